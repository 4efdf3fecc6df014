"""The training loop: train(cfg) trains a GPT as a TrainConfig says and returns a TrainResult.

A default step (TrainConfig, preset "shakespeare_char"): windows from shuffled passes over the
corpus (BatchSampler); forward and backward under bf16 autocast where the device has bf16 (CUDA;
CPUs with AVX512_BF16 or AMX; else float32, or float16 with a GradScaler on older GPUs); the
gradient's norm clipped to 1.0; Muon (Jordan et al. 2024) for the blocks' matrices, AdamW
(Loshchilov & Hutter 2019) for the rest (minigpt.train.optim); the learning rate warmed up for
30 steps, held, then decayed linearly over the last half (lr_at); the weights' moving average
(update_ema) is what evaluations and checkpoints use. Settings add gradient accumulation, ramps,
a cosine schedule, a time budget, torch.compile; torchrun gives DistributedDataParallel.

train() reads top to bottom: setup() (Run: what stays fixed; Progress: what the loop changes),
then evaluate_and_save() every eval_interval steps and train_step() until max_iters, the time
budget or a stop signal. Saving, restoring, metrics.jsonl and signals: minigpt.train.state.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from minigpt.checkpoint import load_checkpoint
from minigpt.model import GPT
from minigpt.runtime import (Distributed, check_cache_dir, check_dir_target, check_input_file,
                             pick_device, resolve_precision)
from minigpt.train.config import PRESETS, TrainConfig, batch_shape, lr_at
from minigpt.train.data import BatchSampler
from minigpt.train.loggers import check_logger
from minigpt.train.optim import build_optimizer, update_ema
from minigpt.train.rundir import RunDir, RunDirLostError
from minigpt.train.state import (Progress, Run, StopRequest, elapsed, open_records,
                                 recent_train_loss, record, restore, save, save_interrupted,
                                 save_lost, start_ema, starting_point, teardown)
from minigpt.train.whole_split import whole_split_evaluation

__all__ = ["train", "TrainConfig", "TrainResult", "PRESETS", "lr_at", "NonFiniteLossError",
           "mean_loss", "gradients", "optimizer_step", "update_ema"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class TrainResult:
    """What train() returns: losses in nats per token, throughput, and where it saved."""

    iters: int
    best_val_loss: float
    final_val_loss: float
    final_train_loss: float
    tokens_per_s: float
    wall_time_s: float
    interrupted: bool
    checkpoint: str                # the checkpoint this run wrote; "" when it wrote none
    history: list = field(default_factory=list)
    val_loss_whole_split: Optional[float] = None  # the final one (whole_split); None if stopped


def train(cfg: TrainConfig, log=print, resume_state: Optional[dict] = None) -> TrainResult:
    """Train a GPT as configured, holding cfg.out_dir for the run (see RunDir); returns a
    summary. See TrainConfig for every setting.

    Args:
        cfg: the settings. With cfg.resume the model is the checkpoint's, of cfg.model's shape
            (dropout and attn_backend may differ); with cfg.init_from, the pretrained model and
            its tokenizer, with cfg.model's block_size, dropout and attn_backend.
        log: called with one-line messages (rank 0 only).
        resume_state: out_dir's checkpoint if the caller has read it; else train reads it.

    Raises:
        PathError, DeviceError, ConfigError: check_targets refused, before anything is written.
        RunDirError: another process holds out_dir, or it holds a checkpoint that this run
            neither resumes nor overwrites. RunDirLostError: out_dir or its lock vanished
            during the run (the checkpoint was saved again; the message says where).
        OSError: the file system refused a write; filename names the file.
        DataError, CheckpointError, PretrainedError, ConfigError: the corpus, the checkpoint
            to resume or the pretrained model cannot be had or do not fit (starting_point).
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
            with StopRequest() as stop:
                while True:
                    done = progress.iter_num >= cfg.max_iters or (
                        cfg.max_time > 0 and run.dist.any(elapsed(run) >= cfg.max_time))
                    if progress.iter_num % cfg.eval_interval == 0 or done:
                        evaluate_and_save(run, progress)
                    if done:
                        whole_split_evaluation(run, progress)  # every window of the val split
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
                log(f"minigpt: stopped at once at step {progress.iter_num} (Ctrl-C twice); {last}")
            raise
        finally:
            teardown(run)
        if lost is not None and run.dist.master:
            raise RunDirLostError(f"{lost} during training; stopped at step {progress.iter_num}, "
                                  f"checkpoint saved to {run.ckpt_path} (continue with --resume)")
        return summarize(run, progress)


def check_targets(cfg: TrainConfig) -> None:
    """Refuse at once, before anything is written, what cannot work: out_dir not a writable
    (or creatable) directory, the cache directory, the corpus not a readable file, the device
    or dtype, the logger's package. Raises PathError, DeviceError or ConfigError."""
    check_dir_target(cfg.out_dir, "out_dir")
    check_cache_dir()
    if cfg.data is not None:
        check_input_file(cfg.data, "data")
    resolve_precision(cfg.dtype, pick_device(cfg.device))
    check_logger(cfg.logger)


def setup(cfg: TrainConfig, resume_state: Optional[dict], log) -> Tuple[Run, Progress]:
    """Device, processes, corpus, model, optimizer, batches, metrics log; restored from the
    checkpoint when resuming."""
    t_start = time.perf_counter()
    device = pick_device(cfg.device)
    dist = Distributed(device)
    device = dist.device_for(device)
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    if cfg.resume and resume_state is None:
        resume_state = load_checkpoint(ckpt_path)
    cfg, tokenizer, corpus, pretrained = starting_point(
        cfg, resume_state, log if dist.master else (lambda message: None))

    torch.manual_seed(cfg.seed + dist.rank)
    raw_model = GPT(cfg.model)
    if pretrained is not None:
        raw_model.load_state_dict(pretrained.pop("model"))
    raw_model.to(device)
    optimizer = build_optimizer(raw_model, cfg, device.type)
    train_batches = BatchSampler(corpus.train, cfg.model.block_size, cfg.batch_size,
                                 seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                                 order=cfg.data_order)
    precision = resolve_precision(cfg.dtype, device)
    scaler = precision.grad_scaler()
    progress = Progress()
    if resume_state is not None:
        progress.iter_num = resume_state["iter_num"]
        progress.best_val = resume_state["best_val_loss"]
        restore(resume_state, raw_model, optimizer, train_batches, scaler, device)

    model = torch.compile(raw_model) if cfg.compile else raw_model
    if dist.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    ema_model = start_ema(cfg, raw_model, resume_state)  # after DDP's broadcast of the weights

    # Fixed evaluation batches: the same windows at every evaluation, so curves are comparable.
    eval_batches = {}
    for split in ("train", "val"):
        sampler = BatchSampler(corpus.split(split), cfg.model.block_size, cfg.batch_size,
                               seed=cfg.seed + 1_000_003, rank=dist.rank,
                               world_size=dist.world_size)
        eval_batches[split] = [sampler.next(device) for _ in range(cfg.eval_iters)]

    run = Run(cfg=cfg, device=device, dist=dist, precision=precision, raw_model=raw_model,
              model=model, optimizer=optimizer, scaler=scaler, tokenizer=tokenizer,
              train_batches=train_batches, eval_batches=eval_batches, ckpt_path=ckpt_path,
              log=log, t_start=t_start, elapsed_before=(resume_state or {}).get("elapsed_s", 0.0),
              ema_model=ema_model, val_tokens=corpus.split("val"))
    if dist.master:
        open_records(run, progress, corpus, pretrained)
    model.train()
    return run, progress


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


def evaluate(run: Run, splits=("train", "val")) -> Dict[str, float]:
    """Mean loss of the fixed batches of each of these splits, averaged over every process."""
    return {s: run.dist.mean(mean_loss(run.eval_model, run.eval_batches[s], run.precision.autocast))
            for s in splits}


def schedule_time(run: Run) -> Optional[float]:
    """The elapsed time the learning-rate schedule follows with a max_time budget (None without
    one): the mean over the processes, so every rank sets the same learning rate."""
    if run.cfg.max_time <= 0:
        return None
    return run.dist.mean(torch.tensor([elapsed(run)], dtype=torch.float64))


def evaluate_and_save(run: Run, progress: Progress) -> None:
    """Evaluate, log the losses, and save a checkpoint (except before the first step)."""
    recent = recent_train_loss(run, progress)  # None: evaluate the fixed training batches
    progress.losses = {"train": recent, **evaluate(run, ("val",) if recent else ("train", "val"))}
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


def gradients(model: torch.nn.Module, micro_batches: Sequence, optimizer, scaler, *,
              autocast=contextlib.nullcontext, grad_clip: float = 0.0):
    """Forward and backward of each micro-batch (x, y), (B, T) int64 each, its loss divided by
    their number so that the gradients are those of the mean; then unscaled (scaler: a
    torch.amp.GradScaler, a no-op unless enabled; optimizer: an Optimizers) and clipped to
    global norm grad_clip (0: not clipped). Under DDP only the last micro-batch all-reduces.

    Returns:
        (loss, norm): the last micro-batch's loss and the gradient norm before clipping,
        0-dim tensors (no host sync).
    """
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with model.no_sync() if ddp and not last else contextlib.nullcontext():
            with autocast():
                _, loss = model(x, y)
            scaler.scale(loss / len(micro_batches)).backward()
    for member in optimizer.members:
        scaler.unscale_(member)  # the clip below sees true gradients
    bound = grad_clip if grad_clip > 0 else float("inf")  # inf: clip_grad_norm_ only measures
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), bound)
    return loss, norm


def optimizer_step(optimizer, scaler) -> None:
    """Apply the gradients through scaler (which skips a float16 step with inf gradients)."""
    optimizer.step(scaler)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def train_step(run: Run, progress: Progress) -> None:
    """One optimizer step of grad_accum micro-batches at the scheduled learning rate; a
    non-finite loss or gradient skips it (past cfg.skip_nonfinite skips NonFiniteLossError)."""
    cfg, scaler = run.cfg, run.scaler
    t0 = time.perf_counter()
    lr = lr_at(progress.iter_num, cfg, schedule_time(run))
    run.optimizer.set_lr(lr)
    B, T = batch_shape(progress.iter_num, cfg)
    batches = [run.train_batches.next(run.device, B, T) for _ in range(cfg.grad_accum)]
    loss, norm = gradients(run.model, batches, run.optimizer, scaler,
                           autocast=run.precision.autocast, grad_clip=cfg.grad_clip)
    loss_value = loss.item()
    # With float16 an inf gradient is the GradScaler's business: scaler.step skips the step
    # and lowers the scale. Otherwise it counts as a non-finite step.
    grad_ok = scaler.is_enabled() or math.isfinite(norm.item())
    if run.dist.any(not (math.isfinite(loss_value) and grad_ok)):
        skip_step(run, progress, loss_value)
        return
    optimizer_step(run.optimizer, scaler)
    if run.ema_model is not None:
        update_ema(run.ema_model, run.raw_model, cfg.ema_decay)
    progress.advance(loss_value, keep=cfg.eval_iters)
    progress.train_time += time.perf_counter() - t0
    progress.train_tokens += B * T * cfg.grad_accum * run.dist.world_size
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


def summarize(run: Run, progress: Progress) -> TrainResult:
    """The TrainResult of a finished run, and its last log line."""
    wall = time.perf_counter() - run.t_start
    result = TrainResult(
        iters=progress.iter_num, best_val_loss=progress.best_val,
        final_val_loss=progress.losses["val"], final_train_loss=progress.losses["train"],
        tokens_per_s=progress.train_tokens / progress.train_time if progress.train_time else 0.0,
        wall_time_s=wall, interrupted=progress.interrupted,
        checkpoint=str(run.ckpt_path) if progress.saved_iter is not None else "",
        history=progress.history, val_loss_whole_split=progress.whole_split_val)
    if run.dist.master:
        where = (f"checkpoint {run.ckpt_path}" if progress.saved_iter is not None
                 else "no checkpoint written (no step taken)")
        whole = (f" ({progress.whole_split_val:.4f} over the whole split)"
                 if progress.whole_split_val is not None else "")
        run.log(f"minigpt: done at step {progress.iter_num}: best val loss {progress.best_val:.4f}"
                f", final val loss {progress.losses['val']:.4f}{whole}, {result.tokens_per_s:,.0f} "
                f"tokens/s, wall time {wall:.1f} s, {where}")
    return result
