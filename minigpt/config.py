"""Settings: the model's GPTConfig, the training run's TrainConfig (which holds a GPTConfig as
``model``), the presets, and the learning-rate schedule a TrainConfig describes.

One place per field: each dataclass field carries its default and, in its trailing comment, its
help text (``field_help`` reads it for the command line). Each config checks itself in
``__post_init__`` and raises ConfigError naming the field and the value. Presets are overrides
of TrainConfig's defaults, nested like the config (``{"model": {"n_layer": 6}, ...}``).

Every field is checked against its declared type first (``check_types``: a bool must be a real
bool, not the string "false"; an int an int; a float a number; Optional[X] None or X; a tuple of
ints a list or tuple of ints), so a TOML/JSON file cannot slip a string into a bool and change
what a run does. Then each range and choice.

This is a low module: it imports nothing of minigpt but runtime, tokenizer and attention (names
only: the backend registry).
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Dict, Optional, Tuple

from minigpt.attention import BACKENDS
from minigpt.runtime import DTYPES
from minigpt.tokenizer import TOKENIZERS


class ConfigError(ValueError):
    """A setting out of range. ``owner.name`` is the field (e.g. "TrainConfig.batch_size"),
    ``value`` its value and ``requirement`` what it must be ("must be > 0")."""

    def __init__(self, owner: str, name: str, value: Any, requirement: str):
        self.owner, self.name, self.value, self.requirement = owner, name, value, requirement
        super().__init__(f"{owner}.{name} {requirement}, got {value!r}")

    @property
    def reason(self) -> str:
        """The message without the field's name: "must be > 0, got -1.0"."""
        return f"{self.requirement}, got {self.value!r}"


def _check(owner: str, obj, name: str, ok, requirement: str) -> None:
    if not ok(getattr(obj, name)):
        raise ConfigError(owner, name, getattr(obj, name), requirement)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


INT_RANGE = (-2 ** 63, 2 ** 63 - 1)  # int64, what torch (and TOML) hold
# The most parameters a GPTConfig may describe: 2^40 (4.4 TB in float32). A config above it is a
# typo (vocab_size = 2**40 would start allocating 35 TB); refused before anything is allocated.
MAX_PARAMS = 2 ** 40


@functools.lru_cache(maxsize=None)
def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_requirement(kind, value):
    """(ok, value converted, requirement) of value against the annotation kind: bool, int,
    float (an int is accepted and converted), str, Optional[X], Tuple[int, ...] (a list is
    accepted and converted) or a dataclass (GPTConfig)."""
    if typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None:
            return True, None, ""
        ok, value, need = _type_requirement(args[0], value)
        return ok, value, need + " or None"
    if typing.get_origin(kind) is typing.Literal:
        choices = typing.get_args(kind)
        return value in choices, value, "must be one of " + ", ".join(map(str, choices))
    if kind is bool:
        return isinstance(value, bool), value, "must be a bool (true or false)"
    if kind is int:
        ok = _is_int(value) and INT_RANGE[0] <= value <= INT_RANGE[1]
        return ok, value, "must be an int in [-2^63, 2^63)"
    if kind is float:
        if _is_int(value):
            try:
                return True, float(value), ""
            except OverflowError:
                return False, value, "must be a number"
        return isinstance(value, float), value, "must be a number"
    if kind is str:
        if isinstance(value, os.PathLike):  # a pathlib.Path for out_dir or data
            value = os.fspath(value)
        return isinstance(value, str) and value != "", value, "must be a non-empty string"
    if typing.get_origin(kind) is tuple:
        ok = isinstance(value, (list, tuple)) and all(
            _type_requirement(int, v)[0] for v in value)
        return ok, tuple(value) if ok else value, "must be a list of ints"
    if isinstance(kind, type):
        return isinstance(value, kind), value, f"must be a {kind.__name__}"
    return True, value, ""


def check_types(obj) -> None:
    """Check every field of the dataclass instance obj against its annotation (see
    _type_requirement); ints given for floats become floats, lists for tuples tuples.

    Raises:
        ConfigError: naming the first field whose value is not of its type.
    """
    owner = type(obj).__name__
    for name, kind in _hints(type(obj)).items():
        if typing.get_origin(kind) is ClassVar or name not in {f.name for f in fields(obj)}:
            continue
        ok, value, need = _type_requirement(kind, getattr(obj, name))
        if not ok:
            raise ConfigError(owner, name, getattr(obj, name), need)
        setattr(obj, name, value)


def _is_rope_scaling(x) -> bool:
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return x is None or (isinstance(x, dict) and set(x) == {"rope_type", *keys}
                         and x["rope_type"] == "llama3"
                         and all(_is_number(x[k]) and x[k] > 0 for k in keys)
                         and x["low_freq_factor"] < x["high_freq_factor"])


@dataclass
class GPTConfig:
    """The shape of a GPT (and the two settings that may change between runs of one model:
    dropout and attn_backend, listed in TUNABLE).

    Fields that default to None (n_kv_head, head_dim, attn_bias, mlp_bias, norm_bias,
    intermediate_size) are resolved from the others in __post_init__ and stored resolved, so
    dataclasses.replace(cfg, n_embd=...) keeps the old head_dim and intermediate_size: build
    changed shapes from the given values (GPTConfig(**given)) instead."""

    vocab_size: int = 65          # number of token ids (set from the tokenizer when training)
    block_size: int = 256         # longest context the model is trained on, in tokens
    n_layer: int = 6              # transformer blocks
    n_head: int = 6               # query heads per attention layer
    n_kv_head: Optional[int] = None  # key/value heads (GQA); None means n_head (plain MHA)
    n_embd: int = 384             # residual stream width C
    head_dim: Optional[int] = None  # width of each query/key/value head; None means
                                  # n_embd // n_head (Llama-family models may set it apart)
    dropout: float = 0.0          # dropout on embeddings and residual branches (not on attention
                                  # probabilities: the fused kernels never form them)
    bias: bool = False            # biases in Linear and LayerNorm layers: the default of
                                  # attn_bias, mlp_bias and norm_bias
    attn_bias: Optional[bool] = None  # biases in the attention's c_attn and c_proj; None = bias
    mlp_bias: Optional[bool] = None   # biases in the MLP's c_fc and c_proj; None = bias
    norm_bias: Optional[bool] = None  # biases in the LayerNorms; None = bias (RMSNorm has none)
    pos_embedding: str = "rope"   # "rope" (rotary, applied to q and k in every layer; Su et al.
                                  # 2021), "learned" (a block_size x n_embd table added to the
                                  # token embeddings; GPT-2), "sinusoidal" (fixed sin/cos
                                  # encodings added to them; Vaswani et al. 2017, sec. 3.5),
                                  # "alibi" (a per-head linear distance penalty on the attention
                                  # scores; Press et al. 2022) or "none" (NoPE: only the causal
                                  # mask tells positions apart)
    rope_theta: float = 10000.0   # RoPE base: frequencies theta^(-2i/head_dim)
    rope_scaling: Optional[Dict[str, Any]] = None  # None, or Llama 3.1's frequency scaling:
                                  # {"rope_type": "llama3", "factor", "low_freq_factor",
                                  # "high_freq_factor", "original_max_position_embeddings"}
                                  # (RotaryEmbedding.inv_freq)
    norm: str = "layernorm"       # "layernorm" (Ba et al. 2016) or "rmsnorm" (Zhang & Sennrich
                                  # 2019; Llama)
    norm_eps: float = 1e-5        # epsilon of every LayerNorm/RMSNorm (not of qk_norm)
    mlp: str = "standard"         # "standard": c_proj(act(c_fc(x))); "glu": c_proj(act(g) * u)
                                  # with [g, u] = c_fc(x) (Shazeer 2020); "glu" with activation
                                  # "silu" is Llama's SwiGLU
    intermediate_size: Optional[int] = None  # MLP hidden width; None means 4 * n_embd
    activation: str = "gelu"      # MLP nonlinearity: "gelu" (exact erf GELU), "gelu_tanh"
                                  # (GPT-2's tanh approximation), "silu" (x sigmoid(x)) or
                                  # "relu2" (ReLU squared, So et al. 2021, "Primer")
    qk_norm: bool = False         # RMSNorm (with a learned gain) of each query and key head
                                  # before RoPE (Henry et al. 2020; Dehghani et al. 2023)
    tie_embeddings: bool = True   # output head shares the token embedding's weight (Press &
                                  # Wolf 2017); False gives the head its own matrix
    zero_init_proj: bool = False  # start the residual projections (attention and MLP c_proj)
                                  # and an untied output head at zero (modded-nanogpt)
    window: Optional[int] = None  # sliding-window attention in every layer: each token sees
                                  # its window most recent tokens, itself included (Beltagy et
                                  # al. 2020); None = the whole causal context
    attn_backend: Optional[str] = None  # minigpt.attention backend; None picks the best
    layer_heads: Optional[Tuple[int, ...]] = None  # query heads of each layer, each in
                                  # 1..n_head (head pruning writes it: python -m minigpt heads
                                  # --prune); None = n_head in every layer
    layer_kv_heads: Optional[Tuple[int, ...]] = None  # key/value heads of each layer, each
                                  # dividing that layer's query heads; None = n_kv_head in every
                                  # layer, or layer_heads itself when n_kv_head == n_head (MHA)

    TUNABLE: ClassVar[Tuple[str, ...]] = ("dropout", "attn_backend")
    ACTIVATIONS: ClassVar[Tuple[str, ...]] = ("gelu", "gelu_tanh", "silu", "relu2")
    # Where positions enter: absolute kinds ("learned", "sinusoidal") are added to the input in
    # GPT._embed; "rope" rotates q and k in CausalSelfAttention.qkv; "alibi" biases the scores
    # inside attention(); "none" adds nothing.
    POS_EMBEDDINGS: ClassVar[Tuple[str, ...]] = ("rope", "learned", "sinusoidal", "alibi", "none")
    NORMS: ClassVar[Tuple[str, ...]] = ("layernorm", "rmsnorm")
    MLPS: ClassVar[Tuple[str, ...]] = ("standard", "glu")

    def __post_init__(self):
        """Resolves the None defaults (n_kv_head, head_dim, the three biases, intermediate_size).

        Raises ConfigError (a ValueError) naming the first field out of range or of the wrong
        type, or a model of more than MAX_PARAMS parameters."""
        check_types(self)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        owner = "GPTConfig"
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            _check(owner, self, name, lambda x: _is_int(x) and x > 0, "must be a positive int")
        _check(owner, self, "vocab_size", lambda x: x <= 2 ** 32,
               "must be at most 2^32 (token ids are stored as uint32)")
        _check(owner, self, "attn_backend", lambda x: x is None or x in BACKENDS,
               f"must be one of {', '.join(BACKENDS)} (or None: the best available)")
        if self.head_dim is None:
            _check(owner, self, "n_embd", lambda x: x % self.n_head == 0,
                   f"must be divisible by n_head ({self.n_head}), or head_dim given")
            self.head_dim = self.n_embd // self.n_head
        _check(owner, self, "head_dim", lambda x: _is_int(x) and x > 0, "must be a positive int")
        _check(owner, self, "pos_embedding", lambda x: x in self.POS_EMBEDDINGS,
               f"must be one of {', '.join(self.POS_EMBEDDINGS)}")
        if self.pos_embedding == "rope":
            _check(owner, self, "head_dim", lambda x: x % 2 == 0,
                   f"must be even for RoPE (head_dim = n_embd / n_head = {self.n_embd} / "
                   f"{self.n_head} unless given)")
        _check(owner, self, "n_head", lambda x: x % self.n_kv_head == 0,
               f"must be a multiple of n_kv_head ({self.n_kv_head})")
        _check(owner, self, "window", lambda x: x is None or (_is_int(x) and x > 0),
               "must be a positive int (the number of most recent tokens each token attends "
               "to, itself included) or None")
        _check(owner, self, "dropout", lambda x: _is_number(x) and 0.0 <= x < 1.0,
               "must be in [0, 1)")
        _check(owner, self, "rope_theta", lambda x: _is_number(x) and x > 0, "must be positive")
        _check(owner, self, "rope_scaling", _is_rope_scaling,
               "must be None or {'rope_type': 'llama3', 'factor', 'low_freq_factor', "
               "'high_freq_factor', 'original_max_position_embeddings'} (positive numbers, "
               "low_freq_factor < high_freq_factor)")
        _check(owner, self, "norm", lambda x: x in self.NORMS,
               f"must be one of {', '.join(self.NORMS)}")
        _check(owner, self, "norm_eps", lambda x: _is_number(x) and x > 0, "must be positive")
        _check(owner, self, "mlp", lambda x: x in self.MLPS,
               f"must be one of {', '.join(self.MLPS)}")
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        _check(owner, self, "intermediate_size", lambda x: _is_int(x) and x > 0,
               "must be a positive int")
        _check(owner, self, "activation", lambda x: x in self.ACTIVATIONS,
               f"must be one of {', '.join(self.ACTIVATIONS)}")
        _check(owner, self, "bias", lambda x: isinstance(x, bool), "must be a bool")
        for name in ("attn_bias", "mlp_bias"):
            if getattr(self, name) is None:
                setattr(self, name, self.bias)
        if self.norm_bias is None:
            self.norm_bias = self.bias and self.norm == "layernorm"
        _check(owner, self, "norm_bias", lambda x: not (x and self.norm == "rmsnorm"),
               "must be False with norm='rmsnorm' (RMSNorm has no bias)")
        for name in ("attn_bias", "mlp_bias", "norm_bias", "qk_norm", "tie_embeddings",
                     "zero_init_proj"):
            _check(owner, self, name, lambda x: isinstance(x, bool), "must be a bool")
        self._check_layer_heads()
        self._check_size()

    def num_params_estimate(self) -> Tuple[int, int]:
        """(embedding and head parameters, the blocks' parameters), without biases and norms:
        what building this config would allocate, to within a few percent."""
        C = self.n_embd
        embed = self.vocab_size * C * (1 if self.tie_embeddings else 2)
        if self.pos_embedding == "learned":
            embed += self.block_size * C
        mlp = C * self.intermediate_size * (3 if self.mlp == "glu" else 2)
        blocks = 0
        for layer in range(self.n_layer if self.layer_heads is not None else 1):
            hq, hkv = self.heads(layer)
            blocks += C * (hq + 2 * hkv) * self.head_dim + hq * self.head_dim * C + mlp
        if self.layer_heads is None:
            blocks *= self.n_layer
        return embed, blocks

    def _check_size(self) -> None:
        embed, blocks = self.num_params_estimate()
        if embed + blocks > MAX_PARAMS:
            name = "vocab_size" if embed >= blocks else ("n_layer" if self.n_layer > self.n_embd
                                                         else "n_embd")
            raise ConfigError("GPTConfig", name, getattr(self, name),
                              f"gives a model of {embed + blocks:.3g} parameters (vocab_size="
                              f"{self.vocab_size}, n_layer={self.n_layer}, n_embd={self.n_embd}, "
                              f"intermediate_size={self.intermediate_size}), more than "
                              f"{MAX_PARAMS:.3g} (2^40)")

    def _check_layer_heads(self) -> None:
        """Validate layer_heads and layer_kv_heads (stored as tuples; a JSON config gives
        lists). layer_kv_heads None with layer_heads given resolves to layer_heads (MHA) or
        stays None (n_kv_head in every layer)."""
        owner = "GPTConfig"
        for name in ("layer_heads", "layer_kv_heads"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
            _check(owner, self, name, lambda x: x is None or (
                isinstance(x, tuple) and len(x) == self.n_layer and all(_is_int(h) for h in x)),
                f"must be None or {self.n_layer} ints (one per layer, n_layer={self.n_layer})")
        if self.layer_heads is None:
            _check(owner, self, "layer_kv_heads", lambda x: x is None,
                   "must be None when layer_heads is None")
            return
        _check(owner, self, "layer_heads", lambda x: all(1 <= h <= self.n_head for h in x),
               f"must hold query head counts in 1..n_head ({self.n_head})")
        # ALiBi's slopes are a function of a head's index among n_head: a pruned layer would
        # need to record which heads it kept.
        _check(owner, self, "layer_heads", lambda x: self.pos_embedding != "alibi",
               "is not supported with pos_embedding='alibi' (each head's slope depends on its "
               "index among n_head)")
        if self.layer_kv_heads is None and self.n_kv_head == self.n_head:
            self.layer_kv_heads = self.layer_heads
        kv = self.layer_kv_heads or (self.n_kv_head,) * self.n_layer
        _check(owner, self, "layer_kv_heads" if self.layer_kv_heads else "n_kv_head",
               lambda x: all(k >= 1 and q % k == 0 for q, k in zip(self.layer_heads, kv)),
               f"must divide each layer's query heads (layer_heads={self.layer_heads})")

    def heads(self, layer: int) -> Tuple[int, int]:
        """(query heads, key/value heads) of layer (0 <= layer < n_layer)."""
        if self.layer_heads is None:
            return self.n_head, self.n_kv_head
        kv = self.layer_kv_heads[layer] if self.layer_kv_heads else self.n_kv_head
        return self.layer_heads[layer], kv

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """A GPTConfig from a dict such as to_dict() wrote; unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# TrainConfig's model when none is given: the preset "shakespeare_char" (nanoGPT's CPU recipe's
# shape, with QK-norm).
DEFAULT_MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, qk_norm=True)

# What settings added since checkpoints were first written meant before they existed: a saved
# config without them describes a run that used these values (see TrainConfig.from_saved).
SAVED_BEFORE = {"optimizer": "adamw", "lr_schedule": "cosine"}
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
    tokenizer: str = "char"           # "char" or "gpt2"; with init_from, the pretrained
                                      # model's ("gpt2", or "hf": its tokenizer.json)
    out_dir: str = "out"              # run directory: ckpt.pt, config.json, metrics.jsonl
    init_from: Optional[str] = None   # fine-tune a pretrained model: a Hugging Face directory
                                      # or hub name (GPT-2, Llama-family); its shape and
                                      # tokenizer replace the model settings, except
                                      # block_size (at most its own), dropout and attn_backend
    # optimisation
    optimizer: str = "muon"           # "muon": Muon for the blocks' matrices and AdamW for
                                      # embeddings, head, biases and gains; or "adamw" for all
                                      # (see minigpt.train.optim)
    batch_size: int = 32              # sequences per micro-step (per process)
    grad_accum: int = 1               # micro-steps per optimizer step
    max_iters: int = 1400             # optimizer steps
    learning_rate: float = 3e-3       # peak learning rate
    min_lr: float = 2e-4              # floor of the cosine decay
    warmup_iters: int = 30            # linear warmup steps
    lr_decay_iters: Optional[int] = None  # length of the schedule; None = max_iters
    lr_schedule: str = "wsd"          # after warmup: "cosine" decay to min_lr, or "wsd" (warmup-
                                      # stable-decay: peak, then a linear cooldown to min_lr)
    cooldown_frac: float = 0.4        # "wsd": the final fraction of the schedule spent decaying
    max_time: float = 0.0             # wall-clock budget in seconds (0 = none): stop once it is
                                      # spent, and run the schedule on the fraction of it used
    weight_decay: float = 0.1         # AdamW decay of matrices (none on biases and norms)
    beta1: float = 0.9                # AdamW first-moment decay
    beta2: float = 0.99               # AdamW second-moment decay
    grad_clip: float = 1.0            # max global grad norm; 0 disables
    muon_lr_scale: float = 10.0       # "muon": the hidden matrices' learning rate as a multiple
                                      # of learning_rate (so 0.03 at the default peak)
    muon_momentum: float = 0.9        # "muon": Nesterov momentum
    muon_weight_decay: float = 0.0    # "muon": decoupled weight decay of the hidden matrices
    muon_ns_steps: int = 5            # "muon": Newton-Schulz iterations that orthogonalise
                                      # each update
    # evaluation and logging
    eval_interval: int = 300          # steps between evaluations (and checkpoints)
    eval_iters: int = 10              # fixed batches per split per evaluation
    log_interval: int = 10            # steps between progress-bar/log updates
    # system
    device: str = "auto"              # "auto" (cuda, then mps, then cpu), "cpu", "cuda", ...
    dtype: str = "auto"               # "auto" (bf16 autocast on CUDA GPUs with bf16, float16
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
    logger: str = "none"              # also log the metrics.jsonl scalars (losses, learning
                                      # rate, tokens/s, grad norm) to "tensorboard"
                                      # (out_dir/tensorboard, via torch.utils.tensorboard) or
                                      # "wandb" (Weights & Biases; offline without a network);
                                      # "none": metrics.jsonl only. Rank 0 only under torchrun

    # Settings that a resumed run takes from its checkpoint and cannot change (with the model's
    # fields other than GPTConfig.TUNABLE).
    FIXED_ON_RESUME: ClassVar[Tuple[str, ...]] = ("tokenizer", "optimizer", "init_from")
    OPTIMIZERS: ClassVar[Tuple[str, ...]] = ("adamw", "muon")
    LR_SCHEDULES: ClassVar[Tuple[str, ...]] = ("cosine", "wsd")
    LOGGERS: ClassVar[Tuple[str, ...]] = ("none", "tensorboard", "wandb")
    MAX_SEED: ClassVar[int] = 2 ** 62  # seed + rank and seed + 1_000_003 stay in torch's range

    def __post_init__(self):
        """Raises ConfigError (a ValueError) naming the first field out of range or of the
        wrong type."""
        if isinstance(self.model, dict):
            self.model = GPTConfig.from_dict({**DEFAULT_MODEL, **self.model})
        check_types(self)
        owner = "TrainConfig"
        _check(owner, self, "logger", lambda x: x in self.LOGGERS,
               f"must be one of {', '.join(self.LOGGERS)}")
        _check(owner, self, "seed", lambda x: 0 <= x <= self.MAX_SEED,
               "must be in [0, 2^62]")
        _check(owner, self, "tokenizer", lambda x: x in TOKENIZERS,
               f"must be one of {', '.join(TOKENIZERS)}")
        _check(owner, self, "tokenizer", lambda x: x != "hf" or self.init_from,
               "can be 'hf' only with init_from (a pretrained model's tokenizer.json)")
        _check(owner, self, "init_from", lambda x: x is None or (isinstance(x, str) and x),
               "must be a model directory or hub name (or None)")
        _check(owner, self, "dtype", lambda x: x in DTYPES, f"must be one of {', '.join(DTYPES)}")
        for name in ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
            _check(owner, self, name, lambda x: _is_int(x) and x > 0, "must be > 0")
        _check(owner, self, "lr_decay_iters", lambda x: x is None or (_is_int(x) and x > 0),
               "must be > 0 (or None)")
        _check(owner, self, "muon_ns_steps", lambda x: _is_int(x) and x > 0, "must be > 0")
        for name in ("max_iters", "warmup_iters", "skip_nonfinite"):
            _check(owner, self, name, lambda x: _is_int(x) and x >= 0, "must be >= 0")
        _check(owner, self, "learning_rate", lambda x: _is_number(x) and x > 0, "must be > 0")
        _check(owner, self, "optimizer", lambda x: x in self.OPTIMIZERS,
               f"must be one of {', '.join(self.OPTIMIZERS)}")
        _check(owner, self, "lr_schedule", lambda x: x in self.LR_SCHEDULES,
               f"must be one of {', '.join(self.LR_SCHEDULES)}")
        _check(owner, self, "cooldown_frac", lambda x: _is_number(x) and 0 < x <= 1,
               "must be in (0, 1]")
        _check(owner, self, "muon_lr_scale", lambda x: _is_number(x) and x > 0, "must be > 0")
        _check(owner, self, "muon_momentum", lambda x: _is_number(x) and 0 <= x < 1,
               "must be in [0, 1)")
        for name in ("min_lr", "weight_decay", "grad_clip", "muon_weight_decay", "max_time"):
            _check(owner, self, name, lambda x: _is_number(x) and x >= 0, "must be >= 0")
        _check(owner, self, "min_lr", lambda x: x <= self.learning_rate,
               f"must not exceed learning_rate ({self.learning_rate})")
        for name in ("beta1", "beta2"):
            _check(owner, self, name, lambda x: _is_number(x) and 0 <= x < 1, "must be in [0, 1)")

    def to_dict(self) -> dict:
        """Nested plain values ({"model": {...}, "batch_size": 32, ...}), JSON-ready."""
        return asdict(self)

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


# Presets: overrides of TrainConfig's defaults. Sizes and measured results: see README.md.
PRESETS: Dict[str, dict] = {
    # A 2-core CPU in under 4 minutes: nanoGPT's CPU recipe (4 layers, 4 heads, 128 wide,
    # block 64) with RoPE and QK-norm, no dropout, batch 32, trained with Muon. The defaults.
    "shakespeare_char": {},
    # The same model on GPT-2 BPE tokens (tiktoken): a 50257-token vocabulary.
    # Each step costs ~8x the char model's (the 50257 x 128 output head), and the corpus is
    # ~340k tokens (an epoch is ~170 steps), so it is shorter.
    "shakespeare": {"tokenizer": "gpt2", "max_iters": 300, "eval_interval": 100},
    # Fine-tuning a pretrained model on a CPU (--init-from picks it unless --preset is given):
    # short windows, small batches, and a peak learning rate ~100x below training from scratch
    # (nanoGPT's finetune_shakespeare uses 3e-5), so the pretrained weights are adjusted, not
    # overwritten.
    "finetune": {"model": dict(block_size=128), "batch_size": 8, "max_iters": 200,
                 "optimizer": "adamw", "lr_schedule": "cosine",
                 "learning_rate": 3e-5, "min_lr": 3e-6, "warmup_iters": 10,
                 "eval_interval": 50, "eval_iters": 10},
    # nanoGPT's "baby GPT" for one GPU.
    "shakespeare_char_gpu": {"model": dict(n_layer=6, n_head=6, n_embd=384, block_size=256,
                                           dropout=0.2),
                             "batch_size": 64, "max_iters": 5000, "learning_rate": 1e-3,
                             "min_lr": 1e-4, "eval_interval": 500, "eval_iters": 200},
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
    train_hints, model_hints = _hints(TrainConfig), _hints(GPTConfig)
    train_names = {f.name for f in fields(TrainConfig)} - {"model"}
    model_names = {f.name for f in fields(GPTConfig)}

    def checked(cls_name, hints, key, value):
        ok, value, need = _type_requirement(hints[key], value)
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


__all__ = ["ConfigError", "GPTConfig", "TrainConfig", "PRESETS", "DEFAULT_MODEL", "lr_at",
           "field_help", "apply_overrides", "default_settings", "fixed_on_resume", "check_types",
           "check_settings",
           "MAX_PARAMS"]
