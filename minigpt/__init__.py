"""minigpt: a compact GPT whose attention runs on its own compiled kernels.

Public API:

    from minigpt import GPT, GPTConfig, attention
    out = attention(q, k, v, causal=True)          # (B, Hq, Tq, D)
    model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128))
    gpt2 = GPT.from_pretrained("path/to/gpt2")     # Hugging Face GPT-2 / Llama (minigpt.pretrained)
"""

from .attention import BACKENDS, attention, attention_backends
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .model import GPT, GPTConfig, KVCache
from .sampling import TextStream, sample_next
from .tokenizer import CharTokenizer, GPT2Tokenizer, HFTokenizer

__version__ = "0.1.0"


def __getattr__(name):
    # minigpt.data is imported on first use, so that `python -m minigpt.data` runs it fresh.
    if name in ("load_corpus", "DataError"):
        from . import data

        return getattr(data, name)
    raise AttributeError(f"module 'minigpt' has no attribute {name!r}")

__all__ = [
    "attention", "attention_backends", "BACKENDS",
    "GPT", "GPTConfig", "KVCache",
    "sample_next", "TextStream",
    "CharTokenizer", "GPT2Tokenizer", "HFTokenizer",
    "load_corpus", "DataError",
    "save_checkpoint", "load_checkpoint", "CheckpointError",
]
