"""Failure modes of long unattended runs: kill -9, SIGTERM, a writer killed mid-checkpoint, and
two DDP processes (gloo) against one process with the same global batch."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minigpt.checkpoint import CheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "16",
        "--batch-size", "4", "--eval-iters", "2", "--no-progress", "--attn-backend", "sdpa",
        "--learning-rate", "3e-3", "--warmup-iters", "2"]


def _env():
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _train(args, **kw):
    return subprocess.run([sys.executable, "train.py", *TINY, *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300, **kw)


def _wait_for_checkpoint(path, min_iter, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if load_checkpoint(path)["iter_num"] >= min_iter:
                return
        except CheckpointError:
            pass
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def _same_weights(a, b):
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa["iter_num"] == sb["iter_num"]
    for name, t in sa["model"].items():
        assert torch.equal(t, sb["model"][name]), name


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGKILL, id="SIGKILL"),
                                 pytest.param(signal.SIGTERM, id="SIGTERM")])
def test_killed_run_resumes_exactly(text_file, tmp_path, sig):
    """Under the default attention backend ("ext" when built) and the default thread count: the
    docs/reliability.md's condition for bit-exact resume is the same thread count in both runs, nothing more."""
    tiny = [a for a in TINY if a not in ("--attn-backend", "sdpa")]
    env = {k: v for k, v in _env().items()
           if k not in ("OMP_NUM_THREADS", "MINIGPT_ATTENTION_BACKEND")}
    common = [*tiny, "--data", str(text_file), "--max-iters", "60", "--eval-interval", "10"]

    def train(args):
        return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)

    straight = train(common + ["--out-dir", str(tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr
    assert _backend_of(straight.stdout) == _default_backend()

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", *common, "--out-dir", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for_checkpoint(out / "ckpt.pt", 10, proc)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    stopped_at = load_checkpoint(out / "ckpt.pt")["iter_num"]
    if sig == signal.SIGKILL:  # died of the signal, before finishing
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, stderr)
        assert "done at step" not in stdout
    else:  # a clean stop: saved where it stopped, exit code 0
        assert proc.returncode == 0 and f"interrupted at step {stopped_at}" in stdout, stderr
    assert 10 <= stopped_at < 60  # stopped short of the end
    resumed = train(["--out-dir", str(out), "--resume"])  # settings come from the checkpoint
    assert resumed.returncode == 0, resumed.stderr
    steps = [int(line.split()[1].rstrip(":")) for line in resumed.stdout.splitlines()
             if line.startswith("step ")]
    assert steps and min(steps) >= stopped_at, resumed.stdout  # resumed, not restarted
    _same_weights(tmp_path / "straight" / "ckpt.pt", out / "ckpt.pt")


def _default_backend():
    from minigpt import attention_backends

    return attention_backends()["default"]


def _backend_of(stdout):
    """The attention backend train.py reports in its first line ("..., attention backend ext")."""
    for line in stdout.splitlines():
        if "attention backend " in line:
            return line.split("attention backend ", 1)[1].split()[0].strip(",")
    raise AssertionError(f"train.py did not report its attention backend:\n{stdout[:2000]}")


WRITER = """
import sys, torch
from minigpt.checkpoint import save_checkpoint
i = 0
while True:
    i += 1
    save_checkpoint({"model": {"w": torch.full((4_000_000,), float(i))}, "model_config": {},
                     "tokenizer": {}, "iter_num": i}, sys.argv[1])
    print(i, flush=True)
"""


def test_writer_killed_mid_write_leaves_a_good_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    for delay in (0.05, 0.13, 0.29, 0.41):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "1"  # one complete checkpoint exists
        time.sleep(delay)
        proc.kill()  # SIGKILL: no chance to clean up
        proc.wait()
        state = load_checkpoint(path)  # never torn
        w = state["model"]["w"]
        assert torch.equal(w, torch.full_like(w, float(state["iter_num"])))


def test_resume_cannot_change_the_model_shape(text_file, tmp_path):
    out = tmp_path / "out"
    assert _train(["--data", str(text_file), "--out-dir", str(out), "--max-iters", "5",
                   "--eval-interval", "5"]).returncode == 0
    r = _train(["--out-dir", str(out), "--resume", "--block-size", "32"])
    assert r.returncode == 2 and "--block-size" in r.stderr and "Traceback" not in r.stderr
    r = _train(["--out-dir", str(tmp_path / "nothing"), "--resume"])
    assert r.returncode == 2 and "no such file" in r.stderr


def _eval_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == "eval"]


@pytest.mark.parametrize("optimizer, tol", [("adamw", 1e-4), ("muon", 2e-3)])
def test_two_gloo_processes_match_one_process(text_file, tmp_path, optimizer, tol):
    """Two processes of batch 4 follow one process of batch 8. With AdamW to 1e-4; Muon
    orthogonalises each update in bfloat16 (torch.optim.Muon), which turns the all-reduce's
    different summation order into ~1e-3 differences of the update, so its bound is looser."""
    # float32: bf16 autocast (the default on CPUs with bf16 instructions) rounds matmuls of
    # batch 4 and batch 8 differently, which is not what this compares.
    common = ["--data", str(text_file), "--max-iters", "20", "--eval-interval", "5",
              "--dropout", "0", "--optimizer", optimizer, "--dtype", "float32"]
    single = _train(common + ["--out-dir", str(tmp_path / "one"), "--batch-size", "8"])
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "train.py", *TINY, *common, "--out-dir", str(tmp_path / "two"), "--batch-size", "4"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 processes" in ddp.stdout
    one, two = _eval_rows(tmp_path / "one"), _eval_rows(tmp_path / "two")
    assert [r["iter"] for r in one] == [r["iter"] for r in two] == [0, 5, 10, 15, 20]
    for a, b in zip(one, two):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=tol)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=tol)
    assert one[-1]["val_loss"] < one[0]["val_loss"] - 0.1  # it did learn


# --- ordinary events end quietly: a closed pipe, Ctrl-C, a second Ctrl-C -----------------------

@pytest.fixture
def tiny_checkpoint(text_file, tmp_path):
    out = tmp_path / "tiny"
    r = _train(["--data", str(text_file), "--out-dir", str(out), "--max-iters", "2",
                "--eval-interval", "2"])
    assert r.returncode == 0, r.stderr
    return out / "ckpt.pt"


def _quiet(stderr):
    assert "Traceback" not in stderr and stderr.count("\n") <= 1, stderr


@pytest.mark.parametrize("stream", [True, False])
def test_sample_into_a_closed_pipe_ends_quietly(tiny_checkpoint, stream):
    """python sample.py | head -c 10"""
    args = [sys.executable, "sample.py", "--checkpoint", str(tiny_checkpoint),
            "--max-new-tokens", "3000", "--num-samples", "40"] + (["--stream"] if stream else [])
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()  # head exits
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=120)
    _quiet(stderr)
    assert proc.returncode == 141 and stderr == "", (proc.returncode, stderr)


def test_ctrl_c_during_sample_ends_quietly(tiny_checkpoint):
    proc = subprocess.Popen([sys.executable, "sample.py", "--checkpoint", str(tiny_checkpoint),
                             "--max-new-tokens", "100000", "--stream"], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stdout.read(20)  # generating
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    _quiet(stderr)
    assert proc.returncode == 130 and stderr.strip() == "interrupted", stderr


def test_a_second_ctrl_c_during_training_stops_at_once_quietly(text_file, tmp_path):
    # Steps of a few hundred ms, so that both signals land within one step.
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "train.py", "--data", str(text_file), "--out-dir", str(out),
         "--n-layer", "4", "--n-embd", "256", "--n-head", "4", "--block-size", "128",
         "--batch-size", "32", "--eval-iters", "1", "--eval-interval", "2", "--max-iters",
         "1000", "--no-progress", "--dtype", "float32"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_checkpoint(out / "ckpt.pt", 2, proc, timeout=240)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    _quiet(stderr)
    assert proc.returncode == 130 and stderr.strip() == "interrupted", (proc.returncode, stderr)
    assert "stopped at once" in stdout and "the last checkpoint is" in stdout, stdout
    load_checkpoint(out / "ckpt.pt")  # whole


def test_ctrl_c_during_profile_ends_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "minigpt.bench.profile", "--seq", "2048", "4096",
                             "--repeats", "50"], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()  # started
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    _quiet(stderr)
    assert proc.returncode == 130, (proc.returncode, stderr)


def test_a_command_line_leaves_the_collector_unfrozen_at_exit(tmp_path):
    """A command line (cli_main) leaves the garbage collector as it found it: at exit nothing
    is frozen (gc.freeze would keep every live object alive through the shutdown, where
    extension modules that check for leaks then, such as triton's under a CUDA build of torch,
    print reports), and an object left in a garbage cycle is still finalized (its __del__
    writes a file here)."""
    kept = tmp_path / "kept.txt"
    script = f"""
import atexit, gc, sys
from pathlib import Path
from minigpt.analysis.curves import main
atexit.register(lambda: print("frozen", gc.get_freeze_count()))  # runs after any of cli_main's
class Holder:
    def __del__(self):
        Path({str(kept)!r}).write_text("finalized")
h = Holder(); h.self = h
del h
sys.exit(main([{str(tmp_path / "no-run")!r}]))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr  # no metrics.jsonl there
    assert int(proc.stdout.split("frozen")[-1]) == 0, proc.stdout
    assert kept.read_text() == "finalized"
