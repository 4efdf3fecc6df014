"""What a trained GPT attends to, and what its heads are worth: attention_maps (the probabilities
of every layer and head) and gated_heads (scale each head's output, e.g. to 0 to remove it).
GPT.attention_maps and GPT.gated_heads call these."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from minigpt.attention import attention_probs
from minigpt.model import check_input


@torch.no_grad()
def attention_maps(model, idx: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of every layer and head of a GPT for one sequence.

    Computed by the explicit softmax(QK^T / sqrt(head_dim)) path (Vaswani et al. 2017, eq. 1;
    the fused kernels never store probabilities) from the model's weights, in eval mode (no
    dropout) whatever mode the model is in. With GQA each query head has its own map.

    Args:
        idx: (T,) or (1, T) int64 token ids, T <= block_size.

    Returns:
        (n_layer, n_head, T, T) float32: row i (a query) sums to 1 over the keys j <= i (with a
        window W, i - W < j <= i); the other entries are 0. A layer with fewer heads
        (GPTConfig.layer_heads) fills its first maps; the others are NaN.

    Raises:
        ValueError: idx is not one int64 sequence of 1 <= T <= block_size tokens.
    """
    if idx.dim() == 1:
        idx = idx[None]
    check_input(idx, model.config)
    if idx.shape[0] != 1:
        raise ValueError(f"attention_maps: idx must hold one sequence, got shape "
                         f"{tuple(idx.shape)}")
    blocks = model.transformer.h
    was_training, backends = model.training, [block.attn.backend for block in blocks]
    model.eval()
    try:
        pos = torch.arange(idx.shape[1], device=idx.device)  # (T,)
        x = model.embed(idx, pos)  # (1, T, C)
        maps = []
        for block in blocks:
            q, k, _ = block.attn.qkv(block.ln_1(x), pos)
            probs = attention_probs(q, k, True, 1.0 / math.sqrt(model.config.head_dim),
                                    block.attn.alibi_slopes, block.attn.window)
            probs = probs[0].float()  # (this layer's heads, T, T)
            missing = model.config.n_head - probs.shape[0]
            maps.append(F.pad(probs, (0, 0, 0, 0, 0, missing), value=float("nan")))
            block.attn.backend = "naive"  # the next layer's input by the same explicit path
            x = block(x, pos)
    finally:
        for block, backend in zip(blocks, backends):
            block.attn.backend = backend
        model.train(was_training)
    return torch.stack(maps)  # (n_layer, n_head, T, T)


@contextlib.contextmanager
def gated_heads(model, head_mask: torch.Tensor):
    """Within the block, head h of layer l of a GPT has its attention output multiplied by
    head_mask[l, h] before c_proj (the gates xi_h of Michel et al. 2019, "Are Sixteen Heads
    Really Better than One?"): forward pre-hooks on each c_proj, so the forward path carries no
    gates.

    Args:
        head_mask: (n_layer, n_head) float gates; 0 removes a head, 1 keeps it. Gradients flow
            to it. A layer with fewer heads (GPTConfig.layer_heads) reads head_mask[l, :heads].

    Raises:
        ValueError: head_mask is not a tensor of shape (n_layer, n_head).
    """
    shape = (model.config.n_layer, model.config.n_head)
    if not isinstance(head_mask, torch.Tensor) or tuple(head_mask.shape) != shape:
        raise ValueError(f"GPT: head_mask must be a tensor of shape (n_layer, n_head) = "
                         f"{shape}, got {tuple(getattr(head_mask, 'shape', ()))}")
    hd = model.config.head_dim

    def gate(layer):
        nh = model.config.heads(layer)[0]

        def hook(module, args):
            y = args[0]  # (B, T, nh * hd): the heads' outputs side by side
            B, T, C = y.shape
            g = head_mask[layer, :nh].to(device=y.device, dtype=y.dtype).view(1, 1, nh, 1)
            return ((y.view(B, T, nh, hd) * g).view(B, T, C),)
        return hook

    handles = [block.attn.c_proj.register_forward_pre_hook(gate(layer))
               for layer, block in enumerate(model.transformer.h)]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
