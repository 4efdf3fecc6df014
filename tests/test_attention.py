"""attention(): every backend against the float64 reference, and the errors of docs/design.md."""

import math

import pytest
import torch

import minigpt
from minigpt.attention import attention, attention_backends

from reference import check_rule, grad_scale, max_err, rand_qkv, reference_attention

# The backends written in PyTorch: every backend of the registry but the compiled one.
PY_BACKENDS = [name for name in minigpt.BACKENDS if name != "ext"]

# (B, Hq, Hkv, Tq, Tk, D): odd sizes, Tq < Tk (bottom-right causal), GQA and MQA, a decode step.
SHAPES = [
    (2, 4, 4, 17, 17, 16),
    (1, 2, 2, 1, 1, 40),
    (1, 4, 2, 129, 129, 64),
    (2, 4, 1, 33, 33, 80),
    (1, 2, 2, 17, 129, 32),
    (1, 6, 3, 1, 50, 64),
]


def _grads(out, inputs, seed=1):
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, dout)


@pytest.mark.parametrize("backend", PY_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False])
def test_float64_matches_reference(backend, shape, causal):
    q, k, v = rand_qkv(*shape, dtype=torch.float64)
    out = attention(q, k, v, causal=causal, backend=backend)
    ref = reference_attention(q, k, v, causal)
    assert out.shape == q.shape and out.dtype == torch.float64
    assert max_err(out, ref) < 1e-12
    for g, gr in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        assert max_err(g, gr) < 1e-11


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_float32_obeys_rule(layout, shape, causal):
    q, k, v = rand_qkv(*shape, layout=layout, seed=3)
    ref = reference_attention(q, k, v, causal)
    dref = _grads(ref, (q, k, v))
    fast = attention(q, k, v, causal=causal, backend="sdpa")
    naive = attention(q, k, v, causal=causal, backend="naive")
    check_rule("out", fast, naive, ref, torch.float32)
    for name, gf, gn, gr in zip("qkv", _grads(fast, (q, k, v)), _grads(naive, (q, k, v)), dref):
        check_rule(f"d{name}", gf, gn, gr, torch.float32, grad_scale(dref))


def test_causal_is_bottom_right_aligned():
    # Tq=2, Tk=5: query 0 sees keys 0..3, query 1 sees keys 0..4 (not the top-left triangle).
    q, k, v = rand_qkv(1, 1, 1, 2, 5, 8, dtype=torch.float64, requires_grad=False)
    v2 = v.clone()
    v2[:, :, 4] += 100.0  # only query 1 may see key 4
    for backend in PY_BACKENDS:
        a = attention(q, k, v, backend=backend)
        b = attention(q, k, v2, backend=backend)
        assert torch.equal(a[:, :, 0], b[:, :, 0]), backend
        assert not torch.allclose(a[:, :, 1], b[:, :, 1]), backend


def test_scale_argument():
    q, k, v = rand_qkv(1, 2, 2, 9, 9, 16, dtype=torch.float64, requires_grad=False)
    for backend in PY_BACKENDS:
        out = attention(q, k, v, scale=0.3, backend=backend)
        assert max_err(out, reference_attention(q, k, v, True, 0.3)) < 1e-12


def test_default_backend_and_env(monkeypatch):
    q, k, v = rand_qkv(1, 2, 2, 5, 5, 16, requires_grad=False)
    monkeypatch.setenv("MINIGPT_ATTENTION_BACKEND", "naive")
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, backend="naive"))
    monkeypatch.setenv("MINIGPT_ATTENTION_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MINIGPT_ATTENTION_BACKEND"):
        attention(q, k, v)


def test_attention_backends_report():
    report = attention_backends()
    for name in minigpt.BACKENDS:
        assert set(report[name]) >= {"available", "reason"}
    assert report["sdpa"]["available"] and report["naive"]["available"]
    assert report["ext"]["available"] == (report["ext"]["reason"] is None)
    assert report["default"] in minigpt.BACKENDS


def test_registry_is_the_one_list_of_backends():
    from minigpt.attention import REGISTRY, available_backends, unavailable_reason
    from minigpt.cli.train import build_parser

    assert minigpt.BACKENDS == tuple(REGISTRY) == ("ext", "sdpa", "naive")
    choices = next(a.choices for a in build_parser()._actions if a.dest == "attn_backend")
    assert tuple(choices) == minigpt.BACKENDS
    cpu = torch.device("cpu")
    report = attention_backends()
    assert available_backends(cpu, torch.float32) == [
        n for n in minigpt.BACKENDS if report[n]["available"]]
    assert unavailable_reason("ext", cpu, torch.int32) is not None  # no integer kernels
    with pytest.raises(ValueError, match="backend must be one of"):
        unavailable_reason("flash", cpu, torch.float32)


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("backend", PY_BACKENDS)
@pytest.mark.parametrize("args, kwargs, exc, pattern", [
    ((_t(2, 4, 8), _t(2, 4, 8, 16), _t(2, 4, 8, 16)), {}, ValueError, r"q must be 4-d.*\(2, 4, 8\)"),
    ((_t(2, 4, 8, 16), _t(3, 4, 8, 16), _t(3, 4, 8, 16)), {}, ValueError, r"batch size"),
    ((_t(2, 4, 8, 16), _t(2, 4, 8, 32), _t(2, 4, 8, 32)), {}, ValueError, r"head dim"),
    ((_t(2, 4, 8, 16), _t(2, 4, 8, 16), _t(2, 4, 9, 16)), {}, ValueError, r"k and v.*same shape"),
    ((_t(2, 4, 8, 16), _t(2, 3, 8, 16), _t(2, 3, 8, 16)), {}, ValueError, r"multiple"),
    ((_t(2, 4, 9, 16), _t(2, 4, 8, 16), _t(2, 4, 8, 16)), {}, ValueError, r"Tq <= Tk"),
    ((_t(2, 4, 8, 16), _t(2, 4, 8, 16, dtype=torch.float64), _t(2, 4, 8, 16)), {}, TypeError,
     r"same dtype"),
    ((torch.ones(2, 4, 8, 16, dtype=torch.int64),) * 3, {}, TypeError, r"floating dtype"),
    ((_t(2, 4, 8, 16).numpy(), _t(2, 4, 8, 16), _t(2, 4, 8, 16)), {}, TypeError, r"torch.Tensor"),
    ((_t(2, 4, 8, 16), _t(2, 4, 8, 16), _t(2, 4, 8, 16)), {"scale": -1.0}, ValueError, r"scale"),
    ((_t(2, 4, 8, 16), _t(2, 4, 8, 16), _t(2, 4, 8, 16)), {"scale": math.nan}, ValueError,
     r"scale"),
])
def test_bad_input(backend, args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        attention(*args, backend=backend, **kwargs)


def test_non_causal_allows_tq_greater_than_tk():
    q, k, v = rand_qkv(1, 2, 2, 9, 4, 16, dtype=torch.float64, requires_grad=False)
    out = attention(q, k, v, causal=False, backend="naive")
    assert max_err(out, reference_attention(q, k, v, False)) < 1e-12


def test_unknown_backend():
    q, k, v = rand_qkv(1, 2, 2, 4, 4, 16, requires_grad=False)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        attention(q, k, v, backend="flash")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_autocast_computes_in_float32(dtype, monkeypatch):
    """Under torch.autocast("cpu") with MINIGPT_CPU_AUTOCAST_ATTENTION=float32 (also the default
    for float16, and for bfloat16 on a CPU without bf16 instructions), low-precision CPU inputs
    run in float32 (on "ext" where it is built) and give float32 out; the float64 reference of
    the same (rounded) inputs agrees to float32 accuracy, and gradients come back in the inputs'
    dtype. (Where bf16 stays bf16, the default on CPUs with bf16 dot products:
    tests/test_cpu16.py.)"""
    q, k, v = rand_qkv(2, 4, 2, 33, 33, 32, dtype=dtype, seed=4)
    import dataclasses

    monkeypatch.setenv("MINIGPT_CPU_AUTOCAST_ATTENTION", "float32")

    from minigpt.attention import REGISTRY

    calls = []
    default = minigpt.attention_backends()["default"]  # "ext" where built
    entry = REGISTRY[default]
    monkeypatch.setitem(REGISTRY, default, dataclasses.replace(
        entry, fn=lambda *a: calls.append(a[0].dtype) or entry.fn(*a)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, causal=True)
    assert calls == [torch.float32] and out.dtype == torch.float32
    ref = reference_attention(q.double(), k.double(), v.double(), causal=True)
    assert max_err(out, ref) < 1e-5
    dq, dk, dv = _grads(out, (q, k, v))
    assert dq.dtype == dk.dtype == dv.dtype == dtype
    # Outside autocast the inputs' dtype is kept.
    assert attention(q, k, v, causal=True).dtype == dtype
