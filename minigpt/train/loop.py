"""The training loop as a library; minigpt/train.py is its command line.

AdamW (Loshchilov & Hutter 2019) with weight-decay groups, linear warmup then cosine decay
(Loshchilov & Hutter 2017, SGDR), gradient clipping, gradient accumulation, bf16 autocast on
CUDA, optional torch.compile, periodic evaluation on fixed batches, atomic checkpoints with
everything needed to resume exactly (model, optimizer, RNG and data-sampler states), a JSONL
metrics log, and DistributedDataParallel when started by torchrun.

train() reads top to bottom: set up (Run: what stays fixed; Progress: what the loop changes),
then evaluate / save / train_step until max_iters or a stop signal. Each step is a named
function of (run, progress); nothing closes over loop state. The loss curves are drawn by the
caller afterwards (minigpt.analysis.pictures.plot_metrics_file; train.py does it).

Before anything is written, check_targets refuses what cannot work (out_dir, the cache, the
corpus file, the device, the logger's package). Every log_interval steps a "train" row (loss,
lr, grad_norm, tokens_per_s) joins the "eval" rows of metrics.jsonl; with cfg.logger they are
mirrored to TensorBoard or W&B (minigpt.train.loggers). Between steps the run checks that its
directory and lock are still there (RunDir.lost); if not, it saves again and stops.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from minigpt.attention import resolve_backend
from minigpt.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from minigpt.config import ConfigError, GPTConfig
from minigpt.train.config import PRESETS, TrainConfig, lr_at
from minigpt.train.data import BatchSampler, DataError, load_corpus
from minigpt.train.loggers import check_logger, open_logger
from minigpt.model import GPT
from minigpt.train.optim import Optimizers, build_optimizer
from minigpt.hf.pretrained import pretrained_state
from minigpt.train.rundir import RunDir, RunDirLostError
from minigpt.runtime import (Distributed, Precision, check_cache_dir, check_dir_target,
                      check_input_file, pick_device, resolve_precision)
from minigpt.tokenizer import from_state

__all__ = ["train", "TrainConfig", "TrainResult", "PRESETS", "lr_at", "NonFiniteLossError"]

CONFIG_NAME = "config.json"  # the resolved TrainConfig, beside the checkpoint


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class TrainResult:
    iters: int
    best_val_loss: float
    final_val_loss: float
    final_train_loss: float
    tokens_per_s: float
    wall_time_s: float
    interrupted: bool
    checkpoint: str                # the checkpoint this run wrote; "" when it wrote none
    history: list = field(default_factory=list)


@dataclass
class Run:
    """What a run sets up once and the loop only uses."""

    cfg: TrainConfig               # with model = the model actually trained (vocab_size set)
    device: torch.device
    dist: Distributed
    precision: Precision
    raw_model: GPT                 # the module whose state is saved
    model: torch.nn.Module         # raw_model, compiled and/or wrapped in DDP
    optimizer: Optimizers
    scaler: Any                    # torch.amp.GradScaler, a no-op unless float16
    tokenizer: Any
    train_batches: BatchSampler
    eval_batches: Dict[str, list]  # split -> fixed [(x, y)] batches
    ckpt_path: Path
    metrics: Any                   # the open metrics.jsonl (rank 0), else None
    logger: Any                    # minigpt.train.loggers.Logger mirroring metrics.jsonl, or None
    bar: Any                       # the tqdm progress bar, or None
    log: Any                       # log(message)
    t_start: float                 # perf_counter() when this process started the run
    elapsed_before: float = 0.0    # seconds of the earlier runs this one resumes


@dataclass
class Progress:
    """What the loop changes: the step, the best loss, timings, the history."""

    iter_num: int = 0
    best_val: float = float("inf")
    losses: Dict[str, float] = field(
        default_factory=lambda: {"train": float("nan"), "val": float("nan")})
    skipped: int = 0
    train_time: float = 0.0
    train_tokens: int = 0
    interrupted: bool = False
    saved_iter: Optional[int] = None  # the step of the last checkpoint this run wrote
    history: List[dict] = field(default_factory=list)


def train(cfg: TrainConfig, log=print, resume_state: Optional[dict] = None) -> TrainResult:
    """Train a GPT as configured, holding cfg.out_dir for the run (see RunDir); returns a
    summary. See TrainConfig for every setting.

    Args:
        cfg: the settings. With cfg.resume, the model is the checkpoint's and must have
            cfg.model's shape (dropout and attn_backend may differ). With cfg.init_from (and no
            resume), the model and tokenizer are the pretrained one's, with cfg.model's
            block_size, dropout and attn_backend; the corpus is tokenized with its tokenizer.
        log: called with one-line messages (rank 0 only).
        resume_state: the checkpoint of out_dir, if the caller has already read it
            (load_checkpoint); with cfg.resume and None, train reads it.

    Raises:
        minigpt.runtime.PathError: out_dir, the cache directory or the corpus cannot be used
            (checked before anything is written: check_targets).
        minigpt.train.rundir.RunDirError: another process holds out_dir, or out_dir holds a
            checkpoint that this run neither resumes nor overwrites.
        minigpt.train.rundir.RunDirLostError: out_dir or its lock vanished during the run (the
            checkpoint was saved again, the message says where).
        OSError: the file system refused a write (disk full, read-only, ...): filename names
            the file; the previous checkpoint is whole.
        minigpt.train.data.DataError: the corpus cannot be had or used, or is not the checkpoint's.
        minigpt.checkpoint.CheckpointError: resume with a missing or unreadable checkpoint.
        minigpt.config.ConfigError: resume with a model shape that is not the checkpoint's.
        minigpt.hf.pretrained.PretrainedError: cfg.init_from cannot be found, read or represented,
            or cfg.model.block_size exceeds its context.
        minigpt.runtime.DeviceError: a device or dtype this machine cannot provide.
        NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
    """
    check_targets(cfg)
    # Under torchrun, rank 0 holds the directory for every process.
    hold = (RunDir(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite)
            if Distributed.is_master_process() else contextlib.nullcontext())
    with hold as rundir:
        run, progress = setup(cfg, resume_state, log)
        lost = None
        try:
            with _StopRequest() as stop:
                while True:
                    done = progress.iter_num >= cfg.max_iters or (
                        cfg.max_time > 0 and run.dist.any(elapsed(run) >= cfg.max_time))
                    if progress.iter_num % cfg.eval_interval == 0 or done:
                        evaluate_and_save(run, progress)
                    if done:
                        break
                    # One agreement per step: a stop signal, or rank 0's directory gone.
                    lost = rundir.lost() if isinstance(rundir, RunDir) else None
                    if run.dist.any(stop.signum is not None or lost is not None):
                        if lost is not None:
                            save_lost(run, progress, lost)
                        else:
                            save_interrupted(run, progress)
                        break
                    train_step(run, progress)
            # Every rank tears the process group down together: a rank that closed its gloo
            # connections while another was still saving made that one abort at exit.
            run.dist.barrier()
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, at no checkpoint
            if run.dist.master:
                last = (f"the last checkpoint is {run.ckpt_path}" if run.ckpt_path.is_file()
                        else "no checkpoint was written")
                log(f"minigpt: stopped at once at step {progress.iter_num} (a second Ctrl-C); "
                    f"{last}")
            raise
        finally:
            teardown(run)
        if lost is not None and run.dist.master:
            raise RunDirLostError(f"{lost} during training; stopped at step "
                                  f"{progress.iter_num}, checkpoint saved to {run.ckpt_path} "
                                  f"(continue with --resume)")
        return summarize(run, progress)


def check_targets(cfg: TrainConfig) -> None:
    """Check every file-system target of a run before anything is written, and what else can
    be refused at once: out_dir a writable directory (or creatable), the cache directory, the
    corpus a regular readable file, the device and dtype, the logger's package.

    Raises:
        minigpt.runtime.PathError, minigpt.runtime.DeviceError, ConfigError: naming the
            setting and why.
    """
    check_dir_target(cfg.out_dir, "out_dir")
    check_cache_dir()
    if cfg.data is not None:
        check_input_file(cfg.data, "data")
    resolve_precision(cfg.dtype, pick_device(cfg.device))
    check_logger(cfg.logger)


def setup(cfg: TrainConfig, resume_state: Optional[dict], log) -> "tuple[Run, Progress]":
    """Device, processes, corpus, model, optimizer, batches, metrics log; restored from the
    checkpoint when resuming."""
    t_start = time.perf_counter()
    device = pick_device(cfg.device)
    dist = Distributed(device)
    device = dist.device_for(device)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    if cfg.resume and resume_state is None:
        resume_state = load_checkpoint(ckpt_path)
    note = log if dist.master else (lambda message: None)

    pretrained = None
    if resume_state is not None:
        tokenizer = from_state(resume_state["tokenizer"])
        # A pretrained model's tokenizer is fixed: tokenize with it. "char" and "gpt2" are
        # rebuilt from the text and must come out the same.
        corpus = load_corpus(cfg.data, tokenizer if tokenizer.name == "hf" else cfg.tokenizer,
                             log=note)
        if tokenizer.state_dict() != corpus.tokenizer.state_dict():
            raise DataError(f"resume: the checkpoint's tokenizer does not match the corpus "
                            f"{corpus.source} (a different text or tokenizer?)")
        model_cfg = _resumed_model_config(cfg.model, resume_state["model_config"])
    elif cfg.init_from is not None:
        pretrained = pretrained_state(cfg.init_from, block_size=cfg.model.block_size)
        tokenizer = from_state(pretrained["tokenizer"])
        corpus = load_corpus(cfg.data, tokenizer, log=note)
        model_cfg = replace(GPTConfig.from_dict(pretrained["model_config"]),
                            **{name: getattr(cfg.model, name) for name in GPTConfig.TUNABLE})
    else:
        corpus = load_corpus(cfg.data, cfg.tokenizer, log=note)
        tokenizer = corpus.tokenizer
        model_cfg = replace(cfg.model, vocab_size=tokenizer.vocab_size)
    cfg = replace(cfg, model=model_cfg, tokenizer=tokenizer.name)

    torch.manual_seed(cfg.seed + dist.rank)
    raw_model = GPT(model_cfg)
    if pretrained is not None:
        raw_model.load_state_dict(pretrained.pop("model"))
    raw_model.to(device)
    optimizer = build_optimizer(raw_model, cfg, device.type)
    train_batches = BatchSampler(corpus.train, model_cfg.block_size, cfg.batch_size,
                                 seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)
    precision = resolve_precision(cfg.dtype, device)
    scaler = precision.grad_scaler()
    progress = Progress()
    elapsed_before = 0.0
    if resume_state is not None:
        progress.iter_num = resume_state["iter_num"]
        progress.best_val = resume_state["best_val_loss"]
        elapsed_before = resume_state.get("elapsed_s", 0.0)
        _restore(resume_state, raw_model, optimizer, train_batches, scaler, device)

    model = torch.compile(raw_model) if cfg.compile else raw_model
    if dist.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    metrics, bar, logger = None, None, None
    if dist.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_config(cfg)
        metrics = open_metrics(out_dir / "metrics.jsonl")
        logger = open_logger(cfg.logger, out_dir, cfg.to_dict())
        # Under CPU autocast, attention() computes in float32 (see minigpt.attention).
        attn_dtype = (precision.autocast_dtype if device.type != "cpu" else None) or torch.float32
        backend = resolve_backend(model_cfg.attn_backend, device, attn_dtype,
                                  model_cfg.head_dim, causal=True)
        log(f"minigpt: {raw_model.num_params() / 1e6:.2f}M parameters"
            + (f" (pretrained: {pretrained['source']})" if pretrained is not None else "")
            + f", device {device}, "
            f"{precision.name}{' autocast' if precision.autocast_dtype else ''}, corpus "
            f"{corpus.source} ({len(corpus.train):,} train / {len(corpus.val):,} val "
            f"{tokenizer.name} tokens), attention backend {backend}"
            + (f", {dist.world_size} processes" if dist.enabled else ""))
        if logger is not None:
            log(f"minigpt: logging to {logger.where}")
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_iters, initial=progress.iter_num, unit="it",
                       dynamic_ncols=True)

    # Fixed evaluation batches: the same windows at every evaluation, so curves are comparable.
    eval_batches = {}
    for split in ("train", "val"):
        sampler = BatchSampler(corpus.split(split), model_cfg.block_size, cfg.batch_size,
                               seed=cfg.seed + 1_000_003, rank=dist.rank,
                               world_size=dist.world_size)
        eval_batches[split] = [sampler.next(device) for _ in range(cfg.eval_iters)]

    run = Run(cfg=cfg, device=device, dist=dist, precision=precision, raw_model=raw_model,
              model=model, optimizer=optimizer, scaler=scaler, tokenizer=tokenizer,
              train_batches=train_batches, eval_batches=eval_batches, ckpt_path=ckpt_path,
              metrics=metrics, logger=logger, bar=bar, log=log, t_start=t_start,
              elapsed_before=elapsed_before)
    model.train()
    return run, progress


def write_config(cfg: TrainConfig) -> None:
    """out_dir/config.json: the resolved settings (usable as --config)."""
    config_text = json.dumps(cfg.to_dict(), indent=2) + "\n"
    atomic_write(Path(cfg.out_dir) / CONFIG_NAME, lambda fh: fh.write(config_text.encode()))


def open_metrics(path: Path):
    """path opened for appending rows; a last line cut short (a run killed mid-write, a file
    truncated) is ended first, so the next row starts on a line of its own."""
    metrics = open(path, "a+b")
    if metrics.tell() > 0:
        metrics.seek(metrics.tell() - 1)
        if metrics.read(1) != b"\n":
            metrics.write(b"\n")
    metrics.close()
    return open(path, "a", encoding="utf-8")


def _resumed_model_config(wanted: GPTConfig, saved: dict) -> GPTConfig:
    """The checkpoint's model config with wanted's dropout and attn_backend (GPTConfig.TUNABLE).

    Raises:
        ConfigError: wanted differs from the checkpoint's model in a field of its shape.
    """
    saved_cfg = GPTConfig.from_dict(saved)
    for f in fields(GPTConfig):
        if f.name in GPTConfig.TUNABLE or f.name == "vocab_size":
            continue
        if getattr(wanted, f.name) != getattr(saved_cfg, f.name):
            raise ConfigError("GPTConfig", f.name, getattr(wanted, f.name),
                              f"cannot change on resume: the checkpoint's model has "
                              f"{f.name}={getattr(saved_cfg, f.name)!r}")
    return replace(saved_cfg, **{name: getattr(wanted, name) for name in GPTConfig.TUNABLE})


def _restore(state: dict, model, optimizer, train_batches, scaler, device) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    train_batches.load_state_dict(state["sampler"])
    torch.set_rng_state(state["rng"]["torch"])
    if device.type == "cuda" and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    if state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])


@torch.no_grad()
@torch.no_grad()
def mean_loss(model: GPT, batches, autocast=contextlib.nullcontext) -> torch.Tensor:
    """Mean cross-entropy (nats/token) of model over batches [(x, y), ...], each x and y
    (B, T) int64 of the same size (so the mean of batch means is the mean over tokens), in eval
    mode (the model's mode is restored after). autocast: a context manager factory around each
    forward (Precision.autocast). Returns a float32 0-dim tensor on the batches' device, without
    a host sync. The validation loss of training, head importance and the experiments."""
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros((), device=batches[0][0].device)
        for x, y in batches:
            with autocast():
                _, loss = model(x, y)
            total += loss.float()
    finally:
        model.train(was_training)
    return total / len(batches)


def evaluate(run: Run) -> Dict[str, float]:
    """Mean loss of the fixed batches of each split, averaged over every process."""
    return {split: run.dist.sum(mean_loss(run.raw_model, batches, run.precision.autocast)).item()
            / run.dist.world_size for split, batches in run.eval_batches.items()}


def elapsed(run: Run) -> float:
    """Seconds since the run started: set-up and evaluations included, and the earlier runs
    that this one resumes (metrics' time_s; what max_time budgets)."""
    return run.elapsed_before + time.perf_counter() - run.t_start


def schedule_time(run: Run) -> Optional[float]:
    """The elapsed time the learning-rate schedule follows with a max_time budget (None without
    one): the mean over the processes, so every rank sets the same learning rate."""
    if run.cfg.max_time <= 0:
        return None
    t = torch.tensor([elapsed(run)], dtype=torch.float64)
    if run.dist.enabled and torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    return run.dist.sum(t).item() / run.dist.world_size


def evaluate_and_save(run: Run, progress: Progress) -> None:
    """Evaluate, log the losses, and save a checkpoint (except before the first step)."""
    progress.losses = evaluate(run)
    progress.best_val = min(progress.best_val, progress.losses["val"])
    record(run, progress, event="eval", iter=progress.iter_num,
           train_loss=progress.losses["train"], val_loss=progress.losses["val"],
           lr=lr_at(progress.iter_num, run.cfg, schedule_time(run)), time_s=elapsed(run))
    if progress.iter_num > 0:
        save(run, progress, progress.losses["val"])
    if run.dist.master:
        (run.bar.write if run.bar is not None else run.log)(
            f"step {progress.iter_num}: train loss {progress.losses['train']:.4f}, "
            f"val loss {progress.losses['val']:.4f}")


def save(run: Run, progress: Progress, val_loss: Optional[float]) -> None:
    """Write the checkpoint atomically (rank 0): everything an exact resume needs."""
    if not run.dist.master:
        return
    device = run.device
    save_checkpoint({
        "model": run.raw_model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "model_config": run.cfg.model.to_dict(),
        "train_config": run.cfg.to_dict(),
        "tokenizer": run.tokenizer.state_dict(),
        "iter_num": progress.iter_num,
        "best_val_loss": progress.best_val,
        "elapsed_s": elapsed(run),
        "val_loss": val_loss,
        "sampler": run.train_batches.state_dict(),
        "grad_scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
    }, run.ckpt_path)
    progress.saved_iter = progress.iter_num


def save_lost(run: Run, progress: Progress, lost: str) -> None:
    """The run directory or its lock vanished: save the checkpoint and config.json again
    (into out_dir, made anew) so that the run's work is not lost with them."""
    progress.interrupted = True
    if run.dist.master:
        run.log(f"minigpt: {lost}; saving the checkpoint again and stopping")
        Path(run.cfg.out_dir).mkdir(parents=True, exist_ok=True)
        write_config(run.cfg)
    save(run, progress, None)


def save_interrupted(run: Run, progress: Progress) -> None:
    """Save after a SIGINT/SIGTERM so that --resume continues from here."""
    progress.interrupted = True
    save(run, progress, None)
    if run.dist.master:
        run.log(f"minigpt: interrupted at step {progress.iter_num}; checkpoint saved to "
                f"{run.ckpt_path} (continue with --resume)")


def train_step(run: Run, progress: Progress) -> None:
    """One optimizer step of grad_accum micro-steps; a non-finite loss or gradient skips it
    (up to cfg.skip_nonfinite times; past that NonFiniteLossError)."""
    cfg, model, scaler, optimizer = run.cfg, run.model, run.scaler, run.optimizer
    t0 = time.perf_counter()
    lr = lr_at(progress.iter_num, cfg, schedule_time(run))
    optimizer.set_lr(lr)
    for micro in range(cfg.grad_accum):
        x, y = run.train_batches.next(run.device)
        # DDP: all-reduce gradients only on the last micro-step.
        last = micro == cfg.grad_accum - 1
        sync = contextlib.nullcontext() if not run.dist.enabled or last else model.no_sync()
        with sync:
            with run.precision.autocast():
                _, loss = model(x, y)
            scaler.scale(loss / cfg.grad_accum).backward()
    for member in optimizer.members:
        scaler.unscale_(member)  # the clip below sees true gradients
    # clip_grad_norm_ with an infinite bound only measures the norm.
    norm = torch.nn.utils.clip_grad_norm_(
        model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    loss_value = loss.item()
    # With float16 an inf gradient is the GradScaler's business: scaler.step skips the step
    # and lowers the scale. Otherwise it counts as a non-finite step.
    grad_ok = scaler.is_enabled() or math.isfinite(norm.item())
    if run.dist.any(not (math.isfinite(loss_value) and grad_ok)):
        skip_step(run, progress, loss_value)
        return
    optimizer.step(scaler)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    progress.iter_num += 1
    progress.train_time += time.perf_counter() - t0
    progress.train_tokens += (cfg.batch_size * cfg.model.block_size * cfg.grad_accum
                              * run.dist.world_size)
    if run.bar is not None:
        run.bar.update(1)
    if progress.iter_num % cfg.log_interval == 0:
        tok_s = progress.train_tokens / max(progress.train_time, 1e-9)
        record(run, progress, event="train", iter=progress.iter_num, loss=loss_value, lr=lr,
               grad_norm=norm.item(), tokens_per_s=round(tok_s, 1), time_s=elapsed(run))
        if run.bar is not None:
            run.bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")


def skip_step(run: Run, progress: Progress, loss_value: float) -> None:
    """Drop the gradients of a non-finite step and count it.

    Raises:
        NonFiniteLossError: more than cfg.skip_nonfinite steps were skipped.
    """
    run.optimizer.zero_grad(set_to_none=True)
    progress.skipped += 1
    record(run, progress, event="nonfinite", iter=progress.iter_num, loss=str(loss_value),
           skipped=progress.skipped)
    if progress.skipped > run.cfg.skip_nonfinite:
        raise NonFiniteLossError(
            f"the training loss or gradient is not finite (loss {loss_value}) at step "
            f"{progress.iter_num}; stopping. The last good checkpoint is kept at "
            f"{run.ckpt_path}. Try a lower learning_rate, or skip_nonfinite > 0.")
    run.log(f"minigpt: step {progress.iter_num}: non-finite loss or gradient, step skipped "
            f"({progress.skipped} of at most {run.cfg.skip_nonfinite})")
    progress.iter_num += 1
    run.scaler.update()


def record(run: Run, progress: Progress, **row) -> None:
    """Append a row to the history and, on rank 0, to metrics.jsonl (and the logger)."""
    progress.history.append(row)
    if run.metrics is not None:
        run.metrics.write(json.dumps(row) + "\n")
        run.metrics.flush()
    if run.logger is not None:
        run.logger.log(row)


def teardown(run: Run) -> None:
    if run.bar is not None:
        run.bar.close()
    if run.metrics is not None:
        with contextlib.suppress(OSError):  # a full disk already said so
            run.metrics.close()
    if run.logger is not None:
        run.logger.close()
    run.dist.close()


def summarize(run: Run, progress: Progress) -> TrainResult:
    wall = time.perf_counter() - run.t_start
    result = TrainResult(
        iters=progress.iter_num, best_val_loss=progress.best_val,
        final_val_loss=progress.losses["val"], final_train_loss=progress.losses["train"],
        tokens_per_s=progress.train_tokens / progress.train_time if progress.train_time else 0.0,
        wall_time_s=wall, interrupted=progress.interrupted,
        checkpoint=str(run.ckpt_path) if progress.saved_iter is not None else "",
        history=progress.history)
    if run.dist.master:
        where = (f"checkpoint {run.ckpt_path}" if progress.saved_iter is not None
                 else "no checkpoint written (no step taken)")
        run.log(f"minigpt: done at step {progress.iter_num}: best val loss "
                f"{progress.best_val:.4f}, final val loss {progress.losses['val']:.4f}, "
                f"{result.tokens_per_s:,.0f} tokens/s, wall time {wall:.1f} s, {where}")
    return result


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so the loop can save and exit."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
