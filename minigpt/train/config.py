"""The settings of a training run: TrainConfig (which holds the model's GPTConfig as ``model``),
the presets, the learning-rate schedule (lr_at), and the helpers the command line and the config
files use (field_help, check_settings, apply_overrides).

Presets are overrides of TrainConfig's defaults, nested like the config
(``{"model": {"n_layer": 6}, ...}``).
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Dict, Literal, Optional, Tuple

from minigpt.config import (ConfigError, GPTConfig, check_types, is_number, require,
                            type_hints, type_requirement)
from minigpt.runtime import DTYPES
from minigpt.tokenizer import TOKENIZERS
from minigpt.train.data import DataOrder

Tokenizer = Literal[TOKENIZERS]  # the names minigpt.tokenizer knows
DType = Literal[DTYPES]
Optimizer = Literal["adamw", "muon"]
LRSchedule = Literal["cosine", "wsd"]
Logger = Literal["none", "tensorboard", "wandb"]

# TrainConfig's model when none is given: the preset "shakespeare_char" (nanoGPT's CPU recipe's
# width and depth, with QK-norm, and 256-token windows as in its GPU recipe).
DEFAULT_MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=256, qk_norm=True)

# What settings added since checkpoints were first written meant before they existed: a saved
# config without them describes a run that used these values (see TrainConfig.from_saved).
SAVED_BEFORE = {"optimizer": "adamw", "lr_schedule": "cosine", "data_order": "random",
                "ema_decay": 0.0, "seq_warmup": None}
MODEL_SAVED_BEFORE = {"qk_norm": False}


@dataclass
class TrainConfig:
    """Every setting of a training run; the defaults are the preset "shakespeare_char".

    The model's fields may also be given flat, as keywords: ``TrainConfig(n_layer=2)`` is
    ``TrainConfig(model=GPTConfig(n_layer=2, <the other fields of the default model>))``.
    """

    model: GPTConfig = field(default_factory=lambda: GPTConfig(**DEFAULT_MODEL))
    # data
    data: Optional[str] = None        # UTF-8 text file; None = tiny Shakespeare (downloaded)
    tokenizer: Tokenizer = "char"     # "char" or "gpt2"; with init_from, the pretrained
                                      # model's ("gpt2", or "hf": its tokenizer.json)
    out_dir: str = "out"              # run directory: ckpt.pt, config.json, metrics.jsonl
    init_from: Optional[str] = None   # fine-tune a pretrained model: a Hugging Face directory
                                      # or hub name (GPT-2, Llama-family); its shape and
                                      # tokenizer replace the model settings, except
                                      # block_size (at most its own), dropout and attn_backend
    # optimisation
    optimizer: Optimizer = "muon"     # "muon": Muon for the blocks' matrices and AdamW for
                                      # embeddings, head, biases and gains; or "adamw" for all
                                      # (see minigpt.train.optim)
    batch_size: int = 8               # sequences per micro-step (per process)
    grad_accum: int = 1               # micro-steps per optimizer step
    batch_size_start: Optional[int] = None  # sequences per micro-step at step 0, growing
                                      # linearly to batch_size over ramp_iters steps (a ramp
                                      # of the batch size, as GPT-3 and modded-nanogpt do);
                                      # None = batch_size throughout
    block_size_start: Optional[int] = None  # tokens per training sequence at step 0, growing
                                      # linearly to the model's block_size over ramp_iters
                                      # steps (a sequence-length schedule); None = block_size
    ramp_iters: int = 0               # steps of the batch_size_start / block_size_start ramps
                                      # (counted from step 0; seq_warmup's steps come first)
    seq_warmup: Optional[Tuple[int, ...]] = (32, 64)  # sequence-length warmup (Li et al.
                                      # 2022, "The Stability-Efficiency Dilemma"): the first
                                      # steps train on windows of these lengths in turn,
                                      # seq_warmup_iters steps each (at most block_size), then
                                      # on block_size; None = block_size from the start
    seq_warmup_iters: int = 100       # steps on each seq_warmup length (0: no warmup)
    seq_warmup_batch_scale: float = 3.0  # sequences per micro-step during the seq_warmup
                                      # steps, as a multiple of batch_size (rounded, at least
                                      # 1): 3 x 8 windows of 32 tokens are 3/8 of a full step's
                                      # 8 x 256 (small early batches, as in GPT-3's batch size
                                      # warmup, Brown et al. 2020)
    data_order: DataOrder = "epochs"  # "epochs": passes over the corpus in shuffled windows,
                                      # each token once per pass; "random": windows at
                                      # uniformly random tokens, with replacement (nanoGPT's)
    max_iters: int = 1600             # optimizer steps
    learning_rate: float = 3e-3       # peak learning rate
    min_lr: float = 2e-4              # floor of the cosine decay
    warmup_iters: int = 30            # linear warmup steps
    lr_decay_iters: Optional[int] = None  # length of the schedule; None = max_iters
    lr_schedule: LRSchedule = "wsd"   # after warmup: "cosine" decay to min_lr, or "wsd" (warmup-
                                      # stable-decay: peak, then a linear cooldown to min_lr)
    cooldown_frac: float = 0.5        # "wsd": the final fraction of the schedule spent decaying
    max_time: float = 0.0             # wall-clock budget in seconds (0 = none): stop once it is
                                      # spent, and run the schedule on the fraction of it used
    weight_decay: float = 0.1         # AdamW decay of matrices (none on biases and norms)
    beta1: float = 0.9                # AdamW first-moment decay
    beta2: float = 0.99               # AdamW second-moment decay
    grad_clip: float = 1.0            # max global grad norm; 0 disables
    muon_lr_scale: float = 10.0       # "muon": the hidden matrices' learning rate as a multiple
                                      # of learning_rate (so 0.03 at the default peak)
    muon_momentum: float = 0.9        # "muon": Nesterov momentum
    muon_weight_decay: float = 0.02   # "muon": decoupled weight decay of the hidden matrices,
                                      # w <- (1 - lr muon_weight_decay) w each step (Loshchilov
                                      # & Hutter 2019; with Muon: Liu et al. 2025, "Muon is
                                      # Scalable for LLM Training")
    muon_ns_steps: int = 5            # "muon": Newton-Schulz iterations that orthogonalise
                                      # each update
    ema_decay: float = 0.95           # the model evaluated and saved (checkpoint "model") is an
                                      # exponential moving average of the trained weights,
                                      # ema = decay ema + (1 - decay) w after every step
                                      # (Polyak & Juditsky 1992; early weight averaging: Sanyal
                                      # et al. 2023); 0 = the trained weights themselves
    # evaluation and logging
    eval_interval: int = 300          # steps between evaluations (and checkpoints)
    eval_iters: int = 10              # fixed batches per split per evaluation
    eval_train: bool = False          # evaluate the fixed training batches too at every
                                      # evaluation (nanoGPT's estimate); otherwise the train loss
                                      # logged is the mean loss of the last eval_iters training
                                      # steps (as many tokens), which costs nothing (an
                                      # evaluation before any step evaluates the batches)
    log_interval: int = 10            # steps between progress-bar/log updates
    # system
    device: str = "auto"              # "auto" (cuda, then mps, then cpu), "cpu", "cuda", ...
    dtype: DType = "auto"             # "auto" (bf16 autocast on CUDA GPUs with bf16, float16
                                      # autocast + GradScaler on older ones; bf16 autocast on
                                      # CPUs with bf16 instructions (AVX512_BF16 or AMX); else
                                      # float32), "float32", "bfloat16", "float16"
    compile: bool = False             # torch.compile the model
    seed: int = 1337                  # seeds the model's init, the batches and dropout
    resume: bool = False              # continue from out_dir/ckpt.pt with its saved settings
    overwrite: bool = False           # replace a checkpoint in out_dir that this run does not
                                      # resume (without it such a run stops, nothing is lost)
    skip_nonfinite: int = 0           # skip up to this many steps whose loss or gradient is
                                      # NaN/inf (counted in the log); past it, stop
    progress: bool = True             # tqdm progress bar
    logger: Logger = "none"           # also log the metrics.jsonl scalars (losses, learning
                                      # rate, tokens/s, grad norm) to "tensorboard"
                                      # (out_dir/tensorboard, via torch.utils.tensorboard) or
                                      # "wandb" (Weights & Biases; offline without a network);
                                      # "none": metrics.jsonl only. Rank 0 only under torchrun

    # Settings that a resumed run takes from its checkpoint and cannot change (with the model's
    # fields other than GPTConfig.TUNABLE).
    FIXED_ON_RESUME: ClassVar[Tuple[str, ...]] = ("tokenizer", "optimizer", "init_from")
    MAX_SEED: ClassVar[int] = 2 ** 62  # seed + rank and seed + 1_000_003 stay in torch's range

    def __post_init__(self):
        """Raises ConfigError (a ValueError) naming the first field out of range or of the
        wrong type."""
        if isinstance(self.model, dict):
            self.model = GPTConfig.from_dict({**DEFAULT_MODEL, **self.model})
        check_types(self)
        require(self, "seed", lambda x: 0 <= x <= self.MAX_SEED, "must be in [0, 2^62]")
        require(self, "tokenizer", lambda x: x != "hf" or self.init_from,
                "can be 'hf' only with init_from (a pretrained model's tokenizer.json)")
        for name in ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval",
                     "muon_ns_steps"):
            require(self, name, lambda x: x > 0, "must be > 0")
        require(self, "lr_decay_iters", lambda x: x is None or x > 0, "must be > 0 (or None)")
        require(self, "batch_size_start", lambda x: x is None or 0 < x <= self.batch_size,
                f"must be in [1, batch_size={self.batch_size}] (or None)")
        require(self, "block_size_start", lambda x: x is None or 0 < x <= self.model.block_size,
                f"must be in [1, block_size={self.model.block_size}] (or None)")
        require(self, "seq_warmup", lambda x: x is None or (len(x) > 0 and min(x) > 0),
                "must be window lengths > 0 (or None)")
        require(self, "seq_warmup_batch_scale", lambda x: is_number(x) and x > 0, "must be > 0")
        for name in ("max_iters", "warmup_iters", "skip_nonfinite", "ramp_iters",
                     "seq_warmup_iters"):
            require(self, name, lambda x: x >= 0, "must be >= 0")
        require(self, "learning_rate", lambda x: is_number(x) and x > 0, "must be > 0")
        require(self, "cooldown_frac", lambda x: is_number(x) and 0 < x <= 1, "must be in (0, 1]")
        require(self, "muon_lr_scale", lambda x: is_number(x) and x > 0, "must be > 0")
        for name in ("min_lr", "weight_decay", "grad_clip", "muon_weight_decay", "max_time"):
            require(self, name, lambda x: is_number(x) and x >= 0, "must be >= 0")
        require(self, "min_lr", lambda x: x <= self.learning_rate,
                f"must not exceed learning_rate ({self.learning_rate})")
        for name in ("beta1", "beta2", "muon_momentum", "ema_decay"):
            require(self, name, lambda x: is_number(x) and 0 <= x < 1, "must be in [0, 1)")

    def to_dict(self) -> dict:
        """Nested plain values ({"model": {...}, "batch_size": 32, ...}), JSON-ready: tuples
        are lists, as JSON and TOML read them back."""
        def plain(x):
            if isinstance(x, dict):
                return {k: plain(v) for k, v in x.items()}
            return [plain(v) for v in x] if isinstance(x, tuple) else x
        return plain(asdict(self))

    @classmethod
    def from_saved(cls, d: dict) -> "TrainConfig":
        """The TrainConfig of a run from the config it saved (a checkpoint's "train_config",
        config.json): settings added since that run was saved take the values they had before
        they existed (SAVED_BEFORE, MODEL_SAVED_BEFORE), not today's defaults. Unknown keys
        are ignored."""
        d = {**SAVED_BEFORE, **d}
        if isinstance(d.get("model"), dict):
            d["model"] = {**MODEL_SAVED_BEFORE, **d["model"]}
        else:  # the flat layout of the first checkpoints
            d = {**MODEL_SAVED_BEFORE, **d}
        return cls.from_dict(d, strict=False)

    @classmethod
    def from_dict(cls, d: dict, strict: bool = True) -> "TrainConfig":
        """A TrainConfig from a dict: nested ({"model": {...}, ...}, as to_dict writes) or flat
        (model fields beside the others, as checkpoints before the nesting stored it).

        Raises:
            ConfigError: a field out of range; with strict, also a key that is not a field.
        """
        if not isinstance(d, dict):
            raise ConfigError("TrainConfig", "settings", d, "must be a table (a dict of settings)")
        d = dict(d)
        model = d.pop("model", None)
        if model is not None and not isinstance(model, dict):
            raise ConfigError("TrainConfig", "model", model,
                              "must be a table of the model's settings ([model] in TOML)")
        model = dict(model or {})
        model_names = {f.name for f in fields(GPTConfig)}
        train_names = {f.name for f in fields(cls)} - {"model"}
        for key in list(d):
            if key in model_names:
                model[key] = d.pop(key)
            elif key not in train_names:
                if strict:
                    raise ConfigError("TrainConfig", key, d[key], "is not a setting")
                d.pop(key)
        if strict:
            for key in model:
                if key not in model_names:
                    raise ConfigError("GPTConfig", key, model[key], "is not a setting")
        return cls(model=GPTConfig.from_dict({**DEFAULT_MODEL, **model}), **d)


def _accept_flat_model_fields(cls):
    """Let cls(n_layer=2, ...) stand for cls(model=GPTConfig(n_layer=2, ...))."""
    init = cls.__init__
    model_names = {f.name for f in fields(GPTConfig)}

    def __init__(self, *args, **kw):
        flat = {k: kw.pop(k) for k in list(kw) if k in model_names}
        if flat:
            if kw.get("model") is not None:
                raise TypeError(f"{cls.__name__}: give the model's fields in model= or flat, "
                                f"not both (got model= and {', '.join(flat)})")
            kw["model"] = GPTConfig(**{**DEFAULT_MODEL, **flat})
        init(self, *args, **kw)

    __init__.__doc__ = init.__doc__
    __init__.__signature__ = inspect.signature(init)
    cls.__init__ = __init__
    return cls


TrainConfig = _accept_flat_model_fields(TrainConfig)


# Presets: overrides of TrainConfig's defaults. Sizes and measured results: see docs/training.md.
PRESETS: Dict[str, dict] = {
    # A 2-core CPU in under 4 minutes: nanoGPT's CPU recipe's model (4 layers, 4 heads, 128
    # wide) with RoPE and QK-norm, no dropout, on 256-token windows (its GPU recipe's; the CPU
    # recipe's are 64) in batches of 8 after a 200-step sequence-length warmup (24 x 32, then
    # 24 x 64), trained with Muon. The defaults.
    "shakespeare_char": {},
    # The same model on GPT-2 BPE tokens (tiktoken): a 50257-token vocabulary, 64-token windows
    # in batches of 32. Each step costs ~8x the char model's (the 50257 x 128 output head), and
    # the corpus is ~340k tokens (an epoch is ~170 steps), so it is shorter.
    "shakespeare": {"tokenizer": "gpt2", "model": dict(block_size=64), "batch_size": 32,
                    "max_iters": 300, "eval_interval": 100, "cooldown_frac": 0.4,
                    "seq_warmup": None},
    # Fine-tuning a pretrained model on a CPU (--init-from picks it unless --preset is given):
    # short windows, small batches, and a peak learning rate ~100x below training from scratch
    # (nanoGPT's finetune_shakespeare uses 3e-5), so the pretrained weights are adjusted, not
    # overwritten.
    "finetune": {"model": dict(block_size=128), "batch_size": 8, "max_iters": 200,
                 "optimizer": "adamw", "lr_schedule": "cosine",
                 "learning_rate": 3e-5, "min_lr": 3e-6, "warmup_iters": 10,
                 "eval_interval": 50, "eval_iters": 10, "seq_warmup": None},
    # nanoGPT's "baby GPT" for one GPU, with its optimizer and schedule (AdamW, 100 warmup steps,
    # cosine from 1e-3 to 1e-4), over 1000 steps instead of nanoGPT's 5000: this model (RoPE,
    # QK-norm, shuffled passes) fits the 1M training characters sooner. On an H200: val 1.4692
    # over the whole split after 1000 steps (35 s); over 5000 steps the loss passes 1.463 at
    # step 1000 and ends at 2.37 (train loss 0.21). docs/training.md.
    "shakespeare_char_gpu": {"model": dict(n_layer=6, n_head=6, n_embd=384, block_size=256,
                                           dropout=0.2),
                             "batch_size": 64, "max_iters": 1000, "optimizer": "adamw",
                             "lr_schedule": "cosine", "warmup_iters": 100,
                             "learning_rate": 1e-3, "min_lr": 1e-4, "eval_interval": 250,
                             "eval_iters": 200, "seq_warmup": None},
}


def default_settings() -> dict:
    """TrainConfig's defaults as a nested dict, as given rather than resolved (the model's
    n_kv_head stays None, so that a preset or flag changing n_head keeps plain MHA)."""
    out = {f.name: f.default for f in fields(TrainConfig) if f.name != "model"}
    out["model"] = {**{f.name: f.default for f in fields(GPTConfig)}, **DEFAULT_MODEL}
    return out


def lr_at(it: int, cfg: TrainConfig, elapsed: Optional[float] = None) -> float:
    """Learning rate at step it (elapsed seconds into the run, for cfg.max_time).

    Linear warmup to learning_rate over warmup_iters, then, over the schedule's progress p from
    0 to 1 (steps after warmup out of lr_decay_iters, default max_iters; or, with max_time,
    the fraction of the time budget used, if that is further along):
    - "cosine": min_lr + (learning_rate - min_lr) * (1 + cos(pi p)) / 2 (Loshchilov & Hutter
      2017, SGDR, without restarts);
    - "wsd": learning_rate until p = 1 - cooldown_frac, then linear to min_lr at p = 1
      (warmup-stable-decay: Hu et al. 2024, "MiniCPM"; Hagele et al. 2024, "Scaling Laws and
      Compute-Optimal Training Beyond Fixed Training Durations").
    After the schedule, min_lr.
    """
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    p = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    if cfg.max_time > 0 and elapsed is not None:
        p = max(p, elapsed / cfg.max_time)
    p = min(p, 1.0)
    span = cfg.learning_rate - cfg.min_lr
    if cfg.lr_schedule == "wsd":
        stable = 1.0 - cfg.cooldown_frac
        if p <= stable:
            return cfg.learning_rate
        return cfg.learning_rate - span * (p - stable) / cfg.cooldown_frac
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * p)) * span


def batch_shape(it: int, cfg: TrainConfig) -> Tuple[int, int]:
    """(sequences, tokens per sequence) of each micro-batch of step it.

    The sequence-length warmup first: steps [k n, (k + 1) n) with n = seq_warmup_iters train
    on windows of seq_warmup[k] tokens (at most block_size) in batches of
    seq_warmup_batch_scale x batch_size sequences (rounded, at least 1). Then batch_size_start and
    block_size_start (when set) growing linearly, rounded to whole numbers, to batch_size and
    the model's block_size until step ramp_iters; after that (batch_size, block_size).
    """
    stage = it // cfg.seq_warmup_iters if cfg.seq_warmup and cfg.seq_warmup_iters else None
    if stage is not None and stage < len(cfg.seq_warmup):
        return (max(1, round(cfg.seq_warmup_batch_scale * cfg.batch_size)),
                min(cfg.seq_warmup[stage], cfg.model.block_size))
    frac = min(it / cfg.ramp_iters, 1.0) if cfg.ramp_iters > 0 else 1.0

    def ramp(start: Optional[int], end: int) -> int:
        return end if start is None else round(start + frac * (end - start))

    return ramp(cfg.batch_size_start, cfg.batch_size), ramp(cfg.block_size_start,
                                                            cfg.model.block_size)


_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^#]*#\s?(.*)$")
_COMMENT_LINE = re.compile(r"^\s+#\s?(.*)$")


@functools.lru_cache(maxsize=None)
def field_help(cls) -> Dict[str, str]:
    """{field: its trailing comment}, comment-only lines right after a field joined to it: the
    help text the command line shows for each field of a config dataclass."""
    docs: Dict[str, str] = {}
    current, indent = None, 0
    for line in inspect.getsource(cls).splitlines():
        m = _FIELD_LINE.match(line)
        if m:
            current, indent = m.group(1), len(line) - len(line.lstrip())
            docs[current] = m.group(2).strip()
            continue
        m = _COMMENT_LINE.match(line)
        # A comment indented past the field continues its text; one at the field's own
        # indentation is a section heading ("# data").
        if m and current is not None and len(line) - len(line.lstrip()) > indent:
            docs[current] += " " + m.group(1).strip()
        else:
            current = None
    return docs


def check_settings(d: Any) -> dict:
    """Type-check a partial, nested settings dict such as a --config file holds ({"seed": 1,
    "model": {"n_layer": 2}}; the model's keys may also stand flat), before any of it is used:
    each key must be a field of TrainConfig or GPTConfig and each value of that field's
    declared type (check_types). Ranges are checked later, by the configs themselves.

    Returns a copy with ints given for floats made floats and lists for tuples made tuples.

    Raises:
        ConfigError: d is not a dict, "model" is not a dict, a key is not a setting (the owner
            and the key are named: "GPTConfig.foo is not a setting"), or a value is of the
            wrong type.
    """
    if not isinstance(d, dict):
        raise ConfigError("TrainConfig", "settings", d, "must be a table (a dict of settings)")
    model = d.get("model", {})
    if not isinstance(model, dict):
        raise ConfigError("TrainConfig", "model", model,
                          "must be a table of the model's settings ([model] in TOML)")
    train_hints, model_hints = type_hints(TrainConfig), type_hints(GPTConfig)
    train_names = {f.name for f in fields(TrainConfig)} - {"model"}
    model_names = {f.name for f in fields(GPTConfig)}

    def checked(cls_name, hints, key, value):
        ok, value, need = type_requirement(hints[key], value)
        if not ok:
            raise ConfigError(cls_name, key, value, need)
        return value

    out = {}
    for key, value in d.items():
        if key == "model":
            continue
        if key in train_names:
            out[key] = checked("TrainConfig", train_hints, key, value)
        elif key in model_names:
            out[key] = checked("GPTConfig", model_hints, key, value)
        else:
            raise ConfigError("TrainConfig", key, value, "is not a setting")
    if "model" in d:
        out["model"] = {}
        for key, value in model.items():
            if key not in model_names:
                raise ConfigError("GPTConfig", key, value, "is not a setting")
            out["model"][key] = checked("GPTConfig", model_hints, key, value)
    return out


def apply_overrides(base: dict, overrides: dict) -> dict:
    """base updated by overrides, the "model" sub-dict merged key by key (both nested dicts as
    TrainConfig.to_dict writes them; flat model keys in overrides go into "model")."""
    out = {**base, "model": dict(base.get("model") or {})}
    model_names = {f.name for f in fields(GPTConfig)}
    for key, value in overrides.items():
        if key == "model":
            if value is not None and not isinstance(value, dict):
                raise ConfigError("TrainConfig", "model", value,
                                  "must be a table of the model's settings ([model] in TOML)")
            out["model"].update(value or {})
        elif key in model_names:
            out["model"][key] = value
        else:
            out[key] = value
    return out


def fixed_on_resume() -> Tuple[str, ...]:
    """The settings a resumed run cannot change: the model's shape and the tokenizer, as keys
    of a flat view ("n_layer", "tokenizer", ...; vocab_size follows from the tokenizer)."""
    shape = tuple(f.name for f in fields(GPTConfig)
                  if f.name not in GPTConfig.TUNABLE and f.name != "vocab_size")
    return TrainConfig.FIXED_ON_RESUME + shape


__all__ = ["TrainConfig", "PRESETS", "DEFAULT_MODEL", "lr_at", "batch_shape", "field_help", "apply_overrides",
           "default_settings", "fixed_on_resume", "check_settings", "Tokenizer", "DType",
           "Optimizer", "LRSchedule", "Logger"]
