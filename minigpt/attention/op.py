"""The compiled op pair ``torch.ops.minigpt.attention_forward`` / ``attention_backward``: its
fake (meta) and autograd formulas, registered from Python as pytorch/extension-cpp does (so
torch.compile traces the ops and torch.library.opcheck passes), and the call that the "ext"
attention backend makes.

The schemas and kernels live in csrc/ (TORCH_LIBRARY in bindings.cpp); minigpt.attention._ext loads the
compiled module, and calls register() through its on_load hook whenever it loads one.
"""

from __future__ import annotations

import torch

from minigpt.attention import _ext

def op_terms(alibi_slopes, window) -> tuple:
    """The ops' optional trailing arguments (alibi_slopes, window; window 0 = none), or () when
    neither is used, so plain calls keep the five-argument form."""
    if alibi_slopes is None and window is None:
        return ()
    return alibi_slopes, int(window or 0)


def ext_attention(q, k, v, causal: bool, scale: float, alibi_slopes=None,
                  window=None) -> torch.Tensor:
    """The compiled forward on checked inputs (see minigpt.attention): (B, Hq, Tq, D).
    alibi_slopes: None or float32 (Hq,) contiguous; window: None or >= 1."""
    # The kernels take any strides whose last dimension is contiguous; copy only otherwise.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, _ = torch.ops.minigpt.attention_forward(q, k, v, causal, scale,
                                                 *op_terms(alibi_slopes, window))
    return out


_registered = False


def register() -> None:
    """Fake (meta) and autograd formulas for the compiled ops (pytorch/extension-cpp's pattern),
    so that torch.compile traces them and torch.library.opcheck passes."""
    global _registered
    if _registered:
        return
    _registered = True

    @torch.library.register_fake("minigpt::attention_forward")
    def _forward_fake(q, k, v, causal, scale, alibi_slopes=None, window=0):
        B, Hq, Tq, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((B, Hq, Tq), dtype=torch.float32)

    @torch.library.register_fake("minigpt::attention_backward")
    def _backward_fake(dout, q, k, v, out, lse, causal, scale, alibi_slopes=None, window=0):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, causal, scale, *terms = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        ctx.n_terms = len(terms)  # trailing arguments given, each gets a None gradient
        # ALiBi slopes and window, passed on only when used (op_terms' five-argument form).
        ctx.terms = op_terms(terms[0], terms[1] or None) if terms else ()
        ctx.set_materialize_grads(False)  # an unused lse gets no zero-filled gradient

    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        elif dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq, dk, dv = torch.ops.minigpt.attention_backward(dout, q, k, v, out, lse,
                                                          ctx.causal, ctx.scale, *ctx.terms)
        if dlse is not None:
            # lse_i = log sum_j exp(s_ij), so d lse_i / d s_ij = P_ij: dq_i gains
            # scale * dlse_i * sum_j P_ij k_j (attention with v = k), and dk_j gains
            # scale * sum_i P_ij dlse_i q_i (the dv of a backward whose dout is dlse * q).
            pk, _ = torch.ops.minigpt.attention_forward(q, k, k, ctx.causal, ctx.scale,
                                                        *ctx.terms)
            _, _, pq = torch.ops.minigpt.attention_backward(
                (dlse.unsqueeze(-1) * q).to(q.dtype), q, k, k, pk, lse, ctx.causal, ctx.scale,
                *ctx.terms)
            dq = dq + ctx.scale * dlse.unsqueeze(-1).to(q.dtype) * pk
            dk = dk + ctx.scale * pq
        return (dq, dk, dv, None, None) + (None,) * ctx.n_terms

    torch.library.register_autograd("minigpt::attention_forward", backward,
                                    setup_context=setup_context)


_ext.on_load(register)
_ext.module(jit=False)  # a built minigpt._C defines torch.ops.minigpt.* as soon as minigpt is imported
