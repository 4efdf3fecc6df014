"""Hugging Face configurations and weights to minigpt's and back, for GPT-2 (GPT2LMHeadModel)
and Llama-architecture models (LlamaForCausalLM: Llama, TinyLlama, SmolLM, ...): the rules that
minigpt.hf.pretrained loads with and minigpt.hf.export writes with. Nothing here reads files or
imports transformers: a config.json dict is mapped field by field (to_minigpt_config,
to_hf_config), and the weights are renamed and reshaped by one table per architecture (_rules),
read in both directions (to_minigpt_weights, to_hf_weights).

What the mapping does, and why the logits are the same:
- GPT-2 (Radford et al. 2019) stores its projections as Conv1D, weight (in, out): transposed to
  nn.Linear's (out, in). Learned absolute positions (wpe), LayerNorm with biases, a 4x GELU MLP
  ("gelu_new" is the tanh approximation), tied output head.
- Llama (Touvron et al. 2023): RMSNorm, SwiGLU MLP (gate_proj and up_proj side by side in our
  c_fc), RoPE, grouped-query attention, optionally untied head and a head_dim of its own. Hugging
  Face's rotary pairs dimension i with i + head_dim/2 in each head ("rotate_half"); ours pairs
  2i with 2i + 1 (RoFormer's layout). Attention scores q . k are unchanged when q and k are
  permuted alike, so the q_proj and k_proj rows of each head are permuted on load
  (halves_to_pairs) and back on export (pairs_to_halves), as transformers' own Llama
  conversion script does in the other direction.

A configuration feature minigpt does not have is refused by name (PretrainedError), never
ignored: rope scaling (rope_type "linear", "dynamic", "yarn", ...; "llama3" is supported),
sliding windows, partial rotary, cross attention, GPT-2's unscaled or layer-scaled attention,
quantized weights, an activation we lack. Dropout settings (attn_pdrop, resid_pdrop,
attention_dropout) only act in training: the loaded model has dropout 0 (fine-tuning sets its
own, --dropout; attention probabilities have no dropout in minigpt). pretraining_tp only splits
matmuls into slices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from minigpt.config import ConfigError, GPTConfig

__all__ = ["PretrainedError", "ARCHITECTURES", "GPT2_VOCAB", "hf_architecture",
           "to_minigpt_config", "export_architecture", "to_hf_config", "to_minigpt_weights",
           "to_hf_weights", "halves_to_pairs", "pairs_to_halves"]

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
GPT2_VOCAB = 50257  # tiktoken's "gpt2": 50,000 merges + 256 bytes + <|endoftext|>

# Hugging Face activation names (transformers.activations.ACT2FN) <-> ours.
_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "silu": "silu", "swish": "silu", "relu2": "relu2"}
_ACT_TO_HF = {"gpt2": {"gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu",
                       "relu2": "relu2"},
              "llama": {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu",
                        "relu2": "relu2"}}


class PretrainedError(ValueError):
    """A pretrained model cannot be found, read or represented; the one-line message names the
    model, the file or the configuration feature, and what to do."""


# ---------------------------------------------------------------------------------------------
# Configurations


def hf_architecture(hf: dict, where: str = "config.json") -> str:
    """"gpt2" or "llama": the architecture a Hugging Face config describes.

    Raises:
        PretrainedError: another architecture (named).
    """
    names = hf.get("architectures") or []
    for kind, cls_name in ARCHITECTURES.items():
        if cls_name in names or (not names and hf.get("model_type") == kind):
            return kind
    what = ", ".join(names) if names else f"model_type {hf.get('model_type')!r}"
    raise PretrainedError(f"{where}: architecture {what} is not supported (minigpt loads "
                          f"{' and '.join(ARCHITECTURES.values())})")


# Fields that would change the function if set, and the values that leave it alone. Some
# belong to neighbouring architectures (Mistral's sliding window, Granite's multipliers,
# Gemma's soft-capping): a LlamaForCausalLM config carrying one was meant for another model.
_REFUSED = {
    "sliding_window": (None,), "use_sliding_window": (None, False), "attention_chunk_size": (None,),
    "partial_rotary_factor": (None, 1, 1.0), "rope_interleaved": (None, False),
    "quantization_config": (None,), "add_cross_attention": (None, False),
    "scale_attn_by_inverse_layer_idx": (None, False), "scale_attn_weights": (None, True),
    "logit_scale": (None, 1, 1.0), "logits_scaling": (None, 1, 1.0),
    "embedding_multiplier": (None, 1, 1.0), "residual_multiplier": (None, 1, 1.0),
    "attention_multiplier": (None,), "final_logit_softcapping": (None,),
    "attn_logit_softcapping": (None,), "query_pre_attn_scalar": (None,),
    "use_qk_norm": (None, False), "qk_layernorm": (None, False), "no_rope_layers": (None,),
    "num_experts": (None, 0), "num_local_experts": (None, 0),
}


def _refuse(hf: dict, where: str) -> None:
    for key, fine in _REFUSED.items():
        if key in hf and hf[key] not in fine:
            raise PretrainedError(f"{where}: {key}={hf[key]!r} is not supported by minigpt "
                                  f"(refused rather than ignored)")


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")


def _rope(hf: dict, where: str) -> Tuple[float, Optional[dict]]:
    """(RoPE's base, its scaling) from either layout: transformers 5's rope_parameters
    {"rope_type", "rope_theta", ...}, or the older top-level rope_theta with rope_scaling (None
    unless scaled). rope_type "llama3" (Llama 3.1, 3.2) gives GPTConfig.rope_scaling; any other
    (linear, dynamic, yarn, longrope) is refused by name."""
    theta, scaling = hf.get("rope_theta", 10000.0), None
    for key in ("rope_parameters", "rope_scaling"):
        params = hf.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise PretrainedError(f"{where}: {key}={params!r} is not supported by minigpt")
        kind = params.get("rope_type", params.get("type", "default"))
        known = {"rope_type", "type", "rope_theta"} | (set(_LLAMA3_KEYS) if kind == "llama3"
                                                       else set())
        extra = set(params) - known
        if kind not in ("default", "llama3") or extra:
            raise PretrainedError(f"{where}: {key} with rope_type {kind!r}"
                                  + (f" and {', '.join(sorted(extra))}" if extra else "")
                                  + " (rope scaling) is not supported by minigpt; it has plain "
                                    "RoPE and rope_type 'llama3' (refused rather than ignored)")
        if kind == "llama3":
            missing = [k for k in _LLAMA3_KEYS if k not in params]
            if missing:
                raise PretrainedError(f"{where}: {key} with rope_type 'llama3' has no "
                                      f"{', '.join(missing)}")
            scaling = {"rope_type": "llama3", **{k: params[k] for k in _LLAMA3_KEYS}}
        theta = params.get("rope_theta", theta)
    return float(theta), scaling


def _activation(name, key: str, where: str) -> str:
    if name not in _ACT_FROM_HF:
        raise PretrainedError(f"{where}: {key}={name!r} is not supported by minigpt (it has "
                              f"{', '.join(sorted(_ACT_FROM_HF))})")
    return _ACT_FROM_HF[name]


def to_minigpt_config(hf: dict, block_size: Optional[int] = None,
                      where: str = "config.json") -> Tuple[str, GPTConfig]:
    """(architecture, GPTConfig) for a Hugging Face config.json dict.

    block_size: the context to keep (default the model's n_positions/max_position_embeddings;
    at most that).

    Raises:
        PretrainedError: an unsupported architecture or feature (named), or a block_size beyond
            the model's.
    """
    arch = hf_architecture(hf, where)
    _refuse(hf, where)
    try:
        if arch == "gpt2":
            n_embd = hf.get("n_embd", hf.get("hidden_size", 768))
            fields = dict(
                vocab_size=hf.get("vocab_size", GPT2_VOCAB),
                block_size=hf.get("n_positions", hf.get("max_position_embeddings", 1024)),
                n_layer=hf.get("n_layer", hf.get("num_hidden_layers", 12)),
                n_head=hf.get("n_head", hf.get("num_attention_heads", 12)),
                n_embd=n_embd, bias=True, pos_embedding="learned", norm="layernorm",
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="standard",
                intermediate_size=hf.get("n_inner") or 4 * n_embd,
                activation=_activation(hf.get("activation_function", "gelu_new"),
                                       "activation_function", where),
                tie_embeddings=hf.get("tie_word_embeddings", True))
        else:
            n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
            theta, scaling = _rope(hf, where)
            fields = dict(
                vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
                n_layer=hf["num_hidden_layers"], n_head=n_head,
                n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=n_embd,
                head_dim=hf.get("head_dim") or n_embd // n_head,
                bias=False, attn_bias=bool(hf.get("attention_bias", False)),
                mlp_bias=bool(hf.get("mlp_bias", False)), norm_bias=False,
                pos_embedding="rope", rope_theta=theta, rope_scaling=scaling, norm="rmsnorm",
                norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="glu",
                intermediate_size=hf["intermediate_size"],
                activation=_activation(hf.get("hidden_act", "silu"), "hidden_act", where),
                tie_embeddings=hf.get("tie_word_embeddings", False))
    except KeyError as e:
        raise PretrainedError(f"{where}: {ARCHITECTURES[arch]} config without {e.args[0]}") from None
    if block_size is not None:
        if not 1 <= block_size <= fields["block_size"]:
            raise PretrainedError(f"block_size {block_size}: must be in [1, {fields['block_size']}]"
                                  f" (the model's context, {where})")
        fields["block_size"] = block_size
    try:
        return arch, GPTConfig(**fields)
    except ConfigError as e:
        raise PretrainedError(f"{where}: gives {e}") from None


def export_architecture(cfg: GPTConfig) -> str:
    """"gpt2" or "llama": which transformers architecture computes the same function as a
    minigpt model of this config.

    Raises:
        PretrainedError: neither does; the message lists what differs from each.
    """
    shared = []
    if cfg.qk_norm:
        shared.append("qk_norm=True (neither has query/key normalisation)")
    if cfg.window is not None:
        shared.append(f"window={cfg.window} (neither has sliding-window attention)")
    if cfg.value_embeds:
        shared.append(f"value_embeds={cfg.value_embeds} (neither has value embeddings)")
    if cfg.unet_skips:
        shared.append("unet_skips=True (neither has skips between blocks)")
    if cfg.attn_gate:
        shared.append("attn_gate=True (neither gates its attention heads)")
    if cfg.logit_softcap is not None:
        shared.append(f"logit_softcap={cfg.logit_softcap} (neither caps its logits)")
    if cfg.layer_heads is not None:
        shared.append(f"layer_heads={list(cfg.layer_heads)} (per-layer head counts, as head "
                      f"pruning leaves them; both have one head count for every layer)")
    act = _ACT_TO_HF["gpt2"]
    gpt2 = [why for bad, why in [
        (cfg.pos_embedding != "learned", f"pos_embedding={cfg.pos_embedding!r} (GPT-2: 'learned')"),
        (cfg.norm != "layernorm", f"norm={cfg.norm!r} (GPT-2: 'layernorm')"),
        (cfg.mlp != "standard", f"mlp={cfg.mlp!r} (GPT-2: 'standard')"),
        (cfg.n_kv_head != cfg.n_head, f"n_kv_head={cfg.n_kv_head} != n_head (GPT-2 has no GQA)"),
        (cfg.head_dim * cfg.n_head != cfg.n_embd,
         f"head_dim={cfg.head_dim} != n_embd / n_head (GPT-2)"),
        (cfg.activation not in act, f"activation={cfg.activation!r}")] if bad]
    llama = [why for bad, why in [
        (cfg.pos_embedding != "rope", f"pos_embedding={cfg.pos_embedding!r} (Llama: 'rope')"),
        (cfg.norm != "rmsnorm", f"norm={cfg.norm!r} (Llama: 'rmsnorm')"),
        (cfg.mlp != "glu", f"mlp={cfg.mlp!r} (Llama: 'glu')")] if bad]
    if not shared and not gpt2:
        return "gpt2"
    if not shared and not llama:
        return "llama"
    raise PretrainedError("this model has no transformers architecture computing the same "
                          "function: " + "; ".join(
                              (["both: " + ", ".join(shared)] if shared else [])
                              + (["GPT-2: " + ", ".join(gpt2)] if gpt2 else [])
                              + (["Llama: " + ", ".join(llama)] if llama else []))
                          + ". Export it with --format safetensors instead")


def to_hf_config(cfg: GPTConfig, arch: str, special_tokens: Optional[dict] = None) -> dict:
    """The config.json of a transformers model equal to a minigpt model of config cfg, for
    arch "gpt2" or "llama" (see export_architecture). special_tokens: e.g. {"bos_token_id": 1,
    "eos_token_id": 2}, copied in."""
    act = _ACT_TO_HF[arch][cfg.activation]
    if arch == "gpt2":
        out = dict(architectures=[ARCHITECTURES[arch]], model_type="gpt2",
                   vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                   n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.intermediate_size,
                   activation_function=act, layer_norm_epsilon=cfg.norm_eps,
                   resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=0.0,
                   scale_attn_weights=True, tie_word_embeddings=cfg.tie_embeddings)
    else:
        out = dict(architectures=[ARCHITECTURES[arch]], model_type="llama",
                   vocab_size=cfg.vocab_size, max_position_embeddings=cfg.block_size,
                   hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
                   num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                   num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim, hidden_act=act,
                   rms_norm_eps=cfg.norm_eps, attention_bias=cfg.attn_bias,
                   mlp_bias=cfg.mlp_bias, attention_dropout=0.0,
                   # both spellings: transformers 5 reads rope_parameters, 4.x rope_theta
                   rope_theta=cfg.rope_theta,
                   rope_parameters=({"rope_theta": cfg.rope_theta, **cfg.rope_scaling}
                                    if cfg.rope_scaling else
                                    {"rope_type": "default", "rope_theta": cfg.rope_theta}),
                   tie_word_embeddings=cfg.tie_embeddings)
    out.update(special_tokens or {})
    out["torch_dtype"] = "float32"
    return out


# ---------------------------------------------------------------------------------------------
# Weights: one table of rules per architecture, read in both directions


@dataclass
class _Rule:
    """Our parameter `ours` is load(their tensors `theirs`); save(ours) gives them back."""

    ours: str
    theirs: Tuple[str, ...]
    load: Callable[..., torch.Tensor]
    save: Callable[[torch.Tensor], Tuple[torch.Tensor, ...]]


def _same(ours: str, theirs: str) -> _Rule:
    return _Rule(ours, (theirs,), lambda t: t, lambda t: (t,))


def _conv1d(ours: str, theirs: str) -> _Rule:
    # GPT-2's Conv1D keeps its weight as (in, out); nn.Linear as (out, in).
    return _Rule(ours, (theirs,), lambda t: t.t(), lambda t: (t.t(),))


def halves_to_pairs(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """q or k projection rows (n_heads * head_dim, ...) from rotate_half order (in each head,
    row i rotates with row i + head_dim/2) to ours (row 2i with row 2i + 1): our row 2i is
    their row i, our row 2i + 1 their row i + head_dim/2."""
    rest = w.shape[1:]
    w = w.reshape(n_heads, 2, head_dim // 2, *rest)  # (heads, half, i, ...)
    return w.transpose(1, 2).reshape(n_heads * head_dim, *rest)  # (heads * (i, half), ...)


def pairs_to_halves(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """The inverse of halves_to_pairs."""
    rest = w.shape[1:]
    w = w.reshape(n_heads, head_dim // 2, 2, *rest)  # (heads, i, half, ...)
    return w.transpose(1, 2).reshape(n_heads * head_dim, *rest)


def _qkv_rule(ours: str, q: str, k: str, v: str, cfg: GPTConfig) -> _Rule:
    nh, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim

    def load(tq, tk, tv):
        return torch.cat([halves_to_pairs(tq, nh, hd), halves_to_pairs(tk, nkv, hd), tv])

    def save(t):
        tq, tk, tv = t.split([nh * hd, nkv * hd, nkv * hd])
        return pairs_to_halves(tq, nh, hd), pairs_to_halves(tk, nkv, hd), tv

    return _Rule(ours, (q, k, v), load, save)


def _rules(arch: str, cfg: GPTConfig) -> List[_Rule]:
    """The parameter map of a minigpt model of config cfg and a transformers model of arch.
    Biases that our model does not have are absent here (see to_hf_weights for GPT-2)."""
    rules: List[_Rule] = []
    if arch == "gpt2":
        rules += [_same("transformer.wte.weight", "transformer.wte.weight"),
                  _Rule("transformer.wpe.weight", ("transformer.wpe.weight",),
                        lambda t: t[:cfg.block_size], lambda t: (t,))]
        for i in range(cfg.n_layer):
            us, them = f"transformer.h.{i}.", f"transformer.h.{i}."
            for norm in ("ln_1", "ln_2"):
                rules.append(_same(us + norm + ".weight", them + norm + ".weight"))
                if cfg.norm_bias:
                    rules.append(_same(us + norm + ".bias", them + norm + ".bias"))
            for mod, bias in (("attn.c_attn", cfg.attn_bias), ("attn.c_proj", cfg.attn_bias),
                              ("mlp.c_fc", cfg.mlp_bias), ("mlp.c_proj", cfg.mlp_bias)):
                rules.append(_conv1d(us + mod + ".weight", them + mod + ".weight"))
                if bias:
                    rules.append(_same(us + mod + ".bias", them + mod + ".bias"))
        rules.append(_same("transformer.ln_f.weight", "transformer.ln_f.weight"))
        if cfg.norm_bias:
            rules.append(_same("transformer.ln_f.bias", "transformer.ln_f.bias"))
    else:
        rules.append(_same("transformer.wte.weight", "model.embed_tokens.weight"))
        for i in range(cfg.n_layer):
            us, them = f"transformer.h.{i}.", f"model.layers.{i}."
            rules += [_same(us + "ln_1.weight", them + "input_layernorm.weight"),
                      _same(us + "ln_2.weight", them + "post_attention_layernorm.weight")]
            kinds = ["weight"] + (["bias"] if cfg.attn_bias else [])
            for kind in kinds:
                a = them + "self_attn."
                rules += [_qkv_rule(us + "attn.c_attn." + kind, a + "q_proj." + kind,
                                    a + "k_proj." + kind, a + "v_proj." + kind, cfg),
                          _same(us + "attn.c_proj." + kind, a + "o_proj." + kind)]
            for kind in ["weight"] + (["bias"] if cfg.mlp_bias else []):
                m = them + "mlp."
                rules += [_Rule(us + "mlp.c_fc." + kind, (m + "gate_proj." + kind,
                                                          m + "up_proj." + kind),
                                lambda g, u: torch.cat([g, u]), lambda t: tuple(t.chunk(2))),
                          _same(us + "mlp.c_proj." + kind, m + "down_proj." + kind)]
        rules.append(_same("transformer.ln_f.weight", "model.norm.weight"))
    if not cfg.tie_embeddings:
        rules.append(_same("lm_head.weight", "lm_head.weight"))
    return rules


# Tensors of a Hugging Face file that are not parameters: GPT-2's causal-mask buffers and old
# Llama files' rotary inv_freq (recomputed from rope_theta in both libraries).
_BUFFERS = re.compile(r".*(\.attn\.bias|\.attn\.masked_bias|\.rotary_emb\.inv_freq)$")


def _hf_names(arch: str, weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """GPT-2 files written by GPT2Model (and the original "gpt2" upload) name the weights
    without the "transformer." prefix; add it, so that one table serves both."""
    if arch != "gpt2":
        return weights
    return {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
            for k, v in weights.items()}


def to_minigpt_weights(arch: str, cfg: GPTConfig, weights: Dict[str, torch.Tensor],
                       where: str = "the weights") -> Dict[str, torch.Tensor]:
    """Our state dict (names of minigpt.GPT) from a transformers model's weights.

    Tensors are taken out of `weights` as they are converted (the caller's dict is emptied of
    them), so a large model is not held twice.

    Raises:
        PretrainedError: a weight missing, of the wrong shape, or left over (a parameter the
            configuration does not explain: refused, never dropped).
    """
    weights = _hf_names(arch, weights)
    tied_head = cfg.tie_embeddings and "lm_head.weight" in weights
    out = {}
    for rule in _rules(arch, cfg):
        missing = [name for name in rule.theirs if name not in weights]
        if missing:
            raise PretrainedError(f"{where}: no tensor {missing[0]} (needed for {rule.ours})")
        out[rule.ours] = rule.load(*(weights.pop(name) for name in rule.theirs)).contiguous()
    if tied_head:
        weights.pop("lm_head.weight")  # a tied head saved anyway: transformers ties it too
    left = sorted(k for k in weights if not _BUFFERS.fullmatch(k))
    if left:
        raise PretrainedError(f"{where}: {len(left)} tensors that a {ARCHITECTURES[arch]} "
                              f"of this config.json does not have, e.g. {', '.join(left[:3])}")
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def to_hf_weights(arch: str, cfg: GPTConfig, state: Dict[str, torch.Tensor]
                  ) -> Dict[str, torch.Tensor]:
    """A transformers model's weights (contiguous, unshared tensors) from our state dict.

    GPT-2 always has biases: those our model lacks are written as zeros, which computes the
    same function. A tied head is left out (transformers ties it from tie_word_embeddings).
    """
    state = dict(state)
    if arch == "gpt2":
        zeros = {}
        for i in range(cfg.n_layer):
            p = f"transformer.h.{i}."
            for name, width in (("ln_1", cfg.n_embd), ("ln_2", cfg.n_embd),
                                ("attn.c_attn", state[p + "attn.c_attn.weight"].shape[0]),
                                ("attn.c_proj", cfg.n_embd),
                                ("mlp.c_fc", cfg.intermediate_size), ("mlp.c_proj", cfg.n_embd)):
                zeros[p + name + ".bias"] = width
        zeros["transformer.ln_f.bias"] = cfg.n_embd
        for name, width in zeros.items():
            if name not in state:
                state[name] = torch.zeros(width, dtype=state["transformer.wte.weight"].dtype)
        cfg = GPTConfig(**{**cfg.to_dict(), "attn_bias": True, "mlp_bias": True,
                           "norm_bias": True})
    out = {}
    for rule in _rules(arch, cfg):
        for name, t in zip(rule.theirs, rule.save(state[rule.ours])):
            out[name] = t.detach().contiguous().clone()
    return out
