"""The two CUDA kernel sets (MINIGPT_CUDA_KERNELS: v2, the default, and v1, the kernels of the
first GPU run) against the float64 reference by docs/design.md's rule, with every term and both dQ
paths; empty inputs (B = 0, Tq = 0) launch nothing and give zero dK, dV. Skipped without a GPU."""

import importlib

import pytest
import torch

from minigpt.attention import _ext
from minigpt.attention import gpu_table
from minigpt.attention import attention

backends_module = importlib.import_module("minigpt.attention.backends")
test_cuda_terms = importlib.import_module("test_cuda_terms")

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _needs_cuda_kernels():
    if not _ext.build_info().get("cuda"):
        pytest.skip("minigpt._C was built without CUDA kernels")


# (B, Hq, Hkv, Tq, Tk, D), causal, window, alibi: each template variant of the v2 kernels
CASES = [
    ((2, 4, 2, 200, 200, 64), True, None, False),
    ((1, 4, 2, 130, 130, 128), True, 17, True),
    ((1, 4, 1, 67, 200, 96), True, 64, False),
    ((1, 4, 2, 67, 130, 32), False, None, True),
    ((1, 4, 2, 130, 67, 64), False, None, False),
    ((1, 8, 2, 1, 300, 128), True, None, True),    # decode: the 16-row forward tile
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("kernels", gpu_table.KERNEL_SETS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=test_cuda_terms._case_id)
def test_kernel_set_against_float64(monkeypatch, case, dtype, kernels, deterministic):
    monkeypatch.setenv(gpu_table.KERNELS_ENV, kernels)
    shape, causal, window, alibi = case
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        test_cuda_terms._check(shape, dtype, causal, window, alibi, seed=sum(shape))
    finally:
        torch.use_deterministic_algorithms(was)


def test_unknown_kernel_set_raises(monkeypatch):
    monkeypatch.setenv(gpu_table.KERNELS_ENV, "v9")
    q = torch.randn(1, 2, 16, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="MINIGPT_CUDA_KERNELS must be v2 or v1, got 'v9'"):
        torch.ops.minigpt.attention_forward(q, q, q, True, 0.125)


@pytest.mark.parametrize("kernels", gpu_table.KERNEL_SETS)
@pytest.mark.parametrize("B, Tq, Tk", [(0, 16, 16), (2, 0, 16), (2, 0, 0)])
def test_empty_inputs(monkeypatch, kernels, B, Tq, Tk):
    monkeypatch.setenv(gpu_table.KERNELS_ENV, kernels)
    q = torch.randn(B, 4, Tq, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, 2, Tk, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    out = attention(q, k, v, causal=True, backend="ext")
    assert out.shape == q.shape
    dk_dv = torch.autograd.grad(out, (k, v), torch.ones_like(out), allow_unused=True)
    for g, t in zip(dk_dv, (k, v)):
        assert g is None or (g.shape == t.shape and not g.any())
    with torch.no_grad():
        out, lse = torch.ops.minigpt.attention_forward(q, k, v, True, 0.125)
        dq, dk, dv = torch.ops.minigpt.attention_backward(torch.ones_like(out), q, k, v, out,
                                                          lse, True, 0.125)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert not dk.any() and not dv.any()  # no query: no gradient for any key
    torch.cuda.synchronize()
