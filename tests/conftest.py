import os
import random
import signal
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def pytest_configure(config):
    # Offline use of the GPT-2 encoding: the project's shared tiktoken cache, when present.
    cache = SHARED / "tiktoken_cache"
    if "TIKTOKEN_CACHE_DIR" not in os.environ and cache.is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    # A run started in the background of a non-interactive shell (`cmd &`) inherits SIGINT
    # ignored, and so would every process the tests start: the Ctrl-C tests need the default.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own minigpt cache, so tests never touch ~/.cache."""
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def text_file(tmp_path):
    """A small generated corpus: 40 kB of pseudo-words over a fixed alphabet."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6)))
             for _ in range(50)]
    lines = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(700)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ext_required() -> bool:
    """MINIGPT_REQUIRE_EXT=1 (CI sets it): the compiled kernels must be available, so the tests
    that need them run and fail, instead of skipping, when minigpt._C cannot be built or loaded."""
    return os.environ.get("MINIGPT_REQUIRE_EXT") == "1"


def tiktoken_available() -> bool:
    try:
        import tiktoken

        tiktoken.get_encoding("gpt2")
        return True
    except Exception:
        return False


def train_tiny_run(base: Path, n_head: int = 2):
    """Train a tiny char model (2 layers, n_head heads, 32 wide) for 12 steps on generated text
    under base; returns its TrainConfig (checkpoint in cfg.out_dir)."""
    from minigpt.train.loop import TrainConfig, train
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6)))
             for _ in range(50)]
    text = base / "corpus.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10))
                              for _ in range(300)) + "\n", encoding="utf-8")
    cfg = TrainConfig(data=str(text), out_dir=str(base / "out"), n_layer=2, n_head=n_head,
                      n_embd=32, block_size=16, batch_size=4, max_iters=12, warmup_iters=2,
                      eval_interval=6, eval_iters=2, learning_rate=3e-3, min_lr=3e-4,
                      progress=False, attn_backend="sdpa", seed=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINIGPT_CACHE_DIR", str(base / "cache"))
        train(cfg, log=lambda *a: None)
    return cfg


@pytest.fixture(params=[1, 3], ids=lambda n: f"{n}threads")
def num_threads(request):
    """Run the test with torch at 1 and at 3 threads (the kernels split work by thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
