"""The float64 reference, written independently of minigpt, and the correctness rule of
docs/design.md (imported from minigpt.attention.rule, its one definition), shared by the tests."""

import math

import torch

from minigpt.attention.rule import rule_floor, within_rule


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
    """Assert minigpt.attention.rule's verdict for one quantity: fast's error against ref at
    most 2x naive's error (same dtype) + the dtype's floor times max(1, scale), scale
    defaulting to max|ref|; for gradients, pass the largest of the three reference gradients
    (grad_scale)."""
    verdict = within_rule(fast, naive, ref, dtype, scale)
    assert verdict.ok, (f"{name}: error {verdict.error:.3e} > the rule's bound "
                        f"{verdict.bound:.3e} (2 x naive error {verdict.naive_error:.3e} + "
                        f"{rule_floor(dtype)} x max(1, size))")


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
