"""Corpora: download with a sha256 check, local text files, and cached token memmaps.

The corpus "shakespeare" is tiny Shakespeare (Karpathy's char-rnn repository, 1,115,394 bytes).
It is downloaded once into ``$MINIGPT_CACHE_DIR/data`` (default ``~/.cache/minigpt``), checked
against its sha256 and written atomically. Offline, ``python -m minigpt data --import-file PATH``
puts a copy you already have into the cache (after the same check), or train on any UTF-8 text
file with ``--data PATH``.

Tokens are stored as memmaps (uint16, or uint32 for vocabularies over 65,536 tokens such as
Llama 3's), split 90/10 into train/val, and cached under a key made of the corpus's sha256 and
the tokenizer, so a second run does not tokenize again. The cache's meta.json records the sha256
of the source text and the size and sha256 of train.bin and val.bin; a cache entry that
disagrees with it (a file truncated, emptied, overwritten) is rebuilt from the text, with a line
saying so.

A corpus must be a regular readable file: a FIFO or a device is refused (reading one would
block or never end).

Usage: python -m minigpt data [--import-file PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union, get_args

import numpy as np
import torch

from minigpt.checkpoint import atomic_write
from minigpt.runtime import (ArgumentParser, PathError, cache_dir, check_cache_dir,
                             check_input_file, cli_main, os_error_message)
from minigpt.tokenizer import CharTokenizer, GPT2Tokenizer

SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                   "tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TRAIN_FRACTION = 0.9


class DataError(Exception):
    """A corpus cannot be had or used; the message says why and what to do instead."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data to path atomically: readers never see a partial file."""
    atomic_write(path, lambda fh: fh.write(data))


def shakespeare_path() -> Path:
    return cache_dir() / "data" / "tinyshakespeare.txt"


def import_shakespeare(src) -> Path:
    """Copy a local tiny Shakespeare file into the cache after checking its sha256.

    Raises:
        DataError: src is not a regular readable file, or not tiny Shakespeare; the cache
            directory cannot be used.
    """
    try:
        check_input_file(src, "--import-file")
        check_cache_dir()
    except PathError as e:
        raise DataError(str(e)) from None
    data = Path(src).read_bytes()
    if _sha256(data) != SHAKESPEARE_SHA256:
        raise DataError(f"{src} is not tiny Shakespeare: its sha256 is {_sha256(data)}, "
                        f"expected {SHAKESPEARE_SHA256}")
    dst = shakespeare_path()
    atomic_write_bytes(dst, data)
    return dst


def download_shakespeare(timeout: float = 30.0) -> Path:
    """Path to the cached tiny Shakespeare, downloading it first if needed.

    Raises:
        DataError: offline with no cached copy, or the download's sha256 does not match.
    """
    dst = shakespeare_path()
    if dst.is_file() and _sha256(dst.read_bytes()) == SHAKESPEARE_SHA256:
        return dst
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=timeout) as resp:
            data = resp.read()
    except (urllib.error.URLError, OSError) as e:
        raise DataError(
            f"Could not download the tiny Shakespeare corpus from {SHAKESPEARE_URL} "
            f"({getattr(e, 'reason', e)}), and there is no cached copy at {dst}. Either connect "
            f"to the internet and run again, put a copy you have into the cache with "
            f"`python -m minigpt data --import-file PATH`, or train on any UTF-8 text file with "
            f"`python train.py --data PATH`.") from None
    if _sha256(data) != SHAKESPEARE_SHA256:
        raise DataError(f"the download from {SHAKESPEARE_URL} has sha256 {_sha256(data)}, "
                        f"expected {SHAKESPEARE_SHA256}; not using it")
    atomic_write_bytes(dst, data)
    return dst


def read_text(path) -> tuple:
    """(text, sha256) of a UTF-8 text file, or DataError naming the file and the problem
    (missing, a directory, a FIFO or other non-regular file, unreadable, empty, not UTF-8)."""
    path = Path(path)
    try:
        check_input_file(path, "corpus file")
    except PathError as e:
        raise DataError(str(e).replace("give a file", "give a UTF-8 text file")) from None
    raw = path.read_bytes()
    if not raw:
        raise DataError(f"corpus file {path}: the file is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"corpus file {path}: not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at "
                        f"offset {e.start})") from None
    return text, _sha256(raw)


@dataclass
class Corpus:
    """A tokenized corpus: train and val token arrays (uint16 or uint32 memmaps) and its
    tokenizer."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: object
    source: str

    def split(self, name: str) -> np.ndarray:
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every token id: uint16 up to 65,536
    tokens, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _tokenizer_key(tok) -> str:
    """A cache key for a tokenizer: its name, plus a hash of its vocabulary when that travels in
    its state (an "hf" tokenizer.json)."""
    state = json.dumps(tok.state_dict(), sort_keys=True).encode()
    return tok.name if tok.name in ("char", "gpt2") else f"{tok.name}-{_sha256(state)[:12]}"


def _cache_problem(key_dir: Path, digest: str, dtype: np.dtype) -> Optional[str]:
    """None if the cache entry in key_dir is complete and agrees with its meta.json (the
    source's sha256, each token file's size and sha256), else what is wrong, in words."""
    meta_path = key_dir / "meta.json"
    if not meta_path.is_file():
        return None if not key_dir.exists() else "meta.json is missing"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        files = meta["files"]
        if meta["sha256"] != digest or meta["dtype"] != dtype.name:
            return "meta.json describes another source"
    except (OSError, ValueError, KeyError, TypeError):
        return "meta.json is unreadable or from an older minigpt (no sizes or hashes)"
    for name in ("train.bin", "val.bin"):
        path = key_dir / name
        want = files.get(name) if isinstance(files, dict) else None
        if not isinstance(want, dict):
            return f"meta.json has no entry for {name}"
        try:
            raw = path.read_bytes()
        except OSError as e:
            return f"{name} cannot be read ({e.strerror or e})"
        if len(raw) != want.get("bytes"):
            return f"{name} has {len(raw):,} bytes, meta.json says {want.get('bytes'):,}"
        if _sha256(raw) != want.get("sha256"):
            return f"{name}'s sha256 differs from meta.json's"
    return None


def load_corpus(data: Optional[str] = None, tokenizer: Union[str, object] = "char",
                log=None) -> Corpus:
    """Tokenize (or load the cached tokens of) a corpus.

    Args:
        data: path to a UTF-8 text file, or None for tiny Shakespeare (downloaded and cached).
        tokenizer: "char" (vocabulary built from the whole text) or "gpt2" (tiktoken BPE); or a
            tokenizer object (minigpt.tokenizer), used as it is: a pretrained model's, so that
            fine-tuning data is tokenized as the model was.
        log: called with one line when a damaged token cache is rebuilt (default: print to
            stderr).

    Raises:
        DataError: unusable file (missing, directory, FIFO, empty, not UTF-8), the cache
            directory unusable (MINIGPT_CACHE_DIR a file, read-only), offline without a
            cached corpus, a vocabulary too large for uint32, text that a given char tokenizer
            cannot encode, or a split too short to hold a single token.
    """
    if isinstance(tokenizer, str) and tokenizer not in ("char", "gpt2"):
        raise ValueError(f"tokenizer must be 'char', 'gpt2' or a tokenizer object, got "
                         f"{tokenizer!r}")
    try:
        check_cache_dir()
    except PathError as e:
        raise DataError(str(e)) from None
    path = download_shakespeare() if data is None else Path(data)
    text, digest = read_text(path)
    if isinstance(tokenizer, str):
        tok = CharTokenizer.from_text(text) if tokenizer == "char" else GPT2Tokenizer()
    else:
        tok = tokenizer
    if tok.vocab_size > 2 ** 32:
        raise DataError(f"corpus file {path}: the {tok.name} vocabulary has {tok.vocab_size} "
                        f"tokens, more than a uint32 token file can hold")
    dtype = token_dtype(tok.vocab_size)
    key = _tokenizer_key(tok)
    if tok.name == "char" and not isinstance(tokenizer, str):
        key += "-" + _sha256("".join(tok.chars).encode())[:12]  # another text's vocabulary
    key_dir = cache_dir() / "tokens" / f"{digest[:16]}-{key}"
    meta_path = key_dir / "meta.json"
    problem = _cache_problem(key_dir, digest, dtype)
    if problem is not None:
        (log or (lambda line: print(line, file=sys.stderr)))(
            f"minigpt: token cache {key_dir}: {problem}; rebuilding it from {path}")
        meta_path.unlink(missing_ok=True)
    if not meta_path.is_file():
        try:
            ids = np.array(tok.encode(text), dtype=dtype)
        except ValueError as e:
            raise DataError(f"corpus file {path}: {e}") from None
        n_train = int(len(ids) * TRAIN_FRACTION)
        if n_train < 1 or len(ids) - n_train < 1:
            raise DataError(f"corpus file {path}: only {len(ids)} tokens; too short for a "
                            f"train/val split")
        files = {}
        for name, part in (("train.bin", ids[:n_train]), ("val.bin", ids[n_train:])):
            raw = part.tobytes()
            atomic_write_bytes(key_dir / name, raw)
            files[name] = {"bytes": len(raw), "sha256": _sha256(raw)}
        # meta.json last: its presence marks a complete cache entry.
        atomic_write_bytes(meta_path, json.dumps({"source": str(path), "sha256": digest,
                                                  "tokenizer": tok.name, "dtype": dtype.name,
                                                  "files": files}).encode())
    train = np.memmap(key_dir / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(key_dir / "val.bin", dtype=dtype, mode="r")
    return Corpus(train=train, val=val, tokenizer=tok, source=str(path))


DataOrder = Literal["random", "epochs"]


class BatchSampler:
    """(B, block_size) windows of a token array, reproducible from a seed.

    order "random" (nanoGPT's): each window starts at a uniformly random token, drawn with
    replacement, so within a pass some tokens are seen several times and others not at all.
    order "epochs": passes over the corpus cut into windows of T tokens at a random offset, in a
    random permutation: every token (but up to T at the ends) once per pass. A new pass starts
    when one runs out (its rest is used first) or when T changes.

    Every rank of a distributed run draws the same global batch (B * world_size windows) from
    the same generator and keeps its own slice, so N ranks see exactly the data one process would
    see with the global batch. The generator state (and the pass under way) is saved in
    checkpoints for an exact resume.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, order: str = "random"):
        if len(tokens) < block_size + 1:
            raise DataError(f"the split has {len(tokens)} tokens, fewer than block_size + 1 = "
                            f"{block_size + 1}; use a longer text or a smaller --block-size")
        if order not in get_args(DataOrder):
            raise ValueError(f"order must be one of {', '.join(get_args(DataOrder))}, got "
                             f"{order!r}")
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.rank, self.world_size, self.order = rank, world_size, order
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_starts = torch.zeros(0, dtype=torch.int64)  # the pass under way ("epochs")
        self.epoch_T = 0

    def _starts(self, n: int, T: int) -> torch.Tensor:
        """n window starts for windows of T + 1 tokens."""
        hi = len(self.tokens) - T
        if self.order == "random":
            return torch.randint(hi, (n,), generator=self.generator)
        taken = []
        while n > 0:
            if self.epoch_T != T or len(self.epoch_starts) == 0:
                offset = int(torch.randint(T, (1,), generator=self.generator))
                starts = torch.arange(offset, hi, T)
                self.epoch_starts = starts[torch.randperm(len(starts), generator=self.generator)]
                self.epoch_T = T
            taken.append(self.epoch_starts[:n])
            self.epoch_starts = self.epoch_starts[n:]
            n -= len(taken[-1])
        return torch.cat(taken)

    def next(self, device="cpu", batch_size: Optional[int] = None,
             block_size: Optional[int] = None):
        """(x, y) int64 tensors of shape (B, T), by default (batch_size, block_size); y is x
        shifted by one. batch_size, block_size: this batch's B and T instead (T at most the
        sampler's block_size)."""
        B = self.batch_size if batch_size is None else batch_size
        T = self.block_size if block_size is None else min(block_size, self.block_size)
        starts = self._starts(B * self.world_size, T)
        starts = starts[self.rank * B:(self.rank + 1) * B].tolist()
        window = np.stack([self.tokens[s:s + T + 1] for s in starts])
        xy = torch.from_numpy(window.astype(np.int64))
        x, y = xy[:, :-1], xy[:, 1:]
        if torch.device(device).type == "cuda":
            return (x.pin_memory().to(device, non_blocking=True),
                    y.pin_memory().to(device, non_blocking=True))
        return x.to(device), y.to(device)

    def state_dict(self) -> dict:
        state = {"generator": self.generator.get_state()}
        if self.order == "epochs":
            state.update(epoch_starts=self.epoch_starts.clone(), epoch_T=self.epoch_T)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        if self.order == "epochs" and "epoch_starts" in state:
            self.epoch_starts, self.epoch_T = state["epoch_starts"].clone(), state["epoch_T"]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m minigpt data``."""
    parser = ArgumentParser(prog="python -m minigpt data",
                            description="Fetch tiny Shakespeare into minigpt's cache.")
    parser.add_argument("--import-file", metavar="PATH",
                        help="copy this local tiny Shakespeare file into the cache (sha256 "
                             "checked) instead of downloading it; None: download")
    return parser


@cli_main
def main(argv=None) -> int:
    """Download (or import) tiny Shakespeare into the cache and print its path; exit code 2
    when it cannot be had."""
    args = build_parser().parse_args(argv)
    try:
        path = (import_shakespeare(args.import_file) if args.import_file
                else download_shakespeare())
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
