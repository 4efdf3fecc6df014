"""The float64 reference and the correctness rule of docs/design.md, shared by the tests."""

import math

import torch


def reference_scores(q, k, causal=True, scale=None, alibi_slopes=None, window=None):
    """scale * QK^T - slope_h * (i + Tk - Tq - j), masked with -inf (causal: j > i + Tk - Tq;
    window W: also j <= i + Tk - Tq - W), in float64, written independently of minigpt."""
    q, k = q.double(), k.double()
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    i = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
    distance = (i - torch.arange(Tk, device=q.device)[None, :]).double()
    if alibi_slopes is not None:
        s = s - alibi_slopes.double().to(q.device)[:, None, None] * distance
    if causal:
        s = s.masked_fill(distance < 0, float("-inf"))
    if window is not None:
        s = s.masked_fill(distance >= window, float("-inf"))
    return s


def reference_attention(q, k, v, causal=True, scale=None, alibi_slopes=None, window=None):
    """softmax(scale * QK^T + ALiBi bias + mask) V in float64, written independently of
    minigpt (see reference_scores)."""
    s = reference_scores(q, k, causal, scale, alibi_slopes, window)
    v = v.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return torch.einsum("bhij,bhjd->bhid", torch.softmax(s, dim=-1), v)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check_rule(name, fast, naive, ref, dtype, scale=None):
    """fast's error vs ref must be <= 2x naive's error (same dtype) + 1e-6 for float32.

    The 1e-6 floor is taken relative to the size of the quantities involved, max(1, scale),
    scale defaulting to max|ref|; for gradients, pass the largest of the three reference
    gradients. Where the naive computation happens to be exact (dq and dk are exactly 0 with a
    single key), a fused kernel's rounding of intermediates of that size is still within
    float32's resolution."""
    floor = 1e-6 if dtype == torch.float32 else 1e-12 if dtype == torch.float64 else 0.0
    if scale is None:
        scale = ref.abs().max().item()
    slack = floor * max(1.0, scale)
    e_fast, e_naive = max_err(fast, ref), max_err(naive, ref)
    assert e_fast <= 2 * e_naive + slack, (
        f"{name}: error {e_fast:.3e} > 2 x naive error {e_naive:.3e} + {slack}")


def rand_qkv(B, Hq, Hkv, Tq, Tk, D, dtype=torch.float32, layout="contiguous", seed=0,
             requires_grad=True):
    """Fresh random q, k, v in one of three layouts: contiguous (B, H, T, D), the model's
    (B, T, H, D).transpose(1, 2) view, or a slice of a larger tensor (non-trivial strides)."""
    g = torch.Generator().manual_seed(seed)

    def make(H, T):
        if layout == "contiguous":
            t = torch.randn(B, H, T, D, generator=g, dtype=dtype)
        elif layout == "transposed":
            t = torch.randn(B, T, H, D, generator=g, dtype=dtype).transpose(1, 2)
        elif layout == "sliced":
            t = torch.randn(B, H + 1, T + 3, D + 5, generator=g, dtype=dtype)[:, 1:, 2:T + 2, :D]
        else:
            raise ValueError(layout)
        return t.detach().requires_grad_(requires_grad)

    return make(Hq, Tq), make(Hkv, Tk), make(Hkv, Tk)


def grad_scale(grads):
    """The largest magnitude among reference gradients, for check_rule's floor."""
    return max(g.abs().max().item() for g in grads)
