"""The run's record where users already look: TensorBoard or Weights & Biases, beside
metrics.jsonl (which stays the source of truth; these only mirror its rows).

    python train.py --logger tensorboard      # out_dir/tensorboard; tensorboard --logdir out
    python train.py --logger wandb            # offline (out_dir/wandb) without a network

Every numeric field of a metrics.jsonl row is logged as the scalar "<event>/<field>" at step
"iter": eval/train_loss, eval/val_loss, eval/lr every evaluation; train/loss, train/lr,
train/grad_norm, train/tokens_per_s every log_interval steps. Rank 0 only under torchrun (the
training loop opens a logger on rank 0 alone).

The packages are optional extras: pip install "minigpt-kernels[tensorboard]" (TensorBoard,
written through torch.utils.tensorboard) or "minigpt-kernels[wandb]".

This is a low module: it imports nothing of minigpt but config (ConfigError).
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from typing import Callable, Dict, Optional

from minigpt.config import ConfigError

INSTALL = {
    "tensorboard": 'pip install "minigpt-kernels[tensorboard]" (or: pip install tensorboard)',
    "wandb": 'pip install "minigpt-kernels[wandb]" (or: pip install wandb)'}
WANDB_HOST = ("api.wandb.ai", 443)


def check_logger(kind: str) -> None:
    """Import what logger kind needs, before a run starts.

    Raises:
        ConfigError: (TrainConfig.logger) the package is missing; the message is the pip line.
    """
    if kind == "none":
        return
    try:
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401 (needs tensorboard)
        elif kind == "wandb":
            import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("TrainConfig", "logger", kind,
                          f"needs the {kind} package: {INSTALL[kind]}") from None


def scalars(row: dict) -> Dict[str, float]:
    """{"<event>/<field>": value} of a metrics.jsonl row's finite numbers (not iter)."""
    event = row.get("event", "eval")
    return {f"{event}/{k}": float(v) for k, v in row.items()
            if k not in ("event", "iter") and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class Logger:
    """A sink for metrics rows: log(row) mirrors one metrics.jsonl row, close() flushes."""

    def __init__(self, write: Callable[[Dict[str, float], int], None],
                 close: Callable[[], None], where: str):
        self._write, self._close, self.where = write, close, where

    def log(self, row: dict) -> None:
        values = scalars(row)
        if values and "iter" in row:
            self._write(values, int(row["iter"]))

    def close(self) -> None:
        self._close()


def _wandb_mode() -> str:
    """WANDB_MODE when set; else "online" with an API key and api.wandb.ai reachable in 2 s,
    otherwise "offline" (the run is written under out_dir/wandb; `wandb sync` uploads it)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _netrc_hosts()
    if not has_key:
        return "offline"
    try:
        socket.create_connection(WANDB_HOST, timeout=2).close()
    except OSError:
        return "offline"
    return "online"


def _netrc_hosts() -> str:
    try:
        return (Path.home() / ".netrc").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def open_logger(kind: str, out_dir, config: dict) -> Optional[Logger]:
    """The Logger of kind ("tensorboard", "wandb"; None for "none") writing under out_dir.

    Raises:
        ConfigError: the package is missing (see check_logger).
    """
    check_logger(kind)
    out_dir = Path(out_dir)
    if kind == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

        def write(values, step):
            for tag, value in values.items():
                writer.add_scalar(tag, value, step)
            writer.flush()

        return Logger(write, writer.close, f"TensorBoard events in {out_dir / 'tensorboard'}")
    if kind == "wandb":
        import wandb

        mode = _wandb_mode()
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "minigpt"), dir=str(out_dir),
                         config=config, mode=mode)
        where = (f"W&B offline run in {out_dir / 'wandb'} (upload with `wandb sync`)"
                 if mode == "offline" else f"W&B run {getattr(run, 'url', '') or ''}".strip())
        return Logger(lambda values, step: run.log(values, step=step), run.finish, where)
    return None


__all__ = ["check_logger", "open_logger", "scalars", "Logger", "INSTALL"]
