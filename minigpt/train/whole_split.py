"""The validation loss over the whole split, taken once at the end of a completed run.

The evaluations during training (minigpt.train.loop.evaluate) use a fixed sample of random
windows: cheap, and the same at every evaluation, so curves are comparable, but with a sampling
error of its own (on tiny Shakespeare's 111,540 validation tokens a 20,480-token sample can read
0.03 below the whole split; docs/training.md). The final evaluation here reads every window.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from minigpt.model import GPT
from minigpt.train.state import Progress, Run, elapsed, record


@torch.no_grad()
def split_loss(model: GPT, tokens, block_size: int, batch_size: int, device,
               autocast=contextlib.nullcontext, rank: int = 0, world_size: int = 1):
    """Cross-entropy of model summed over every window of a split: the split cut into
    consecutive, non-overlapping windows of block_size tokens from its first token (the last
    partial window dropped), each window predicting its next tokens from its own context only,
    as in training. tokens: the split's 1-d token array; batches of batch_size windows; this
    process takes windows rank, rank + world_size, ... Unlike the sampled batches of the
    evaluations during training, it has no sampling error.

    Returns:
        (sum of the losses in nats, tokens counted): 0-dim float64 and int64 tensors on the
        CPU, to be summed over processes; their ratio is the mean loss per token.
    """
    n = (len(tokens) - 1) // block_size
    starts = list(range(rank * block_size, n * block_size, world_size * block_size))
    total = torch.zeros((), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(starts), batch_size):
            window = np.stack([tokens[s:s + block_size + 1] for s in starts[i:i + batch_size]])
            xy = torch.from_numpy(window.astype(np.int64)).to(device)
            with autocast():
                _, loss = model(xy[:, :-1], xy[:, 1:])
            total += loss.double().cpu() * (xy.shape[0] * block_size)
    finally:
        model.train(was_training)
    return total, torch.tensor(len(starts) * block_size, dtype=torch.int64)


# The final evaluation reads at most this many validation tokens (tiny Shakespeare's split has
# 111,540): on a large corpus, its first ones, and the log says so.
WHOLE_SPLIT_MAX_TOKENS = 1 << 20


def whole_split_evaluation(run: Run, progress: Progress) -> None:
    """The evaluated model's mean loss over the whole validation split (split_loss; its first
    WHOLE_SPLIT_MAX_TOKENS tokens if longer), logged, recorded in metrics.jsonl and kept for the
    TrainResult. Its row (event "whole_split": val_loss, tokens, whole = False when cut) is the
    last row with a val_loss, so a reader that takes the last one reads the whole split."""
    cfg = run.cfg
    whole = len(run.val_tokens) <= WHOLE_SPLIT_MAX_TOKENS + 1
    total, count = split_loss(run.eval_model, run.val_tokens[:WHOLE_SPLIT_MAX_TOKENS + 1],
                              cfg.model.block_size, cfg.batch_size, run.device,
                              run.precision.autocast, run.dist.rank, run.dist.world_size)
    both = run.dist.sum(torch.stack([total, count.double()]).to(run.device))
    loss, count = float(both[0] / both[1]), int(both[1])
    progress.whole_split_val = loss
    if run.dist.master:
        windows = count // cfg.model.block_size
        what = ("the whole split" if whole
                else f"the split's first {WHOLE_SPLIT_MAX_TOKENS:,} tokens")
        run.log(f"minigpt: val loss over {what} ({count:,} tokens, {windows:,} windows of "
                f"{cfg.model.block_size}): {loss:.4f}")
        record(run, progress, event="whole_split", iter=progress.iter_num,
               val_loss=loss, tokens=count, whole=whole, time_s=elapsed(run))


__all__ = ["WHOLE_SPLIT_MAX_TOKENS", "split_loss", "whole_split_evaluation"]
