"""A training run's state, and what keeps it beyond the process.

Run holds what a run sets up once (settings, device, model, optimizer, batches, open files),
Progress what the loop changes (the step, the best loss, timings, the history). The loop
(minigpt.train.loop) trains them; this module writes them out and reads them back:

- out_dir/ckpt.pt, everything an exact resume needs (model, optimizer, data-sampler, RNG and
  GradScaler states, the step, the best loss, the time spent): save(); restore() and
  starting_point() read it back. save_interrupted() saves after SIGINT/SIGTERM (StopRequest
  turns those into a flag the loop checks between steps), save_lost() after the run directory
  or its lock vanished (minigpt.train.rundir.RunDir.lost).
- out_dir/config.json, the resolved settings, usable as ``--config``: write_config(), which
  open_records() calls at the start with the opening of metrics.jsonl.
- out_dir/metrics.jsonl, one JSON row per event ("eval", "train", "nonfinite"), mirrored to the
  optional TensorBoard or W&B logger (minigpt.train.loggers): record().
"""

from __future__ import annotations

import contextlib
import copy
import json
import signal
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from minigpt.attention import resolve_backend
from minigpt.checkpoint import atomic_write, save_checkpoint
from minigpt.config import ConfigError, GPTConfig
from minigpt.train.config import TrainConfig
from minigpt.hf.pretrained import pretrained_state
from minigpt.model import GPT
from minigpt.runtime import Distributed, Precision
from minigpt.tokenizer import from_state
from minigpt.train.data import BatchSampler, DataError, load_corpus
from minigpt.train.loggers import open_logger
from minigpt.train.optim import Optimizers

CONFIG_NAME = "config.json"  # the resolved TrainConfig, beside the checkpoint


@dataclass
class Run:
    """What a run sets up once and the loop only uses."""

    cfg: TrainConfig               # with model = the model actually trained (vocab_size set)
    device: torch.device
    dist: Distributed
    precision: Precision
    raw_model: GPT                 # the module trained (saved as "train_weights" with an EMA)
    model: torch.nn.Module         # raw_model, compiled and/or wrapped in DDP
    optimizer: Optimizers
    scaler: Any                    # torch.amp.GradScaler, a no-op unless float16
    tokenizer: Any
    train_batches: BatchSampler
    eval_batches: Dict[str, list]  # split -> fixed [(x, y)] batches
    ckpt_path: Path
    log: Any                       # log(message)
    t_start: float                 # perf_counter() when this process started the run
    elapsed_before: float = 0.0    # seconds of the earlier runs this one resumes
    metrics: Any = None            # the open metrics.jsonl (rank 0: open_records)
    logger: Any = None             # minigpt.train.loggers.Logger mirroring metrics.jsonl, or None
    bar: Any = None                # the tqdm progress bar, or None
    ema_model: Optional[GPT] = None  # the weights' moving average (cfg.ema_decay), or None
    val_tokens: Any = None         # the validation split's tokens (1-d array), for split_loss

    @property
    def eval_model(self) -> GPT:
        """The model evaluated and saved as the checkpoint's "model": the EMA, if any."""
        return self.ema_model if self.ema_model is not None else self.raw_model


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
    recent_losses: List[float] = field(default_factory=list)  # the last steps' losses
    interrupted: bool = False
    saved_iter: Optional[int] = None  # the step of the last checkpoint this run wrote
    whole_split_val: Optional[float] = None  # the final loss over the whole validation split
    history: List[dict] = field(default_factory=list)

    def advance(self, loss: float, keep: int) -> None:
        """Count a step taken, and keep the losses of the last `keep` steps."""
        self.iter_num += 1
        self.recent_losses = (self.recent_losses + [loss])[-keep:]


def recent_train_loss(run: Run, progress: Progress) -> Optional[float]:
    """The train loss an evaluation logs unless cfg.eval_train: the mean loss of the last
    cfg.eval_iters steps (as many tokens as the fixed batches), averaged over every process;
    None with cfg.eval_train or before this process's first step, when the fixed training
    batches are evaluated instead."""
    if run.cfg.eval_train or not progress.recent_losses:
        return None
    recent = progress.recent_losses
    mean = torch.tensor(sum(recent) / len(recent), dtype=torch.float32, device=run.device)
    return run.dist.mean(mean)


def elapsed(run: Run) -> float:
    """Seconds since the run started: set-up and evaluations included, and the earlier runs
    that this one resumes (metrics' time_s; what max_time budgets)."""
    return run.elapsed_before + time.perf_counter() - run.t_start


def starting_point(cfg: TrainConfig, resume_state: Optional[dict], log):
    """What a run starts from: the checkpoint's model and tokenizer (resume_state), a
    pretrained model's (cfg.init_from), or a new model of cfg.model with the corpus's tokenizer.

    Returns:
        (cfg, tokenizer, corpus, pretrained): cfg with model (vocab_size set) and tokenizer as
        trained; the corpus tokenized with tokenizer; pretrained_state()'s dict (holding
        "model", the weights to load) or None.

    Raises:
        DataError: the corpus cannot be had, or is not the checkpoint's.
        ConfigError: resume with a model shape that is not the checkpoint's.
        minigpt.hf.pretrained.PretrainedError: cfg.init_from cannot be loaded.
    """
    pretrained = None
    if resume_state is not None:
        tokenizer = from_state(resume_state["tokenizer"])
        # A pretrained model's tokenizer is fixed: tokenize with it. "char" and "gpt2" are
        # rebuilt from the text and must come out the same.
        corpus = load_corpus(cfg.data, tokenizer if tokenizer.name == "hf" else cfg.tokenizer,
                             log=log)
        if tokenizer.state_dict() != corpus.tokenizer.state_dict():
            raise DataError(f"resume: the checkpoint's tokenizer does not match the corpus "
                            f"{corpus.source} (a different text or tokenizer?)")
        model_cfg = _resumed_model_config(cfg.model, resume_state["model_config"])
    elif cfg.init_from is not None:
        pretrained = pretrained_state(cfg.init_from, block_size=cfg.model.block_size)
        tokenizer = from_state(pretrained["tokenizer"])
        corpus = load_corpus(cfg.data, tokenizer, log=log)
        model_cfg = replace(GPTConfig.from_dict(pretrained["model_config"]),
                            **{name: getattr(cfg.model, name) for name in GPTConfig.TUNABLE})
    else:
        corpus = load_corpus(cfg.data, cfg.tokenizer, log=log)
        tokenizer = corpus.tokenizer
        model_cfg = replace(cfg.model, vocab_size=tokenizer.vocab_size)
    return replace(cfg, model=model_cfg, tokenizer=tokenizer.name), tokenizer, corpus, pretrained


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


def restore(state: dict, model, optimizer, train_batches, scaler, device) -> None:
    """Load a checkpoint's trained weights, optimizer, sampler, RNG and GradScaler states in
    place. With an EMA the checkpoint's "model" is the average and "train_weights" the trained
    weights; without, "model" is both."""
    model.load_state_dict(state.get("train_weights") or state["model"])
    optimizer.load_state_dict(state["optimizer"])
    train_batches.load_state_dict(state["sampler"])
    torch.set_rng_state(state["rng"]["torch"])
    if device.type == "cuda" and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    if state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])


def start_ema(cfg: TrainConfig, model: GPT, state: Optional[dict]) -> Optional[GPT]:
    """The weights' moving average (cfg.ema_decay > 0; else None): a copy of model, or the
    checkpoint's "model" when resuming. Made after DistributedDataParallel has broadcast rank
    0's weights, so every rank averages the same weights."""
    if cfg.ema_decay <= 0:
        return None
    ema = copy.deepcopy(model).requires_grad_(False)
    if state is not None:
        ema.load_state_dict(state["model"])
    return ema


def save(run: Run, progress: Progress, val_loss: Optional[float]) -> None:
    """Write the checkpoint atomically (rank 0): everything an exact resume needs."""
    if not run.dist.master:
        return
    device = run.device
    save_checkpoint({
        "model": run.eval_model.state_dict(),
        "train_weights": run.raw_model.state_dict() if run.ema_model is not None else None,
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


def open_records(run: Run, progress: Progress, corpus, pretrained: Optional[dict]) -> None:
    """Rank 0's start: out_dir made, config.json written, metrics.jsonl and the logger opened
    (run.metrics, run.logger), one line saying what trains where, and the progress bar
    (run.bar, with cfg.progress)."""
    cfg, device, precision = run.cfg, run.device, run.precision
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    write_config(cfg)
    run.metrics = open_metrics(Path(cfg.out_dir) / "metrics.jsonl")
    run.logger = open_logger(cfg.logger, Path(cfg.out_dir), cfg.to_dict())
    # Under CPU autocast, attention() computes in float32 (see minigpt.attention).
    attn_dtype = (precision.autocast_dtype if device.type != "cpu" else None) or torch.float32
    backend = resolve_backend(cfg.model.attn_backend, device, attn_dtype, cfg.model.head_dim,
                              causal=True)
    run.log(f"minigpt: {run.raw_model.num_params() / 1e6:.2f}M parameters"
            + (f" (pretrained: {pretrained['source']})" if pretrained is not None else "")
            + f", device {device}, "
            f"{precision.name}{' autocast' if precision.autocast_dtype else ''}, corpus "
            f"{corpus.source} ({len(corpus.train):,} train / {len(corpus.val):,} val "
            f"{run.tokenizer.name} tokens), attention backend {backend}"
            + (f", {run.dist.world_size} processes" if run.dist.enabled else ""))
    if run.logger is not None:
        run.log(f"minigpt: logging to {run.logger.where}")
    if cfg.progress:
        from tqdm.auto import tqdm

        run.bar = tqdm(total=cfg.max_iters, initial=progress.iter_num, unit="it",
                       dynamic_ncols=True)


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


def record(run: Run, progress: Progress, **row) -> None:
    """Append a row to the history and, on rank 0, to metrics.jsonl (and the logger)."""
    progress.history.append(row)
    if run.metrics is not None:
        run.metrics.write(json.dumps(row) + "\n")
        run.metrics.flush()
    if run.logger is not None:
        run.logger.log(row)


def teardown(run: Run) -> None:
    """Close the progress bar, metrics.jsonl, the logger and the process group."""
    if run.bar is not None:
        run.bar.close()
    if run.metrics is not None:
        with contextlib.suppress(OSError):  # a full disk already said so
            run.metrics.close()
    if run.logger is not None:
        run.logger.close()
    run.dist.close()


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag (signum) checked between steps, so the loop can save
    and exit; a second SIGINT/SIGTERM raises KeyboardInterrupt at once."""

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
