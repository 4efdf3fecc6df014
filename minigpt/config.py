"""The model's settings: GPTConfig.

One place per setting: each field holds its default and, in its trailing comment, its help text
(the command line shows it). A setting with a fixed set of values has a Literal type below, which
the type check, the model and the command line all read (``typing.get_args``). __post_init__
checks every field against its type (check_types: a TOML or JSON file cannot slip "false" into a
bool), then each range, and raises ConfigError naming the field and the value. The training
run's settings, which hold a GPTConfig: minigpt.train.config.
"""

from __future__ import annotations

import functools
import math
import os
import typing
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Dict, Literal, Optional, Tuple

from minigpt.attention import BACKENDS

Activation = Literal["gelu", "gelu_tanh", "silu", "relu2"]
Norm = Literal["layernorm", "rmsnorm"]
MLPKind = Literal["standard", "glu"]
# Where positions enter: "learned" and "sinusoidal" are added to the input in GPT.embed; "rope"
# rotates q and k in CausalSelfAttention.qkv; "alibi" biases the scores inside attention().
PosEmbedding = Literal["rope", "learned", "sinusoidal", "alibi", "none"]
AttnBackend = Literal[BACKENDS]  # the names of minigpt.attention's backend registry

INT_RANGE = (-2 ** 63, 2 ** 63 - 1)  # int64, what torch (and TOML) hold
# The most parameters a GPTConfig may describe: 2^40 (4.4 TB in float32). A config above it is a
# typo (vocab_size = 2**40), refused before anything is allocated.
MAX_PARAMS = 2 ** 40


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


def require(obj, name: str, ok, requirement: str) -> None:
    """Raise ConfigError (owner: obj's class) unless ok(obj.name)."""
    if not ok(getattr(obj, name)):
        raise ConfigError(type(obj).__name__, name, getattr(obj, name), requirement)


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@functools.lru_cache(maxsize=None)
def type_hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def type_requirement(kind, value):
    """(ok, value converted, requirement) of value against the annotation kind: bool, int,
    float (an int is converted), str, a Literal, Optional[X], Tuple[int, ...] (a list is
    converted) or a dataclass."""
    origin = typing.get_origin(kind)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return True, None, ""
        ok, value, need = type_requirement(typing.get_args(kind)[0], value)
        return ok, value, need + " or None"
    if origin is Literal:
        choices = typing.get_args(kind)
        return value in choices, value, "must be one of " + ", ".join(map(str, choices))
    if kind is bool:
        return isinstance(value, bool), value, "must be a bool (true or false)"
    if kind is int:
        ok = is_int(value) and INT_RANGE[0] <= value <= INT_RANGE[1]
        return ok, value, "must be an int in [-2^63, 2^63)"
    if kind is float:
        if is_int(value):
            try:
                return True, float(value), ""
            except OverflowError:
                return False, value, "must be a number"
        return isinstance(value, float), value, "must be a number"
    if kind is str:
        value = os.fspath(value) if isinstance(value, os.PathLike) else value
        return isinstance(value, str) and value != "", value, "must be a non-empty string"
    if origin is tuple:
        ok = isinstance(value, (list, tuple)) and all(type_requirement(int, v)[0] for v in value)
        return ok, tuple(value) if ok else value, "must be a list of ints"
    if isinstance(kind, type):
        return isinstance(value, kind), value, f"must be a {kind.__name__}"
    return True, value, ""


def check_types(obj) -> None:
    """Check every field of the dataclass instance obj against its annotation
    (type_requirement); ints given for floats become floats, lists for tuples tuples.

    Raises:
        ConfigError: naming the first field whose value is not of its type.
    """
    names = {f.name for f in fields(obj)}
    for name, kind in type_hints(type(obj)).items():
        if name in names:
            ok, value, need = type_requirement(kind, getattr(obj, name))
            if not ok:
                raise ConfigError(type(obj).__name__, name, getattr(obj, name), need)
            setattr(obj, name, value)


def _is_rope_scaling(x) -> bool:
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return x is None or (isinstance(x, dict) and set(x) == {"rope_type", *keys}
                         and x["rope_type"] == "llama3"
                         and all(is_number(x[k]) and x[k] > 0 for k in keys)
                         and x["low_freq_factor"] < x["high_freq_factor"])


@dataclass
class GPTConfig:
    """The shape of a GPT, and two settings that may change between runs of one model (TUNABLE).

    Fields that default to None (n_kv_head, head_dim, the three biases, intermediate_size) are
    resolved in __post_init__ and stored resolved: dataclasses.replace(cfg, n_embd=...) keeps
    the old head_dim; build a changed shape from the given values instead.
    """

    vocab_size: int = 65          # number of token ids (set from the tokenizer when training)
    block_size: int = 256         # longest context the model is trained on, in tokens
    n_layer: int = 6              # transformer blocks
    n_head: int = 6               # query heads per attention layer
    n_kv_head: Optional[int] = None  # key/value heads (GQA); None means n_head (plain MHA)
    n_embd: int = 384             # residual stream width C
    head_dim: Optional[int] = None  # width of each query/key/value head; None means
                                  # n_embd // n_head
    dropout: float = 0.0          # dropout on embeddings and residual branches (not on attention
                                  # probabilities: the fused kernels never form them)
    bias: bool = False            # biases in Linear and LayerNorm layers: the default of
                                  # attn_bias, mlp_bias and norm_bias
    attn_bias: Optional[bool] = None  # biases in the attention's c_attn and c_proj; None = bias
    mlp_bias: Optional[bool] = None   # biases in the MLP's c_fc and c_proj; None = bias
    norm_bias: Optional[bool] = None  # biases in the LayerNorms; None = bias (RMSNorm has none)
    pos_embedding: PosEmbedding = "rope"  # "rope" (rotary q and k; Su et al. 2021), "learned"
                                  # (GPT-2's table), "sinusoidal" (Vaswani et al. 2017, sec.
                                  # 3.5), "alibi" (a per-head distance penalty on the scores;
                                  # Press et al. 2022) or "none" (only the causal mask)
    rope_theta: float = 10000.0   # RoPE base: frequencies theta^(-2i/head_dim)
    rope_scaling: Optional[Dict[str, Any]] = None  # None, or Llama 3.1's frequency scaling
                                  # (RotaryEmbedding.inv_freq)
    norm: Norm = "layernorm"      # "layernorm" (Ba et al. 2016) or "rmsnorm" (Zhang & Sennrich
                                  # 2019; Llama)
    norm_eps: float = 1e-5        # epsilon of every LayerNorm/RMSNorm (not of qk_norm)
    mlp: MLPKind = "standard"     # "standard": c_proj(act(c_fc(x))); "glu": c_proj(act(g) * u)
                                  # with [g, u] = c_fc(x) (Shazeer 2020; with "silu": SwiGLU)
    intermediate_size: Optional[int] = None  # MLP hidden width; None means 4 * n_embd
    activation: Activation = "gelu"  # MLP nonlinearity: "gelu" (exact), "gelu_tanh" (GPT-2's),
                                  # "silu" (x sigmoid(x)) or "relu2" (ReLU squared; So et al. 2021)
    qk_norm: bool = False         # RMSNorm (with a learned gain) of each query and key head
                                  # before RoPE (Henry et al. 2020; Dehghani et al. 2023)
    tie_embeddings: bool = True   # output head shares the token embedding's weight (Press &
                                  # Wolf 2017); False gives the head its own matrix
    zero_init_proj: bool = False  # start the residual projections (attention and MLP c_proj)
                                  # and an untied output head at zero (modded-nanogpt)
    value_embeds: int = 0         # value embeddings (modded-nanogpt): tables of token vectors,
                                  # table i mixed into the values of layers i and n_layer -
                                  # value_embeds + i (v = a v + b ve, learned a, b); <= n_layer//2
    unet_skips: bool = False      # U-net skips (modded-nanogpt; Ronneberger et al. 2015): block
                                  # i's output, times a learned weight, joins the input of
                                  # block n_layer - 1 - i, for i < n_layer // 2
    attn_gate: bool = False       # gated attention (Qiu et al. 2025, headwise): head h's output
                                  # times 2 sigmoid(x . w_h), w zero-initialised (gates start at 1)
    logit_softcap: Optional[float] = None  # logits = cap tanh(logits / cap) (Gemma 2 team
                                  # 2024; modded-nanogpt); None = uncapped
    window: Optional[int] = None  # sliding-window attention: each token sees its window most
                                  # recent tokens, itself included (Beltagy et al. 2020); None =
                                  # the whole causal context
    attn_backend: Optional[AttnBackend] = None  # minigpt.attention backend; None picks the best
    layer_heads: Optional[Tuple[int, ...]] = None  # query heads of each layer, each in
                                  # 1..n_head (written by head pruning); None = n_head everywhere
    layer_kv_heads: Optional[Tuple[int, ...]] = None  # key/value heads of each layer, each
                                  # dividing that layer's query heads; None = n_kv_head in every
                                  # layer, or layer_heads itself when n_kv_head == n_head (MHA)

    TUNABLE: ClassVar[Tuple[str, ...]] = ("dropout", "attn_backend")

    def __post_init__(self):
        """Resolves the None defaults. Raises ConfigError (a ValueError) naming the first field
        of the wrong type or out of range, or a model of more than MAX_PARAMS parameters."""
        check_types(self)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            require(self, name, lambda x: x > 0, "must be a positive int")
        require(self, "vocab_size", lambda x: x <= 2 ** 32,
                "must be at most 2^32 (token ids are stored as uint32)")
        if self.head_dim is None:
            require(self, "n_embd", lambda x: x % self.n_head == 0,
                    f"must be divisible by n_head ({self.n_head}), or head_dim given")
            self.head_dim = self.n_embd // self.n_head
        require(self, "head_dim", lambda x: x > 0, "must be a positive int")
        if self.pos_embedding == "rope":
            require(self, "head_dim", lambda x: x % 2 == 0,
                    f"must be even for RoPE (head_dim = n_embd / n_head = {self.n_embd} / "
                    f"{self.n_head} unless given)")
        require(self, "n_head", lambda x: x % self.n_kv_head == 0,
                f"must be a multiple of n_kv_head ({self.n_kv_head})")
        require(self, "window", lambda x: x is None or x > 0,
                "must be a positive int (the number of most recent tokens each token attends "
                "to, itself included) or None")
        require(self, "dropout", lambda x: 0.0 <= x < 1.0, "must be in [0, 1)")
        require(self, "value_embeds", lambda x: 0 <= x <= self.n_layer // 2,
                f"must be in [0, n_layer // 2 = {self.n_layer // 2}]")
        require(self, "logit_softcap", lambda x: x is None or (is_number(x) and x > 0),
                "must be a positive number or None")
        require(self, "rope_theta", lambda x: is_number(x) and x > 0, "must be positive")
        require(self, "rope_scaling", _is_rope_scaling,
                "must be None or {'rope_type': 'llama3', 'factor', 'low_freq_factor', "
                "'high_freq_factor', 'original_max_position_embeddings'} (positive numbers, "
                "low_freq_factor < high_freq_factor)")
        require(self, "norm_eps", lambda x: is_number(x) and x > 0, "must be positive")
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        require(self, "intermediate_size", lambda x: x > 0, "must be a positive int")
        for name in ("attn_bias", "mlp_bias"):
            if getattr(self, name) is None:
                setattr(self, name, self.bias)
        if self.norm_bias is None:
            self.norm_bias = self.bias and self.norm == "layernorm"
        require(self, "norm_bias", lambda x: not (x and self.norm == "rmsnorm"),
                "must be False with norm='rmsnorm' (RMSNorm has no bias)")
        self._check_layer_heads()
        self._check_size()

    def _check_layer_heads(self) -> None:
        """Check layer_heads and layer_kv_heads; resolve layer_kv_heads to layer_heads (MHA)."""
        for name in ("layer_heads", "layer_kv_heads"):
            require(self, name, lambda x: x is None or len(x) == self.n_layer,
                    f"must be None or {self.n_layer} ints (one per layer, n_layer="
                    f"{self.n_layer})")
        if self.layer_heads is None:
            require(self, "layer_kv_heads", lambda x: x is None,
                    "must be None when layer_heads is None")
            return
        require(self, "layer_heads", lambda x: all(1 <= h <= self.n_head for h in x),
                f"must hold query head counts in 1..n_head ({self.n_head})")
        # ALiBi's slope is a function of a head's index among n_head: a pruned layer would
        # need to record which heads it kept.
        require(self, "layer_heads", lambda x: self.pos_embedding != "alibi",
                "is not supported with pos_embedding='alibi' (each head's slope depends on its "
                "index among n_head)")
        if self.layer_kv_heads is None and self.n_kv_head == self.n_head:
            self.layer_kv_heads = self.layer_heads
        kv = self.layer_kv_heads or (self.n_kv_head,) * self.n_layer
        require(self, "layer_kv_heads" if self.layer_kv_heads else "n_kv_head",
                lambda x: all(k >= 1 and q % k == 0 for q, k in zip(self.layer_heads, kv)),
                f"must divide each layer's query heads (layer_heads={self.layer_heads})")
        require(self, "value_embeds", lambda x: x == 0 or all(k == self.n_kv_head for k in kv),
                f"must be 0 when layers have other key/value head counts than n_kv_head "
                f"({self.n_kv_head}; layer_kv_heads={self.layer_kv_heads})")

    def num_params_estimate(self) -> Tuple[int, int]:
        """(embedding and head parameters, the blocks' parameters), without biases and norms:
        what building this config would allocate, to within a few percent."""
        C = self.n_embd
        embed = self.vocab_size * C * (1 if self.tie_embeddings else 2)
        if self.pos_embedding == "learned":
            embed += self.block_size * C
        embed += self.value_embeds * self.vocab_size * self.n_kv_head * self.head_dim
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

    def value_embed_table(self, layer: int) -> Optional[int]:
        """The value-embedding table layer mixes into its values, or None (value_embeds)."""
        k, n = self.value_embeds, self.n_layer
        return layer if layer < k else (layer - (n - k) if layer >= n - k else None)

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


__all__ = ["ConfigError", "GPTConfig", "Activation", "Norm", "MLPKind", "PosEmbedding",
           "AttnBackend", "check_types", "MAX_PARAMS"]
