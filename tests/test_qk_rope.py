"""The fused QK-norm + RoPE CPU op (csrc/qk_rope_cpu.cpp, minigpt.attention.qk_rope) against a
float64 reference of the same math, by the correctness rule of docs/design.md, and the model's
use of it."""

import functools

import pytest
import torch

from minigpt.attention import qk_rope
from minigpt.attention.rule import within_rule
from minigpt.config import GPTConfig
from minigpt.model import GPT, CausalSelfAttention
from minigpt.positions import RotaryEmbedding
from minigpt.runtime import bf16_supported

pytestmark = pytest.mark.skipif(not qk_rope.available(torch.zeros(1)),
                                reason="the compiled module (with the fused op) is not built")


def reference(qkv, n_q, n_k, q_gain, k_gain, pos, theta, eps, norm):
    """The unfused math in qkv's dtype (angles in float64): the split into heads, RMSNorm with
    gain per query and key head, then RoPE of their pairs. Returns q, k, v."""
    B, T, _ = qkv.shape
    x = qkv.reshape(B, T, n_q + 2 * n_k, -1)
    x, v = x[:, :, :n_q + n_k], x[:, :, n_q + n_k:]
    D = x.shape[-1]
    if norm:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ones = torch.ones(D, dtype=x.dtype)
        gains = torch.stack([q_gain if q_gain is not None else ones] * n_q
                            + [k_gain if k_gain is not None else ones] * n_k)
        x = x * gains
    angles = pos.double()[:, None] * theta ** (-torch.arange(0, D, 2).double() / D)[None]
    cos = angles.cos().to(x.dtype)[None, :, None]
    sin = angles.sin().to(x.dtype)[None, :, None]
    a, b = x[..., 0::2], x[..., 1::2]
    qk = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return qk[:, :, :n_q], qk[:, :, n_q:], v


def run(impl, qkv, q_gain, k_gain, douts, dtype, gain_dtype=None):
    """impl's q, k, v of qkv (cast to dtype; the gains to gain_dtype, default dtype) and the
    gradients of qkv and the gains for the output gradients douts."""
    x = qkv.detach().to(dtype).requires_grad_()
    gain_dtype = gain_dtype or dtype
    gains = [g.detach().to(gain_dtype).requires_grad_() if g is not None else None
             for g in (q_gain, k_gain)]
    outs = impl(x, *gains)
    torch.autograd.backward(outs, [d.to(o.dtype) for d, o in zip(douts, outs)])
    return list(outs) + [x.grad] + [g.grad for g in gains if g is not None]


def fused(x, gq, gk, *, shape, out_dtype=torch.float32):
    n_q, n_k, cos, sin, norm = shape
    return qk_rope.qkv_norm_rope(x, n_q, n_k, gq, gk, cos, sin, 1e-6, norm, out_dtype)


def case(B, T, n_q, n_k, D, gains, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, (n_q + 2 * n_k) * D, generator=g) * 2  # a c_attn output
    q_gain = torch.randn(D, generator=g) if gains else None
    k_gain = torch.randn(D, generator=g) if gains else None
    douts = [torch.randn(B, T, n, D, generator=g) for n in (n_q, n_k, n_k)]
    return qkv, q_gain, k_gain, douts


NAMES = ["q", "k", "v", "dqkv", "dq_gain", "dk_gain"]


def fused_and_references(qkv, q_gain, k_gain, douts, n_q, n_k, pos, norm, out_dtype):
    """The fused op's outputs and gradients (qkv read in its dtype, float32 gains, q, k, v in
    out_dtype) and the reference's in float64 and float32, each a list in NAMES' order."""
    D = qkv.shape[-1] // (n_q + 2 * n_k)
    cos, sin = RotaryEmbedding(D, 10000.0).cos_sin(pos)
    impl = functools.partial(fused, shape=(n_q, n_k, cos, sin, norm), out_dtype=out_dtype)
    ref = functools.partial(lambda x, gq, gk: reference(x, n_q, n_k, gq, gk, pos, 10000.0, 1e-6,
                                                        norm))
    return (run(impl, qkv, q_gain, k_gain, douts, qkv.dtype, torch.float32),
            run(ref, qkv, q_gain, k_gain, douts, torch.float64),
            run(ref, qkv, q_gain, k_gain, douts, torch.float32))


@pytest.mark.parametrize("B, T, n_q, n_k, D", [(2, 17, 4, 4, 32), (1, 64, 6, 2, 64),
                                               (3, 5, 2, 1, 16), (2, 33, 3, 3, 80)])
@pytest.mark.parametrize("norm, gains", [(True, True), (True, False), (False, False)],
                         ids=["norm+gains", "norm", "rope-only"])
def test_values_and_gradients_match_float64(B, T, n_q, n_k, D, norm, gains):
    qkv, q_gain, k_gain, douts = case(B, T, n_q, n_k, D, gains, B * 1000 + T * 10 + D)
    pos = torch.arange(3, 3 + T)
    cos, sin = RotaryEmbedding(D, 10000.0).cos_sin(pos)
    impl = functools.partial(fused, shape=(n_q, n_k, cos, sin, norm))
    ref = functools.partial(lambda x, gq, gk: reference(x, n_q, n_k, gq, gk, pos, 10000.0, 1e-6,
                                                        norm))
    out = run(impl, qkv, q_gain, k_gain, douts, torch.float32)
    ref64 = run(ref, qkv, q_gain, k_gain, douts, torch.float64)
    ref32 = run(ref, qkv, q_gain, k_gain, douts, torch.float32)
    for name, f, r64, r32 in zip(NAMES, out, ref64, ref32):
        assert f.shape == r64.shape and f.dtype == torch.float32, name
        verdict = within_rule(f, r32, r64, torch.float32)
        assert verdict.ok, (name, verdict)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_read_in_their_dtype_and_computed_in_float32(dtype):
    """c_attn's output under CPU autocast: q, k, v are float32 from the half-precision values
    (against float64 of those same values), and qkv's gradient comes back in qkv's dtype, as
    the float64 gradient rounded to it."""
    n_q, n_k, D, T = 4, 2, 32, 21
    qkv, q_gain, k_gain, douts = case(2, T, n_q, n_k, D, True, 7)
    qkv = qkv.to(dtype)  # the values the op reads, exactly
    out, ref64, ref32 = fused_and_references(qkv, q_gain, k_gain, douts, n_q, n_k,
                                             torch.arange(T), True, torch.float32)
    assert [t.dtype for t in out[:3]] == [torch.float32] * 3 and out[3].dtype == dtype
    for name, f, r64, r32 in zip(NAMES, out, ref64, ref32):
        if name == "dqkv":  # float64's gradient rounded once to dtype: within half an ulp more
            r32 = r64.to(dtype)
        verdict = within_rule(f, r32, r64, torch.float32 if name != "dqkv" else dtype)
        assert verdict.ok, (name, verdict)


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm, gains", [(True, True), (True, False), (False, False)],
                         ids=["norm", "norm-no-gains", "rope-only"])
@pytest.mark.parametrize("D", [32, 20, 80])
def test_bfloat16_outputs_are_rounded_once_and_bfloat16_gradients_read(in_dtype, norm, gains, D):
    """out_dtype bfloat16 (what the bf16 attention kernels take under CPU autocast): q, k, v
    are the float64 values rounded once to bfloat16, within half an ulp more; the bfloat16
    output gradients (drawn as bfloat16 values, so both sides read the same numbers) give qkv's
    and the gains' gradients as float32 arithmetic does. bfloat16 in and out runs the AVX-512
    rows where the CPU has them (csrc/cpu/qk_rope_avx512.h): head dims of 16 lanes and less."""
    n_q, n_k, T = 4, 2, 19
    qkv, q_gain, k_gain, douts = case(3, T, n_q, n_k, D, gains, 11)
    qkv = qkv.to(in_dtype)  # the values the op reads, exactly
    douts = [d.bfloat16() for d in douts]
    out, ref64, ref32 = fused_and_references(qkv, q_gain, k_gain, douts, n_q, n_k,
                                             torch.arange(5, 5 + T), norm, torch.bfloat16)
    assert [t.dtype for t in out[:3]] == [torch.bfloat16] * 3 and out[3].dtype == in_dtype
    # The dtype each result is stored in: q, k, v bfloat16, qkv's gradient qkv's, gains float32.
    stored = dict(q=torch.bfloat16, k=torch.bfloat16, v=torch.bfloat16, dqkv=in_dtype)
    for name, f, r64, r32 in zip(NAMES, out, ref64, ref32):
        dtype = stored.get(name, torch.float32)
        if dtype == torch.bfloat16:
            r32 = r64.to(dtype)  # float64's value rounded once to dtype
        verdict = within_rule(f, r32, r64, dtype)
        assert verdict.ok, (name, verdict)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gradients_of_any_layout_are_read(out_dtype):
    """Upstream gradients the op's rows cannot read in place (a sum's expanded gradient, whose
    strides are 0; one whose last dimension is strided) give the gradient that the same values,
    contiguous, give."""
    B, T, n_q, n_k, D = 2, 7, 2, 1, 16
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, T, (n_q + 2 * n_k) * D, generator=g).requires_grad_()
    cos, sin = RotaryEmbedding(D, 10000.0).cos_sin(torch.arange(T))
    q, k, v = qk_rope.qkv_norm_rope(qkv, n_q, n_k, None, None, cos, sin, 1e-6, True, out_dtype)
    summed, = torch.autograd.grad(q.sum() + k.sum() + v.sum(), qkv, retain_graph=True)
    ones, = torch.autograd.grad((q, k, v), qkv, [torch.ones_like(t) for t in (q, k, v)],
                                retain_graph=True)
    assert torch.equal(summed, ones)
    douts = [torch.randn(t.shape[:-1] + (2 * D,), generator=g).to(out_dtype)[..., ::2]
             for t in (q, k, v)]
    assert douts[0].stride(-1) == 2
    strided, = torch.autograd.grad((q, k, v), qkv, douts, retain_graph=True)
    dense, = torch.autograd.grad((q, k, v), qkv, [d.contiguous() for d in douts])
    assert torch.equal(strided, dense) and strided.abs().sum() > 0


def test_bad_inputs_raise_one_line_errors():
    qkv = torch.randn(2, 8, 96)
    cos, sin = RotaryEmbedding(16, 10000.0).cos_sin(torch.arange(8))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        qk_rope.qkv_norm_rope(qkv.double(), 2, 2, None, None, cos, sin, 1e-6, True)
    with pytest.raises(RuntimeError, match="must make qkv's width 96"):
        qk_rope.qkv_norm_rope(qkv, 4, 4, None, None, cos, sin, 1e-6, True)
    with pytest.raises(RuntimeError, match="cos and sin"):
        qk_rope.qkv_norm_rope(qkv, 2, 2, None, None, cos[:4], sin[:4], 1e-6, True)
    q, k, v = qk_rope.qkv_norm_rope(qkv.requires_grad_(), 2, 2, None, None, cos, sin, 1e-6,
                                    True)
    with pytest.raises(RuntimeError, match="dq must be \\(2, 8, 2, 16\\)"):
        torch.ops.minigpt.qkv_norm_rope_backward(
            q[:, :4].detach(), k.detach(), v.detach(), qkv.detach(), torch.empty(0), 2, 2, 16,
            None, None, cos, sin, False)
    with pytest.raises(RuntimeError, match="all float32 or all bfloat16"):
        torch.ops.minigpt.qkv_norm_rope_backward(
            q.detach().bfloat16(), k.detach(), v.detach(), qkv.detach(), torch.empty(0), 2, 2,
            16, None, None, cos, sin, False)
    with pytest.raises(RuntimeError, match="out_dtype must be float32 or bfloat16"):
        torch.ops.minigpt.qkv_norm_rope_forward(qkv.detach(), 2, 2, 16, None, None, cos, sin,
                                                1e-6, True, torch.float16)
    with pytest.raises(ValueError, match="out_dtype must be torch.float32 or torch.bfloat16"):
        qk_rope.qkv_norm_rope(qkv, 2, 2, None, None, cos, sin, 1e-6, True, torch.float16)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_model_uses_the_fused_op_and_matches_the_pytorch_code(monkeypatch, qk_norm):
    """The attention layer with the fused op and with the PyTorch code: the same q, k, v and
    gradients to float32 rounding; the fused op is what ran."""
    cfg = GPTConfig(vocab_size=65, block_size=32, n_layer=1, n_head=4, n_kv_head=2, n_embd=64,
                    qk_norm=qk_norm)
    torch.manual_seed(0)
    attn = CausalSelfAttention(cfg)
    if qk_norm:
        with torch.no_grad():
            attn.q_norm.weight.normal_()
            attn.k_norm.weight.normal_()
    x = torch.randn(3, 19, 64)
    pos = torch.arange(19)
    calls = []
    fused_fn = qk_rope.qkv_norm_rope
    monkeypatch.setattr(qk_rope, "qkv_norm_rope", lambda *a: calls.append(1) or fused_fn(*a))
    results = []
    for fused in (True, False):
        monkeypatch.setattr(qk_rope, "available", lambda *a, on=fused: on)
        attn.zero_grad()
        xx = x.clone().requires_grad_()
        q, k, v = attn.qkv(xx, pos)
        weights = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i))
                   for i, t in enumerate((q, k, v))]
        torch.autograd.backward([q, k, v], weights)
        grads = [xx.grad, attn.c_attn.weight.grad.clone()]
        if qk_norm:
            grads += [attn.q_norm.weight.grad.clone(), attn.k_norm.weight.grad.clone()]
        results.append([q, k, v] + grads)
    assert len(calls) == 1
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_naive_backend_keeps_the_pytorch_code(monkeypatch):
    """A model on the readable "naive" backend never calls compiled code."""
    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32,
                          qk_norm=True, attn_backend="naive"))
    monkeypatch.setattr(qk_rope, "qkv_norm_rope", lambda *a: pytest.fail("fused op called"))
    model(torch.randint(65, (2, 16)))


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")),
                    reason="no bf16 dot-product instructions: attention stays float32")
def test_model_under_autocast_with_bf16_attention_gets_bfloat16_from_the_fused_op(monkeypatch):
    """Under CPU autocast with bf16 attention (cpu_autocast_dtype bfloat16), the layer takes
    bfloat16 q, k, v from the fused op, equal to the PyTorch code's to bfloat16 rounding, and
    the gradients of x and the gains agree to bfloat16 rounding."""
    monkeypatch.setenv("MINIGPT_CPU_AUTOCAST_ATTENTION", "bfloat16")
    cfg = GPTConfig(vocab_size=65, block_size=32, n_layer=1, n_head=4, n_embd=64, qk_norm=True)
    torch.manual_seed(1)
    attn = CausalSelfAttention(cfg)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 23, 64)
    pos = torch.arange(23)
    calls = []
    fused_fn = qk_rope.qkv_norm_rope
    monkeypatch.setattr(qk_rope, "qkv_norm_rope", lambda *a: calls.append(a[-1]) or fused_fn(*a))
    available = qk_rope.available
    results = []
    for fused in (True, False):
        monkeypatch.setattr(qk_rope, "available", lambda *a, on=fused: on and available(*a))
        attn.zero_grad()
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q, k, v = attn.qkv(xx, pos)
        weights = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i))
                   for i, t in enumerate((q, k, v))]
        torch.autograd.backward([q, k, v], [w.to(t.dtype) for w, t in zip(weights, (q, k, v))])
        results.append([q, k, v, xx.grad, attn.q_norm.weight.grad.clone(),
                        attn.k_norm.weight.grad.clone()])
    assert calls == [torch.bfloat16]
    assert all(t.dtype == torch.bfloat16 for t in results[0][:3] + results[1][:3])
    for a, b in zip(*results):
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)
