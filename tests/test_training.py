"""The training loop, exact resume, and train.py / sample.py end to end."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

from minigpt.checkpoint import load_checkpoint
from minigpt.train.loop import TrainConfig, lr_at, train

ROOT = Path(__file__).resolve().parent.parent


def tiny_cfg(text_file, out_dir, **kw):
    cfg = TrainConfig(data=str(text_file), out_dir=str(out_dir), n_layer=2, n_head=2,
                      n_embd=32, block_size=16, batch_size=4, max_iters=20, warmup_iters=3,
                      eval_interval=10, eval_iters=2, learning_rate=3e-3, min_lr=3e-4,
                      dropout=0.1, progress=False, attn_backend="sdpa", seed=1)
    model_fields = {f.name for f in fields(cfg.model)}
    model_kw = {k: kw.pop(k) for k in list(kw) if k in model_fields}
    return replace(cfg, model=replace(cfg.model, **model_kw), **kw)


def test_lr_schedule():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110,
                      lr_schedule="cosine")
    assert lr_at(0, cfg) < lr_at(5, cfg) < lr_at(9, cfg) <= 1.0
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == 0.1


def test_wsd_schedule_and_time_budget():
    # 10 warmup steps, then 100 steps: stable to p = 0.75 (step 85), linear to min_lr at 110.
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.2, warmup_iters=10, max_iters=110,
                      lr_schedule="wsd", cooldown_frac=0.25)
    assert lr_at(9, cfg) < 1.0
    assert lr_at(10, cfg) == lr_at(50, cfg) == lr_at(85, cfg) == 1.0
    assert lr_at(90, cfg) == pytest.approx(1.0 - 0.8 * 0.05 / 0.25)
    assert lr_at(110, cfg) == pytest.approx(0.2) and lr_at(300, cfg) == pytest.approx(0.2)
    # With max_time the schedule follows the fraction of the budget used, when further along.
    timed = replace(cfg, max_time=100.0)
    assert lr_at(20, timed, elapsed=5.0) == 1.0
    assert lr_at(20, timed, elapsed=90.0) == pytest.approx(1.0 - 0.8 * 0.15 / 0.25)
    assert lr_at(20, timed, elapsed=500.0) == pytest.approx(0.2)
    assert lr_at(20, cfg, elapsed=90.0) == 1.0  # no budget: time does not count


def test_max_time_stops_the_run(text_file, tmp_path):
    cfg = tiny_cfg(text_file, tmp_path, max_iters=100_000, max_time=3.0, eval_interval=50)
    t0 = time.perf_counter()
    result = train(cfg, log=lambda *a: None)
    assert 0 < result.iters < 100_000
    assert time.perf_counter() - t0 < 60
    last = [r for r in result.history if r.get("event") == "eval"][-1]
    assert last["iter"] == result.iters and last["time_s"] >= 3.0
    assert last["lr"] == pytest.approx(cfg.min_lr)  # the schedule ran to its end


def test_training_reduces_loss_and_writes_logs(text_file, tmp_path):
    result = train(tiny_cfg(text_file, tmp_path, max_iters=40), log=lambda *a: None)
    first = result.history[0]
    assert result.final_val_loss < first["val_loss"] - 0.1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if r["event"] == "eval"] == [0, 10, 20, 30, 40]
    steps = [r for r in rows if r["event"] == "train"]  # every log_interval steps
    assert [r["iter"] for r in steps] == [10, 20, 30, 40]
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["lr"] > 0 for r in steps)
    state = load_checkpoint(tmp_path / "ckpt.pt")
    assert state["iter_num"] == 40 and state["best_val_loss"] == result.best_val_loss


def test_train_loss_is_the_last_steps_mean_unless_eval_train(text_file, tmp_path):
    """Without eval_train an evaluation's train loss is the mean loss of the last eval_iters
    training steps (step 0's evaluates the fixed batches); with it, the fixed training batches'
    loss. The validation losses and the trained weights are the same either way."""
    def rows_of(out, **kw):
        train(tiny_cfg(text_file, out, log_interval=1, dropout=0.0, eval_iters=3, **kw),
              log=lambda *a: None)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return ([r for r in rows if r["event"] == "eval"],
                {r["iter"]: r["loss"] for r in rows if r["event"] == "train"})
    evals, steps = rows_of(tmp_path / "a")
    evals_b, _ = rows_of(tmp_path / "b", eval_train=True)
    assert [r["iter"] for r in evals] == [0, 10, 20] and len(steps) == 20
    assert evals[0]["train_loss"] == pytest.approx(evals_b[0]["train_loss"], rel=1e-6)
    for row, last in ((evals[1], (8, 9, 10)), (evals[2], (18, 19, 20))):
        assert row["train_loss"] == pytest.approx(sum(steps[i] for i in last) / 3, rel=1e-5)
    assert [r["val_loss"] for r in evals] == [r["val_loss"] for r in evals_b]
    assert abs(evals[2]["train_loss"] - evals_b[2]["train_loss"]) > 1e-4


@pytest.mark.parametrize("backend, optimizer", [(None, "muon"), ("sdpa", "muon"),
                                                ("sdpa", "adamw")],
                         ids=["default", "sdpa", "sdpa-adamw"])
def test_resume_is_exact(text_file, tmp_path, backend, optimizer):
    """N steps, then N more with --resume, equals 2N steps in one go, bit for bit: with the
    default backend ("ext" when built) at the default thread count, and with "sdpa"; with
    each optimizer (Muon's momentum and AdamW's moments are restored)."""
    if backend is None:
        from minigpt import attention_backends

        report = attention_backends()
        assert report["default"] == ("ext" if report["ext"]["available"] else "sdpa")
    full = tiny_cfg(text_file, tmp_path / "full", max_iters=20, lr_decay_iters=20,
                    attn_backend=backend, optimizer=optimizer)
    train(full, log=lambda *a: None)
    half = tiny_cfg(text_file, tmp_path / "half", max_iters=10, lr_decay_iters=20,
                    attn_backend=backend, optimizer=optimizer)
    train(half, log=lambda *a: None)
    train(replace(half, max_iters=20, resume=True), log=lambda *a: None)
    a = load_checkpoint(tmp_path / "full" / "ckpt.pt")
    b = load_checkpoint(tmp_path / "half" / "ckpt.pt")
    assert a["iter_num"] == b["iter_num"] == 20
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["val_loss"] == b["val_loss"]


def run(args, **kw):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, **kw)


@pytest.mark.slow
def test_train_and_sample_scripts(text_file, tmp_path):
    out = tmp_path / "out"
    r = run(["train.py", "--data", str(text_file), "--out-dir", str(out), "--n-layer", "1",
             "--n-embd", "32", "--n-head", "2", "--block-size", "16", "--batch-size", "4",
             "--max-iters", "30", "--eval-interval", "15", "--eval-iters", "2", "--no-progress",
             "--attn-backend", "sdpa"])
    assert r.returncode == 0, r.stderr
    assert "best val loss" in r.stdout and (out / "ckpt.pt").is_file()

    args = ["sample.py", "--checkpoint", str(out), "--prompt", "abc", "--max-new-tokens", "40",
            "--seed", "3", "--top-k", "5", "--top-p", "0.9", "--num-samples", "2"]
    s1, s2 = run(args), run(args)
    assert s1.returncode == 0, s1.stderr
    assert s1.stdout == s2.stdout  # same seed, same text
    samples = s1.stdout.split("---------------\n")
    assert len(samples) == 2 and all(s.startswith("abc") and len(s) >= 43 for s in samples)
    streamed = run(args + ["--stream"])
    assert streamed.returncode == 0 and streamed.stdout == s1.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args, pattern", [
    (["train.py", "--learning-rate", "-1"], "--learning-rate: must be > 0"),
    (["train.py", "--dropout", "1.5"], "--dropout"),
    (["train.py", "--tokenizer", "words"], "--tokenizer"),
    (["sample.py", "--top-p", "1.5"], "--top-p"),
    (["sample.py", "--temperature", "-1"], "--temperature"),
])
def test_bad_flags_are_rejected(args, pattern):
    r = run(args)
    assert r.returncode == 2 and pattern in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_offline_without_corpus_exits_2(tmp_path):
    env_cache = tmp_path / "empty-cache"
    r = subprocess.run([sys.executable, "-c", (
        "import sys, urllib.request, urllib.error\n"
        "def offline(*a, **k): raise urllib.error.URLError('offline')\n"
        "urllib.request.urlopen = offline\n"
        f"sys.argv = ['train.py', '--out-dir', {str(tmp_path / 'out')!r}]\n"
        "import runpy; runpy.run_path('train.py', run_name='__main__')")],
        cwd=ROOT, env={**os.environ, "MINIGPT_CACHE_DIR": str(env_cache)},
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "--data" in r.stderr and "char-rnn" in r.stderr


@pytest.mark.slow
def test_sample_with_bad_checkpoint(tmp_path):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"\x00" * 100)
    r = run(["sample.py", "--checkpoint", str(bad)])
    assert r.returncode == 2 and str(bad) in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint(text_file, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "train.py", "--data", str(text_file), "--out-dir", str(out),
         "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "16",
         "--batch-size", "4", "--max-iters", "1000000", "--eval-interval", "100000",
         "--eval-iters", "1", "--no-progress", "--attn-backend", "sdpa"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while "parameters" not in (line := proc.stdout.readline()) and time.time() < deadline:
            pass
        time.sleep(2.0)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "interrupted at step" in stdout and "Traceback" not in stderr
    state = load_checkpoint(out / "ckpt.pt")
    assert 0 < state["iter_num"] < 1000000


def _corrupt_loss_at(monkeypatch, steps, corrupt):
    """Replace the training loss by corrupt(loss) at the given (0-based) training forward calls."""
    from minigpt.model import GPT

    real, calls = GPT.forward, {"n": 0}

    def forward(self, idx, targets=None, kv_cache=None):
        logits, loss = real(self, idx, targets, kv_cache)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] - 1 in steps:
                loss = corrupt(loss)
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)


def _nan_at(monkeypatch, steps):
    """Make the training loss NaN at the given (0-based) training forward calls."""
    _corrupt_loss_at(monkeypatch, steps, lambda loss: loss * float("nan"))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(text_file, tmp_path, monkeypatch):
    from minigpt.train.loop import NonFiniteLossError

    _nan_at(monkeypatch, {15})
    with pytest.raises(NonFiniteLossError, match="step 15"):
        train(tiny_cfg(text_file, tmp_path, max_iters=20), log=lambda *a: None)
    assert load_checkpoint(tmp_path / "ckpt.pt")["iter_num"] == 10


def test_skip_nonfinite_counts_and_continues(text_file, tmp_path, monkeypatch):
    _nan_at(monkeypatch, {3, 7})
    msgs = []
    result = train(tiny_cfg(text_file, tmp_path, max_iters=12, skip_nonfinite=2), log=msgs.append)
    assert result.iters == 12 and sum("step skipped" in m for m in msgs) == 2
    for name, t in load_checkpoint(tmp_path / "ckpt.pt")["model"].items():
        assert torch.isfinite(t).all(), name


class _InfGradient(torch.autograd.Function):
    """Identity forward; the backward sends an inf gradient: a finite loss, an inf grad norm."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _inf_gradient_at(monkeypatch, steps):
    """A finite loss whose gradient is inf at the given training forward calls."""
    _corrupt_loss_at(monkeypatch, steps, _InfGradient.apply)


def test_inf_gradient_stops_and_keeps_last_good_checkpoint(text_file, tmp_path, monkeypatch):
    from minigpt.train.loop import NonFiniteLossError

    _inf_gradient_at(monkeypatch, {13})
    msgs = []
    with pytest.raises(NonFiniteLossError, match="step 13"):
        train(tiny_cfg(text_file, tmp_path, max_iters=20), log=msgs.append)
    state = load_checkpoint(tmp_path / "ckpt.pt")
    assert state["iter_num"] == 10
    for name, t in state["model"].items():
        assert torch.isfinite(t).all(), name
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if r.get("event") == "nonfinite"] == [13]


TRAIN_WITH_NAN = """
import runpy, sys
from minigpt.model import GPT
real, calls = GPT.forward, [0]
def forward(self, idx, targets=None, kv_cache=None):  # NaN loss from training step 7 on
    logits, loss = real(self, idx, targets, kv_cache)
    if self.training and targets is not None:
        calls[0] += 1
        if calls[0] > 7:
            loss = loss * float("nan")
    return logits, loss
GPT.forward = forward
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.slow
def test_train_script_exits_1_on_a_nonfinite_stop(text_file, tmp_path):
    r = run(["-c", TRAIN_WITH_NAN, "--data", str(text_file), "--out-dir", str(tmp_path),
             "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "16",
             "--batch-size", "4", "--max-iters", "10", "--eval-interval", "5", "--eval-iters", "1",
             "--no-progress"])
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "step 7" in r.stderr and "Traceback" not in r.stderr
    assert load_checkpoint(tmp_path / "ckpt.pt")["iter_num"] == 5  # the last good checkpoint
