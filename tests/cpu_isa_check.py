"""The CPU kernels' correctness checks, run as a script in a process of its own so that
MINIGPT_CPU_ISA (read once per process) picks the vector path under test:

    MINIGPT_CPU_ISA=avx2 python tests/cpu_isa_check.py

Prints the path in use (build_info()["vector_isa"]) and what computes the bfloat16 tile
products (build_info()["bf16_products"]: our AMX or AVX512-BF16 tiles, or ATen's brgemm) on the first
line and "ok" on the last; any failed check raises. float32: out and dq, dk, dv within the project's rule (at most 2x the naive
float32 computation's error against float64, plus 1e-6) over odd sizes, head dims that are not a
multiple of any vector width, causal both ways, grouped-query heads, the model's strided
(B, T, H, D) views and decode steps (Tq 1-4, one or several key chunks). float64: the same against
the float64 reference to 1e-12, and gradcheck on small cases. bfloat16: out and every gradient
within the rule in bfloat16, over odd lengths (odd last key and query tiles), GQA, the strided
layouts, a window starting at an odd key, an odd head dim and rows at odd offsets (whose
32-bit pairs are misaligned: both served by brgemm), and a decode step.
"""

import sys
import time
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]  # this checkout's minigpt, then reference.py
from reference import check_rule, grad_scale, max_err, rand_qkv, reference_attention  # noqa: E402

from minigpt.attention import _ext  # noqa: E402
from minigpt.attention import attention  # noqa: E402

# (B, Hq, Hkv, Tq, Tk, D, causal, layout)
FLOAT32_CASES = [
    (1, 2, 2, 1, 1, 16, True, "contiguous"),
    (1, 4, 2, 17, 17, 40, True, "transposed"),
    (2, 2, 1, 17, 129, 16, False, "sliced"),
    (1, 2, 2, 129, 129, 64, True, "contiguous"),
    (2, 4, 2, 129, 129, 80, False, "transposed"),
    (1, 2, 1, 129, 300, 128, True, "transposed"),
    (1, 2, 2, 1000, 1000, 64, True, "transposed"),
    (1, 1, 1, 257, 1000, 40, False, "contiguous"),
    (1, 2, 1, 200, 1000, 128, True, "sliced"),
    # Decode steps: 1-4 query rows, 700 keys (two chunks) or 90 (one).
    (1, 4, 2, 1, 700, 64, True, "transposed"),
    (2, 4, 1, 2, 90, 40, True, "contiguous"),
    (1, 8, 2, 3, 700, 128, False, "transposed"),
    (1, 2, 2, 4, 700, 80, True, "sliced"),
    (1, 4, 4, 1, 1000, 16, True, "contiguous"),
]

FLOAT64_CASES = [
    (1, 4, 2, 129, 129, 80, True, "transposed"),
    (1, 2, 1, 3, 700, 40, True, "sliced"),
    (2, 2, 2, 70, 130, 64, False, "contiguous"),
]

# (B, Hq, Hkv, Tq, Tk, D, causal, layout, window)
BFLOAT16_CASES = [
    (1, 2, 2, 129, 129, 64, True, "transposed", None),
    (2, 4, 2, 17, 301, 80, True, "contiguous", None),
    (1, 2, 1, 300, 300, 128, False, "sliced", None),
    (1, 4, 4, 257, 257, 32, True, "transposed", 37),
    (1, 2, 1, 33, 33, 17, True, "contiguous", None),
    (1, 2, 1, 65, 65, 64, True, "odd-stride", None),
    (1, 4, 2, 1, 300, 64, True, "transposed", None),
    # Whole 16 x 16 tiles with pairs left over (D 40: 20 pairs) and keys past the last whole
    # tile, under a causal mask offset by Tk - Tq; and D 16 (8 pairs: no whole step of 16).
    (1, 2, 2, 64, 200, 40, True, "contiguous", None),
    (2, 2, 2, 96, 96, 16, True, "transposed", None),
]

GRADCHECK_CASES = [
    (1, 2, 1, 5, 7, 12, True, "transposed"),
    (1, 2, 2, 2, 9, 8, False, "contiguous"),  # decode path
]


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def check_float32(B, Hq, Hkv, Tq, Tk, D, causal, layout):
    q, k, v = rand_qkv(B, Hq, Hkv, Tq, Tk, D, layout=layout, seed=Tq + Tk + D)
    name = f"float32 {(B, Hq, Hkv, Tq, Tk, D)} causal={causal} {layout}"
    ref = reference_attention(q, k, v, causal)
    fast = attention(q, k, v, causal=causal, backend="ext")
    naive = attention(q, k, v, causal=causal, backend="naive")
    dout = torch.randn(fast.shape, generator=torch.Generator().manual_seed(D))
    ref_grads = _grads(ref, (q, k, v), dout.double())
    check_rule(f"{name}: out", fast, naive, ref, torch.float32)
    for which, g, n, r in zip("qkv", _grads(fast, (q, k, v), dout),
                              _grads(naive, (q, k, v), dout), ref_grads):
        check_rule(f"{name}: d{which}", g, n, r, torch.float32, grad_scale(ref_grads))


def check_float64(B, Hq, Hkv, Tq, Tk, D, causal, layout):
    q, k, v = rand_qkv(B, Hq, Hkv, Tq, Tk, D, dtype=torch.float64, layout=layout, seed=D)
    name = f"float64 {(B, Hq, Hkv, Tq, Tk, D)} causal={causal} {layout}"
    ref = reference_attention(q, k, v, causal)
    fast = attention(q, k, v, causal=causal, backend="ext")
    dout = torch.randn(fast.shape, generator=torch.Generator().manual_seed(D), dtype=torch.float64)
    assert max_err(fast, ref) < 1e-12, f"{name}: out error {max_err(fast, ref):.3e}"
    for which, g, r in zip("qkv", _grads(fast, (q, k, v), dout), _grads(ref, (q, k, v), dout)):
        assert max_err(g, r) < 1e-11, f"{name}: d{which} error {max_err(g, r):.3e}"


def check_bfloat16(B, Hq, Hkv, Tq, Tk, D, causal, layout, window):
    q, k, v = rand_qkv(B, Hq, Hkv, Tq, Tk, D, dtype=torch.bfloat16,
                       layout="contiguous" if layout == "odd-stride" else layout, seed=Tq + D)
    if layout == "odd-stride":  # rows D + 1 apart from an odd offset: pairs not 4-byte aligned
        q, k, v = (torch.randn(*t.shape[:-1], D + 1, dtype=t.dtype)[..., 1:].requires_grad_()
                   for t in (q, k, v))
    name = f"bfloat16 {(B, Hq, Hkv, Tq, Tk, D)} causal={causal} {layout} window={window}"
    fast = attention(q, k, v, causal=causal, backend="ext", window=window)
    naive = attention(q, k, v, causal=causal, backend="naive", window=window)
    ref = reference_attention(q, k, v, causal, None, None, window)
    dout = torch.randn(fast.shape, generator=torch.Generator().manual_seed(D), dtype=fast.dtype)
    ref_grads = _grads(ref, (q, k, v), dout.double())
    check_rule(f"{name}: out", fast, naive, ref, torch.bfloat16)
    for which, g, n, r in zip("qkv", _grads(fast, (q, k, v), dout),
                              _grads(naive, (q, k, v), dout), ref_grads):
        check_rule(f"{name}: d{which}", g, n, r, torch.bfloat16, grad_scale(ref_grads))


def gradcheck(B, Hq, Hkv, Tq, Tk, D, causal, layout):
    q, k, v = rand_qkv(B, Hq, Hkv, Tq, Tk, D, dtype=torch.float64, layout=layout, seed=D)
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention(q, k, v, causal=causal, backend="ext"), (q, k, v))


def main():
    info = _ext.build_info()
    print(info["vector_isa"], info["bf16_products"], flush=True)
    timing = "--time" in sys.argv
    for check, cases in [(check_float32, FLOAT32_CASES), (check_float64, FLOAT64_CASES),
                         (check_bfloat16, BFLOAT16_CASES), (gradcheck, GRADCHECK_CASES)]:
        for case in cases:
            t0 = time.perf_counter()
            check(*case)
            if timing:
                print(f"{time.perf_counter() - t0:6.2f} s  {check.__name__} {case}", flush=True)
    print("ok")


if __name__ == "__main__":
    main()
