"""Hugging Face models into minigpt: GPT-2 (GPT2LMHeadModel) and Llama-architecture models
(LlamaForCausalLM: Llama, TinyLlama, SmolLM, ...), from a directory, a hub name or a GGUF file.

    from minigpt import GPT
    from minigpt.hf.pretrained import load_tokenizer
    model = GPT.from_pretrained("path/to/gpt2")            # or a hub name, when online
    tokenizer = load_tokenizer("path/to/gpt2")

A model directory holds config.json and the weights: model.safetensors (read with the
safetensors library), pytorch_model.bin (read with torch.load(weights_only=True), which runs no
pickled code), or either one sharded with its *.index.json. Nothing here imports transformers:
the configuration and the weights are mapped by minigpt.hf.convert, whose rules also serve
exporting (minigpt.hf.export); a feature minigpt does not have is refused there by name
(PretrainedError).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional

import torch

from minigpt.hf.convert import (GPT2_VOCAB, PretrainedError, hf_architecture, to_minigpt_config,
                                to_minigpt_weights)
from minigpt.tokenizer import GPT2Tokenizer, HFTokenizer

__all__ = ["PretrainedError", "pretrained_state", "load_tokenizer", "model_dir",
           "read_hf_config", "read_weights", "chat_settings", "add_model_source_args"]

# Files fetched from the hub: the configuration, the tokenizer, the weights.
_HUB_META = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json"]
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


# ---------------------------------------------------------------------------------------------
# Finding and reading the files


def add_model_source_args(parser, init_from_help: str = "") -> None:
    """The command lines' choice of model: --checkpoint (a minigpt run) or --init-from (a
    pretrained model); init_from_help is appended to --init-from's help."""
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", default="out/ckpt.pt",
                       help="a minigpt checkpoint file, or a directory holding ckpt.pt")
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
