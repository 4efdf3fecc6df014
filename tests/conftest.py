import os
import random
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
