"""minigpt: a compact GPT whose attention runs on its own compiled kernels.

Public API:

    from minigpt import GPT, GPTConfig, attention
    out = attention(q, k, v, causal=True)          # (B, Hq, Tq, D)
    model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128))
    gpt2 = GPT.from_pretrained("path/to/gpt2")     # Hugging Face GPT-2 / Llama (minigpt.hf.pretrained)
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys

from minigpt.attention import BACKENDS, attention, attention_backends
from minigpt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from minigpt.model import GPT, GPTConfig, KVCache
from minigpt.generation import TextStream, sample_next
from minigpt.tokenizer import CharTokenizer, GPT2Tokenizer, HFTokenizer

__version__ = "0.2.0"


def __getattr__(name):
    # minigpt.train.data is imported on first use, so that `python -m minigpt.train.data` runs it
    # fresh.
    if name in ("load_corpus", "DataError"):
        from minigpt.train import data

        return getattr(data, name)
    raise AttributeError(f"module 'minigpt' has no attribute {name!r}")


# Modules of minigpt 0.1 that now live in subpackages. The old names keep working, both
# `import minigpt.pretrained` (the same module object as minigpt.hf.pretrained) and
# `python -m minigpt.profile` (runs minigpt.bench.profile).
MOVED = {
    "minigpt.training": "minigpt.train.loop", "minigpt.optim": "minigpt.train.optim",
    "minigpt.data": "minigpt.train.data", "minigpt.rundir": "minigpt.train.rundir",
    "minigpt.loggers": "minigpt.train.loggers", "minigpt.sampling": "minigpt.generation",
    "minigpt.sample": "minigpt.cli.sample", "minigpt.ops": "minigpt.attention.op",
    "minigpt._ext": "minigpt.attention._ext", "minigpt._build": "minigpt.attention._build",
    "minigpt.gpu_table": "minigpt.attention.gpu_table",
    "minigpt.pretrained": "minigpt.hf.pretrained", "minigpt.gguf_file": "minigpt.hf.gguf_file",
    "minigpt.export": "minigpt.hf.export", "minigpt.chat": "minigpt.hf.chat",
    "minigpt.visualize": "minigpt.analysis.pictures", "minigpt.plot": "minigpt.analysis.curves",
    "minigpt.heads": "minigpt.analysis.heads", "minigpt.profile": "minigpt.bench.profile",
    "minigpt.bench_generate": "minigpt.bench.generate",
    "minigpt.coreference": "minigpt.experiments.coreference",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module name in MOVED and answers with the module at its new place."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, origin=MOVED[fullname])

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        spec.loader_state = module.__spec__  # the import system sets __spec__ to ours next
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state

    def get_code(self, fullname):  # what runpy runs for `python -m <old name>`
        new = MOVED[fullname]
        return importlib.util.find_spec(new).loader.get_code(new)


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())

__all__ = [
    "attention", "attention_backends", "BACKENDS",
    "GPT", "GPTConfig", "KVCache",
    "sample_next", "TextStream",
    "CharTokenizer", "GPT2Tokenizer", "HFTokenizer",
    "load_corpus", "DataError",
    "save_checkpoint", "load_checkpoint", "CheckpointError",
]
