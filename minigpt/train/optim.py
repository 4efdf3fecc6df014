"""The optimizers a training run can use, built from a TrainConfig.

- "adamw": AdamW (Loshchilov & Hutter 2019) for every parameter, with weight decay on matrices
  (Linear weights and the embedding) and none on biases and norm gains.
- "muon": Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks";
  ``torch.optim.Muon``) for the hidden matrices, the 2-d weights inside the transformer blocks:
  momentum SGD whose update is orthogonalised by Newton-Schulz iterations. The token embedding,
  the output head, biases and norm gains keep AdamW, as Muon is meant only for hidden layers.

Both give one object with ``param_groups``, ``step``, ``zero_grad``, ``state_dict`` and
``load_state_dict`` (Optimizers), so the training loop and the checkpoint treat them alike. Each
param group carries ``lr_scale``: its learning rate is ``lr_at(...) * lr_scale``, so one schedule
drives both (AdamW's peak is ``learning_rate``, Muon's ``learning_rate * muon_lr_scale``).
"""

from __future__ import annotations

import math
from typing import List, get_args

import torch

from minigpt.train.config import Optimizer

OPTIMIZERS = get_args(Optimizer)


class Optimizers:
    """Several torch optimizers stepped together, over disjoint parameters.

    ``members`` are the torch optimizers (a GradScaler unscales each one). ``state_dict()`` of
    a single member is that member's own state dict, so checkpoints of AdamW-only runs keep
    their format.
    """

    def __init__(self, members: List[torch.optim.Optimizer]):
        self.members = members

    @property
    def param_groups(self) -> list:
        return [g for opt in self.members for g in opt.param_groups]

    def set_lr(self, lr: float) -> None:
        """Set every group's learning rate to lr times the group's lr_scale."""
        for group in self.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.members:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self, scaler=None) -> None:
        """One step of each member (through scaler.step when a GradScaler is given)."""
        for opt in self.members:
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)

    def state_dict(self):
        if len(self.members) == 1:
            return self.members[0].state_dict()
        return {"members": [opt.state_dict() for opt in self.members]}

    def load_state_dict(self, state) -> None:
        """Raises ValueError: the state was saved by a different set of optimizers."""
        states = state["members"] if "members" in state else [state]
        if len(states) != len(self.members):
            raise ValueError(f"optimizer state holds {len(states)} optimizer(s), this run has "
                             f"{len(self.members)} (was the checkpoint trained with another "
                             f"optimizer setting?)")
        for opt, st in zip(self.members, states):
            opt.load_state_dict(st)


class Muon(torch.optim.Muon):
    """torch.optim.Muon with the Newton-Schulz iterations of same-shaped matrices batched.

    The update is torch's, term by term: Nesterov momentum (buf = lerp(buf, g, 1 - mu),
    update = lerp(g, buf, mu)), the update scaled to unit Frobenius norm and orthogonalised by
    ns_steps quintic Newton-Schulz iterations in bfloat16 (X <- aX + (bA + cA^2)X, A = XX^T,
    on the wide orientation of the matrix), decoupled weight decay, and the step scaled by
    sqrt(max(1, rows/cols)) ("original" adjust_lr_fn; "match_rms_adamw" likewise). The
    matrices of one shape up to transposition (the 4 * n_layer hidden matrices of a model come
    in 3 such shapes) go through each iteration as one batched matmul, and the momentum
    updates are foreach calls: for the default model on 2 CPU cores (AVX512_BF16), 12.4 ms a
    step against torch's 19.4 ms. Parameters, param_groups and state ("momentum_buffer") are
    torch's, so checkpoints are interchangeable with torch.optim.Muon.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                bufs.append(state["momentum_buffer"])
            momentum = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = (torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"]
                       else bufs)
            lr = float(group["lr"])
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            # Matrices of one shape up to transposition share each batched iteration.
            batches = {}
            for p, u in zip(params, updates):
                wide = u if u.size(0) <= u.size(1) else u.T
                batches.setdefault(tuple(wide.shape), []).append((p, wide))
            for members in batches.values():
                ortho = _newton_schulz(torch.stack([w for _, w in members]),
                                       group["ns_coefficients"], group["ns_steps"], group["eps"])
                for (p, wide), o in zip(members, ortho.unbind(0)):
                    o = o if wide.shape == p.shape else o.T
                    p.add_(o.to(p.dtype), alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


def _newton_schulz(g: torch.Tensor, coefficients, steps: int, eps: float) -> torch.Tensor:
    """(N, rows, cols) updates, rows <= cols -> their orthogonalised forms, (N, rows, cols)
    bfloat16: torch.optim.Muon's iteration (Jordan et al. 2024) on each matrix, batched."""
    a, b, c = coefficients
    x = g.bfloat16()
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.transpose(1, 2)  # A = X X^T, (N, rows, rows)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def _adjust_lr(lr: float, adjust_lr_fn, shape) -> float:
    """torch.optim.Muon's per-shape learning-rate adjustment."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1, rows / cols))  # None or "original"


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay ema + (1 - decay) model, parameter by parameter (one foreach call): the
    weights' exponential moving average (TrainConfig.ema_decay)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def _adamw(groups, cfg, device_type: str) -> torch.optim.AdamW:
    # The fused kernel exists for CPU and CUDA tensors and saves a Python loop over parameters.
    fused = device_type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             **({"fused": True} if fused else {}))


def build_optimizer(model: torch.nn.Module, cfg, device_type: str) -> Optimizers:
    """The optimizer cfg.optimizer names, for model's trainable parameters.

    Args:
        model: a minigpt GPT (hidden matrices are the >= 2-d parameters under transformer.h,
            except attn_gate's gates).
        cfg: a TrainConfig (optimizer, learning_rate, weight_decay, beta1, beta2,
            muon_lr_scale, muon_momentum, muon_weight_decay, muon_ns_steps).
        device_type: "cpu", "cuda", "mps", ...

    Raises:
        ValueError: cfg.optimizer is not one of OPTIMIZERS.
    """
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = cfg.optimizer == "muon"
    # Gains, biases, scalars and attn_gate's gates (one row per head): AdamW without decay.
    gains = {id(p) for n, p in named if p.dim() < 2 or n.endswith(".attn.gate.weight")}
    hidden = [p for n, p in named if muon and id(p) not in gains and n.startswith("transformer.h.")]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for _, p in named if id(p) not in hidden_ids]
    adamw_groups = [
        {"params": [p for p in rest if id(p) not in gains], "weight_decay": cfg.weight_decay},
        {"params": [p for p in rest if id(p) in gains], "weight_decay": 0.0},
    ]
    members = [_adamw([g for g in adamw_groups if g["params"]], cfg, device_type)]
    if hidden:
        members.append(Muon(
            [{"params": hidden, "lr_scale": cfg.muon_lr_scale}],
            lr=cfg.learning_rate * cfg.muon_lr_scale, momentum=cfg.muon_momentum,
            weight_decay=cfg.muon_weight_decay, nesterov=True, ns_steps=cfg.muon_ns_steps))
    return Optimizers(members)


__all__ = ["OPTIMIZERS", "Muon", "Optimizers", "build_optimizer", "update_ema"]
