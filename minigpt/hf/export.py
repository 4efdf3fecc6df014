"""Export a minigpt model: a directory transformers loads, or a safetensors file.

    python -m minigpt export --checkpoint out/ --format hf DIR
    python -m minigpt export --checkpoint out/ --format safetensors model.safetensors

--format hf writes config.json, model.safetensors and the tokenizer (tokenizer.json and
tokenizer_config.json) for transformers' AutoModelForCausalLM / AutoTokenizer, as a
GPT2LMHeadModel (learned positions, LayerNorm, standard MLP, no GQA) or a LlamaForCausalLM
(RoPE, RMSNorm, GLU MLP); minigpt.hf.convert.export_architecture says which, or why neither
computes the same function (then use --format safetensors). A head-pruned model (per-layer head
counts, GPTConfig.layer_heads; python -m minigpt heads --prune) is refused: both configurations
hold one head count for all layers. The weights are mapped by the same
table that loads them (minigpt.hf.convert): GPT-2's matrices transposed to Conv1D, biases our
model lacks written as zeros; Llama's q/k rows permuted back to rotate_half order. A "gpt2"
tokenizer is written as a byte-level BPE tokenizer.json built from tiktoken's ranks (the merges
recovered as transformers' TikTokenConverter does); an "hf" one as its own tokenizer.json; a
"char" vocabulary has no transformers tokenizer, so none is written (the command says so).

--format safetensors writes any minigpt model: its state dict under minigpt's names (a tied head
stored once, as transformer.wte.weight), with {"model_config", "tokenizer"} as JSON both in the
file's metadata (key "minigpt") and beside it (FILE with the suffix .json). load_safetensors
reads it back into a checkpoint dict (GPT.from_checkpoint builds the model).

Nothing is overwritten unasked: an export onto its own source checkpoint (or its .json beside it),
or into a training run's directory (one holding ckpt.pt, metrics.jsonl or run.lock, whose
config.json an hf export would replace), is refused unless --force; the destination is checked before the checkpoint is read.

Exit codes: 0 written, 2 bad input (checkpoint, model, unsupported configuration, paths, a file
system that refused the write).
Needs the safetensors package (and tokenizers for the tokenizer files): the extra "hf".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from minigpt.checkpoint import (CheckpointError, atomic_write, atomic_write_text, checkpoint_file,
                         load_checkpoint)
from minigpt.config import GPTConfig
from minigpt.runtime import (ArgumentParser, PathError, check_dir_target, check_file_target, cli_main,
                      os_error_message)
from minigpt.hf.convert import (GPT2_VOCAB, PretrainedError, export_architecture, to_hf_config,
                                to_hf_weights)
from minigpt.hf.pretrained import add_model_source_args, pretrained_state

__all__ = ["export_hf", "export_safetensors", "load_safetensors", "gpt2_tokenizer_json", "main"]


def _serialize(tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> bytes:
    """The safetensors file of tensors (contiguous, none sharing memory) and string metadata."""
    try:
        from safetensors.torch import save
    except ImportError:
        raise PretrainedError("writing safetensors needs the safetensors package: pip install "
                              "safetensors (or pip install \"minigpt-kernels[hf]\")") from None
    return save(tensors, metadata=metadata)


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _bpe_parts(token: bytes, ranks: Dict[bytes, int], max_rank: int) -> List[bytes]:
    """The two tokens whose merge made `token`: byte-pair merging of its bytes with only the
    merges ranked below its own (Sennrich et al. 2016; as tiktoken's educational bpe and
    transformers' TikTokenConverter recover them)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def gpt2_tokenizer_json() -> str:
    """GPT-2's tokenizer (tiktoken "gpt2": 50,256 byte-level BPE tokens and <|endoftext|> =
    50256) as a Hugging Face tokenizer.json: the same ids for the same text.

    Raises:
        PretrainedError: the tokenizers package is missing.
    """
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise PretrainedError("writing a tokenizer.json needs the tokenizers package: pip "
                              "install tokenizers") from None
    import tiktoken

    from minigpt.tokenizer import _byte_decoder

    enc = tiktoken.get_encoding("gpt2")
    to_char = {b: c for c, b in _byte_decoder().items()}

    def text(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    tokens = [enc.decode_single_token_bytes(i) for i in range(enc.eot_token)]
    ranks = {t: i for i, t in enumerate(tokens)}
    merges = []
    for rank, token in enumerate(tokens):
        if len(token) > 1:
            a, b = _bpe_parts(token, ranks, rank)
            merges.append((text(a), text(b)))
    tok = Tokenizer(models.BPE({text(t): i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return tok.to_str()


def _write_tokenizer(tokenizer: Optional[dict], out: Path) -> Optional[str]:
    """Write tokenizer.json + tokenizer_config.json for a tokenizer state; returns what was
    written, in words, or None when there is no transformers equivalent (char)."""
    kind = (tokenizer or {}).get("kind")
    if kind == "gpt2":
        text, special = gpt2_tokenizer_json(), {"bos_token": "<|endoftext|>",
                                                "eos_token": "<|endoftext|>",
                                                "unk_token": "<|endoftext|>"}
    elif kind == "hf":
        text, special = tokenizer["json"], {}
    else:
        return None
    atomic_write_text(out / "tokenizer.json", text)
    _write_json(out / "tokenizer_config.json",
                {"tokenizer_class": "PreTrainedTokenizerFast", **special})
    return f"{kind} tokenizer as tokenizer.json"


def export_hf(state: dict, out_dir) -> dict:
    """Write a transformers-loadable directory for a minigpt checkpoint dict.

    Args:
        state: {"model": state dict, "model_config": GPTConfig dict, "tokenizer": its state}
            (minigpt.load_checkpoint, or minigpt.hf.pretrained.pretrained_state).
        out_dir: the directory (created; files in it are replaced).

    Returns:
        {"path", "architecture" ("gpt2" or "llama"), "tokenizer" (what was written, or None)}.

    Raises:
        PretrainedError: no transformers architecture computes this model (the reason lists
            what differs); safetensors (or tokenizers) is missing.
    """
    cfg = GPTConfig.from_dict(state["model_config"])
    arch = export_architecture(cfg)
    weights = to_hf_weights(arch, cfg, {k: v.detach().float().cpu()
                                        for k, v in state["model"].items()})
    blob = _serialize(weights, {"format": "pt"})
    tokenizer = state.get("tokenizer")
    special = ({"bos_token_id": GPT2_VOCAB - 1, "eos_token_id": GPT2_VOCAB - 1}
               if (tokenizer or {}).get("kind") == "gpt2" else {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", to_hf_config(cfg, arch, special))
    atomic_write(out / "model.safetensors", lambda fh: fh.write(blob))
    written = _write_tokenizer(tokenizer, out)
    return {"path": out, "architecture": arch, "tokenizer": written}


def export_safetensors(state: dict, path) -> Path:
    """Write any minigpt model as safetensors: its parameters under minigpt's names (a tied
    head once, as transformer.wte.weight), and {"format": "minigpt", "model_config",
    "tokenizer"} as JSON in the metadata (key "minigpt") and in path.with_suffix(".json").

    Returns the JSON file's path. Raises PretrainedError without the safetensors package.
    """
    path = Path(path)
    cfg = GPTConfig.from_dict(state["model_config"])
    tensors = {k: v.detach().cpu().contiguous() for k, v in state["model"].items()}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    meta = {"format": "minigpt", "model_config": cfg.to_dict(),
            "tokenizer": state.get("tokenizer")}
    blob = _serialize(tensors, {"format": "pt", "minigpt": json.dumps(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fh.write(blob))
    side = path.with_suffix(".json")
    _write_json(side, meta)
    return side


def load_safetensors(path) -> dict:
    """A checkpoint dict {"model", "model_config", "tokenizer"} from a file export_safetensors
    wrote (GPT.from_checkpoint builds the model).

    Raises:
        PretrainedError: the file cannot be read, or has no minigpt metadata.
    """
    try:
        from safetensors import safe_open
    except ImportError:
        raise PretrainedError("reading safetensors needs the safetensors package") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("minigpt", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise PretrainedError(f"{path}: cannot be read as safetensors ({e})") from None
    if not isinstance(meta, dict) or "model_config" not in meta:
        raise PretrainedError(f"{path}: not a minigpt safetensors file (no 'minigpt' metadata)")
    if GPTConfig.from_dict(meta["model_config"]).tie_embeddings:
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
    return {"model": tensors, "model_config": meta["model_config"],
            "tokenizer": meta.get("tokenizer")}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m minigpt export``."""
    p = ArgumentParser(prog="python -m minigpt export",
                       description="Export a minigpt model for transformers (--format hf) or as "
                                   "safetensors plus a JSON config.")
    add_model_source_args(p)
    p.add_argument("--format", choices=("hf", "safetensors"), required=True,
                   default=argparse.SUPPRESS,
                   help="hf: a directory transformers loads; safetensors: one file (+ .json)")
    p.add_argument("dest", type=Path, help="the directory (hf) or the file (safetensors)")
    p.add_argument("--force", action="store_true",
                   help="write even onto the source checkpoint or into a training run's "
                        "directory (refused without it)")
    return p


RUN_FILES = ("ckpt.pt", "metrics.jsonl", "run.lock")  # what marks a training run's directory


def destination_problem(fmt: str, dest: Path, source: Optional[Path]) -> Optional[str]:
    """Why exporting to dest would destroy something (None if it would not): a file to be
    written is the source checkpoint, or the directory written into is a training run's."""
    outputs = ([dest / "config.json", dest / "model.safetensors", dest / "tokenizer.json",
                dest / "tokenizer_config.json"] if fmt == "hf"
               else [dest, dest.with_suffix(".json")])
    if source is not None and source.exists():
        for out in outputs:
            if out.exists() and out.resolve() == source.resolve():
                return f"{out} is the source checkpoint; exporting would replace it"
    folder = dest if fmt == "hf" else dest.parent
    marks = [name for name in RUN_FILES if (folder / name).exists()]
    if marks:
        return (f"{folder} is a training run's directory (it holds {', '.join(marks)}); "
                f"exporting there could replace the run's files (config.json); export to "
                f"another path")
    return None


@cli_main
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.format == "hf" and args.dest.exists() and not args.dest.is_dir():
        parser.error(f"argument dest: {args.dest} is a file; --format hf writes a directory")
    if args.format == "safetensors" and args.dest.is_dir():
        parser.error(f"argument dest: {args.dest} is a directory; --format safetensors writes "
                     f"a file (e.g. {args.dest / 'model.safetensors'})")
    source = None if args.init_from else checkpoint_file(args.checkpoint)
    try:
        if args.format == "hf":
            check_dir_target(args.dest, "dest")
        else:
            check_file_target(args.dest, "dest", make_parents=True)
            check_file_target(args.dest.with_suffix(".json"), "dest", make_parents=True)
    except PathError as e:
        parser.error(f"argument {e}")
    problem = destination_problem(args.format, args.dest, source)
    if problem and not args.force:
        parser.error(f"argument dest: {problem} (--force writes anyway)")
    try:
        state = (pretrained_state(args.init_from) if args.init_from
                 else load_checkpoint(args.checkpoint))
        if args.format == "hf":
            info = export_hf(state, args.dest)
            print(f"wrote {info['path']}: a transformers {info['architecture']} model "
                  f"(config.json, model.safetensors"
                  + (f", {info['tokenizer']})" if info["tokenizer"] else
                     "); no tokenizer: a 'char' vocabulary has no transformers tokenizer"))
        else:
            side = export_safetensors(state, args.dest)
            print(f"wrote {args.dest} and its config {side}")
    except (CheckpointError, PretrainedError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
