"""The CUDA kernels' optional score terms: ALiBi (alibi_slopes) and the sliding window, against a
float64 reference by docs/design.md's rule, for every dtype path, head dim, GQA, Tq < Tk, decode and
the deterministic backward; and the first-use self-check with these terms. Skipped without a GPU."""

import importlib
import math

import pytest
import torch

from minigpt.attention import _ext
from minigpt.attention import attention, naive_attention

from reference import check_rule, grad_scale, max_err, rand_qkv

backends_module = importlib.import_module("minigpt.attention.backends")

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(autouse=True)
def _needs_cuda_kernels():
    if not _ext.build_info().get("cuda"):
        pytest.skip("minigpt._C was built without CUDA kernels")


def reference_terms(q, k, v, causal, scale, slopes=None, window=None):
    """softmax(scale * QK^T - slope_h * (i' - j) + mask) V and its log-sum-exp, in float64 on the
    CPU, written independently of minigpt. i' = i + Tk - Tq; with a window W, query i sees keys
    i' - W < j <= i'. Returns out (B, Hq, Tq, D) and lse (B, Hq, Tq)."""
    q, k, v = (t.cpu().double() for t in (q, k, v))
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    i = torch.arange(Tq)[:, None] + (Tk - Tq)
    j = torch.arange(Tk)[None, :]
    if slopes is not None:
        s = s - slopes.detach().cpu().double()[:, None, None] * (i - j)
    if causal:
        hidden = j > i
        if window is not None:
            hidden = hidden | (j <= i - window)
        s = s.masked_fill(hidden, float("-inf"))
    return torch.einsum("bhij,bhjd->bhid", torch.softmax(s, dim=-1), v), torch.logsumexp(s, -1)


def make_slopes(Hq):
    """Slopes exactly representable in bfloat16 (so the naive path's bias in the same dtype starts
    from the same slopes), of ALiBi's size: 2^-1 .. 2^-8, some times 1.5."""
    return torch.tensor([2.0 ** -(h % 8 + 1) * (1.5 if h % 3 == 1 else 1.0) for h in range(Hq)],
                        device="cuda")


def _inputs(shape, dtype, seed):
    q, k, v = rand_qkv(*shape, dtype=torch.float32, layout="transposed", seed=seed,
                       requires_grad=False)
    return tuple(t.cuda().to(dtype).requires_grad_() for t in (q, k, v))


def _check(shape, dtype, causal, window, alibi, deterministic=False, seed=0):
    """out, lse, dq, dk, dv of the CUDA kernels against the float64 reference (docs/design.md's rule
    for out and the gradients; lse to float32 accuracy). Returns the gradients."""
    q, k, v = _inputs(shape, dtype, seed)
    scale = 1.0 / math.sqrt(shape[-1])
    slopes = make_slopes(shape[1]) if alibi else None
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).cuda().to(dtype)

    out = attention(q, k, v, causal=causal, alibi_slopes=slopes, window=window, backend="ext")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    naive = naive_attention(q, k, v, causal, scale, slopes, window)
    naive_grads = torch.autograd.grad(naive, (q, k, v), dout)

    qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference_terms(qd, kd, vd, causal, scale, slopes, window)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), dout.cpu().double())

    check_rule("out", out.detach().cpu(), naive.detach().cpu(), ref.detach(), dtype)
    for name, g, n, r in zip("qkv", grads, naive_grads, ref_grads):
        # With window=1 each row sees only itself: dq and dk are exactly 0, and so is the naive
        # path's (P = 1, dP - D = 0 exactly). The kernel forms dP and D = rowsum(dO * O) in
        # float32 in different orders, so its dS is float32 rounding: hold it to float32's floor.
        exact = max_err(n.cpu(), r) == 0.0
        check_rule(f"d{name}", g.cpu(), n.cpu(), r, torch.float32 if exact else dtype,
                   grad_scale(ref_grads))

    extra = (slopes, window or 0)
    with torch.no_grad():
        _, lse = torch.ops.minigpt.attention_forward(q, k, v, causal, scale, *extra)
    torch.testing.assert_close(lse.double().cpu(), ref_lse, atol=1e-3, rtol=1e-4)
    return grads


# (B, Hq, Hkv, Tq, Tk, D), causal, window, alibi
CASES = [
    ((2, 4, 2, 200, 200, 64), True, 17, True),     # GQA; packed row tiles with a gap in keys
    ((1, 4, 4, 67, 67, 32), True, 1, False),       # each query sees itself only
    ((1, 8, 2, 80, 80, 128), True, 64, True),
    ((2, 4, 1, 67, 200, 96), True, 64, True),      # Tq < Tk, multi-query
    ((1, 8, 2, 1, 300, 64), True, 17, True),       # a decode step
    ((1, 4, 2, 80, 80, 96), True, 1000, True),     # a window longer than the sequence
    ((1, 6, 3, 200, 200, 32), True, None, True),   # ALiBi with the plain causal mask
    ((1, 4, 2, 200, 200, 128), True, 64, False),   # window alone
    ((1, 4, 2, 67, 130, 64), False, None, True),   # ALiBi without a mask, Tq < Tk
    ((1, 4, 2, 130, 67, 32), False, None, True),   # ALiBi without a mask, Tq > Tk
]


def _case_id(case):
    shape, causal, window, alibi = case
    return "x".join(map(str, shape)) + ("-causal" if causal else "-full") + \
        (f"-w{window}" if window else "") + ("-alibi" if alibi else "")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_cuda_terms_against_float64(dtype, case):
    shape, causal, window, alibi = case
    _check(shape, dtype, causal, window, alibi, seed=sum(shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [((2, 4, 2, 200, 200, 64), True, 17, True),
                                  ((1, 4, 1, 45, 130, 128), True, 64, True),
                                  ((1, 4, 2, 67, 67, 96), False, None, True)], ids=_case_id)
def test_cuda_terms_deterministic_backward(dtype, case):
    """torch.use_deterministic_algorithms(True): the separate dQ kernels with the terms, bitwise
    equal on repeated runs and within the rule."""
    shape, causal, window, alibi = case
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_check(shape, dtype, causal, window, alibi, seed=3) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D, causal, features", [(32, True, ("window",)),
                                                 (64, True, ("alibi", "window")),
                                                 (96, False, ("alibi",)),
                                                 (128, True, ("alibi",))])
def test_self_check_with_terms_passes(dtype, D, causal, features):
    """The first-use self-check passes with the terms, so "ext" is available for them."""
    device = torch.device("cuda")
    assert "alibi" in _ext.build_info()["features"]["cuda"]
    assert "window" in _ext.build_info()["features"]["cuda"]
    assert backends_module._self_check(device, dtype, D, causal, features) is None
    assert backends_module._ext_unavailable_reason(device, dtype, D, causal, features) is None
    assert backends_module.resolve_backend("ext", device, dtype, D, causal, features) == "ext"
