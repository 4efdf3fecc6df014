"""Tokenizers behind one small interface: "char" (a vocabulary built from the corpus) and
"gpt2" (GPT-2's byte-pair encoding through tiktoken; Radford et al. 2019)."""

from __future__ import annotations

from typing import Iterable, List


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


TOKENIZERS = ("char", "gpt2")


def from_state(state: dict):
    """Rebuild a tokenizer from its state_dict() (as stored in a checkpoint)."""
    kind = state.get("kind")
    if kind == "char":
        return CharTokenizer(state["chars"])
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {TOKENIZERS}")
