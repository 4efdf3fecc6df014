"""A decoder-only GPT with rotary position embeddings, grouped-query attention and a KV cache.

References:
- GPT-2: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"
  (pre-norm blocks, weight tying, residual-projection init scaled by 1/sqrt(2 * n_layer)).
- RoPE: Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding", eq. 34.
- GQA: Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models".
- nanoGPT (Karpathy), whose model.py this file follows in layout and module names.
- Options (GPTConfig, all off by default): ReLU^2 MLP (So et al. 2021, "Primer"), QK-norm
  (Henry et al. 2020, "Query-Key Normalization for Transformers"; Dehghani et al. 2023), an
  untied output head, zero-initialised residual projections (Jordan et al. 2024,
  modded-nanogpt); and the pieces that pretrained models need (minigpt.hf.pretrained loads them):
  GPT-2's learned absolute positions and tanh-approximate GELU, Llama's RMSNorm (Zhang &
  Sennrich 2019, "Root Mean Square Layer Normalization") and SwiGLU MLP (Shazeer 2020, "GLU
  Variants Improve Transformer", eq. 6) with its own intermediate size and head_dim, the norm
  epsilon, and biases per layer kind.
- Position encodings (GPTConfig.pos_embedding): RoPE (default), GPT-2's learned table, fixed
  sinusoids (Vaswani et al. 2017, "Attention Is All You Need", sec. 3.5), ALiBi (Press et al.
  2022, "Train Short, Test Long: Attention with Linear Biases Enables Input Length
  Extrapolation") or none (NoPE; Haviv et al. 2022, "Transformer Language Models without
  Positional Encodings Still Learn Positional Information"); and sliding-window attention
  (GPTConfig.window; Beltagy et al. 2020, "Longformer"). GPT.with_block_size gives a copy for a
  longer context, to measure length extrapolation.

Attention goes through minigpt.attention (our compiled kernels, or a PyTorch fallback).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.attention import attention, attention_probs, cpu_autocast_dtype
from minigpt.config import GPTConfig


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021, eq. 34): rotate each pair (x[2i], x[2i+1]) of a query/key by the
    angle pos * theta^(-2i/head_dim). Then q_m . k_n depends on positions only through m - n.

    Hugging Face's Llama pairs (x[i], x[i + head_dim/2]) instead ("rotate_half"); the two are
    the same model up to a permutation of the q and k projection rows within each head, which
    minigpt.hf.pretrained applies when it loads such weights (and undoes when it exports them).

    Angles are computed from integer positions on each call (cheap: T x head_dim/2), so no
    table has to be sized or moved between devices in advance. They are float64 except on MPS,
    which has no float64: float32 there (angle_dtype).

    scaling (GPTConfig.rope_scaling): None, or Llama 3.1's {"rope_type": "llama3", "factor",
    "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, which divides
    the low frequencies by factor (see inv_freq).
    """

    def __init__(self, head_dim: int, theta: float, scaling: Optional[dict] = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling

    @staticmethod
    def angle_dtype(device: torch.device) -> torch.dtype:
        return torch.float32 if device.type == "mps" else torch.float64

    @staticmethod
    def inv_freq(head_dim: int, theta: float, scaling: Optional[dict], dtype: torch.dtype,
                 device=None) -> torch.Tensor:
        """The rotation frequencies theta^(-2i/head_dim), i < head_dim/2, in radians per
        position: (head_dim/2,) of dtype.

        With scaling rope_type "llama3" (Meta's Llama 3.1 reference code, apply_scaling; also
        transformers' _compute_llama3_parameters): with L = original_max_position_embeddings,
        a frequency whose wavelength 2 pi / f is above L / low_freq_factor is divided by
        factor, one below L / high_freq_factor is kept, and one in between is interpolated:
        (1 - s) f / factor + s f, s = (L / wavelength - low_freq_factor) / (high_freq_factor -
        low_freq_factor). Short wavelengths (local order) stay as trained; long ones are
        stretched to cover factor x L positions.
        """
        exponent = torch.arange(0, head_dim, 2, dtype=dtype, device=device)
        inv_freq = theta ** (-exponent / head_dim)  # (hd/2,)
        if scaling is None:
            return inv_freq
        factor, low, high = (scaling["factor"], scaling["low_freq_factor"],
                             scaling["high_freq_factor"])
        old = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        s = (old / wavelength - low) / (high - low)
        scaled = torch.where(wavelength > old / low, inv_freq / factor, inv_freq)
        medium = (wavelength >= old / high) & (wavelength <= old / low)
        return torch.where(medium, (1 - s) * inv_freq / factor + s * inv_freq, scaled)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x: (B, T, H, head_dim); pos: (T,) int64 absolute positions. Returns x rotated, in
        x's dtype.

        Each pair is one complex number, x[2i] + i x[2i+1], multiplied by e^(i angle): one
        complex multiply instead of the four real products, a subtraction, an addition and a
        stack of the real form (about 2.5x faster forward and backward on a CPU; the same
        values in float32). bfloat16/float16 pairs are rotated in float32. MPS has no complex
        dtypes and torch.compile's inductor generates no code for them: there the real form
        (rotate_real) runs.
        """
        dtype = self.angle_dtype(pos.device)
        inv_freq = self.inv_freq(self.head_dim, self.theta, self.scaling, dtype, pos.device)
        angles = pos.to(dtype)[:, None] * inv_freq[None, :]  # (T, hd/2)
        if x.device.type == "mps" or torch.compiler.is_compiling():
            return self.rotate_real(x, angles)  # inductor generates no code for complex ops
        real = torch.float64 if x.dtype == torch.float64 else torch.float32
        rotation = torch.polar(torch.ones_like(angles), angles)  # (T, hd/2) e^(i angle)
        rotation = rotation.to(torch.complex128 if real == torch.float64 else torch.complex64)
        xr = x.to(real)
        if xr.stride(-1) != 1 or xr.storage_offset() % 2 or any(st % 2 for st in xr.stride()[:-1]):
            xr = xr.contiguous()  # view_as_complex needs pairs adjacent and aligned
        pairs = torch.view_as_complex(xr.unflatten(-1, (-1, 2)))  # (B, T, H, hd/2)
        out = torch.view_as_real(pairs * rotation[None, :, None, :])  # (B, T, H, hd/2, 2)
        return out.flatten(-2).to(x.dtype)  # (B, T, H, hd)

    @staticmethod
    def rotate_real(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """The rotation in real arithmetic (for devices without complex dtypes): x (B, T, H,
        head_dim) by angles (T, head_dim/2) -> (B, T, H, head_dim) in x's dtype."""
        cos = angles.cos().to(x.dtype)[None, :, None, :]  # (1, T, 1, hd/2)
        sin = angles.sin().to(x.dtype)[None, :, None, :]
        x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, T, H, hd/2) each
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.flatten(-2)  # (B, T, H, hd)


class RMSNorm(nn.RMSNorm):
    """torch's RMSNorm (Zhang & Sennrich 2019), x / sqrt(mean(x^2) + eps) * gain, with the
    gain cast to x's dtype: under autocast x may be bfloat16 while the gain stays float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's head-specific slopes (Press et al. 2022, "Train Short, Test Long", sec. 3 and
    their reference code's get_slopes): for n_head a power of 2, the geometric sequence
    slope_h = 2^(-8h / n_head), h = 1..n_head (8 heads: 1/2, 1/4, ..., 1/256). Otherwise, with
    n the largest power of 2 below n_head: the n slopes of that sequence, then the first
    n_head - n of every other slope of the sequence for 2n (6 heads: 1/4, 1/16, 1/64, 1/256,
    then 1/2, 1/8).

    Returns:
        (n_head,) float32 tensor on the CPU, computed in float64; head h of a layer adds
        -slopes[h] * (i - j) to the score of query i and key j (minigpt.attention's
        alibi_slopes). With GQA these are per query head.

    Raises:
        ValueError: n_head is not a positive int.
    """
    if isinstance(n_head, bool) or not isinstance(n_head, int) or n_head < 1:
        raise ValueError(f"alibi_slopes: n_head must be a positive int, got {n_head!r}")

    def power_of_2(n):
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    n = 1 << (n_head.bit_length() - 1)  # the largest power of 2 <= n_head
    slopes = power_of_2(n) + power_of_2(2 * n)[0::2][:n_head - n]
    return torch.tensor(slopes, dtype=torch.float64).to(torch.float32)


def sinusoidal_encoding(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """The fixed absolute position encodings of Vaswani et al. 2017, sec. 3.5:
    PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(p / 10000^(2i/dim)).

    Args:
        pos: (T,) integer positions (any value: the formula has no table to run out of).
        dim: the encoding's width (n_embd); an odd dim ends with a sine column.

    Returns:
        (T, dim) on pos's device, float64 (float32 on MPS, which has no float64).
    """
    dtype = RotaryEmbedding.angle_dtype(pos.device)
    two_i = torch.arange(0, dim, 2, dtype=dtype, device=pos.device)  # (ceil(dim/2),)
    angles = pos.to(dtype)[:, None] / 10000.0 ** (two_i / dim)[None, :]  # (T, ceil(dim/2))
    pe = torch.stack((angles.sin(), angles.cos()), dim=-1)  # (T, ceil(dim/2), 2)
    return pe.flatten(-2)[:, :dim]  # (T, dim): sin, cos, sin, cos, ...


class KVCache:
    """Keys and values of every layer for incremental decoding.

    Holds up to block_size tokens, (B, n_kv_head, block_size, head_dim) per layer, allocated on
    first use in the dtype the keys arrive in (autocast may make it bf16). ``length`` tokens are
    filled. A forward with the cache feeds only the new tokens; they attend to the cached ones
    with the bottom-right causal mask (Tq new queries against Tk = length + Tq keys).
    With GPTConfig.layer_kv_heads, each layer holds its own number of key/value heads.

    last_logits_only: a forward with this cache returns the logits of the last position only,
    (B, 1, vocab_size): all that generation reads, and it spares the output head the other
    positions of a prompt (GPT-2 small's head is a 768 x 50257 matmul per position).
    """

    def __init__(self, config: GPTConfig, batch_size: int, last_logits_only: bool = False):
        self.shapes = [(batch_size, config.heads(layer)[1], config.block_size, config.head_dim)
                       for layer in range(config.n_layer)]
        self.k: list = [None] * config.n_layer
        self.v: list = [None] * config.n_layer
        self.block_size = config.block_size
        self.length = 0
        self.last_logits_only = last_logits_only

    def reset(self) -> None:
        self.length = 0

    def check_room(self, T: int) -> None:
        if self.length + T > self.block_size:
            raise ValueError(f"KVCache: {self.length} cached + {T} new tokens exceed block_size "
                             f"{self.block_size}; reset() the cache and feed the last block_size "
                             f"tokens")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append k, v (B, Hkv, T, hd) of one layer; return that layer's cached (B, Hkv, Tk, hd)."""
        T = k.shape[2]
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(self.shapes[layer])
            self.v[layer] = v.new_empty(self.shapes[layer])
        self.k[layer][:, :, self.length:self.length + T] = k
        self.v[layer][:, :, self.length:self.length + T] = v
        end = self.length + T
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T: int) -> None:
        self.length += T


# A decode step multiplies one token's activations by every weight matrix: it is bound by reading
# the weights. Stored (out, in), as nn.Linear keeps them, F.linear asks BLAS for x @ W^T; MKL runs
# that product markedly slower for a single row than x @ W with W stored (in, out) -- GPT-2's own
# Conv1D layout: 1.25x on GPT-2 small's blocks and 2x on its 768 x 50257 output head, measured on
# an AMD EPYC (python -m minigpt bench-generate). Switching the layout costs two copies of the
# weights per generate() call, about what 40 decode steps save, hence the threshold.
_COLUMN_MAJOR_MIN_TOKENS = 64


@contextlib.contextmanager
def _column_major_linears(model: nn.Module, enabled: bool):
    """Within the block, every float32 nn.Linear weight of model holds the same (out, in) values
    stored column-major (W.t() contiguous), so F.linear multiplies by a contiguous (in, out)
    matrix; each weight is made contiguous again on exit. Weights shared by several modules (the
    tied output head and token embedding) are switched once."""
    switched, seen = [], set()
    if enabled:
        for module in model.modules():
            w = getattr(module, "weight", None)
            if (isinstance(module, nn.Linear) and id(w) not in seen and w.dtype == torch.float32
                    and w.is_contiguous()):
                seen.add(id(w))
                w.data = w.data.t().contiguous().t()  # (out, in), strides (1, out)
                switched.append(w)
    try:
        yield
    finally:
        for w in switched:
            w.data = w.data.contiguous()


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        # layer's own head counts: n_head / n_kv_head, or GPTConfig.layer_heads after pruning
        self.n_head, self.n_kv_head = config.heads(layer)
        self.head_dim = config.head_dim
        # q, k, v projections in one matmul: n_head query heads, n_kv_head key and value heads
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) *
                                config.head_dim, bias=config.attn_bias)
        self.c_proj = nn.Linear(self.n_head * config.head_dim, config.n_embd,
                                bias=config.attn_bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # Positions enter here only for relative kinds (RoPE, ALiBi); absolute ones are in
        # GPT._embed.
        self.rotary = (RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
                       if config.pos_embedding == "rope" else None)
        # ALiBi: one slope per query head (with GQA, heads sharing keys keep their own slopes).
        # A buffer, so it follows the model's device; not persistent: a function of n_head,
        # not a weight, so state dicts are the same for every position encoding but "learned".
        if config.pos_embedding == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(config.n_head), persistent=False)
        else:
            self.alibi_slopes = None
        self.window = config.window  # sliding window: the most recent keys each query sees
        self.backend = config.attn_backend
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, eps=1e-6)
            self.k_norm = RMSNorm(config.head_dim, eps=1e-6)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def qkv(self, x, pos):
        """Queries, keys and values of x (B, T, C) at positions pos (T,), RoPE applied (if the
        model uses it): q (B, nh, T, hd), k and v (B, nkv, T, hd), as views of one projection."""
        B, T, C = x.size()  # batch, time, channels (n_embd)
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.c_attn(x)  # (B, T, (nh + 2 nkv) hd)
        if qkv.dtype in (torch.bfloat16, torch.float16) and qkv.is_cpu and \
                torch.is_autocast_enabled("cpu"):
            # Cast once to the dtype attention() computes in under CPU autocast, before the
            # norms and RoPE, instead of q, k and v each on the way in.
            qkv = qkv.to(cpu_autocast_dtype(qkv.dtype, self.backend))
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=2)
        q = self.q_norm(q.view(B, T, nh, hd))  # (B, T, nh, hd)
        k = self.k_norm(k.view(B, T, nkv, hd))  # (B, T, nkv, hd)
        if self.rotary is not None:
            q, k = self.rotary(q, pos), self.rotary(k, pos)
        q = q.transpose(1, 2)  # (B, nh, T, hd)
        k = k.transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        return q, k, v

    def forward(self, x, pos, kv_cache: Optional[KVCache] = None, layer: int = 0):
        """x (B, T, C), pos (T,) int64, kv_cache of the model (layer: this block's index in it).
        Returns (B, T, C)."""
        B, T, C = x.size()
        q, k, v = self.qkv(x, pos)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nkv, Tk, hd), Tk = cached + T
        y = attention(q, k, v, causal=True, alibi_slopes=self.alibi_slopes, window=self.window,
                      backend=self.backend)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh * hd)
        return self.resid_dropout(self.c_proj(y))


class ReLU2(nn.Module):
    """relu(x)^2 (So et al. 2021, "Primer", sec. 3)."""

    def forward(self, x):
        return F.relu(x).square()


# The MLP nonlinearities (GPTConfig.ACTIVATIONS), each a module class called with no argument.
ACTIVATIONS = {
    "gelu": nn.GELU,  # x Phi(x), exact (erf); Hendrycks & Gimpel 2016
    "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"),  # their tanh form: GPT-2's
    "silu": nn.SiLU,  # x sigmoid(x) (Swish-1): Llama's, inside a GLU
    "relu2": ReLU2,
}


class MLP(nn.Module):
    """config.mlp "standard": c_proj(act(c_fc(x))). "glu": c_fc makes the gate g and the value u
    side by side (one matmul, as c_attn makes q, k, v), then c_proj(act(g) * u) (Shazeer 2020,
    eq. 6; SwiGLU with activation "silu", as in Llama). Hidden width: config.intermediate_size."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.glu = config.mlp == "glu"
        hidden = config.intermediate_size
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.glu else hidden,
                              bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.activation]()
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.mlp_bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, hidden), or (B, T, 2 * hidden) for a GLU
        if self.glu:
            gate, up = h.chunk(2, dim=-1)  # (B, T, hidden) each
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.dropout(self.c_proj(h))


def make_norm(config: GPTConfig) -> nn.Module:
    """The model's normalisation over n_embd: LayerNorm (with a bias if config.norm_bias) or
    RMSNorm (x / sqrt(mean(x^2) + eps) * gain), with epsilon config.norm_eps."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.norm_bias)


class Block(nn.Module):

    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, pos, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), pos, kv_cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        if config.pos_embedding == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # Weight tying (Press & Wolf 2017): the output projection is the token embedding.
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the stream's variance
        # does not grow with depth; with zero_init_proj they start at zero, so every block
        # starts as the identity (and an untied head predicts uniformly).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init_proj:
                    torch.nn.init.zeros_(p)
                else:
                    torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.zero_init_proj and not config.tie_embeddings:
            torch.nn.init.zeros_(self.lm_head.weight)

    @classmethod
    def from_checkpoint(cls, state: dict) -> "GPT":
        """The model of a checkpoint (minigpt.load_checkpoint): built from its "model_config"
        and loaded with its "model" weights, on the CPU."""
        model = cls(GPTConfig.from_dict(state["model_config"]))
        model.load_state_dict(state["model"])
        return model

    @classmethod
    def from_pretrained(cls, path_or_name: str, *, block_size: Optional[int] = None,
                        dtype: torch.dtype = torch.float32) -> "GPT":
        """A GPT with the weights of a Hugging Face GPT-2 (GPT2LMHeadModel) or Llama-architecture
        (LlamaForCausalLM: Llama, TinyLlama, SmolLM, ...) model, on the CPU.

        Args:
            path_or_name: a local directory holding config.json and model.safetensors (or
                pytorch_model.bin, or their sharded index), or a hub name such as
                "openai-community/gpt2" (downloaded with huggingface_hub when online).
            block_size: the longest context to keep (default: the model's
                max_position_embeddings); GPT-2's position table is cut to it.
            dtype: of the parameters (default float32, which the CPU kernels need).

        Raises:
            minigpt.hf.pretrained.PretrainedError: no such model, offline without a local copy
                (the message says what to download and where), unreadable files, or a
                configuration feature minigpt does not have (named: rope scaling, sliding
                windows, ...).

        The matching tokenizer: minigpt.hf.pretrained.load_tokenizer(path_or_name). See
        minigpt/pretrained.py for the weight mapping (GPT-2's Conv1D matrices are transposed;
        Llama's q/k rows are permuted to our RoPE pairing).
        """
        from minigpt.hf.pretrained import pretrained_state

        state = pretrained_state(path_or_name, block_size=block_size, dtype=dtype,
                                 tokenizer=False)
        # Built on the meta device and given the loaded tensors themselves: initialising 135M
        # parameters at random only to overwrite them took seconds.
        with torch.device("meta"):
            model = cls(GPTConfig.from_dict(state["model_config"]))
        model.load_state_dict(state["model"], assign=True)
        if model.config.tie_embeddings:
            model.transformer.wte.weight = model.lm_head.weight
        return model.to(dtype)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def with_block_size(self, block_size: int,
                        generator: Optional[torch.Generator] = None) -> "GPT":
        """A copy of this model (same weights, same device and dtype; this one is unchanged)
        whose config has block_size, so that it takes contexts up to that length: the way to
        evaluate a model beyond the context it was trained on (length extrapolation).

        "rope", "sinusoidal", "alibi" and "none" compute positions from a formula, so nothing
        but the limit changes. "learned" has one trained row per position seen in training:
        the table is cut to block_size, or extended with rows drawn as at initialisation
        (normal, std 0.02; from generator, default one seeded with 0) that no training ever
        updated. That is why learned absolute positions cannot extrapolate (Press et al. 2022,
        sec. 2): a position past the training context gets an arbitrary vector.

        Args:
            block_size: the new longest context, a positive int (larger or smaller).
            generator: a CPU torch.Generator for the new rows of a learned table.

        Returns:
            a new GPT, in this model's training/eval mode.

        Raises:
            ValueError: block_size is not a positive int.
        """
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"GPT.with_block_size: block_size must be a positive int, got "
                             f"{block_size!r}")
        model = copy.deepcopy(self)
        model.config = dataclasses.replace(self.config, block_size=block_size)
        if self.config.pos_embedding == "learned":
            old = self.transformer.wpe.weight.detach()  # (old block_size, C)
            rows = torch.empty(block_size, old.shape[1], dtype=old.dtype)
            n = min(block_size, old.shape[0])
            rows[n:].normal_(0.0, 0.02, generator=generator or torch.Generator().manual_seed(0))
            wpe = nn.Embedding(block_size, old.shape[1], device=old.device, dtype=old.dtype)
            with torch.no_grad():
                wpe.weight.copy_(rows.to(old.device))
                wpe.weight[:n] = old[:n]
            wpe.weight.requires_grad_(self.transformer.wpe.weight.requires_grad)
            model.transformer.wpe = wpe
        return model

    def num_params(self) -> int:
        """Number of parameters (a tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def _check_idx(self, idx, kv_cache):
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"GPT: idx must be a (B, T) int64 tensor, got "
                             f"{getattr(idx, 'dtype', type(idx))} of shape "
                             f"{tuple(getattr(idx, 'shape', ()))}")
        T = idx.shape[1]
        if T == 0 or T > self.config.block_size:
            raise ValueError(f"GPT: sequence length T={T} must be in [1, block_size="
                             f"{self.config.block_size}] (GPT.with_block_size makes a copy for "
                             f"a longer context)")
        if kv_cache is not None:
            kv_cache.check_room(T)
        # An id outside the vocabulary would index past the embedding table (torch says only
        # "index out of range in self", or worse on a GPU). One min/max reduction; skipped
        # while torch.compile traces, where it would be a data-dependent branch.
        if idx.numel() and idx.device.type != "meta" and not torch.compiler.is_compiling():
            lo, hi = torch.aminmax(idx)
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= self.config.vocab_size:
                bad = hi if hi >= self.config.vocab_size else lo
                raise ValueError(f"GPT: idx holds token id {bad}, outside the vocabulary "
                                 f"[0, vocab_size={self.config.vocab_size})")

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None):
        """Logits for every position, and the mean cross-entropy loss if targets are given.

        Args:
            idx: (B, T) int64 token ids, 1 <= T <= block_size.
            targets: (B, T) int64 next-token ids, or None. Ids of -1 are ignored in the loss.
            kv_cache: a KVCache for incremental decoding (see generate); idx holds only the new
                tokens, which attend to the cached ones.

        Returns:
            (logits, loss): logits (B, T, vocab_size) float ((B, 1, vocab_size) with a KVCache
            made with last_logits_only); loss a scalar tensor or None.

        Raises:
            ValueError: idx is not a (B, T) int64 tensor with 1 <= T <= block_size, or holds
                an id outside [0, vocab_size).

        Head gating for analysis is outside this path: ``with model.gated_heads(mask):``.
        """
        self._check_idx(idx, kv_cache)
        B, T = idx.size()
        pos = self._positions(T, kv_cache, idx.device)
        x = self._embed(idx, pos)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, pos, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.advance(T)
            if kv_cache.last_logits_only:
                x = x[:, -1:]  # (B, 1, C)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    @contextlib.contextmanager
    def gated_heads(self, head_mask: torch.Tensor):
        """Within the block, head h of layer l has its attention output multiplied by
        head_mask[l, h] before c_proj (the gates xi_h of Michel et al. 2019): forward
        pre-hooks on each c_proj, so the forward path itself carries no gates.

        Args:
            head_mask: (n_layer, n_head) float gates; 0 removes a head, 1 keeps it. Gradients
                flow to it. A layer with fewer heads (GPTConfig.layer_heads) reads its first
                ones: head_mask[l, :layer_heads[l]].

        Raises:
            ValueError: head_mask is not a tensor of shape (n_layer, n_head).
        """
        shape = (self.config.n_layer, self.config.n_head)
        if not isinstance(head_mask, torch.Tensor) or tuple(head_mask.shape) != shape:
            raise ValueError(f"GPT: head_mask must be a tensor of shape (n_layer, n_head) = "
                             f"{shape}, got {tuple(getattr(head_mask, 'shape', ()))}")
        hd = self.config.head_dim

        def gate(layer):
            nh = self.config.heads(layer)[0]

            def hook(module, args):
                y = args[0]  # (B, T, C = nh * hd): the heads' outputs side by side
                B, T, C = y.shape
                g = head_mask[layer, :nh].to(device=y.device, dtype=y.dtype).view(1, 1, nh, 1)
                return ((y.view(B, T, nh, hd) * g).view(B, T, C),)
            return hook

        handles = [block.attn.c_proj.register_forward_pre_hook(gate(layer))
                   for layer, block in enumerate(self.transformer.h)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _embed(self, idx, pos):
        """Token embeddings of idx (B, T), plus the absolute encodings of positions pos (T,):
        the learned table's rows, or the sinusoids (to which the token embeddings are scaled by
        sqrt(n_embd), as Vaswani et al. 2017 do in sec. 3.4, so that unit-amplitude encodings
        do not drown embeddings initialised at std 0.02). (B, T, C)."""
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.pos_embedding == "learned":
            x = x + self.transformer.wpe(pos)  # (T, C) broadcast over the batch
        elif self.config.pos_embedding == "sinusoidal":
            pe = sinusoidal_encoding(pos, self.config.n_embd).to(x.dtype)  # (T, C)
            x = x * math.sqrt(self.config.n_embd) + pe
        return self.transformer.drop(x)

    @staticmethod
    def _positions(T, kv_cache, device):
        start = 0 if kv_cache is None else kv_cache.length
        return torch.arange(start, start + T, dtype=torch.long, device=device)  # (T,)

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of every layer and head for one sequence.

        Computed with the explicit softmax(QK^T / sqrt(head_dim)) path (Vaswani et al. 2017,
        eq. 1; the fused kernels never store probabilities), by the same weights as forward(),
        in eval mode (no dropout) whatever mode the model is in. With GQA each query head gets
        its own map (query heads sharing a key/value head still differ in their queries).

        Args:
            idx: (T,) or (1, T) int64 token ids, T <= block_size.

        Returns:
            (n_layer, n_head, T, T) float32 probabilities: row i (a query) sums to 1 over the
            keys j <= i (with a window W, i - W < j <= i); the other entries are 0. A layer
            with fewer heads (GPTConfig.layer_heads) fills its first maps; the others are NaN.

        Raises:
            ValueError: idx is not one int64 sequence of 1 <= T <= block_size tokens (feed the
                last block_size tokens of a longer one).
        """
        if idx.dim() == 1:
            idx = idx[None]
        self._check_idx(idx, None)
        if idx.shape[0] != 1:
            raise ValueError(f"attention_maps: idx must hold one sequence, got shape "
                             f"{tuple(idx.shape)}")
        was_training = self.training
        backends = [block.attn.backend for block in self.transformer.h]
        self.eval()
        try:
            pos = self._positions(idx.shape[1], None, idx.device)
            x = self._embed(idx, pos)
            maps = []
            for block in self.transformer.h:
                q, k, _ = block.attn.qkv(block.ln_1(x), pos)
                probs = attention_probs(q, k, True, 1.0 / math.sqrt(self.config.head_dim),
                                        block.attn.alibi_slopes, block.attn.window)
                probs = probs[0].float()  # (layer's heads, T, T)
                missing = self.config.n_head - probs.shape[0]
                maps.append(F.pad(probs, (0, 0, 0, 0, 0, missing), value=float("nan")))
                block.attn.backend = "naive"  # the next layer's input by the same explicit path
                x = block(x, pos)
        finally:
            for block, backend in zip(self.transformer.h, backends):
                block.attn.backend = backend
            self.train(was_training)
        return torch.stack(maps)  # (n_layer, n_head, T, T)

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas,
                             device_type: str) -> torch.optim.AdamW:
        """AdamW (Loshchilov & Hutter 2019) with weight decay on matrices (every >= 2-d
        parameter: Linear weights and the embedding) and none on biases and norm gains.
        minigpt.train.optim.build_optimizer builds this or Muon from a TrainConfig."""
        from types import SimpleNamespace

        from minigpt.train.optim import build_optimizer

        cfg = SimpleNamespace(optimizer="adamw", weight_decay=weight_decay,
                              learning_rate=learning_rate, beta1=betas[0], beta2=betas[1])
        return build_optimizer(self, cfg, device_type).members[0]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, use_cache: bool = True,
                 callback=None, stop_tokens=None) -> torch.Tensor:
        """Sample max_new_tokens tokens after the prompt idx (B, T), autoregressively.

        The model conditions on the last block_size tokens (nanoGPT's crop). With use_cache
        (default) each step feeds only the newest token and attends to a KVCache, until the
        context fills block_size; from then on every token's context changes at each step, so
        each step recomputes the last block_size tokens (the cache is refilled), which keeps the
        logits equal to a full recompute. Sampling: see minigpt.generation.sample_next
        (temperature 0 is greedy). callback(step, next_tokens) is called after each new token
        (next_tokens (B, 1)); a truthy return value ends generation there (sample.py's --stop
        strings). On the CPU, for max_new_tokens >= 64, the Linear weights are stored
        column-major while generating (same values; see _column_major_linears): one-token
        matmuls run faster so.

        stop_tokens: token ids (an instruct model's end of turn, EOS) that end a sequence; the
        stop token is kept. Generation ends when every sequence of the batch has ended; a
        sequence that ended earlier repeats its stop token until then. None or empty: always
        max_new_tokens tokens.

        Returns:
            (B, T + n) int64 token ids, n <= max_new_tokens (n < max_new_tokens only when
            stopped by stop_tokens or callback).

        Raises:
            ValueError: max_new_tokens < 0, or a stop token outside [0, vocab_size).
        """
        from minigpt.generation import sample_next

        if max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        stop = None
        if stop_tokens:
            stop = torch.tensor(sorted({int(t) for t in stop_tokens}), device=idx.device)
            if stop.min() < 0 or stop.max() >= self.config.vocab_size:
                raise ValueError(f"generate: stop_tokens must be token ids in [0, "
                                 f"{self.config.vocab_size}), got {sorted(stop.tolist())}")
            done = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
        bs = self.config.block_size
        cache = None
        if use_cache:
            cache = KVCache(self.config, idx.shape[0], last_logits_only=True)
        feed = idx[:, -bs:]
        layout = idx.device.type == "cpu" and max_new_tokens >= _COLUMN_MAJOR_MIN_TOKENS
        with _column_major_linears(self, layout):
            for step in range(max_new_tokens):
                if cache is None or cache.length + feed.shape[1] > bs:
                    feed = idx[:, -bs:]
                    if cache is not None:
                        cache.reset()
                logits, _ = self(feed, kv_cache=cache)
                nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
                if stop is not None:
                    nxt = torch.where(done, idx[:, -1:], nxt)  # ended rows repeat their stop
                    done = done | torch.isin(nxt, stop)
                idx = torch.cat((idx, nxt), dim=1)
                feed = nxt
                if callback is not None and callback(step, nxt):
                    break
                if stop is not None and bool(done.all()):
                    break
        return idx
