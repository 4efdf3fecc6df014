"""Bad input and faults at every public interface end in one line and lose nothing: a full or
read-only disk, paths that cannot be used, an export onto its own source, a log cut mid-line,
a run of zero steps, token ids outside the vocabulary, non-finite ALiBi slopes, output paths
checked before a benchmark or an experiment starts; and the --logger mirrors of
metrics.jsonl."""

import errno
import json
import os
import sys
import types

import pytest
import torch

from minigpt.attention import attention
from minigpt import checkpoint as checkpoint_module
from minigpt.checkpoint import load_checkpoint
from minigpt.config import ConfigError, GPTConfig
from minigpt.model import GPT
from minigpt.runtime import PathError, check_dir_target
from minigpt.train.loop import TrainConfig, train
from minigpt.cli.train import main as train_main

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
        "--batch-size", "2", "--eval-iters", "1", "--no-progress", "--attn-backend", "sdpa"]


def _tiny_cfg(text_file, out_dir, **kw):
    return TrainConfig(data=str(text_file), out_dir=str(out_dir), n_layer=1, n_head=2, n_embd=16,
                       block_size=8, batch_size=2, eval_iters=1, progress=False,
                       attn_backend="sdpa", seed=1, **kw)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_full_disk_during_training_is_one_line_exit_2_and_the_checkpoint_survives(
        text_file, tmp_path, monkeypatch, capsys, err):
    out = tmp_path / "run"
    real_save = torch.save
    calls = []

    def fails_the_second_time(obj, fh, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            fh.write(b"partial")
            raise OSError(err, os.strerror(err))
        return real_save(obj, fh, *a, **kw)

    monkeypatch.setattr(checkpoint_module.torch, "save", fails_the_second_time)
    code = train_main(["--data", str(text_file), "--out-dir", str(out), "--max-iters", "4",
                       "--eval-interval", "2", *TINY])
    err_text = capsys.readouterr().err
    assert code == 2, err_text
    assert err_text.count("\n") == 1 and "Traceback" not in err_text, err_text
    assert str(out / "ckpt.pt") in err_text and errno.errorcode[err] in err_text, err_text
    assert "previous checkpoint is kept" in err_text
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 2  # the one before the failure


def test_a_read_only_out_dir_is_refused_before_anything(text_file, tmp_path, monkeypatch,
                                                        capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(str(ro))
                        else real_access(p, mode))
    monkeypatch.setattr(os, "statvfs", lambda p: types.SimpleNamespace(f_flag=os.ST_RDONLY))
    with pytest.raises(PathError, match="read-only file system"):
        check_dir_target(ro / "run", "out_dir")
    code = train_main(["--data", str(text_file), "--out-dir", str(ro / "run"), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "out_dir" in err and "read-only" in err, err
    assert not (ro / "run").exists()


@pytest.mark.parametrize("target", ["out_dir_file", "cache_file"])
def test_unusable_paths_are_one_line_exit_2(text_file, tmp_path, monkeypatch, capsys, target):
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = afile if target == "out_dir_file" else tmp_path / "run"
    if target == "cache_file":
        monkeypatch.setenv("MINIGPT_CACHE_DIR", str(afile))
    code = train_main(["--data", str(text_file), "--out-dir", str(out), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and str(afile) in err, err
    assert "not a directory" in err and not (tmp_path / "run").exists()


def test_resume_after_a_log_cut_mid_line_starts_a_new_line(text_file, tmp_path):
    out = tmp_path / "run"
    train(_tiny_cfg(text_file, out, max_iters=2, eval_interval=2), log=lambda *a: None)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"event": "eval", "iter": 2, "train_lo')  # killed mid-write
    train(_tiny_cfg(text_file, out, max_iters=4, eval_interval=2, resume=True),
          log=lambda *a: None)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    torn = [line for line in lines if line.endswith('"train_lo')]
    assert len(torn) == 1  # alone on its line
    rows = [json.loads(line) for line in lines if line not in torn]
    # The resumed run's last evaluation, then its final one over the whole validation split.
    assert [r["event"] for r in rows[-2:]] == ["eval", "whole_split"]
    assert rows[-2]["iter"] == rows[-1]["iter"] == 4


def test_zero_steps_report_no_checkpoint(text_file, tmp_path):
    lines = []
    result = train(_tiny_cfg(text_file, tmp_path / "run", max_iters=0), log=lines.append)
    assert result.checkpoint == "" and not (tmp_path / "run" / "ckpt.pt").exists()
    assert "no checkpoint written" in lines[-1] and "ckpt.pt" not in lines[-1], lines


def test_token_ids_outside_the_vocabulary_are_named():
    model = GPT(GPTConfig(vocab_size=10, n_layer=1, n_head=2, n_embd=16, block_size=8))
    for bad in (10, -1):
        with pytest.raises(ValueError, match=f"token id {bad}, outside the vocabulary"):
            model(torch.tensor([[1, bad, 2]]))
    assert model(torch.zeros(0, 3, dtype=torch.long))[0].shape == (0, 3, 10)


def test_targets_not_shaped_as_idx_or_out_of_range_are_named():
    model = GPT(GPTConfig(vocab_size=10, n_layer=1, n_head=2, n_embd=16, block_size=8))
    idx = torch.randint(10, (2, 5))
    for bad, got in ((idx[:, 1:], r"torch.int64 of shape \(2, 4\)"),
                     (idx.flatten(), r"torch.int64 of shape \(10,\)"),
                     (idx.float(), r"torch.float32 of shape \(2, 5\)"),
                     (idx.tolist(), r"<class 'list'>")):
        with pytest.raises(ValueError, match=r"targets must be torch.int64 of shape \(2, 5\), "
                                             r"as idx, got " + got):
            model(idx, bad)
    for bad_id in (10, 11, -2):
        bad = idx.clone()
        bad[1, 3] = bad_id
        with pytest.raises(ValueError, match=rf"targets holds token id {bad_id}, outside the "
                                             r"vocabulary \[0, vocab_size=10\)"):
            model(idx, bad)
    ignored = idx.clone()
    ignored[0, :2] = -1  # left out of the loss
    _, loss = model(idx, ignored)
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 10), ignored.view(-1),
                                                 ignore_index=-1)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_alibi_slopes_are_refused(bad):
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="alibi_slopes must be finite"):
        attention(q, q, q, alibi_slopes=torch.tensor([0.5, bad]), backend="naive")


def test_export_never_writes_onto_its_source_or_into_a_run_directory(text_file, tmp_path,
                                                                     capsys):
    pytest.importorskip("safetensors")
    from minigpt.hf.export import main as export_main

    out = tmp_path / "run"
    train(_tiny_cfg(text_file, out, max_iters=1, eval_interval=1), log=lambda *a: None)
    ckpt = out / "ckpt.pt"
    before, config = ckpt.read_bytes(), (out / "config.json").read_bytes()
    for fmt, dest in (("safetensors", ckpt), ("safetensors", out / "model.safetensors"),
                      ("hf", out)):
        with pytest.raises(SystemExit) as info:
            export_main(["--checkpoint", str(ckpt), "--format", fmt, str(dest)])
        err = capsys.readouterr().err
        assert info.value.code == 2 and "--force" in err and "Traceback" not in err, err
    assert ckpt.read_bytes() == before and (out / "config.json").read_bytes() == config
    assert export_main(["--checkpoint", str(ckpt), "--format", "safetensors",
                        str(tmp_path / "elsewhere" / "model.safetensors")]) == 0
    assert export_main(["--checkpoint", str(ckpt), "--format", "safetensors", "--force",
                        str(out / "model.safetensors")]) == 0  # asked for


def test_profile_refuses_bad_sizes_and_output_paths_before_timing(tmp_path, monkeypatch, capsys):
    from minigpt.bench import profile

    monkeypatch.setattr(profile, "run_case", lambda *a, **k: pytest.fail("benchmark ran"))
    for argv, words in ((["--seq", "0"], "argument --seq"),
                        (["--heads", "0"], "argument --heads"),
                        (["--json", str(tmp_path / "missing" / "rows.json")], "does not exist"),
                        (["--csv", str(tmp_path)], "is a directory")):
        with pytest.raises(SystemExit) as info:
            profile.main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and words in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv, words", [
    (["ablation", "--data", "MISSING"], "--data"),
    (["positions", "--data", "MISSING"], "--data"),
    (["window", "--out", "AFILE"], "--out"),
    (["ablation", "--out-dir", "AFILE"], "--out-dir"),
])
def test_experiments_refuse_missing_data_and_file_outputs_before_training(tmp_path, monkeypatch,
                                                                         capsys, argv, words):
    from minigpt import experiments
    from minigpt.experiments import window
    from minigpt.train import loop

    (tmp_path / "afile").write_text("x")
    argv = [a.replace("MISSING", str(tmp_path / "missing.txt"))
            .replace("AFILE", str(tmp_path / "afile")) for a in argv]
    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(window, "attention_cost", lambda *a, **k: pytest.fail("timed"))
    with pytest.raises(SystemExit) as info:
        experiments.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and words in err and "Traceback" not in err, err


def test_an_interrupted_run_ends_the_whole_experiment(monkeypatch):
    from minigpt import experiments
    from minigpt.train import loop as training

    monkeypatch.setattr(training, "train",
                        lambda cfg, log=None: types.SimpleNamespace(interrupted=True))
    assert experiments.main(["ablation", "--max-time", "1", "--out-dir", "unused"]) == 130


# --- --logger ----------------------------------------------------------------------------------

def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_logger_mirrors_metrics_jsonl(text_file, tmp_path):
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        pytest.skip('tensorboard is not installed: pip install "minigpt-kernels[tensorboard]" '
                    '(or pip install tensorboard)')
    out = tmp_path / "run"
    train(_tiny_cfg(text_file, out, max_iters=6, eval_interval=3, log_interval=2,
                    logger="tensorboard"), log=lambda *a: None)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/train_loss", "eval/val_loss", "eval/lr", "train/loss", "train/lr",
            "train/grad_norm", "train/tokens_per_s"} <= tags, tags
    rows = _metrics(out)
    for event, field in (("eval", "val_loss"), ("eval", "lr"), ("train", "loss"),
                         ("train", "grad_norm"), ("train", "tokens_per_s")):
        want = [(r["iter"], r[field]) for r in rows if r["event"] == event]
        got = [(e.step, e.value) for e in acc.Scalars(f"{event}/{field}")]
        assert [s for s, _ in got] == [s for s, _ in want] and want
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def test_a_missing_logger_package_is_one_line_with_the_pip_line(text_file, tmp_path,
                                                                monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    code = train_main(["--data", str(text_file), "--out-dir", str(tmp_path / "run"),
                       "--logger", "wandb", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pip install" in err and "wandb" in err, err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="pip install"):
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
        from minigpt.train.loggers import check_logger

        check_logger("tensorboard")


def test_wandb_logger_goes_offline_without_a_network(text_file, tmp_path, monkeypatch):
    """A stand-in wandb module records what the logger asks of it (the real package talks to a
    server)."""
    calls = {"init": [], "log": [], "finish": 0}

    class FakeRun:
        url = None

        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls["init"].append(kw) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key
    out = tmp_path / "run"
    train(_tiny_cfg(text_file, out, max_iters=4, eval_interval=2, log_interval=2,
                    logger="wandb"), log=lambda *a: None)
    assert calls["init"][0]["mode"] == "offline" and calls["finish"] == 1
    rows = _metrics(out)
    assert [step for step, _ in calls["log"]] == [r["iter"] for r in rows]
    assert calls["log"][-2][1]["eval/val_loss"] == pytest.approx(rows[-2]["val_loss"])
    assert calls["log"][-1][1]["whole_split/val_loss"] == pytest.approx(rows[-1]["val_loss"])


def test_sizes_too_large_for_the_machine_are_one_line(monkeypatch, capsys):
    from minigpt.bench import profile

    def allocate(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 1024000000000 bytes.")

    monkeypatch.setattr(profile, "run_case", allocate)
    assert profile.main(["--seq", "4000000000", "--backends", "sdpa"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: out of memory"), err
