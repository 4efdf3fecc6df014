"""The CPU kernels in bfloat16 and float16 (csrc/attention_cpu_bf16.cpp): out and every gradient
within the correctness rule (at most 2x the naive computation's error in the same dtype, both
against float64) over sizes, layouts, GQA, decode steps, ALiBi and windows; opcheck; and what
attention() computes under CPU autocast."""

import dataclasses
import importlib

import pytest
import torch

import minigpt
from minigpt.attention import _ext
from minigpt.attention import REGISTRY, attention, cpu_autocast_dtype

from conftest import ext_required
from reference import check_rule, grad_scale, max_err, rand_qkv, reference_attention

EXT = _ext.unavailable_reason() is None
backends_module = importlib.import_module("minigpt.attention.backends")
needs_ext = pytest.mark.skipif(not EXT and not ext_required(),
                               reason=f"minigpt._C unavailable: {_ext.unavailable_reason()}")
DTYPES = [torch.bfloat16, torch.float16]


def _grads(out, inputs, seed=1):
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, dout)


def _check(shape, causal, dtype, layout="contiguous", slopes=None, window=None):
    q, k, v = rand_qkv(*shape, dtype=dtype, layout=layout, seed=sum(shape) + len(layout))
    terms = dict(alibi_slopes=slopes, window=window)
    fast = attention(q, k, v, causal=causal, backend="ext", **terms)
    assert fast.shape == q.shape and fast.dtype == dtype
    naive = attention(q, k, v, causal=causal, backend="naive", **terms)
    ref = reference_attention(q, k, v, causal, None, slopes, window)
    check_rule("out", fast, naive, ref, dtype)
    ref_grads = _grads(ref, (q, k, v))
    for name, g, n, r in zip("qkv", _grads(fast, (q, k, v)), _grads(naive, (q, k, v)),
                             ref_grads):
        assert g.dtype == dtype
        # Where each row sees one key (causal T = 1, window 1), dq and dk are exactly 0, and so
        # is the naive path's (P = 1, dP - delta = 0). The kernel forms dP and delta in float32
        # in different orders, so its dS is float32 rounding: hold it to float32's floor (as
        # tests/test_cuda_terms.py does).
        exact = max_err(n, r) == 0.0
        check_rule(f"d{name}", g, n, r, torch.float32 if exact else dtype, grad_scale(ref_grads))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 17, 129, 300])
@pytest.mark.parametrize("D", [16, 40, 64, 80, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_grid(dtype, T, D, causal):
    _check((1, 2, 2, T, T, D), causal, dtype)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [
    (2, 4, 2, 17, 129, 64),   # Tq < Tk, GQA
    (1, 6, 1, 1, 300, 32),    # a decode step, multi-query
    (2, 3, 3, 4, 70, 64),     # four query rows against a cache
    (2, 8, 4, 129, 129, 80),
    (1, 3, 3, 5, 1000, 40),
    (1, 2, 1, 33, 33, 17),    # odd head dim
], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("causal", [True, False])
def test_gqa_strides_and_bottom_right_causal(dtype, shape, layout, causal):
    _check(shape, causal, dtype, layout)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [None, 1, 16])
def test_alibi_and_window(dtype, window):
    slopes = torch.rand(4, generator=torch.Generator().manual_seed(3)) * 0.5
    _check((2, 4, 2, 150, 150, 32), True, dtype, "transposed", slopes, window)
    _check((1, 4, 4, 70, 70, 64), True, dtype, "contiguous", None, window)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, window", [
    ((2, 4, 2, 256, 256, 32), None),   # the default model's attention: diagonal tiles
    ((1, 2, 1, 70, 200, 64), None),    # Tq < Tk: every row sees the first 130 keys
    ((1, 2, 2, 130, 390, 32), None),   # Tq < Tk over three backward key tiles
    ((1, 4, 2, 300, 300, 48), 100),    # a window cuts each row's first keys
    ((1, 2, 2, 65, 65, 34), 7),
], ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else f"window{x}")
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_causal_tiles_skip_only_masked_products(dtype, shape, window, layout):
    # Under a causal mask without ALiBi, the bf16 tile products stop at each row's last visible
    # key and start dK, dV at each key's first query (dpbf16::RowLimits): what they skip must
    # be exactly what the mask zeroes, at every tile edge.
    _check(shape, True, dtype, layout, None, window)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    q, k, v = rand_qkv(2, 4, 2, 8, 11, 16, dtype=dtype, seed=5)
    torch.library.opcheck(torch.ops.minigpt.attention_forward.default, (q, k, v, True, 0.25))
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = torch.ops.minigpt.attention_forward(q, k, v, True, 0.25)
    assert lse.dtype == torch.float32
    torch.library.opcheck(torch.ops.minigpt.attention_backward.default,
                          (torch.randn_like(out), q, k, v, out, lse, True, 0.25))


@needs_ext
def test_bf16_kernels_and_onednn_share_threads():
    """Our bf16 kernels (on AMX tiles where the CPU has them: build_info()["bf16_products"]),
    oneDNN's bf16 matmul and PyTorch's SDPA (both on AMX there), interleaved on the same threads,
    each give the same bits every round and ours stays within the rule: our workers configure
    the tile registers for themselves and release them when they end."""
    q, k, v = rand_qkv(2, 4, 4, 200, 200, 64, dtype=torch.bfloat16, seed=11)
    gen = torch.Generator().manual_seed(12)
    a = torch.randn(300, 256, generator=gen).bfloat16()
    b = torch.randn(256, 200, generator=gen).bfloat16()

    def ours():
        out = attention(q, k, v, causal=True, backend="ext")
        return (out.detach(), *_grads(out, (q, k, v)))

    def theirs():
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q.detach(), k.detach(), v.detach(), is_causal=True)
        return a @ b, sdpa

    first = ours(), theirs()
    ref = reference_attention(q, k, v, True, None, None, None)
    naive = attention(q, k, v, causal=True, backend="naive")
    check_rule("out", first[0][0], naive.detach(), ref, torch.bfloat16)
    for _ in range(3):
        for got, want in zip((*ours(), *theirs()), (*first[0], *first[1])):
            assert torch.equal(got, want)


@needs_ext
def test_default_backend_and_build_info():
    assert {"bfloat16", "float16"} <= set(_ext.build_info()["dtypes"]["cpu"])
    assert minigpt.attention_backends()["default"] == "ext"
    calls = []
    entry = REGISTRY["ext"]
    q, k, v = rand_qkv(1, 2, 2, 9, 9, 16, dtype=torch.bfloat16, requires_grad=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(REGISTRY, "ext", dataclasses.replace(
            entry, fn=lambda *a: calls.append(a[0].dtype) or entry.fn(*a)))
        assert attention(q, k, v).dtype == torch.bfloat16
    assert calls == [torch.bfloat16]


@needs_ext
@pytest.mark.parametrize("setting, bf16_cpu", [("", True), ("", False), ("bfloat16", True),
                                               ("bfloat16", False), ("float32", True)])
def test_cpu_autocast_dtype(setting, bf16_cpu, monkeypatch):
    """Under CPU autocast attention computes bfloat16 inputs in bfloat16 on "ext" where the CPU
    has bf16 dot products (the default, or MINIGPT_CPU_AUTOCAST_ATTENTION=bfloat16), else in
    float32 (=float32, or a CPU without them); on "sdpa", and for float16, always in float32.
    Either way the result is within the rule of the dtype it was computed in."""
    monkeypatch.setenv("MINIGPT_CPU_AUTOCAST_ATTENTION", setting)
    monkeypatch.setattr(backends_module, "bf16_supported", lambda device: bf16_cpu)
    want = torch.bfloat16 if setting != "float32" and bf16_cpu else torch.float32
    assert cpu_autocast_dtype(torch.bfloat16) == want
    assert cpu_autocast_dtype(torch.float16) == torch.float32
    assert cpu_autocast_dtype(torch.bfloat16, "sdpa") == torch.float32
    q, k, v = rand_qkv(2, 4, 2, 33, 33, 32, dtype=torch.bfloat16, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, causal=True)
    assert out.dtype == want
    ref = reference_attention(q, k, v, causal=True)
    naive = attention(q.to(want), k.to(want), v.to(want), backend="naive")
    check_rule("out", out, naive, ref, want)
    assert all(g.dtype == torch.bfloat16 for g in _grads(out, (q, k, v)))


def test_cpu_autocast_setting_is_checked(monkeypatch):
    monkeypatch.setenv("MINIGPT_CPU_AUTOCAST_ATTENTION", "fp8")
    with pytest.raises(ValueError, match="MINIGPT_CPU_AUTOCAST_ATTENTION must be float32 or "
                                         "bfloat16, got 'fp8'"):
        cpu_autocast_dtype(torch.bfloat16)
