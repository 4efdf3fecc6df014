"""The training loop as a library; train.py is its command line.

AdamW (Loshchilov & Hutter 2019) with weight-decay groups, linear warmup then cosine decay
(Loshchilov & Hutter 2017, SGDR), gradient clipping, gradient accumulation, bf16 autocast on
CUDA, optional torch.compile, periodic evaluation on fixed batches, atomic checkpoints with
everything needed to resume exactly (model, optimizer, RNG and data-sampler states), a JSONL
metrics log, and DistributedDataParallel when started by torchrun.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .data import BatchSampler, DataError, load_corpus
from .model import GPT, GPTConfig
from .rundir import RunDir
from .runtime import pick_device, resolve_precision
from .tokenizer import from_state


@dataclass
class TrainConfig:
    """Every setting of a training run; the defaults are the preset "shakespeare_char"."""

    # data
    data: Optional[str] = None        # UTF-8 text file; None = tiny Shakespeare (downloaded)
    tokenizer: str = "char"           # "char" or "gpt2"
    out_dir: str = "out"              # checkpoint, metrics.jsonl
    # model (see GPTConfig)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = False
    rope_theta: float = 10000.0
    attn_backend: Optional[str] = None
    # optimisation
    batch_size: int = 32              # sequences per micro-step (per process)
    grad_accum: int = 1               # micro-steps per optimizer step
    max_iters: int = 1800             # optimizer steps
    learning_rate: float = 2e-3       # peak learning rate
    min_lr: float = 2e-4              # floor of the cosine decay
    warmup_iters: int = 100           # linear warmup steps
    lr_decay_iters: Optional[int] = None  # length of the cosine; None = max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0            # max global grad norm; 0 disables
    # evaluation and logging
    eval_interval: int = 300          # steps between evaluations (and checkpoints)
    eval_iters: int = 20              # fixed batches per split per evaluation
    log_interval: int = 10            # steps between progress-bar/log updates
    # system
    device: str = "auto"              # "auto" (cuda, then mps, then cpu), "cpu", "cuda", ...
    dtype: str = "auto"               # "auto" (bf16 autocast on CUDA GPUs with bf16, float16
                                      # autocast + GradScaler on older ones, else float32),
                                      # "float32", "bfloat16", "float16"
    compile: bool = False             # torch.compile the model
    seed: int = 1337
    resume: bool = False              # continue from out_dir/ckpt.pt
    overwrite: bool = False           # replace a checkpoint in out_dir that this run does not
                                      # resume (without it such a run stops, nothing is lost)
    skip_nonfinite: int = 0           # skip up to this many steps whose loss or gradient is
                                      # NaN/inf (counted in the log); past it, stop
    progress: bool = True             # tqdm progress bar

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_kv_head=self.n_kv_head, n_embd=self.n_embd,
                         dropout=self.dropout, bias=self.bias, rope_theta=self.rope_theta,
                         attn_backend=self.attn_backend)


# Presets: overrides of TrainConfig's defaults. Sizes and measured results: see README.md.
PRESETS = {
    # A 2-core CPU in under 4 minutes: nanoGPT's CPU recipe (4 layers, 4 heads, 128 wide,
    # block 64) with RoPE, no dropout, batch 32 and twice the peak learning rate.
    "shakespeare_char": dict(tokenizer="char", n_layer=4, n_head=4, n_embd=128, block_size=64,
                             batch_size=32, max_iters=1800, learning_rate=2e-3, min_lr=2e-4,
                             warmup_iters=100, eval_interval=300, eval_iters=20),
    # The same model on GPT-2 BPE tokens (tiktoken): a 50257-token vocabulary.
    "shakespeare": dict(tokenizer="gpt2", n_layer=4, n_head=4, n_embd=128, block_size=64,
                        batch_size=32, max_iters=1800, learning_rate=2e-3, min_lr=2e-4,
                        warmup_iters=100, eval_interval=300, eval_iters=20),
    # nanoGPT's "baby GPT" for one GPU.
    "shakespeare_char_gpu": dict(tokenizer="char", n_layer=6, n_head=6, n_embd=384,
                                 block_size=256, batch_size=64, max_iters=5000, dropout=0.2,
                                 learning_rate=1e-3, min_lr=1e-4, warmup_iters=100,
                                 eval_interval=500, eval_iters=200),
}


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Learning rate at step it: linear warmup to learning_rate, cosine decay to min_lr."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


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
    checkpoint: str
    history: list = field(default_factory=list)


class _Dist:
    """torchrun's environment: rank, world size, and the process group when there is one."""

    def __init__(self, device: torch.device):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)

    @property
    def master(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True if flag is true on any rank, so that every rank takes the same branch."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def close(self):
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


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


def train(cfg: TrainConfig, log=print) -> TrainResult:
    """Train a GPT as configured, holding cfg.out_dir for the run (see RunDir); returns a
    summary. See TrainConfig for every setting.

    Raises:
        minigpt.rundir.RunDirError: another process holds out_dir, or out_dir holds a
            checkpoint that this run neither resumes nor overwrites.
        minigpt.data.DataError: the corpus cannot be had or used.
        minigpt.checkpoint.CheckpointError: --resume with a missing or unreadable checkpoint.
        NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
    """
    if int(os.environ.get("RANK", "0")) != 0:  # DDP: rank 0 holds the directory for all
        return _train(cfg, log)
    with RunDir(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite):
        return _train(cfg, log)


def _train(cfg: TrainConfig, log=print) -> TrainResult:
    t_start = time.perf_counter()
    device = pick_device(cfg.device)
    dist = _Dist(device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"

    resume_state = load_checkpoint(ckpt_path) if cfg.resume else None
    corpus = load_corpus(cfg.data, cfg.tokenizer)
    tokenizer = corpus.tokenizer
    if resume_state is not None:
        tokenizer = from_state(resume_state["tokenizer"])
        model_cfg = GPTConfig.from_dict(resume_state["model_config"])
        if tokenizer.state_dict() != corpus.tokenizer.state_dict():
            raise DataError(f"--resume: the checkpoint's tokenizer does not match the corpus "
                             f"{corpus.source} (a different text or tokenizer?)")
    else:
        model_cfg = cfg.model_config(tokenizer.vocab_size)

    torch.manual_seed(cfg.seed + dist.rank)
    model = GPT(model_cfg).to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                           (cfg.beta1, cfg.beta2), device.type)
    train_batches = BatchSampler(corpus.train, model_cfg.block_size, cfg.batch_size,
                                 seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)
    iter_num, best_val = 0, float("inf")
    history = []
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        train_batches.load_state_dict(resume_state["sampler"])
        torch.set_rng_state(resume_state["rng"]["torch"])
        if device.type == "cuda" and resume_state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(resume_state["rng"]["cuda"], device)
        iter_num, best_val = resume_state["iter_num"], resume_state["best_val_loss"]

    precision = resolve_precision(cfg.dtype, device)
    autocast = precision.autocast()
    scaler = precision.grad_scaler()  # a no-op unless float16
    if resume_state is not None and resume_state.get("grad_scaler"):
        scaler.load_state_dict(resume_state["grad_scaler"])
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if dist.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    # Fixed evaluation batches: the same windows at every evaluation, so curves are comparable.
    eval_batches = {}
    for split in ("train", "val"):
        sampler = BatchSampler(corpus.split(split), model_cfg.block_size, cfg.batch_size,
                               seed=cfg.seed + 1_000_003, rank=dist.rank,
                               world_size=dist.world_size)
        eval_batches[split] = [sampler.next(device) for _ in range(cfg.eval_iters)]

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        losses = {}
        for split, batches in eval_batches.items():
            total = torch.zeros((), device=device)
            for x, y in batches:
                with autocast:
                    _, loss = raw_model(x, y)
                total += loss.float()
            if dist.enabled:
                torch.distributed.all_reduce(total)
            losses[split] = total.item() / (len(batches) * dist.world_size)
        model.train()
        return losses

    def checkpoint(val_loss: Optional[float]):
        if not dist.master:
            return
        state = {
            "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "model_config": model_cfg.to_dict(),
            "train_config": asdict(cfg),
            "tokenizer": tokenizer.state_dict(),
            "iter_num": iter_num,
            "best_val_loss": best_val,
            "val_loss": val_loss,
            "sampler": train_batches.state_dict(),
            "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        }
        save_checkpoint(state, ckpt_path)

    metrics_file = None
    if dist.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_file = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")

    def record(**row):
        history.append(row)
        if metrics_file is not None:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()

    if dist.master:
        log(f"minigpt: {raw_model.num_params() / 1e6:.2f}M parameters, device {device}, "
            f"{precision.name}{' autocast' if precision.autocast_dtype else ''}, corpus {corpus.source} "
            f"({len(corpus.train):,} train / {len(corpus.val):,} val {tokenizer.name} tokens), "
            f"attention backend {_backend_name(model_cfg, device, precision)}"
            + (f", {dist.world_size} processes" if dist.enabled else ""))

    tokens_per_step = cfg.batch_size * model_cfg.block_size * cfg.grad_accum * dist.world_size
    bar = None
    if dist.master and cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.max_iters, initial=iter_num, unit="it", dynamic_ncols=True)
    interrupted = False
    last_losses = {"train": float("nan"), "val": float("nan")}
    train_time, train_tokens = 0.0, 0
    loss_value = float("nan")
    skipped = 0
    model.train()
    try:
        with _StopRequest() as stop:
            while True:
                last_step = iter_num >= cfg.max_iters
                if iter_num % cfg.eval_interval == 0 or last_step:
                    last_losses = evaluate()
                    best_val = min(best_val, last_losses["val"])
                    record(event="eval", iter=iter_num, train_loss=last_losses["train"],
                           val_loss=last_losses["val"], lr=lr_at(iter_num, cfg),
                           time_s=time.perf_counter() - t_start)
                    if iter_num > 0:
                        checkpoint(last_losses["val"])
                    if dist.master:
                        (bar.write if bar is not None else log)(
                            f"step {iter_num}: train loss {last_losses['train']:.4f}, "
                            f"val loss {last_losses['val']:.4f}")
                if last_step:
                    break
                if dist.any(stop.signum is not None):
                    interrupted = True
                    checkpoint(None)
                    if dist.master:
                        log(f"minigpt: interrupted at step {iter_num}; checkpoint saved to "
                            f"{ckpt_path} (continue with --resume)")
                    break

                t0 = time.perf_counter()
                lr = lr_at(iter_num, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                for micro in range(cfg.grad_accum):
                    x, y = train_batches.next(device)
                    # DDP: all-reduce gradients only on the last micro-step.
                    sync = (contextlib.nullcontext() if not dist.enabled
                            or micro == cfg.grad_accum - 1 else model.no_sync())
                    with sync:
                        with autocast:
                            _, loss = model(x, y)
                        scaler.scale(loss / cfg.grad_accum).backward()
                scaler.unscale_(optimizer)  # the clip below sees true gradients
                # clip_grad_norm_ with an infinite bound only measures the norm.
                norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                loss_value = loss.item()
                # With float16 an inf gradient is the GradScaler's business: scaler.step skips
                # the step and lowers the scale. Otherwise it counts as a non-finite step.
                grad_ok = scaler.is_enabled() or math.isfinite(norm.item())
                if dist.any(not (math.isfinite(loss_value) and grad_ok)):
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    record(event="nonfinite", iter=iter_num, loss=str(loss_value), skipped=skipped)
                    if skipped > cfg.skip_nonfinite:
                        raise NonFiniteLossError(
                            f"the training loss or gradient is not finite (loss {loss_value}) at "
                            f"step {iter_num}; stopping. The last good checkpoint is kept at "
                            f"{ckpt_path}. Try a lower --learning-rate, or --skip-nonfinite N.")
                    log(f"minigpt: step {iter_num}: non-finite loss or gradient, step skipped "
                        f"({skipped} of at most {cfg.skip_nonfinite})")
                    iter_num += 1
                    scaler.update()
                    continue
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                iter_num += 1
                train_time += time.perf_counter() - t0
                train_tokens += tokens_per_step
                if bar is not None:
                    bar.update(1)
                    if iter_num % cfg.log_interval == 0:
                        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}",
                                        tok_s=f"{train_tokens / max(train_time, 1e-9):,.0f}")
    finally:
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
        dist.close()

    wall = time.perf_counter() - t_start
    result = TrainResult(iters=iter_num, best_val_loss=best_val, final_val_loss=last_losses["val"],
                         final_train_loss=last_losses["train"],
                         tokens_per_s=train_tokens / train_time if train_time else 0.0,
                         wall_time_s=wall, interrupted=interrupted, checkpoint=str(ckpt_path),
                         history=history)
    if dist.master:
        log(f"minigpt: done at step {iter_num}: best val loss {best_val:.4f}, final val loss "
            f"{last_losses['val']:.4f}, {result.tokens_per_s:,.0f} tokens/s, wall time "
            f"{wall:.1f} s, checkpoint {ckpt_path}")
        try:
            from .visualize import plot_metrics_file

            curves = plot_metrics_file(out_dir, train_config=asdict(cfg))
        except ImportError as e:  # matplotlib is optional at run time
            log(f"minigpt: no loss-curve plot (matplotlib is not available: {e})")
        except (OSError, ValueError) as e:  # a plot never fails a finished run
            log(f"minigpt: no loss-curve plot ({e})")
        else:
            log(f"minigpt: loss curves in {curves}")
    return result


def _backend_name(model_cfg: GPTConfig, device: torch.device, precision) -> str:
    from .attention import _resolve_backend

    dtype = precision.autocast_dtype or torch.float32
    return _resolve_backend(model_cfg.attn_backend, device, dtype, model_cfg.head_dim)

