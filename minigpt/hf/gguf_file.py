"""Llama-architecture GGUF files (llama.cpp's format) into minigpt.

    from minigpt import GPT
    model = GPT.from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")
    python sample.py --init-from model.gguf --chat --prompt "What is the capital of France?"

A GGUF file holds typed metadata (the architecture's hyperparameters under "llama.*", the
tokenizer under "tokenizer.*") and the tensors, each stored as F32, F16, BF16 or one of ggml's
block-quantized types (Q8_0, Q4_0, Q4_1, Q5_*, K-quants, ...). It is read with the `gguf`
package (llama.cpp's own Python package; pip install gguf, or the extra
"minigpt-kernels[gguf]"): its type tables (GGUFValueType, GGMLQuantizationType,
GGML_QUANT_SIZES) and gguf.quants.dequantize, which turns every tensor into float32. The header
(metadata and tensor index) is parsed here with struct, after the GGUF specification
(ggml/docs/gguf.md): gguf.GGUFReader makes one numpy view per array element, 16 s of a
SmolLM2-135M load for its 150,000 vocabulary strings, merges and token types, where this parse
takes well under a second. Nothing in the file is executed: the chat template is a string,
rendered later in a sandbox (minigpt.hf.chat).

The metadata is mapped to the fields of a Hugging Face LlamaForCausalLM config.json, and the
tensors to its parameter names, so that minigpt.hf.convert's checks and its weight table serve
GGUF files too (a feature minigpt lacks is refused by name there). Two things differ from a
Hugging Face directory:
- llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) reorders the rows of q and k
  of each head from rotate_half order (row i with row i + head_dim/2) to adjacent pairs (2i with
  2i + 1), which is minigpt's own RoPE layout; pairs_to_halves undoes it here (as transformers'
  GGUF loader does: LlamaTensorProcessor._reverse_permute_weights), and the shared table then
  permutes back, so the file's rows arrive as they were stored.
- The tokenizer is rebuilt with the `tokenizers` library from the vocabulary, merges and token
  types in the metadata (byte-level BPE, tokenizer.ggml.model "gpt2"), with the pre-tokenizer
  that tokenizer.ggml.pre names (llama.cpp's llama-vocab.cpp lists the regular expressions).

Llama 3.1/3.2 files store RoPE's "llama3" frequency scaling as a tensor of per-frequency
divisors (rope_freqs.weight) rather than its parameters: it is accepted when it equals the
llama3 formula for one of Meta's published settings (_LLAMA3_CANDIDATES), and refused otherwise.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Dict, NamedTuple, Tuple

import numpy as np
import torch

from minigpt.hf.convert import PretrainedError, pairs_to_halves

INSTALL = 'pip install gguf (or pip install "minigpt-kernels[gguf]")'

# llama.* metadata -> LlamaForCausalLM config.json field. Keys not listed here nor in _IGNORED are
# refused by name: they would change the function (expert counts, rope scaling, ...).
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}
# Keys that restate what the tensors' shapes already say (checked against them).
_SHAPE_KEYS = ("rope.dimension_count", "attention.key_length", "attention.value_length")
_IGNORED_LLAMA = {"expert_used_count"}  # meaningless without experts (expert_count is refused)

# tokenizer.* metadata that only describes the tokenizer; other tokenizer keys are refused.
_TOKENIZER_KEYS = {"model", "pre", "tokens", "token_type", "merges", "scores", "add_bos_token",
                   "add_eos_token", "add_space_prefix", "bos_token_id", "eos_token_id",
                   "eot_token_id", "eom_token_id", "unknown_token_id", "padding_token_id",
                   "seperator_token_id", "separator_token_id", "cls_token_id", "mask_token_id"}

# GGUF tensor names (llama.cpp's gguf-py/gguf/tensor_mapping.py) -> transformers' Llama names.
_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Pre-tokenizers by tokenizer.ggml.pre, after llama.cpp's llama-vocab.cpp: GPT-2's regex as
# `tokenizers`' ByteLevel applies it; SmolLM splits digits one by one first; Llama 3's regex.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    "gpt2": [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
              "use_regex": True}],
    "smollm": [{"type": "Digits", "individual_digits": True},
               {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                "use_regex": True}],
    "llama3": [{"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated",
                "invert": False},
               {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                "use_regex": False}],
}
_PRE_TOKENIZERS["default"] = _PRE_TOKENIZERS["gpt2"]
_PRE_TOKENIZERS["llama-bpe"] = _PRE_TOKENIZERS["llama-v3"] = _PRE_TOKENIZERS["llama3"]

# llama3 RoPE settings of Meta's Llama 3.1 (factor 8) and 3.2 (factor 32) releases.
_LLAMA3_CANDIDATES = [dict(rope_type="llama3", factor=f, low_freq_factor=1.0,
                           high_freq_factor=4.0, original_max_position_embeddings=8192)
                      for f in (8.0, 32.0)]

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types (gguf.TokenType)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise PretrainedError(f"reading GGUF files needs the gguf package: {INSTALL}") from None
    return gguf


def is_gguf(path) -> bool:
    """Whether path is a file that starts with GGUF's magic bytes."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def read_gguf(path, with_tensors: bool = True) -> dict:
    """The contents of a Llama-architecture GGUF file, in Hugging Face terms.

    Returns:
        {"config": a LlamaForCausalLM config.json dict, "weights": {transformers name: float32
        tensor} (empty with with_tensors=False), "tokenizer": the tokenizer.json string,
        "chat_template": str or None, "special_tokens": {"bos_token_id", "eos_token_id",
        ...: int}, "name": general.name or None}.

    Raises:
        PretrainedError: gguf not installed; not a GGUF file; an architecture other than
            "llama", a metadata key, tensor or tensor type minigpt does not support (each named),
            a tokenizer other than byte-level BPE with a known pre-tokenizer.
    """
    gguf = _gguf()
    path = Path(path)
    meta, tensors = _read_header(path, gguf)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise PretrainedError(f"{path}: general.architecture={arch!r} is not supported (minigpt "
                              f"reads 'llama' GGUF files: Llama, SmolLM, TinyLlama, ...)")
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    shapes = {}
    for key, value in meta.items():
        if key.startswith("general."):
            continue
        if key.startswith("tokenizer."):
            sub = key[len("tokenizer.ggml."):] if key.startswith("tokenizer.ggml.") else None
            if key != "tokenizer.chat_template" and sub not in _TOKENIZER_KEYS:
                raise PretrainedError(f"{path}: metadata key {key} is not supported by minigpt")
            continue
        sub = key[len("llama."):] if key.startswith("llama.") else None
        if sub in _CONFIG_KEYS:
            if isinstance(value, list):
                raise PretrainedError(f"{path}: {key}={value[:4]}... (one value per layer) is not "
                                      f"supported by minigpt")
            hf[_CONFIG_KEYS[sub]] = value
        elif sub in _SHAPE_KEYS:
            shapes[sub] = value
        elif sub in _IGNORED_LLAMA:
            continue
        elif sub is not None and sub.startswith("rope.scaling.") and \
                meta.get("llama.rope.scaling.type", "none") == "none":
            continue  # parameters of no scaling
        else:
            raise PretrainedError(f"{path}: metadata key {key}={value!r} is not supported by "
                                  f"minigpt (refused rather than ignored)")
    hf.setdefault("rms_norm_eps", 1e-5)  # llama.cpp's default when the key is absent
    n_head = hf.get("num_attention_heads")
    hf.setdefault("num_key_value_heads", n_head)
    if "vocab_size" not in hf and "tokenizer.ggml.tokens" in meta:
        hf["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    hf["tie_word_embeddings"] = "output.weight" not in tensors
    hf["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if "blk.0.attn_q.weight" in tensors and n_head:
        hd = tensors["blk.0.attn_q.weight"].shape[0] // n_head  # (out, in)
        hf["head_dim"] = hd
        rot = shapes.get("rope.dimension_count", hd)
        if rot != hd:
            raise PretrainedError(f"{path}: llama.rope.dimension_count={rot} rotates part of each "
                                  f"{hd}-wide head (partial rotary), which minigpt does not support")
    if "rope_freqs.weight" in tensors:
        hf["rope_scaling"] = _llama3_from_factors(path, tensors["rope_freqs.weight"], hf, gguf)
    hf["torch_dtype"] = "float32"

    special = {key[len("tokenizer.ggml."):]: int(value) for key, value in meta.items()
               if key.startswith("tokenizer.ggml.") and key.endswith("_token_id")}
    hf.update({k: v for k, v in special.items() if k in ("bos_token_id", "eos_token_id")})
    out = {"config": hf, "weights": {}, "tokenizer": _tokenizer_json(path, meta, gguf),
           "chat_template": meta.get("tokenizer.chat_template"), "special_tokens": special,
           "name": meta.get("general.name")}
    if with_tensors:
        out["weights"] = _weights(path, tensors, hf, gguf)
    return out


class _Tensor(NamedTuple):
    """One tensor of a GGUF file: shape in torch's order (out, in), ggml type id, raw bytes."""

    name: str
    shape: Tuple[int, ...]
    ggml_type: int
    data: np.ndarray  # uint8, (rows, bytes per row): a view of the memory-mapped file


# GGUF metadata value types (gguf.GGUFValueType) of fixed size, as struct/numpy formats.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _read_header(path: Path, gguf) -> Tuple[dict, Dict[str, _Tensor]]:
    """(metadata {key: value}, tensors {name: _Tensor}) of a GGUF file (version 2 or 3).

    Layout (ggml/docs/gguf.md): "GGUF", u32 version, u64 tensor count, u64 key count; each key
    a string (u64 length, UTF-8 bytes), a u32 value type and the value (an array: u32 item
    type, u64 count, items); each tensor a name, u32 n_dims, u64 dims (innermost first), u32
    ggml type, u64 offset into the data section, which starts at the next multiple of
    general.alignment (default 32).

    Raises:
        PretrainedError: not GGUF, an unsupported version, truncated, or an unknown type (named).
    """
    try:
        # a plain ndarray view: slicing a np.memmap costs a Python-level __array_finalize__
        buf = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
    except (OSError, ValueError) as e:
        raise PretrainedError(f"{path}: cannot be read ({e})") from None
    raw = memoryview(buf)
    pos = 0

    def take(fmt):
        nonlocal pos
        value = struct.unpack_from(fmt, raw, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def string():
        nonlocal pos
        n = take("<Q")
        text = bytes(raw[pos:pos + n]).decode("utf-8", errors="replace")
        pos += n
        return text

    def value(kind):
        nonlocal pos
        if kind in _SCALARS:
            return take(_SCALARS[kind])
        if kind == _STRING:
            return string()
        if kind == _ARRAY:
            item, n = take("<I"), take("<Q")
            if item in _SCALARS:
                dtype = np.dtype(_SCALARS[item])
                out = np.frombuffer(raw, dtype=dtype, count=n, offset=pos).tolist()
                pos += n * dtype.itemsize
                return out
            return [value(item) for _ in range(n)]
        raise PretrainedError(f"{path}: metadata value type {kind} is not a GGUF type")

    try:
        if bytes(raw[:4]) != b"GGUF":
            raise PretrainedError(f"{path}: not a GGUF file (no GGUF magic)")
        pos = 4
        version = take("<I")
        if version not in (2, 3):
            raise PretrainedError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_keys = take("<Q"), take("<Q")
        meta = {}
        for _ in range(n_keys):
            key = string()
            meta[key] = value(take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            dims = [take("<Q") for _ in range(take("<I"))]
            infos.append((name, dims, take("<I"), take("<Q")))
    except (struct.error, ValueError, IndexError):
        raise PretrainedError(f"{path}: truncated or malformed GGUF header") from None
    align = int(meta.get("general.alignment", 32))
    start = (pos + align - 1) // align * align
    tensors = {}
    for name, dims, kind, offset in infos:
        try:
            qtype = gguf.GGMLQuantizationType(kind)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise PretrainedError(f"{path}: tensor {name} has ggml type {kind}, unknown to the "
                                  f"gguf package") from None
        row = dims[0] // block * type_size  # bytes per row (the innermost dimension)
        rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
        begin = start + offset
        if dims[0] % block or begin + rows * row > len(buf):
            raise PretrainedError(f"{path}: tensor {name} ({qtype.name}, dims {dims}) does not "
                                  f"fit the file")
        data = buf[begin:begin + rows * row].reshape(rows, row)
        tensors[name] = _Tensor(name, tuple(reversed(dims)), kind, data)
    return meta, tensors


def _dequantize(path, tensor: _Tensor, gguf) -> torch.Tensor:
    """One tensor as float32, in torch's (out, in) order."""
    qtype = gguf.GGMLQuantizationType(tensor.ggml_type)
    try:
        array = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError:
        raise PretrainedError(f"{path}: tensor {tensor.name} has type {qtype.name}, which the "
                              f"gguf package cannot dequantize") from None
    array = np.require(array, np.float32, ["C", "W"])  # copies F32 data out of the read-only map
    return torch.from_numpy(array.reshape(tensor.shape))


def _weights(path, tensors, hf, gguf) -> Dict[str, torch.Tensor]:
    n_head, n_kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    hd = hf.get("head_dim")
    out = {}
    for name, tensor in tensors.items():
        if name == "rope_freqs.weight":
            continue  # read into rope_scaling
        if name in _TENSORS:
            theirs = _TENSORS[name]
        else:
            parts = name.split(".")  # blk.N.kind.weight|bias
            if (len(parts) != 4 or parts[0] != "blk" or not parts[1].isdigit()
                    or parts[2] not in _BLOCK_TENSORS or parts[3] not in ("weight", "bias")):
                raise PretrainedError(f"{path}: tensor {name} is not part of a Llama model that "
                                      f"minigpt supports")
            theirs = f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}.{parts[3]}"
        t = _dequantize(path, tensor, gguf)
        if name.endswith((".attn_q.weight", ".attn_q.bias")):
            t = pairs_to_halves(t, n_head, hd)  # undo llama.cpp's permutation (see above)
        elif name.endswith((".attn_k.weight", ".attn_k.bias")):
            t = pairs_to_halves(t, n_kv, hd)
        out[theirs] = t
    return out


def llama3_inv_freq_factors(head_dim: int, theta: float, params: dict) -> torch.Tensor:
    """The divisor of each RoPE frequency under rope_type "llama3" (float64, (head_dim/2,)):
    1 for wavelengths below original_max_position_embeddings / high_freq_factor, factor above
    original / low_freq_factor, and in between 1 / ((1 - s) / factor + s) with
    s = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)."""
    from minigpt.positions import RotaryEmbedding

    inv_freq = RotaryEmbedding.inv_freq(head_dim, theta, None, torch.float64)
    scaled = RotaryEmbedding.inv_freq(head_dim, theta, params, torch.float64)
    return inv_freq / scaled


def _llama3_from_factors(path, tensor, hf, gguf) -> dict:
    factors = _dequantize(path, tensor, gguf).double().flatten()
    hd = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    theta = float(hf.get("rope_theta", 10000.0))
    for params in _LLAMA3_CANDIDATES:
        want = llama3_inv_freq_factors(hd, theta, params)
        if want.shape == factors.shape and torch.allclose(factors, want, rtol=1e-5, atol=0):
            return dict(params)
    raise PretrainedError(f"{path}: tensor rope_freqs.weight (RoPE frequency factors) matches no "
                          f"llama3 scaling minigpt knows (factor 8 or 32, low_freq_factor 1, "
                          f"high_freq_factor 4, original context 8192)")


def _tokenizer_json(path, meta, gguf) -> str:
    """tokenizer.json (the `tokenizers` library's format) for the file's byte-level BPE."""
    import json

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise PretrainedError(f"{path}: tokenizer.ggml.model={kind!r} is not supported (minigpt "
                              f"builds byte-level BPE tokenizers, 'gpt2', from GGUF metadata)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise PretrainedError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported (minigpt "
                              f"knows {', '.join(sorted(_PRE_TOKENIZERS))})")
    if "tokenizer.ggml.tokens" not in meta or "tokenizer.ggml.merges" not in meta:
        raise PretrainedError(f"{path}: no tokenizer.ggml.tokens or tokenizer.ggml.merges")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = meta["tokenizer.ggml.merges"]
    types = (meta["tokenizer.ggml.token_type"]
             if "tokenizer.ggml.token_type" in meta else [1] * len(tokens))
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": kind_ == _CONTROL}
             for i, (tok, kind_) in enumerate(zip(tokens, types))
             if kind_ in (_CONTROL, _USER_DEFINED)]
    bos = meta.get("tokenizer.ggml.bos_token_id")
    post = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
            "use_regex": True}
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        b = tokens[int(bos)]
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": b, "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": b, "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": b, "type_id": 1}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {b: {"id": b, "ids": [int(bos)], "tokens": [b]}}}
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": _PRE_TOKENIZERS[pre]},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {tok: i for i, tok in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in merges]},
    }
    return json.dumps(spec, ensure_ascii=False)
