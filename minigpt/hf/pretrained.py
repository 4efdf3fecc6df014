"""Hugging Face models into minigpt and back: GPT-2 (GPT2LMHeadModel) and Llama-architecture
models (LlamaForCausalLM: Llama, TinyLlama, SmolLM, ...).

    from minigpt import GPT
    from minigpt.hf.pretrained import load_tokenizer
    model = GPT.from_pretrained("path/to/gpt2")            # or a hub name, when online
    tokenizer = load_tokenizer("path/to/gpt2")

A model directory holds config.json and the weights: model.safetensors (read with the
safetensors library), pytorch_model.bin (read with torch.load(weights_only=True), which runs no
pickled code), or either one sharded with its *.index.json. Nothing here imports transformers:
the configuration is read from config.json and mapped field by field (to_minigpt_config), and
the weights are renamed and reshaped by one table per architecture (_rules), which serves both
directions: loading here and exporting (minigpt.hf.export).

What the mapping does, and why the logits are the same:
- GPT-2 (Radford et al. 2019) stores its projections as Conv1D, weight (in, out): transposed to
  nn.Linear's (out, in). Learned absolute positions (wpe), LayerNorm with biases, a 4x GELU MLP
  ("gelu_new" is the tanh approximation), tied output head.
- Llama (Touvron et al. 2023): RMSNorm, SwiGLU MLP (gate_proj and up_proj side by side in our
  c_fc), RoPE, grouped-query attention, optionally untied head and a head_dim of its own. Hugging
  Face's rotary pairs dimension i with i + head_dim/2 in each head ("rotate_half"); ours pairs
  2i with 2i + 1 (RoFormer's layout). Attention scores q . k are unchanged when q and k are
  permuted alike, so the q_proj and k_proj rows of each head are permuted on load
  (_halves_to_pairs) and back on export (_pairs_to_halves), as transformers' own Llama
  conversion script does in the other direction.

A configuration feature minigpt does not have is refused by name (PretrainedError), never
ignored: rope scaling (rope_type "linear", "dynamic", "yarn", "llama3", ...), sliding windows,
partial rotary, cross attention, GPT-2's unscaled or layer-scaled attention, quantized weights,
an activation we lack. Dropout settings (attn_pdrop, resid_pdrop, attention_dropout) only act
in training: the loaded model has dropout 0 (fine-tuning sets its own, --dropout; attention
probabilities have no dropout in minigpt). pretraining_tp only splits matmuls into slices.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from minigpt.config import ConfigError, GPTConfig
from minigpt.tokenizer import GPT2Tokenizer, HFTokenizer

__all__ = ["PretrainedError", "pretrained_state", "load_tokenizer", "model_dir",
           "read_hf_config", "read_weights", "hf_architecture", "to_minigpt_config",
           "to_minigpt_weights", "export_architecture", "to_hf_config", "to_hf_weights",
           "chat_settings", "ARCHITECTURES"]

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
GPT2_VOCAB = 50257  # tiktoken's "gpt2": 50,000 merges + 256 bytes + <|endoftext|>

# Hugging Face activation names (transformers.activations.ACT2FN) <-> ours.
_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "silu": "silu", "swish": "silu", "relu2": "relu2"}
_ACT_TO_HF = {"gpt2": {"gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu",
                       "relu2": "relu2"},
              "llama": {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu",
                        "relu2": "relu2"}}

# Files fetched from the hub: the configuration, the tokenizer, the weights.
_HUB_META = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json"]
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class PretrainedError(ValueError):
    """A pretrained model cannot be found, read or represented; the one-line message names the
    model, the file or the configuration feature, and what to do."""


# ---------------------------------------------------------------------------------------------
# Finding and reading the files


def add_model_source_args(parser, init_from_help: str = "") -> None:
    """The command lines' choice of model: --checkpoint (a minigpt run) or --init-from (a
    pretrained model); init_from_help is appended to --init-from's help."""
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", default=None,
                       help="checkpoint file, or a directory holding ckpt.pt (default: "
                            "out/ckpt.pt)")
    model.add_argument("--init-from", metavar="PATH_OR_NAME", default=None,
                       help="a pretrained model instead: a Hugging Face directory (GPT-2 or "
                            "Llama-family), a Llama-architecture GGUF file (pip install gguf) "
                            "or a hub name" + init_from_help)


def model_dir(path_or_name: str) -> Path:
    """The local directory of a model: path_or_name itself, or a hub name ("gpt2",
    "HuggingFaceTB/SmolLM-135M") downloaded (or found in the cache) with
    huggingface_hub.snapshot_download: config, tokenizer and safetensors weights, or
    pytorch_model.bin weights when the repository has no safetensors.

    Raises:
        PretrainedError: not a directory and not a hub name; huggingface_hub missing; offline
            (or no such repository) without a cached copy: the message says what to download
            and where to put it.
    """
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise PretrainedError(f"{path_or_name}: is a file but not a GGUF file; give a GGUF file "
                              f"or the model's directory (with config.json and "
                              f"model.safetensors or pytorch_model.bin)")
    name = str(path_or_name)
    if not _HUB_NAME.fullmatch(name) or name.startswith("."):
        raise PretrainedError(f"{path_or_name}: no such directory")
    advice = (f"download it where there is a network, e.g. `hf download {name} --local-dir "
              f"DIR` (huggingface_hub's command line; config.json, tokenizer.json and "
              f"model.safetensors are enough), copy DIR here and pass DIR instead of {name}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PretrainedError(f"{name}: no such directory, and huggingface_hub is not installed "
                              f"to fetch it from the hub (pip install huggingface_hub); or "
                              f"{advice}") from None
    try:
        local = Path(snapshot_download(name, allow_patterns=_HUB_META + [
            "*.safetensors", "*.safetensors.index.json"]))
        if not any(local.glob("*.safetensors")):
            local = Path(snapshot_download(name, allow_patterns=_HUB_META + [
                "pytorch_model*.bin", "pytorch_model.bin.index.json"]))
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise PretrainedError(f"{name}: no such directory, and the Hugging Face hub did not "
                              f"give it ({type(e).__name__}: {first}); {advice}") from None
    return local


def read_hf_config(directory: Path) -> dict:
    """config.json of a model directory, as a dict. Raises PretrainedError naming the file."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise PretrainedError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PretrainedError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise PretrainedError(f"{path}: not a configuration (expected a JSON object)")
    return cfg


def _load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise PretrainedError(f"{path}: reading safetensors needs the safetensors package "
                              f"(pip install safetensors)") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise PretrainedError(f"{path}: cannot be read as safetensors ({e})") from None


def _load_bin(path: Path) -> Dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PretrainedError(f"{path}: cannot be read safely with torch.load(weights_only=True) "
                              f"({first})") from None
    if not isinstance(state, dict):
        raise PretrainedError(f"{path}: not a state dict")
    return state


def read_weights(directory: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a model directory by its Hugging Face name, as stored (dtype kept).

    Looks for, in this order: model.safetensors.index.json (shards), model.safetensors,
    pytorch_model.bin.index.json, pytorch_model.bin.

    Raises:
        PretrainedError: no weights file, or one that cannot be read (named).
    """
    directory = Path(directory)
    for index_name, load in (("model.safetensors.index.json", _load_safetensors),
                             ("pytorch_model.bin.index.json", _load_bin)):
        index = directory / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                                    .values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise PretrainedError(f"{index}: not a shard index ({e})") from None
            state = {}
            for shard in shards:
                if not (directory / shard).is_file():
                    raise PretrainedError(f"{index}: names {shard}, which is missing")
                state.update(load(directory / shard))
            return state
    if (directory / "model.safetensors").is_file():
        return _load_safetensors(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():
        return _load_bin(directory / "pytorch_model.bin")
    raise PretrainedError(f"{directory}: no weights (expected model.safetensors, "
                          f"pytorch_model.bin, or a sharded *.index.json)")


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


def _halves_to_pairs(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """q or k projection rows (n_heads * head_dim, ...) from rotate_half order (in each head,
    row i rotates with row i + head_dim/2) to ours (row 2i with row 2i + 1): our row 2i is
    their row i, our row 2i + 1 their row i + head_dim/2."""
    rest = w.shape[1:]
    w = w.reshape(n_heads, 2, head_dim // 2, *rest)  # (heads, half, i, ...)
    return w.transpose(1, 2).reshape(n_heads * head_dim, *rest)  # (heads * (i, half), ...)


def _pairs_to_halves(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """The inverse of _halves_to_pairs."""
    rest = w.shape[1:]
    w = w.reshape(n_heads, head_dim // 2, 2, *rest)  # (heads, i, half, ...)
    return w.transpose(1, 2).reshape(n_heads * head_dim, *rest)


def _qkv_rule(ours: str, q: str, k: str, v: str, cfg: GPTConfig) -> _Rule:
    nh, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim

    def load(tq, tk, tv):
        return torch.cat([_halves_to_pairs(tq, nh, hd), _halves_to_pairs(tk, nkv, hd), tv])

    def save(t):
        tq, tk, tv = t.split([nh * hd, nkv * hd, nkv * hd])
        return _pairs_to_halves(tq, nh, hd), _pairs_to_halves(tk, nkv, hd), tv

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


# ---------------------------------------------------------------------------------------------
# Tokenizers and the whole model


def _is_gpt2_bpe(tok: HFTokenizer) -> bool:
    """Whether a tokenizer.json is GPT-2's own BPE (then tiktoken's "gpt2" gives its ids)."""
    return (tok.vocab_size == GPT2_VOCAB and tok.tok.token_to_id("Ġthe") == 262
            and tok.tok.token_to_id("<|endoftext|>") == GPT2_VOCAB - 1)


def load_tokenizer(path_or_name: str, vocab_size: Optional[int] = None):
    """The tokenizer of a pretrained model: a GPT-2 model with GPT-2's vocabulary -> minigpt's
    "gpt2" (tiktoken); otherwise the directory's tokenizer.json -> "hf" (Hugging Face
    tokenizers), e.g. a Llama-family model's, or a GPT-2-architecture model trained with
    another vocabulary.

    Raises:
        PretrainedError: no tokenizer.json where one is needed, one that cannot be read, or a
            tokenizer with ids beyond the model's vocabulary.
    """
    gguf_path = _gguf_path(path_or_name)
    if gguf_path is not None:
        from minigpt.hf.gguf_file import read_gguf

        contents = read_gguf(gguf_path, with_tensors=False)
        return _checked_tokenizer(HFTokenizer(contents["tokenizer"]), gguf_path,
                                  vocab_size or contents["config"]["vocab_size"])
    directory = model_dir(path_or_name)
    hf = read_hf_config(directory)
    arch = hf_architecture(hf, str(directory / "config.json"))
    vocab = vocab_size or hf.get("vocab_size", GPT2_VOCAB)
    path = directory / "tokenizer.json"
    if arch == "gpt2" and vocab >= GPT2_VOCAB and not path.is_file():
        return GPT2Tokenizer()
    if not path.is_file():
        why = (f"its vocabulary ({vocab}) is not GPT-2's" if arch == "gpt2"
               else "a Llama-family model's tokenizer comes from there")
        raise PretrainedError(f"{directory}: no tokenizer.json ({why}); a directory with only "
                              f"tokenizer.model can get one with transformers: "
                              f"AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    try:
        tok = HFTokenizer.from_file(path)
    except (OSError, ValueError, ImportError) as e:
        raise PretrainedError(str(e)) from None
    if arch == "gpt2" and _is_gpt2_bpe(tok):
        return GPT2Tokenizer()
    return _checked_tokenizer(tok, path, vocab)


def _checked_tokenizer(tok: HFTokenizer, where, vocab: int) -> HFTokenizer:
    if tok.vocab_size > vocab:
        raise PretrainedError(f"{where}: token ids up to {tok.vocab_size - 1}, beyond the "
                              f"model's vocabulary of {vocab}")
    return tok


def _gguf_path(path_or_name: str) -> Optional[Path]:
    """path_or_name as a Path if it is a GGUF file, else None."""
    from minigpt.hf.gguf_file import is_gguf

    path = Path(path_or_name).expanduser()
    return path if path.is_file() and is_gguf(path) else None


def _token_text(value) -> Optional[str]:
    """A special token of tokenizer_config.json: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> List[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value] if isinstance(value, list) else []


def chat_settings(directory: Path, hf: dict) -> dict:
    """What instruct generation needs from a model directory: {"chat_template": the Jinja
    template of tokenizer_config.json (its "default" one when it lists several) or of
    chat_template.jinja, else None; "bos_token", "eos_token": their texts (for the template);
    "stop_token_ids": the ids that end a reply: generation_config.json's eos_token_id (an int
    or a list), else config.json's}."""
    def read(name):
        try:
            value = json.loads((directory / name).read_text(encoding="utf-8"))
            return value if isinstance(value, dict) else {}
        except (OSError, ValueError):
            return {}

    tok_cfg, gen_cfg = read("tokenizer_config.json"), read("generation_config.json")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja = directory / "chat_template.jinja"
    if not isinstance(template, str) and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    stop = _ids(gen_cfg.get("eos_token_id")) or _ids(hf.get("eos_token_id"))
    return {"chat_template": template if isinstance(template, str) else None,
            "bos_token": _token_text(tok_cfg.get("bos_token")),
            "eos_token": _token_text(tok_cfg.get("eos_token")), "stop_token_ids": stop}


def _gguf_state(path: Path, block_size, dtype, tokenizer: bool) -> dict:
    from minigpt.hf.gguf_file import read_gguf

    contents = read_gguf(path)
    arch, cfg = to_minigpt_config(contents["config"], block_size, str(path))
    state = to_minigpt_weights(arch, cfg, contents["weights"], where=str(path))
    state = {k: v.to(dtype) for k, v in state.items()}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    tok = (_checked_tokenizer(HFTokenizer(contents["tokenizer"]), path, cfg.vocab_size)
           if tokenizer else None)
    special = contents["special_tokens"]
    names = {}
    if tok is not None:
        names = {k: tok.tok.id_to_token(special[k + "_id"]) for k in ("bos_token", "eos_token")
                 if k + "_id" in special}
    # Llama 3 ends a turn with <|eot_id|> (eot) and a tool call with <|eom_id|> (eom).
    stop = [special[k] for k in ("eos_token_id", "eot_token_id", "eom_token_id") if k in special]
    chat = {"chat_template": contents["chat_template"], "bos_token": names.get("bos_token"),
            "eos_token": names.get("eos_token"), "stop_token_ids": sorted(set(stop))}
    return {"model": state, "model_config": cfg.to_dict(),
            "tokenizer": tok.state_dict() if tok is not None else None,
            "source": str(path), "architecture": arch, "chat": chat}


def pretrained_state(path_or_name: str, *, block_size: Optional[int] = None,
                     dtype: torch.dtype = torch.float32, tokenizer: bool = True) -> dict:
    """A pretrained model as a minigpt checkpoint dict (what minigpt.load_checkpoint returns,
    less the training state): {"model": state dict, "model_config": GPTConfig dict,
    "tokenizer": tokenizer state (None with tokenizer=False), "source": the model's directory,
    "architecture": "gpt2" or "llama"}. GPT.from_checkpoint builds the model from it.

    Also "chat": the chat template and stop tokens (chat_settings; from a GGUF file, its
    tokenizer.chat_template and its eos/eot/eom token ids).

    Args:
        path_or_name: a model directory or a hub name (see model_dir), or a Llama-architecture
            GGUF file (minigpt.hf.gguf_file; needs the gguf package).
        block_size: context to keep (default the model's; at most that).
        dtype: of the floating-point weights (default float32; the files may hold bf16).
        tokenizer: also read the tokenizer (load_tokenizer).

    Raises:
        PretrainedError: see model_dir, read_weights, to_minigpt_config, to_minigpt_weights,
            load_tokenizer.
    """
    gguf_path = _gguf_path(path_or_name)
    if gguf_path is not None:
        return _gguf_state(gguf_path, block_size, dtype, tokenizer)
    directory = model_dir(path_or_name)
    where = str(directory / "config.json")
    hf = read_hf_config(directory)
    arch, cfg = to_minigpt_config(hf, block_size, where)
    weights = read_weights(directory)
    state = to_minigpt_weights(arch, cfg, weights, where=str(directory))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    tok = load_tokenizer(str(directory), cfg.vocab_size) if tokenizer else None
    return {"model": state, "model_config": cfg.to_dict(),
            "tokenizer": tok.state_dict() if tok is not None else None,
            "source": str(directory), "architecture": arch, "chat": chat_settings(directory, hf)}
