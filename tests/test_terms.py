"""ALiBi slopes and the sliding window (attention's alibi_slopes= and window=): every backend
against the float64 reference, docs/design.md's rule in float32, gradcheck, the decode path, the
skipping of key tiles outside the window, opcheck, and the errors."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minigpt
from minigpt.attention import _ext
from minigpt.attention import attention, available_backends

from conftest import ext_required
from reference import check_rule, grad_scale, max_err, rand_qkv, reference_attention

EXT = _ext.unavailable_reason() is None
needs_ext = pytest.mark.skipif(not EXT and not ext_required(),
                               reason=f"minigpt._C unavailable: {_ext.unavailable_reason()}")

# (B, Hq, Hkv, Tq, Tk, D): odd sizes over several 64-key tiles, GQA and MQA, Tq < Tk, decode
# steps (Tq <= 4 takes the kernels' decode path).
SHAPES = [
    (2, 4, 2, 67, 67, 16),
    (1, 4, 1, 130, 200, 64),
    (1, 6, 3, 1, 300, 32),
    (2, 2, 2, 3, 90, 40),
    (1, 2, 2, 200, 200, 80),
]
WINDOWS = [None, 1, 17, 64, 1000]


def slopes(Hq, seed=0):
    """Fresh random positive slopes, (Hq,) float32: ALiBi's are powers of 1/2, any work."""
    return torch.rand(Hq, generator=torch.Generator().manual_seed(seed)) * 0.5 + 0.01


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


@pytest.mark.parametrize("backend", minigpt.BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("alibi", [False, True])
def test_float64_matches_reference(backend, shape, window, alibi):
    if backend == "ext" and not EXT and not ext_required():
        pytest.skip(f"minigpt._C unavailable: {_ext.unavailable_reason()}")
    q, k, v = rand_qkv(*shape, dtype=torch.float64, layout="transposed", seed=sum(shape))
    s = slopes(shape[1]) if alibi else None
    out = attention(q, k, v, alibi_slopes=s, window=window, backend=backend)
    ref = reference_attention(q, k, v, True, None, s, window)
    assert out.shape == q.shape and out.dtype == torch.float64
    assert max_err(out, ref) < 1e-12
    dout = torch.randn_like(out)
    for g, r in zip(_grads(out, (q, k, v), dout), _grads(ref, (q, k, v), dout)):
        assert max_err(g, r) < 1e-11


@pytest.mark.parametrize("backend", minigpt.BACKENDS)
@pytest.mark.parametrize("shape", [(1, 4, 2, 17, 40, 16), (1, 2, 1, 2, 30, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_alibi_without_causal_mask(backend, shape):
    """Non-causal ALiBi: keys after the query get a positive bias, slope * (j - i')."""
    if backend == "ext" and not EXT and not ext_required():
        pytest.skip(f"minigpt._C unavailable: {_ext.unavailable_reason()}")
    q, k, v = rand_qkv(*shape, dtype=torch.float64, seed=3)
    s = slopes(shape[1], seed=1)
    out = attention(q, k, v, causal=False, alibi_slopes=s, backend=backend)
    ref = reference_attention(q, k, v, False, None, s)
    assert max_err(out, ref) < 1e-12
    dout = torch.randn_like(out)
    for g, r in zip(_grads(out, (q, k, v), dout), _grads(ref, (q, k, v), dout)):
        assert max_err(g, r) < 1e-11


@pytest.mark.parametrize("backend", [b for b in minigpt.BACKENDS if b != "naive"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("window, alibi", [(None, True), (17, False), (64, True)])
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_float32_obeys_rule(backend, shape, window, alibi, layout):
    if backend == "ext" and not EXT and not ext_required():
        pytest.skip(f"minigpt._C unavailable: {_ext.unavailable_reason()}")
    q, k, v = rand_qkv(*shape, layout=layout, seed=7)
    s = slopes(shape[1], seed=2) if alibi else None
    ref = reference_attention(q, k, v, True, None, s, window)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    dref = _grads(ref, (q, k, v), dout.double())
    fast = attention(q, k, v, alibi_slopes=s, window=window, backend=backend)
    naive = attention(q, k, v, alibi_slopes=s, window=window, backend="naive")
    check_rule("out", fast, naive, ref, torch.float32)
    for name, gf, gn, gr in zip("qkv", _grads(fast, (q, k, v), dout),
                                _grads(naive, (q, k, v), dout), dref):
        check_rule(f"d{name}", gf, gn, gr, torch.float32, grad_scale(dref))


@needs_ext
@pytest.mark.parametrize("shape", [(1, 4, 2, 9, 9, 8), (1, 2, 1, 3, 11, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gradcheck(shape):
    q, k, v = rand_qkv(*shape, dtype=torch.float64, seed=5)
    s = slopes(shape[1]).double()
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention(q, k, v, alibi_slopes=s, window=4, backend="ext"), (q, k, v))


@needs_ext
@pytest.mark.parametrize("Tq", [1, 4])
@pytest.mark.parametrize("window", [None, 300, 2000])
def test_decode_path_splits_keys_with_terms(Tq, window, num_threads):
    """Decode steps against a long cache, cut into chunks merged by lse (more than one chunk
    with 3 threads), with ALiBi and a window: out and lse against float64."""
    q, k, v = rand_qkv(1, 4, 2, Tq, 1500, 64, dtype=torch.float64, seed=Tq,
                       requires_grad=False)
    s = slopes(4, seed=4)
    out, lse = torch.ops.minigpt.attention_forward(q, k, v, True, 0.125, s, window or 0)
    ref = reference_attention(q, k, v, True, 0.125, s, window)
    assert max_err(out, ref) < 1e-12
    from reference import reference_scores
    ref_lse = torch.logsumexp(reference_scores(q, k, True, 0.125, s, window), dim=-1)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-6)


@needs_ext
@pytest.mark.parametrize("Tq, Tk, window", [(64, 1000, 32), (1, 1000, 100), (3, 700, 64),
                                            (130, 1100, 200)])
def test_keys_outside_the_window_are_never_read(Tq, Tk, window):
    """The kernels skip key tiles wholly outside every query's window: NaN keys and values
    there (up to a multiple of 128 keys, so that no tile of the kernels' sizes, 32 to 128,
    holds both them and a visible key) change nothing, and their gradients are exactly 0.
    A kernel that visited them and masked the scores afterwards would return NaN."""
    q, k, v = rand_qkv(1, 4, 2, Tq, Tk, 32, seed=Tq)
    first_visible = Tk - Tq - window + 1  # the first key that query 0 sees
    hidden = first_visible // 128 * 128
    assert hidden > 0
    with torch.no_grad():
        k_nan, v_nan = k.clone(), v.clone()
        k_nan[:, :, :hidden] = float("nan")
        v_nan[:, :, :hidden] = float("nan")
    k_nan.requires_grad_(), v_nan.requires_grad_()
    out = attention(q, k_nan, v_nan, window=window, backend="ext")
    ref = reference_attention(q, k, v, True, None, None, window)
    assert torch.isfinite(out).all()
    assert max_err(out, ref) < 1e-5
    dq, dk, dv = torch.autograd.grad(out, (q, k_nan, v_nan), torch.randn_like(out))
    assert torch.isfinite(dq).all()
    assert torch.equal(dk[:, :, :hidden], torch.zeros_like(dk[:, :, :hidden]))
    assert torch.equal(dv[:, :, :hidden], torch.zeros_like(dv[:, :, :hidden]))
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


@needs_ext
def test_opcheck_with_terms():
    q, k, v = rand_qkv(2, 4, 2, 8, 11, 16, seed=5)
    s = slopes(4)
    torch.library.opcheck(torch.ops.minigpt.attention_forward.default,
                          (q, k, v, True, 0.25, s, 5))
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = torch.ops.minigpt.attention_forward(q, k, v, True, 0.25, s, 5)
    torch.library.opcheck(torch.ops.minigpt.attention_backward.default,
                          (torch.randn_like(out), q, k, v, out, lse, True, 0.25, s, 5))


@needs_ext
@pytest.mark.parametrize("alibi, window", [(True, 3), (False, 3), (True, 0)])
def test_lse_gradient_with_terms(alibi, window):
    """The lse output is differentiable with ALiBi and a window too (ops.py's dlse term): its
    gradients match those of the float64 reference's log-sum-exp. (gradcheck cannot judge it:
    lse is float32 by contract, too coarse for finite differences.)"""
    from reference import reference_scores
    q, k, v = rand_qkv(1, 2, 2, 6, 9, 8, dtype=torch.float64, seed=9)
    s = slopes(2) if alibi else None
    _, lse = torch.ops.minigpt.attention_forward(q, k, v, True, 0.3, s, window)
    w = torch.randn(lse.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((lse * w).sum(), (q, k))
    ref = torch.logsumexp(reference_scores(q, k, True, 0.3, s, window or None), dim=-1)
    ref_grads = torch.autograd.grad((ref * w.double()).sum(), (q, k))
    for g, r in zip(grads, ref_grads):
        assert max_err(g, r) < 1e-12


@needs_ext
def test_build_info_declares_the_terms():
    assert set(_ext.build_info()["features"]["cpu"]) == {"alibi", "window"}


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(window=0), ValueError, r"window must be a positive int"),
    (dict(window=2.5), ValueError, r"window must be a positive int"),
    (dict(window=True), ValueError, r"window must be a positive int"),
    (dict(window=4, causal=False), ValueError, r"window needs causal=True"),
    (dict(alibi_slopes=[0.5, 0.25, 0.1, 0.1]), TypeError, r"alibi_slopes must be a torch.Tensor"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must be a floating \(Hq,\)"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.int64)), ValueError, r"floating"),
    (dict(alibi_slopes=torch.ones(4, 1)), ValueError, r"\(Hq,\) = \(4,\)"),
])
@pytest.mark.parametrize("backend", minigpt.BACKENDS)
def test_bad_terms_raise(kwargs, exc, pattern, backend):
    q, k, v = rand_qkv(1, 4, 2, 8, 8, 16, requires_grad=False)
    with pytest.raises(exc, match=pattern):
        attention(q, k, v, backend=backend, **kwargs)


@needs_ext
@pytest.mark.parametrize("args, pattern", [
    ((True, 0.1, torch.ones(3), 0), r"alibi_slopes must have shape \(Hq,\)"),
    ((True, 0.1, torch.ones(4).double(), 0), r"contiguous float32"),
    ((True, 0.1, torch.ones(8)[::2], 0), r"contiguous float32"),
    ((True, 0.1, None, -1), r"window must be >= 0"),
    ((False, 0.1, None, 3), r"window needs causal=True"),
])
def test_direct_op_calls_check_the_terms(args, pattern):
    q, k, v = rand_qkv(1, 4, 2, 8, 8, 16, requires_grad=False)
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.minigpt.attention_forward(q, k, v, *args)


BACKENDS = available_backends(torch.device("cpu"), torch.float32)
if ext_required() and "ext" not in BACKENDS:
    BACKENDS.append("ext")


@st.composite
def windowed_inputs(draw):
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.integers(1, 3))
    Tk = draw(st.one_of(st.integers(1, 20), st.integers(60, 200)))
    Tq = draw(st.integers(1, Tk))
    D = draw(st.sampled_from([8, 19, 32, 64]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    q, k, v = rand_qkv(draw(st.integers(1, 2)), Hq, Hkv, Tq, Tk, D, dtype=dtype, seed=seed,
                       layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])))
    window = draw(st.one_of(st.none(), st.integers(1, 2 * Tk)))
    s = slopes(Hq, seed) if draw(st.booleans()) else None
    return q, k, v, s, window, draw(st.sampled_from(BACKENDS))


@settings(max_examples=30, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(windowed_inputs())
def test_property_matches_reference(case):
    """Random shapes, strides, dtypes, windows and slopes: the reference by the rule."""
    q, k, v, s, window, backend = case
    out = attention(q, k, v, alibi_slopes=s, window=window, backend=backend)
    ref = reference_attention(q, k, v, True, None, s, window)
    assert torch.isfinite(out).all()
    dout = torch.randn_like(out)
    grads = _grads(out, (q, k, v), dout)
    ref_grads = _grads(ref, (q, k, v), dout.double())
    if q.dtype == torch.float64:
        assert max_err(out, ref) < 1e-10
        for g, r in zip(grads, ref_grads):
            assert max_err(g, r) < 1e-9
        return
    naive = attention(q, k, v, alibi_slopes=s, window=window, backend="naive")
    naive_grads = _grads(naive, (q, k, v), dout)
    check_rule(f"{backend} out", out, naive, ref, q.dtype)
    for name, g, n, r in zip("qkv", grads, naive_grads, ref_grads):
        check_rule(f"{backend} d{name}", g, n, r, q.dtype, grad_scale(ref_grads))
