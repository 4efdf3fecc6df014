"""What users of minigpt 0.1 rely on keeps working after the move to subpackages: the old module
names (imports and ``python -m``), and checkpoints written by 0.1 (tests/data/v0.1: a tiny
character-level model trained for 3 steps by minigpt 0.1's train.py, with its logits and a greedy
continuation recorded by 0.1)."""

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minigpt
from minigpt import GPT, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
V01 = Path(__file__).resolve().parent / "data" / "v0.1"


@pytest.mark.parametrize("old, new", sorted(minigpt.MOVED.items()))
def test_old_module_names_are_the_new_modules(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)
    assert importlib.import_module(old).__spec__.name == new


def test_old_names_import_their_functions():
    from minigpt.pretrained import pretrained_state
    from minigpt.training import train

    assert train.__module__ == "minigpt.train.loop"
    assert pretrained_state.__module__ == "minigpt.hf.pretrained"


def test_the_names_the_0_1_readme_showed():
    from minigpt import GPT, GPTConfig, attention  # noqa: F401
    from minigpt.attention import cpu_autocast_dtype, within_rule  # noqa: F401
    from minigpt.export import load_safetensors  # noqa: F401
    from minigpt.model import alibi_slopes, sinusoidal_encoding  # noqa: F401
    from minigpt.pretrained import load_tokenizer  # noqa: F401
    from minigpt.profile import peak_memory  # noqa: F401
    from minigpt.training import TrainConfig, train  # noqa: F401
    import minigpt._ext
    import minigpt.hf

    assert callable(minigpt.hf.register) and callable(minigpt._ext.build_info)
    assert callable(GPT.from_pretrained) and callable(GPT.generate)
    assert callable(GPT.attention_maps) and callable(GPT.with_block_size)


def test_python_m_old_name_runs_the_new_module():
    out = subprocess.run([sys.executable, "-m", "minigpt.bench_generate", "--no-such-flag"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("python -m minigpt bench-generate: error: unrecognized arguments: --no-such-flag")


def test_version_0_1_checkpoint_loads_with_the_same_outputs():
    state = load_checkpoint(V01 / "ckpt.pt")
    model = GPT.from_checkpoint(state).eval()
    expected = torch.load(V01 / "expected.pt", weights_only=True)
    with torch.no_grad():
        logits, _ = model(expected["idx"])
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    greedy = model.generate(expected["idx"][:1, :4], 8, temperature=1.0, top_k=1)
    assert torch.equal(greedy, expected["greedy"])


@pytest.mark.slow
def test_version_0_1_run_resumes_and_samples(tmp_path):
    corpus = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"  # the run's corpus
    if not corpus.is_file():
        pytest.skip("tiny Shakespeare is not on this machine")
    run = tmp_path / "run"
    shutil.copytree(V01, run)
    (run / "expected.pt").unlink()
    resume = subprocess.run([sys.executable, "train.py", "--resume", "--out-dir", str(run),
                             "--max-iters", "5", "--data", str(corpus), "--no-progress"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stderr
    assert "done at step 5" in resume.stdout + resume.stderr
    assert load_checkpoint(run / "ckpt.pt")["iter_num"] == 5
    sample = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(run),
                             "--max-new-tokens", "20", "--prompt", "ROMEO:", "--seed", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("ROMEO:")
