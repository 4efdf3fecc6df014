"""minigpt's attention inside Hugging Face ``transformers`` models.

    import minigpt.hf.plugin
    name = minigpt.hf.register()                    # "minigpt"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)
    model.set_attn_implementation(name)             # or switch a loaded model

register() adds one entry under ``name`` to each of transformers' two registries:

- ``AttentionInterface``: ``attention_forward(module, query, key, value, attention_mask, scaling,
  dropout, **kwargs)``, with query (B, Hq, Tq, D) and key, value (B, Hkv, Tk, D) (grouped-query
  attention runs as is, no repeat of the key/value heads), returning (B, Tq, Hq, D) and no
  attention weights. It calls minigpt.attention (the "ext" kernels where they support the device
  and dtype, else "sdpa"; or the backend given to register()).
- ``AttentionMaskInterface``: ``causal_mask(...)`` returns None exactly when the mask is the
  plain bottom-right-aligned causal mask (no padding), else the boolean (B, 1, Tq, Tk) mask
  transformers' sdpa implementation builds. Without this entry transformers would hand an
  implementation it does not know no mask at all, and padding would be ignored.

What runs, and what is refused (ValueError naming the feature; never silently wrong):

- No mask (None): causal attention, query i seeing keys j <= i + (Tk - Tq), on the kernels in
  one call; in a non-causal module (an encoder, cross-attention: ``module.is_causal`` False),
  attention to every key, as under sdpa.
- A mask: for each sequence of the batch, every query row must see one contiguous range of keys,
  all rows starting at the same key: a causal mask with left padding (the keys before the first
  real token hidden), right padding, or a static cache's unused slots; a bidirectional mask with
  padding. Rows whose last visible key moves on by one per row run as one causal call, rows
  whose last key stays put as one non-causal call, rows that see no key (padding queries) get
  zeros: one to three calls per sequence. Boolean masks and additive masks of 0 / -inf (or the
  dtype's minimum) are read. Refused: rows starting at different keys (sliding-window or chunked
  attention, packed sequences), gaps inside a row's range, masks that differ between heads,
  additive biases.
- Refused outright: ``dropout`` > 0 (training with attention dropout), ``softcap``, attention
  sinks (``s_aux``), ``position_bias``, a ``sliding_window`` shorter than the keys,
  ``output_attentions=True`` (the fused kernels never form the probabilities).

This module is the only one in minigpt that imports ``transformers``, and only when register()
is called: ``import minigpt`` does not need it (``pip install minigpt-kernels[hf]`` installs it).
"""

from __future__ import annotations

import weakref
from typing import List, Optional, Tuple

import torch

from minigpt.attention import BACKENDS, attention

__all__ = ["register", "attention_forward", "causal_mask", "mask_plan"]

_backends: dict = {}  # registered name -> minigpt attention backend (None: the default choice)


def register(name: str = "minigpt", backend: Optional[str] = None) -> str:
    """Register minigpt's attention (and its mask function) with transformers under name.

    Args:
        name: the ``attn_implementation`` string to register, default "minigpt".
        backend: the minigpt.attention backend to run ("ext", "sdpa", "naive"), or None for
            its default choice ("ext" where the compiled kernels support the device and dtype).

    Returns:
        name, for ``from_pretrained(..., attn_implementation=name)``.

    Raises:
        ImportError: transformers is not installed, or too old to have AttentionMaskInterface.
        ValueError: an unknown backend.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"minigpt.hf.register: backend must be one of {BACKENDS} or None, "
                         f"got {backend!r}")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError(f"minigpt.hf needs transformers with AttentionInterface and "
                          f"AttentionMaskInterface: pip install 'minigpt-kernels[hf]' ({e})") from e
    _backends[name] = backend
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, causal_mask)
    return name


def _implementation_of(module) -> Optional[str]:
    config = getattr(module, "config", None)
    return getattr(config, "_attn_implementation", None)


def _refuse(feature: str, hint: str = "") -> None:
    raise ValueError(f"minigpt attention (minigpt.hf) does not support {feature}"
                     f"{'; ' + hint if hint else ''}. Use attn_implementation='sdpa' or 'eager' "
                     f"for this model.")


def _is_causal(module, kwargs: dict) -> bool:
    """The module's causality, as transformers' sdpa implementation reads it."""
    is_causal = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)


def _check_supported(module, key: torch.Tensor, dropout: float, kwargs: dict) -> None:
    if dropout and dropout > 0:
        _refuse(f"attention dropout (dropout={dropout})",
                "the fused kernels never form the probabilities it would drop; set the model's "
                "attention dropout to 0 or call model.eval()")
    for feature in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(feature) is not None:
            name = {"s_aux": "attention sinks (s_aux)", "softcap": "logit softcapping (softcap)",
                    "position_bias": "an additive position bias (position_bias)"}[feature]
            _refuse(name)
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:
        _refuse(f"sliding-window attention (sliding_window={window} < {key.shape[2]} keys)")
    if kwargs.get("output_attentions"):
        _refuse("output_attentions=True", "the fused kernels never form the probabilities")


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                      scaling: Optional[float] = None, dropout: float = 0.0,
                      **kwargs) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function signature, computed by minigpt.attention.

    Args:
        module: the model's attention module (read: is_causal, config._attn_implementation).
        query: (B, Hq, Tq, D); key, value: (B, Hkv, Tk, D), Hq a multiple of Hkv.
        attention_mask: None (plain causal, bottom-right aligned; every key for a non-causal
            module) or the (B or 1, 1 or Hq, Tq, Tk) mask that causal_mask() built: boolean
            (True = attend) or additive (0 = attend).
        scaling: softmax scale; None means 1/sqrt(D).
        dropout: must be 0.

    Returns:
        (out, None): out (B, Tq, Hq, D) contiguous, query's dtype.

    Raises:
        ValueError: a feature outside causal attention with padding (see the module docstring).
    """
    _check_supported(module, key, dropout, kwargs)
    backend = _backends.get(_implementation_of(module))
    scale = None if scaling is None else float(scaling)
    if attention_mask is None:
        # causal_mask() returns None only for the bottom-right causal mask; a non-causal module
        # (an encoder, cross-attention) without a mask attends to every key, as under sdpa.
        out = attention(query, key, value, causal=_is_causal(module, kwargs), scale=scale,
                        backend=backend)
    else:
        out = _masked_attention(query, key, value, attention_mask, scale, backend)
    return out.transpose(1, 2).contiguous(), None


# ---------------------------------------------------------------------------------------------
# Masks.

def causal_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                mask_function=None, attention_mask: Optional[torch.Tensor] = None,
                allow_is_causal_skip: bool = True, **kwargs) -> Optional[torch.Tensor]:
    """transformers' mask-interface signature: None where the mask is plain causal attention
    aligned bottom-right (query i sees keys j <= i + kv_length - q_length, no padding), which
    attention_forward runs in one kernel call; otherwise the boolean (B, 1, Tq, Tk) mask of
    transformers' sdpa_mask (bidirectional masks included), which attention_forward reads."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    plain = (allow_is_causal_skip and mask_function is causal_mask_function
             and not isinstance(q_offset, torch.Tensor)
             and q_offset - kv_offset == kv_length - q_length)
    if plain and attention_mask is not None:
        window = attention_mask[:, kv_offset:kv_offset + kv_length]
        plain = window.shape[-1] == kv_length and bool(window.all())
    if plain:
        return None
    if mask_function is None:
        mask_function = causal_mask_function
    # Never None from here: transformers' bidirectional masks (encoders, and decoders configured
    # with is_causal=False) would otherwise come back as None, which reads as causal here.
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, allow_is_causal_skip=False, **kwargs)


# One kernel call: query rows [row0, row1) of a sequence against its keys [key0, key1).
Call = Tuple[int, int, int, int, bool]


def mask_plan(mask: torch.Tensor, batch_size: int) -> List[List[Call]]:
    """The kernel calls that compute attention under mask, per sequence of the batch.

    Args:
        mask: (B or 1, 1 or H, Tq, Tk), boolean (True = attend) or additive float (0 = attend,
            -inf or the dtype's minimum = masked).
        batch_size: B of the query.

    Returns:
        For each sequence, a list of (row0, row1, key0, key1, causal): query rows [row0, row1)
        attend to keys [key0, key1), causally (bottom-right) or to all of them. Rows in no call
        see no key.

    Raises:
        ValueError: a mask outside causal-with-padding (see the module docstring).
    """
    if mask.dim() != 4:
        raise ValueError(f"minigpt.hf: the attention mask must be 4-d (B, H, Tq, Tk), got shape "
                         f"{tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask == 0
        masked = mask <= torch.finfo(mask.dtype).min / 2  # -inf, or transformers' finfo.min
        if not bool((allowed | masked).all()):
            _refuse("an additive attention bias (a float mask with values other than 0 and "
                    "-inf)")
    if allowed.shape[1] > 1:
        if not bool((allowed == allowed[:, :1]).all()):
            _refuse("masks that differ between heads")
    allowed = allowed[:, 0].expand(batch_size, -1, -1).cpu()  # (B, Tq, Tk)
    Tk = allowed.shape[-1]
    count = allowed.sum(-1)  # (B, Tq)
    first = allowed.int().argmax(-1)
    last = Tk - 1 - allowed.flip(-1).int().argmax(-1)
    seen = count > 0
    if not bool(((last - first + 1 == count) | ~seen).all()):
        _refuse("a mask with gaps inside a query's range of keys (padding between tokens, "
                "packed sequences or a custom pattern)")
    plans = []
    for b in range(batch_size):
        rows = seen[b].nonzero().flatten().tolist()
        if not rows:
            plans.append([])
            continue
        key0 = int(first[b, rows[0]])
        if bool((first[b][seen[b]] != key0).any()):
            _refuse("query rows that start at different keys (sliding-window or chunked "
                    "attention, or packed sequences)")
        if rows != list(range(rows[0], rows[-1] + 1)) or rows[-1] != allowed.shape[1] - 1:
            _refuse("query rows that see no key between rows that do")
        hi = last[b].tolist()
        calls, r = [], rows[0]
        while r < len(hi):
            end = r + 1
            if end < len(hi) and hi[end] == hi[r] + 1:  # the causal diagonal
                while end < len(hi) and hi[end] == hi[end - 1] + 1:
                    end += 1
                calls.append((r, end, key0, hi[end - 1] + 1, True))
            else:  # rows that all see keys key0 .. hi[r]
                while end < len(hi) and hi[end] == hi[r]:
                    end += 1
                calls.append((r, end, key0, hi[r] + 1, False))
            r = end
        plans.append(calls)
    return plans


_plan_cache: dict = {}  # the last mask's plan: transformers passes one mask to every layer


def _cached_plan(mask: torch.Tensor, batch_size: int) -> List[List[Call]]:
    entry = _plan_cache.get("last")
    if (entry is not None and entry[0]() is mask and entry[1] == mask._version
            and entry[2] == batch_size):
        return entry[3]
    plan = mask_plan(mask, batch_size)
    _plan_cache["last"] = (weakref.ref(mask), mask._version, batch_size, plan)
    return plan


def _masked_attention(q, k, v, mask, scale, backend) -> torch.Tensor:
    """(B, Hq, Tq, D): each sequence's calls of mask_plan on the kernels, zeros elsewhere."""
    plans = _cached_plan(mask, q.shape[0])
    if len(plans) == 1 or all(plan == plans[0] for plan in plans):
        if len(plans[0]) == 1 and plans[0][0][:2] == (0, q.shape[2]):
            row0, row1, key0, key1, causal = plans[0][0]  # the whole batch in one call
            return attention(q, k[:, :, key0:key1], v[:, :, key0:key1], causal=causal,
                             scale=scale, backend=backend)
    out = q.new_zeros(q.shape)
    for b, plan in enumerate(plans):
        for row0, row1, key0, key1, causal in plan:
            out[b:b + 1, :, row0:row1] = attention(
                q[b:b + 1, :, row0:row1], k[b:b + 1, :, key0:key1], v[b:b + 1, :, key0:key1],
                causal=causal, scale=scale, backend=backend)
    return out
