"""Tokenizers behind one small interface: "char" (a vocabulary built from the corpus), "gpt2"
(GPT-2's byte-pair encoding through tiktoken; Radford et al. 2019) and "hf" (a pretrained
model's tokenizer.json through Hugging Face's `tokenizers`, e.g. Llama's).

The interface: name, vocab_size, encode(text) -> ids, decode(ids) -> text, decode_bytes(ids)
-> bytes (for incremental UTF-8 decoding), token_strings(ids) (plot labels), state_dict() (what
a checkpoint stores; from_state rebuilds the tokenizer from it).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Dict, Iterable, List


class CharTokenizer:
    """One token per Unicode character; the vocabulary is the sorted set of the corpus's
    characters and travels in the checkpoint (state_dict)."""

    name = "char"

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        if not self.chars:
            raise ValueError("CharTokenizer: the vocabulary is empty (is the text empty?)")
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> List[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"CharTokenizer.encode: character {e.args[0]!r} is not in the "
                             f"model's vocabulary of {self.vocab_size} characters") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def decode_bytes(self, ids) -> bytes:
        return self.decode(ids).encode("utf-8")

    def token_strings(self, ids) -> List[str]:
        """One display string per token (for plot labels)."""
        return [self.chars[i] for i in ids]

    def state_dict(self) -> dict:
        return {"kind": "char", "chars": "".join(self.chars)}


class GPT2Tokenizer:
    """GPT-2 BPE via tiktoken (50257 tokens). tiktoken downloads the encoding once and caches
    it; offline, point TIKTOKEN_CACHE_DIR at a directory holding the cached files."""

    name = "gpt2"

    def __init__(self):
        import tiktoken

        self.enc = tiktoken.get_encoding("gpt2")

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str) -> List[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def decode_bytes(self, ids) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def token_strings(self, ids) -> List[str]:
        return [self.enc.decode_single_token_bytes(i).decode("utf-8", errors="replace")
                for i in ids]

    def state_dict(self) -> dict:
        return {"kind": "gpt2"}


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> Dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: each of the 256 bytes is written as one printable
    character in a byte-level BPE vocabulary (Radford et al. 2019; openai/gpt-2 encoder.py's
    bytes_to_unicode)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer, read from a model directory's tokenizer.json
    (Llama, TinyLlama, SmolLM, ...). The whole JSON travels in the checkpoint (state_dict), so a
    fine-tuned model needs no other file.

    encode() applies the tokenizer's own post-processing (add_special_tokens=True): a Llama
    tokenizer starts every text with its BOS token, as the model was trained. decode() drops
    special tokens. decode_bytes() maps each token to its bytes (byte-level vocabularies through
    GPT-2's byte alphabet; SentencePiece-style ones with "▁" as a space and <0xNN> byte-fallback
    tokens as that byte; special tokens to nothing), so TextStream can print a character whose
    bytes span two tokens once, whole.

    Raises:
        ImportError: the `tokenizers` package is not installed (pip install tokenizers, or the
            extra: pip install "minigpt-kernels[hf]").
        ValueError: the JSON is not a tokenizer.
    """

    name = "hf"

    def __init__(self, tokenizer_json: str):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError(f"the 'hf' tokenizer needs the `tokenizers` package ({e}): pip "
                              f"install tokenizers, or pip install \"minigpt-kernels[hf]\"") from None
        try:
            self.tok = Tokenizer.from_str(tokenizer_json)
        except Exception as e:
            raise ValueError(f"not a tokenizers tokenizer.json: {e}") from None
        self.json = tokenizer_json
        added = self.tok.get_added_tokens_decoder()  # {id: AddedToken}
        self._special = {i for i, t in added.items() if t.special}
        self._added = {i: t.content for i, t in added.items() if not t.special}
        decoder = str(self.tok.decoder or "")
        self._byte_level = "ByteLevel" in decoder
        self._vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values()) + 1
        self._bytes_cache: Dict[int, bytes] = {}

    @classmethod
    def from_file(cls, path) -> "HFTokenizer":
        """Read a tokenizer.json. Raises OSError (unreadable) or ValueError (not a tokenizer),
        naming the file."""
        try:
            return cls(Path(path).read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @property
    def vocab_size(self) -> int:
        """One past the largest token id (added tokens included)."""
        return self._vocab_size

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def _token_bytes(self, i: int) -> bytes:
        if i not in self._bytes_cache:
            piece = self.tok.id_to_token(i)
            if i in self._special or piece is None:
                out = b""
            elif i in self._added:
                out = self._added[i].encode("utf-8")
            elif self._byte_level:
                table = _byte_decoder()
                out = (bytes(table[c] for c in piece) if all(c in table for c in piece)
                       else piece.encode("utf-8"))
            else:
                m = _BYTE_TOKEN.fullmatch(piece)
                out = bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode("utf-8")
            self._bytes_cache[i] = out
        return self._bytes_cache[i]

    def decode_bytes(self, ids) -> bytes:
        return b"".join(self._token_bytes(int(i)) for i in ids)

    def token_strings(self, ids) -> List[str]:
        """One display string per token: its text, or the token itself for special tokens
        ("<s>")."""
        out = []
        for i in ids:
            i = int(i)
            if i in self._special:
                out.append(self.tok.id_to_token(i) or "")
            else:
                out.append(self._token_bytes(i).decode("utf-8", errors="replace"))
        return out

    def state_dict(self) -> dict:
        return {"kind": "hf", "json": self.json}


# Tokenizer kinds. "char" and "gpt2" can be chosen for training from scratch; "hf" comes with a
# pretrained model (TrainConfig.init_from).
TOKENIZERS = ("char", "gpt2", "hf")


def from_state(state: dict):
    """Rebuild a tokenizer from its state_dict() (as stored in a checkpoint).

    Raises:
        ValueError: an unknown kind. ImportError: an "hf" tokenizer without `tokenizers`.
    """
    kind = state.get("kind")
    if kind == "char":
        return CharTokenizer(state["chars"])
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "hf":
        return HFTokenizer(state["json"])
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {TOKENIZERS}")
