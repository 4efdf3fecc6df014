"""The compiled kernels ("ext", minigpt._C): values and gradients against float64, gradcheck,
opcheck, torch.compile, the fallback when the extension is missing, and direct op calls."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt.attention import _ext
from minigpt.attention import attention, attention_backends
from minigpt.model import GPT, GPTConfig

from conftest import ext_required
from reference import check_rule, grad_scale, max_err, rand_qkv, reference_attention

backends_module = importlib.import_module("minigpt.attention.backends")

EXT = _ext.unavailable_reason() is None
# Where the extension is required (CI), a missing one fails these tests instead of skipping them.
needs_ext = pytest.mark.skipif(not EXT and not ext_required(),
                               reason=f"minigpt._C unavailable: {_ext.unavailable_reason()}")


@pytest.mark.skipif(not ext_required(), reason="MINIGPT_REQUIRE_EXT=1 is not set (CI sets it)")
def test_required_extension_is_available():
    assert _ext.unavailable_reason() is None, _ext.unavailable_reason()
    report = attention_backends()
    assert report["ext"]["available"] is True, report["ext"]
    if not os.environ.get("MINIGPT_ATTENTION_BACKEND"):
        assert report["default"] == "ext", report
    q, k, v = rand_qkv(1, 2, 2, 8, 8, 16, requires_grad=False)
    out, lse = torch.ops.minigpt.attention_forward(q, k, v, True, 0.25)
    assert max_err(out, reference_attention(q, k, v, True, 0.25)) < 1e-5


def _grads(out, inputs, seed=1):
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, dout)


def _check_against_reference(shape, causal, layout="contiguous", dtype=torch.float32):
    q, k, v = rand_qkv(*shape, dtype=dtype, layout=layout, seed=sum(shape))
    ref = reference_attention(q, k, v, causal)
    fast = attention(q, k, v, causal=causal, backend="ext")
    assert fast.shape == q.shape and fast.dtype == dtype
    grads, ref_grads = _grads(fast, (q, k, v)), _grads(ref, (q, k, v))
    if dtype == torch.float64:
        assert max_err(fast, ref) < 1e-12
        for g, r in zip(grads, ref_grads):
            assert max_err(g, r) < 1e-11
        return
    naive = attention(q, k, v, causal=causal, backend="naive")
    check_rule("out", fast, naive, ref, dtype)
    for name, g, n, r in zip("qkv", grads, _grads(naive, (q, k, v)), ref_grads):
        check_rule(f"d{name}", g, n, r, dtype, grad_scale(ref_grads))


@needs_ext
@pytest.mark.parametrize("T", [1, 17, 129, 1000])
@pytest.mark.parametrize("D", [16, 40, 64, 80, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_grid_float32(T, D, causal):
    _check_against_reference((1, 2, 2, T, T, D), causal)


@needs_ext
@pytest.mark.parametrize("shape", [
    (2, 4, 2, 17, 129, 64),   # Tq < Tk, GQA
    (1, 6, 1, 1, 300, 32),    # a decode step, multi-query
    (2, 8, 4, 129, 129, 80),
    (1, 3, 3, 5, 1000, 40),
], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("causal", [True, False])
def test_gqa_strides_and_bottom_right_causal(shape, layout, causal):
    _check_against_reference(shape, causal, layout)


@needs_ext
@pytest.mark.parametrize("shape", [(1, 2, 2, 17, 17, 40), (2, 4, 2, 9, 33, 64),
                                   (1, 2, 1, 1, 17, 128)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False])
def test_float64_exact_and_gradcheck(shape, causal):
    _check_against_reference(shape, causal, "transposed", torch.float64)
    small = tuple(min(s, 5) if i in (3, 4) else s for i, s in enumerate(shape))
    small = small[:3] + (min(small[3], small[4]) if causal else small[3],) + small[4:5] + (8,)
    q, k, v = rand_qkv(*small, dtype=torch.float64, seed=7)
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention(q, k, v, causal=causal, backend="ext"), (q, k, v))


@needs_ext
def test_scale_and_output_strides():
    q, k, v = rand_qkv(2, 2, 2, 7, 7, 16, dtype=torch.float64, requires_grad=False)
    out = attention(q, k, v, scale=0.05, backend="ext")
    assert max_err(out, reference_attention(q, k, v, True, 0.05)) < 1e-12


@needs_ext
def test_lse_is_the_log_sum_exp():
    q, k, v = rand_qkv(1, 2, 2, 9, 12, 16, dtype=torch.float64, requires_grad=False)
    out, lse = torch.ops.minigpt.attention_forward(q, k, v, True, 0.25)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * 0.25
    mask = torch.arange(12)[None, :] > torch.arange(9)[:, None] + 3
    ref = torch.logsumexp(s.masked_fill(mask, float("-inf")), dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 9)
    torch.testing.assert_close(lse.double(), ref, atol=1e-5, rtol=1e-6)


@needs_ext
@pytest.mark.parametrize("causal", [True, False])
def test_opcheck(causal):
    q, k, v = rand_qkv(2, 4, 2, 8, 11 if causal else 6, 16, seed=5)
    torch.library.opcheck(torch.ops.minigpt.attention_forward.default, (q, k, v, causal, 0.25))
    # The backward op has no derivative of its own (no double backward): check it on
    # inputs that do not require grad.
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = torch.ops.minigpt.attention_forward(q, k, v, causal, 0.25)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.minigpt.attention_backward.default,
                          (dout, q, k, v, out, lse, causal, 0.25))


@needs_ext
def test_torch_compile_fullgraph_trains_like_eager():
    def make():
        torch.manual_seed(0)
        return GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=4, n_kv_head=2,
                             n_embd=32, attn_backend="ext"))

    x, y = torch.randint(40, (4, 16)), torch.randint(40, (4, 16))
    losses = {}
    for name in ("eager", "compiled"):
        model = make()
        run = torch.compile(model, fullgraph=True) if name == "compiled" else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[name] = []
        for _ in range(3):
            _, loss = run(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["compiled"] == pytest.approx(losses["eager"], abs=1e-4)
    assert losses["eager"][-1] < losses["eager"][0]


@needs_ext
@pytest.mark.parametrize("call, pattern", [
    (lambda q, k, v: (q[0], k, v, True, 0.1), r"q must be 4-d"),
    (lambda q, k, v: (q[:, :3], k, v, True, 0.1), r"multiple"),
    (lambda q, k, v: (q, k, v[:, :, :5], True, 0.1), r"k and v must have the same shape"),
    (lambda q, k, v: (q, k.double(), v.double(), True, 0.1), r"dtype"),
    (lambda q, k, v: (q.int(), k.int(), v.int(), True, 0.1), r"float32, float64, bfloat16 or float16"),
    (lambda q, k, v: (q.transpose(2, 3), k, v, False, 0.1), r"contiguous last dimension"),
    (lambda q, k, v: (torch.cat([q, q], 2), k, v, True, 0.1), r"Tq <= Tk"),
    (lambda q, k, v: (q[..., :8], k, v, True, 0.1), r"head dim"),
])
def test_direct_op_calls_are_checked(call, pattern):
    q, k, v = rand_qkv(1, 4, 2, 8, 8, 16, requires_grad=False)
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.minigpt.attention_forward(*call(q, k, v))


@needs_ext
def test_backward_op_checks_lse_and_dout():
    q, k, v = rand_qkv(1, 2, 2, 8, 8, 16, requires_grad=False)
    out, lse = torch.ops.minigpt.attention_forward(q, k, v, True, 0.25)
    with pytest.raises(RuntimeError, match="lse"):
        torch.ops.minigpt.attention_backward(out, q, k, v, out, lse[:, :, :4], True, 0.25)
    with pytest.raises(RuntimeError, match="dout"):
        torch.ops.minigpt.attention_backward(out[:, :1], q, k, v, out, lse, True, 0.25)


@needs_ext
@pytest.mark.parametrize("args, exc, pattern", [
    ((torch.randn(2, 4, 8), torch.randn(2, 4, 8, 16), torch.randn(2, 4, 8, 16)), ValueError,
     r"q must be 4-d"),
    ((torch.randn(2, 4, 8, 16), torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16)), ValueError,
     r"multiple"),
    ((torch.randn(2, 4, 9, 16), torch.randn(2, 4, 8, 16), torch.randn(2, 4, 8, 16)), ValueError,
     r"Tq <= Tk"),
])
def test_bad_input_through_attention(args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        attention(*args, backend="ext")


def test_fallback_when_extension_missing(monkeypatch):
    monkeypatch.setattr(_ext, "_tried", True)
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_reason", "minigpt._C is not built (test)")
    monkeypatch.setattr(backends_module, "_warned_fallback", False)
    monkeypatch.delenv("MINIGPT_ATTENTION_BACKEND", raising=False)
    q, k, v = rand_qkv(1, 2, 2, 6, 6, 16, requires_grad=False)
    with pytest.warns(RuntimeWarning, match=r"not built \(test\).*using 'sdpa'"):
        out = attention(q, k, v)
    torch.testing.assert_close(out, attention(q, k, v, backend="sdpa"))
    with pytest.raises(RuntimeError, match=r"'ext' is not available: minigpt._C is not built "
                                           r"\(test\).*pip install --no-build-isolation -e \."):
        attention(q, k, v, backend="ext")
    report = attention_backends()
    assert report["ext"] == {"available": False, "reason": "minigpt._C is not built (test)"}
    assert report["default"] == "sdpa"


def test_stale_jit_lock_does_not_hang(tmp_path):
    build = tmp_path / "build"
    build.mkdir()
    (build / "lock").write_text("")  # what torch leaves behind when a build is killed
    # A process that took our lock and was killed: the kernel releases flocks on exit.
    code = ("import sys, time; from pathlib import Path; from minigpt.attention._ext import _build_lock\n"
            "with _build_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(build)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    proc.kill()
    proc.wait()
    (build / "lock").write_text("")
    with _ext._build_lock(build):
        assert not (build / "lock").exists()


@needs_ext
def test_build_info():
    info = _ext.build_info()
    assert {"compiler", "openmp", "vector_isa", "cuda", "cuda_archs"} <= set(info)
    assert info["openmp"] is True


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [32, 64, 96, 128])
@pytest.mark.parametrize("shape", [(2, 4, 4, 257, 257), (1, 8, 2, 1, 700), (2, 4, 1, 64, 300)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_against_reference(dtype, D, shape, causal):
    if not _ext.build_info().get("cuda"):
        pytest.skip("minigpt._C was built without CUDA kernels")
    q, k, v = (t.detach().cuda().requires_grad_()
               for t in rand_qkv(*shape, D, dtype=torch.float32, seed=D))
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    ref = reference_attention(q.cpu(), k.cpu(), v.cpu(), causal)
    fast = attention(q, k, v, causal=causal, backend="ext")
    naive = attention(q, k, v, causal=causal, backend="naive")
    dout = torch.randn_like(fast)
    qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(qd, kd, vd, causal)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), dout.cpu().double())
    check_rule("out", fast.cpu(), naive.cpu(), ref, dtype)
    for name, g, n, r in zip("qkv", torch.autograd.grad(fast, (q, k, v), dout),
                             torch.autograd.grad(naive, (q, k, v), dout), ref_grads):
        check_rule(f"d{name}", g.cpu(), n.cpu(), r, dtype, grad_scale(ref_grads))


JIT_BUILD = """
import importlib.abc, sys, torch
class BlockBuiltModule(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "minigpt._C":
            raise ImportError("minigpt._C hidden for this test")
sys.meta_path.insert(0, BlockBuiltModule())
sys.path.insert(0, sys.argv[1])
from minigpt import _ext
from minigpt.attention import attention
from reference import check_rule, rand_qkv, reference_attention
mod = _ext.module()
assert mod is not None, _ext.unavailable_reason()
assert mod.__name__ != "minigpt._C", mod.__name__
assert _ext.build_info()["openmp"] is True, _ext.build_info()
q, k, v = rand_qkv(1, 4, 2, 70, 130, 64, seed=11)
out = attention(q, k, v, causal=True, backend="ext")
check_rule("out", out, attention(q, k, v, causal=True, backend="naive"),
           reference_attention(q, k, v, True), torch.float32)
print(mod.__file__)
"""


@pytest.mark.slow
def test_just_in_time_build(tmp_path):
    """With minigpt._C missing, the first use builds csrc/ into $MINIGPT_CACHE_DIR and loads it
    (about a minute on two cores)."""
    tests_dir = str(Path(__file__).resolve().parent)
    env = {**os.environ, "MINIGPT_CACHE_DIR": str(tmp_path / "cache"), "MAX_JOBS": "2"}
    env.pop("MINIGPT_NO_JIT", None)
    r = subprocess.run([sys.executable, "-c", JIT_BUILD, tests_dir], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    built = Path(r.stdout.strip().splitlines()[-1])
    assert built.is_file() and (tmp_path / "cache") in built.parents


def test_no_jit_reports_why(tmp_path):
    """MINIGPT_NO_JIT=1 with minigpt._C missing: no build, a reason, and 'sdpa' as default."""
    code = JIT_BUILD.split("mod = _ext.module()")[0] + (
        "from minigpt import attention_backends\n"
        "r = attention_backends()\n"
        "assert _ext.module() is None and r['default'] == 'sdpa', r\n"
        "print(_ext.unavailable_reason())\n")
    env = {**os.environ, "MINIGPT_CACHE_DIR": str(tmp_path / "cache"), "MINIGPT_NO_JIT": "1"}
    env.pop("MINIGPT_ATTENTION_BACKEND", None)
    r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "hidden for this test" in r.stdout and "MINIGPT_NO_JIT" in r.stdout
    assert not (tmp_path / "cache" / "torch_extensions").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape, D, causal", [((2, 4, 2, 67, 67), 64, True),
                                              ((1, 4, 4, 100, 300), 128, False),
                                              ((1, 2, 1, 45, 130), 96, True)],
                         ids=["gqa-causal-64", "tq<tk-128", "mqa-causal-96"])
def test_cuda_deterministic_backward(dtype, shape, D, causal):
    """torch.use_deterministic_algorithms(True) takes the CUDA backward's separate dQ kernels
    (no atomics): bitwise equal gradients on repeated runs, and within the rule."""
    if not _ext.build_info().get("cuda"):
        pytest.skip("minigpt._C was built without CUDA kernels")
    q, k, v = (t.detach().cuda().to(dtype).requires_grad_()
               for t in rand_qkv(*shape, D, layout="transposed", seed=D))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).cuda().to(dtype)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(3):
            out = attention(q, k, v, causal=causal, backend="ext")
            runs.append(torch.autograd.grad(out, (q, k, v), dout))
    finally:
        torch.use_deterministic_algorithms(was)
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)
    naive = torch.autograd.grad(attention(q, k, v, causal=causal, backend="naive"), (q, k, v),
                                dout)
    qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref_grads = torch.autograd.grad(reference_attention(qd, kd, vd, causal), (qd, kd, vd),
                                    dout.cpu().double())
    for name, g, n, r in zip("qkv", runs[0], naive, ref_grads):
        check_rule(f"d{name}", g.cpu(), n.cpu(), r, dtype, grad_scale(ref_grads))


# ---------------------------------------------------------------------------------------------
# The decode path (csrc/attention_cpu.cpp, "Decode"): Tq <= 4 query rows against many keys, the
# keys cut into chunks across threads and the chunks merged by log-sum-exp. How many chunks
# depends on the thread count and on B * Hkv, so each case runs at 1 and 3 threads; (1, 4, 1, ...)
# with Tk >= 512 is cut into several chunks at any thread count.
DECODE_SHAPES = [
    (1, 12, 12, 1, 1024, 64),  # GPT-2 small's decode step
    (1, 4, 1, 1, 1000, 64),    # multi-query, several chunks
    (2, 6, 2, 3, 777, 40),     # GQA, odd Tk, three new rows
    (1, 8, 4, 4, 4, 128),      # Tq == Tk: the rows see 1 to 4 keys
    (1, 2, 1, 2, 300, 33),     # head dim not a multiple of the vector width
    (1, 2, 1, 4, 1300, 80),    # causal rows ending inside the last chunk
    (3, 3, 3, 1, 1, 16),       # a single key
]


def _float64_lse(q, k, causal, scale):
    """log-sum-exp of each query row's visible scores, in float64: (B, Hq, Tq)."""
    Tq, Tk = q.shape[2], k.shape[2]
    k = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k) * scale
    if causal:
        s = s.masked_fill(torch.arange(Tk)[None, :] > torch.arange(Tq)[:, None] + Tk - Tq,
                          float("-inf"))
    return torch.logsumexp(s, dim=-1)


@needs_ext
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False])
def test_decode_path_float64_out_and_lse(shape, causal, num_threads):
    q, k, v = rand_qkv(*shape, dtype=torch.float64, layout="sliced", seed=sum(shape),
                       requires_grad=False)
    scale = shape[-1] ** -0.5
    out, lse = torch.ops.minigpt.attention_forward(q, k, v, causal, scale)
    assert max_err(out, reference_attention(q, k, v, causal, scale)) < 1e-12
    assert lse.dtype == torch.float32 and lse.shape == shape[:2] + (shape[3],)
    torch.testing.assert_close(lse.double(), _float64_lse(q, k, causal, scale), atol=1e-5,
                               rtol=1e-6)
    again, _ = torch.ops.minigpt.attention_forward(q, k, v, causal, scale)
    assert torch.equal(out, again)  # the chunks merge in a fixed order


@needs_ext
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False])
def test_decode_path_float32_rule_with_gradients(shape, causal, num_threads):
    """out by the decode path, and the gradients of the tiled backward from its lse, within
    docs/design.md's rule."""
    _check_against_reference(shape, causal, "transposed")
    q, k, v = rand_qkv(*shape, layout="transposed", seed=1, requires_grad=False)
    _, lse = torch.ops.minigpt.attention_forward(q, k, v, causal, 0.3)
    torch.testing.assert_close(lse.double(), _float64_lse(q, k, causal, 0.3), atol=2e-6,
                               rtol=2e-6)


@needs_ext
@pytest.mark.parametrize("causal", [True, False])
def test_decode_path_gradcheck(causal, num_threads):
    q, k, v = rand_qkv(1, 4, 2, 3, 9, 8, dtype=torch.float64, seed=5)
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention(q, k, v, causal=causal, backend="ext"), (q, k, v))


@needs_ext
def test_empty_batch_and_empty_query_rows():
    """B = 0 (every Tq, the decode path's Tq <= 4 included) and Tq = 0 give empty or zero
    results on every backend, never a crash. A subprocess, because the failure this guards
    against was SIGFPE (an integer division by B * Hkv), which kills the interpreter."""
    code = r"""
import torch, minigpt
from minigpt.model import GPT, GPTConfig
for backend in ("ext", "sdpa", "naive"):
    for B, H, Tq, Tk in ((0, 2, 3, 3), (0, 2, 9, 9), (0, 2, 1, 300)):
        q = torch.randn(B, H, Tq, 16, requires_grad=True)
        k = torch.randn(B, H, Tk, 16, requires_grad=True)
        out = minigpt.attention(q, k, k, backend=backend)
        assert out.shape == q.shape, (backend, out.shape)
        out.sum().backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape
    q = torch.randn(1, 2, 0, 16, requires_grad=True)
    k = torch.randn(1, 2, 5, 16, requires_grad=True)
    out = minigpt.attention(q, k, k, causal=False, backend=backend)
    out.sum().backward()
    assert out.shape == (1, 2, 0, 16) and torch.equal(k.grad, torch.zeros_like(k)), backend
out, lse = torch.ops.minigpt.attention_forward(*(torch.randn(0, 2, 3, 16),) * 3, True, 0.25)
assert out.shape == (0, 2, 3, 16) and lse.shape == (0, 2, 3)
model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32))
for T in (3, 7):
    assert model(torch.zeros(0, T, dtype=torch.long))[0].shape == (0, T, 50)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
