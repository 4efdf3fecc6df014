"""One run per run directory: no silent overwrite of another run's checkpoint, and a lock that
stops a second concurrent run at once and does not outlive a killed holder."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from minigpt.train.rundir import RunDir, RunDirError
from minigpt.train.loop import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent

HOLD = ("import sys, time\n"
        "from minigpt.train.rundir import RunDir\n"
        "with RunDir(sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n")


def _tiny(text_file, out_dir, **kw):
    cfg = TrainConfig(data=str(text_file), out_dir=str(out_dir), n_layer=1, n_head=2, n_embd=16,
                      block_size=8, batch_size=2, max_iters=2, eval_interval=2, eval_iters=1,
                      progress=False, attn_backend="sdpa", seed=1)
    return replace(cfg, **kw)


def test_a_second_fresh_run_keeps_the_first_runs_checkpoint(text_file, tmp_path):
    train(_tiny(text_file, tmp_path), log=lambda *a: None)
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(RunDirError) as info:
        train(_tiny(text_file, tmp_path, seed=2), log=lambda *a: None)
    msg = str(info.value)
    assert all(flag in msg for flag in ("--resume", "--out-dir", "--overwrite")), msg
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    # Resuming and overwriting are both allowed, and the lock was released each time.
    assert train(_tiny(text_file, tmp_path, max_iters=4, resume=True),
                 log=lambda *a: None).iters == 4
    assert train(_tiny(text_file, tmp_path, overwrite=True), log=lambda *a: None).iters == 2
    assert (tmp_path / "ckpt.pt").read_bytes() != before


def test_a_held_directory_names_its_holder_and_is_free_once_the_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=f"in use by another training run \\(process "
                                              f"{holder.pid} on "):
            with RunDir(tmp_path):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    assert (tmp_path / "run.lock.owner").exists()  # left behind by the killed holder
    with RunDir(tmp_path):
        assert str(holder.pid) not in (tmp_path / "run.lock.owner").read_text()
    assert not (tmp_path / "run.lock.owner").exists()


@pytest.mark.slow
def test_train_cli_into_a_used_directory_exits_2_with_the_choices(text_file, tmp_path):
    args = [sys.executable, "train.py", "--data", str(text_file), "--out-dir", str(tmp_path),
            "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "8",
            "--batch-size", "2", "--max-iters", "2", "--eval-interval", "2", "--eval-iters",
            "1", "--no-progress", "--attn-backend", "sdpa"]
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert "--resume" in second.stderr and "--overwrite" in second.stderr


@pytest.mark.parametrize("what", ["directory", "lock"])
def test_a_run_notices_its_directory_or_lock_vanishing(text_file, tmp_path, monkeypatch, what):
    import shutil

    from minigpt.train import loop as training
    from minigpt.train.rundir import RunDirLostError

    out = tmp_path / "run"
    real_step = training.train_step

    def step_then_delete(run, progress):
        real_step(run, progress)
        if progress.iter_num == 3:
            if what == "directory":
                shutil.rmtree(out)
            else:
                (out / "run.lock").unlink()

    monkeypatch.setattr(training, "train_step", step_then_delete)
    lines = []
    with pytest.raises(RunDirLostError) as info:
        train(_tiny(text_file, out, max_iters=50, eval_interval=50), log=lines.append)
    msg = str(info.value)
    assert "stopped at step 3" in msg and str(out / "ckpt.pt") in msg, msg
    from minigpt.checkpoint import load_checkpoint

    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 3  # saved again, where it says
    assert (out / "config.json").is_file()
    assert any("saving the checkpoint again" in line for line in lines), lines


def test_a_failed_start_leaves_no_directory_behind(text_file, tmp_path, monkeypatch):
    from minigpt.train import state
    from minigpt.train.data import DataError

    def broken(*a, **k):
        raise DataError("no corpus today")

    monkeypatch.setattr(state, "load_corpus", broken)
    out = tmp_path / "new" / "run"
    with pytest.raises(DataError):
        train(_tiny(text_file, out), log=lambda *a: None)
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(DataError):
        train(_tiny(text_file, existing), log=lambda *a: None)
    assert existing.is_dir()  # the user's directory stays
