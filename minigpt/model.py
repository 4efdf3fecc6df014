"""A decoder-only GPT: pre-norm blocks of causal self-attention and an MLP, with a KV cache.

Read it after config.py (GPTConfig). The layout and module names follow nanoGPT's model.py,
which follows GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners"). The defaults add rotary position embeddings (Su et al. 2021, "RoFormer";
minigpt.positions); grouped-query attention (Ainslie et al. 2023, "GQA") is n_kv_head < n_head.
The other options of GPTConfig (RMSNorm, SwiGLU, ALiBi, gates, sliding windows, ...) are each a
few lines below, sources in GPTConfig's comments. Attention itself is minigpt.attention.attention
(our compiled kernels, or the PyTorch reference).
"""

from __future__ import annotations

import functools
import math
import typing
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.attention import attention, cpu_autocast_dtype, qk_rope
from minigpt.config import Activation, GPTConfig
from minigpt.positions import RotaryEmbedding, alibi_slopes, sinusoidal_encoding, with_block_size


class RMSNorm(nn.RMSNorm):
    """x / sqrt(mean(x^2) + eps) * gain (Zhang & Sennrich 2019), the gain cast to x's dtype:
    under autocast x may be bfloat16 while the gain stays float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class KVCache:
    """The keys and values of every layer, for decoding one token at a time.

    Holds up to block_size tokens, (B, n_kv_head, block_size, head_dim) per layer (each layer's
    own head count after pruning), allocated on first use in the dtype the keys arrive in.
    ``length`` tokens are filled. A forward with the cache feeds only the new tokens, which
    attend to the cached ones (the causal mask aligned bottom-right: Tq new queries, Tk =
    length + Tq keys). last_logits_only: that forward returns the logits of the last position
    only, (B, 1, vocab_size), all generation reads, sparing the output head the others.
    """

    def __init__(self, config: GPTConfig, batch_size: int, last_logits_only: bool = False):
        self.shapes = [(batch_size, config.heads(layer)[1], config.block_size, config.head_dim)
                       for layer in range(config.n_layer)]
        self.k, self.v = [None] * config.n_layer, [None] * config.n_layer  # per layer
        self.block_size = config.block_size
        self.length = 0
        self.last_logits_only = last_logits_only

    def reset(self) -> None:
        self.length = 0

    def check_room(self, T: int) -> None:
        if self.length + T > self.block_size:
            raise ValueError(f"KVCache: {self.length} cached + {T} new tokens exceed block_size "
                             f"{self.block_size}; reset() it and feed the last block_size tokens")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append k, v (B, Hkv, T, hd) of one layer; return its cache so far (B, Hkv, Tk, hd)."""
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(self.shapes[layer])
            self.v[layer] = v.new_empty(self.shapes[layer])
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T: int) -> None:
        self.length += T


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (Vaswani et al. 2017, sec. 3.2) with grouped-query
    heads (Ainslie et al. 2023): n_head query heads share n_kv_head key/value heads.

    Holds c_attn, one Linear n_embd -> (n_head + 2 n_kv_head) * head_dim that makes q, k and v
    in one matmul; c_proj, n_head * head_dim -> n_embd; the optional q_norm and k_norm
    (QK-norm, RMSNorm per head); gate (attn_gate: n_embd -> n_head); rotary (RoPE, no weights)
    or alibi_slopes (a buffer, not saved), by config.pos_embedding. (B, T, n_embd) -> same.
    """

    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.n_head, self.n_kv_head = config.heads(layer)  # this layer's, after any pruning
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) *
                                config.head_dim, bias=config.attn_bias)
        self.c_proj = nn.Linear(self.n_head * config.head_dim, config.n_embd, bias=config.attn_bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.rotary = (RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
                       if config.pos_embedding == "rope" else None)
        # Not persistent: a function of n_head, not a weight, so state dicts do not change.
        if config.pos_embedding == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(config.n_head), persistent=False)
        else:
            self.alibi_slopes = None
        self.window = config.window
        self.backend = config.attn_backend
        self.gate = nn.Linear(config.n_embd, self.n_head, bias=False) if config.attn_gate else None
        # Value embeddings: v = value_mix[0] v + value_mix[1] ve (modded-nanogpt's lambdas).
        self.value_mix = (nn.Parameter(torch.tensor([0.5, 0.5]))
                          if config.value_embed_table(layer) is not None else None)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, eps=1e-6)
            self.k_norm = RMSNorm(config.head_dim, eps=1e-6)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def qkv(self, x, pos, ve=None):
        """Queries, keys and values of x (B, T, C) at positions pos (T,), RoPE applied:
        q (B, nh, T, hd), k and v (B, nkv, T, hd), of one projection. ve: this layer's
        value embeddings (B, T, nkv * hd), mixed into v, or None."""
        B, T, C = x.size()  # batch, time, channels (n_embd)
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.c_attn(x)  # (B, T, (nh + 2 nkv) hd)
        dtype = qkv.dtype  # the dtype attention() computes in: under CPU autocast, its choice
        if dtype in (torch.bfloat16, torch.float16) and qkv.is_cpu and \
                torch.is_autocast_enabled("cpu"):
            dtype = cpu_autocast_dtype(dtype, self.backend)
        norm = isinstance(self.q_norm, RMSNorm)
        if (self.rotary is not None and self.backend in (None, "ext")
                and qk_rope.available(qkv, dtype, self.q_norm.weight if norm else None)):
            # The cast, split and qk_normed_rotated in one compiled pass (attention.qk_rope).
            gains = (self.q_norm.weight, self.k_norm.weight) if norm else (None, None)
            q, k, v = qk_rope.qkv_norm_rope(qkv, nh, nkv, *gains, *self.rotary.cos_sin(pos),
                                            self.q_norm.eps if norm else 0.0, norm, dtype)
        else:
            qkv = qkv.to(dtype)
            q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=2)
            q, k = self.qk_normed_rotated(q.view(B, T, nh, hd), k.view(B, T, nkv, hd), pos)
        if ve is not None:  # value embeddings: v = a v + b ve
            v = v.flatten(2) * self.value_mix[0] + (ve * self.value_mix[1]).to(v.dtype)
        q = q.transpose(1, 2)  # (B, nh, T, hd)
        k = k.transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        return q, k, v

    def qk_normed_rotated(self, q, k, pos):
        """QK-norm, then RoPE (each if any) of q (B, T, nh, hd), k (B, T, nkv, hd) at pos."""
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q, pos), self.rotary(k, pos)
        return q, k

    def forward(self, x, pos, kv_cache: Optional[KVCache] = None, layer: int = 0, ve=None):
        """x (B, T, C), pos (T,) int64; kv_cache the model's (layer: this block's index in it);
        ve (B, T, nkv * hd) value embeddings or None. Returns (B, T, C)."""
        B, T, C = x.size()
        q, k, v = self.qkv(x, pos, ve)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nkv, Tk, hd), Tk = cached + T
        y = attention(q, k, v, causal=True, alibi_slopes=self.alibi_slopes, window=self.window,
                      backend=self.backend)  # (B, nh, T, hd)
        if self.gate is not None:  # attn_gate: head h times 2 sigmoid(x . w_h), in (0, 2)
            y = y * (2 * torch.sigmoid(self.gate(x))).transpose(1, 2).unsqueeze(-1).to(y.dtype)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh * hd)
        return self.resid_dropout(self.c_proj(y))


class ReLU2(nn.Module):
    """relu(x)^2 (So et al. 2021, "Primer", sec. 3)."""

    def forward(self, x):
        return F.relu(x).square()


# One module class per GPTConfig.activation, called with no argument.
ACTIVATIONS = {
    "gelu": nn.GELU,  # x Phi(x), exact (erf); Hendrycks & Gimpel 2016
    "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"),  # GPT-2's tanh approximation
    "silu": nn.SiLU,  # x sigmoid(x) (Swish-1): Llama's, inside a GLU
    "relu2": ReLU2,
}
assert tuple(ACTIVATIONS) == typing.get_args(Activation), "one module per config.Activation"


class MLP(nn.Module):
    """"standard": c_proj(act(c_fc(x))). "glu": c_fc makes the gate g and the value u side by
    side, then c_proj(act(g) * u) (Shazeer 2020, eq. 6; "silu" makes it Llama's SwiGLU).
    Hidden width config.intermediate_size; (B, T, n_embd) -> (B, T, n_embd)."""

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
        h = self.act(gate) * up if self.glu else self.act(h)
        return self.dropout(self.c_proj(h))


def make_norm(config: GPTConfig) -> nn.Module:
    """LayerNorm (Ba et al. 2016; a bias if config.norm_bias) or RMSNorm over n_embd."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.norm_bias)


class Block(nn.Module):
    """One pre-norm transformer block (GPT-2's order): x + attn(ln_1(x)), then + mlp(ln_2(x)).
    Holds ln_1, attn (CausalSelfAttention), ln_2, mlp (MLP); (B, T, C) -> (B, T, C)."""

    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, pos, kv_cache=None, layer=0, ve=None):
        x = x + self.attn(self.ln_1(x), pos, kv_cache, layer, ve)
        return x + self.mlp(self.ln_2(x))


def check_input(idx, config: GPTConfig, kv_cache: Optional[KVCache] = None, targets=None) -> None:
    """Raise ValueError unless idx is (B, T) int64 ids in [0, vocab_size), 1 <= T <= block_size
    (and T fits the cache), and targets None or like idx, ids in [0, vocab_size) or -1 (on a
    GPU an id out of range would be a device-side assert, fatal to the process): up front."""
    what = lambda x: f"{getattr(x, 'dtype', type(x))} of shape {tuple(getattr(x, 'shape', ()))}"
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
        raise ValueError(f"GPT: idx must be a (B, T) int64 tensor, got {what(idx)}")
    if targets is not None and what(targets) != what(idx):
        raise ValueError(f"GPT: targets must be {what(idx)}, as idx, got {what(targets)}")
    T, V = idx.shape[1], config.vocab_size
    if T == 0 or T > config.block_size:
        raise ValueError(f"GPT: sequence length T={T} must be in [1, block_size="
                         f"{config.block_size}] (GPT.with_block_size copies for longer contexts)")
    if kv_cache is not None:
        kv_cache.check_room(T)
    # Skipped while torch.compile traces, where it would be a data-dependent branch.
    if idx.numel() and idx.device.type != "meta" and not torch.compiler.is_compiling():
        checks = [("idx", idx, 0)] + ([("targets", targets, -1)] if targets is not None else [])
        ranges = torch.stack([m for _, x, _ in checks for m in torch.aminmax(x)]).tolist()
        for (name, _, least), lo, hi in zip(checks, ranges[::2], ranges[1::2]):  # one sync
            if lo < least or hi >= V:
                raise ValueError(f"GPT: {name} holds token id {hi if hi >= V else lo}, outside the"
                                 f" vocabulary [0, vocab_size={V})" + " (or -1)" * (least < 0))


def init_weights(model: "GPT") -> None:
    """GPT-2's initialisation: weights N(0, 0.02), biases 0, and the residual projections
    N(0, 0.02 / sqrt(2 n_layer)) so that the stream's variance does not grow with depth;
    zero_init_proj starts every block as the identity (and an untied head at zero)."""
    config = model.config
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)
    for name, p in model.named_parameters():
        if name.endswith("attn.gate.weight"):  # attn_gate: every gate starts at 1
            torch.nn.init.zeros_(p)
        if name.endswith("c_proj.weight"):
            if config.zero_init_proj:
                torch.nn.init.zeros_(p)
            else:
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
    if config.zero_init_proj and not config.tie_embeddings:
        torch.nn.init.zeros_(model.lm_head.weight)


class GPT(nn.Module):
    """The language model (GPT-2's, Radford et al. 2019, with the options of GPTConfig).

    Holds transformer.wte (vocab_size x n_embd token embeddings), transformer.wpe (block_size x
    n_embd, with pos_embedding "learned" only), transformer.h (n_layer Blocks),
    transformer.ln_f (the final norm) and lm_head (n_embd -> vocab_size, no bias; the same
    weight as wte with tie_embeddings). forward maps (B, T) token ids to (B, T, vocab_size)
    logits. Generation, loading and analysis live beside it (minigpt.generation,
    minigpt.hf.pretrained, minigpt.analysis.maps); the methods below delegate to them.
    """

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
        if config.value_embeds:  # tables of n_kv_head * head_dim values per token
            self.transformer.ve = nn.ModuleList(nn.Embedding(
                config.vocab_size, config.n_kv_head * config.head_dim) for _ in
                range(config.value_embeds))
        if config.unet_skips:  # one weight per skip, from block i to block n_layer - 1 - i
            self.skip_weights = nn.Parameter(torch.ones(config.n_layer // 2))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # weight tying (Press & Wolf 2017)
            self.transformer.wte.weight = self.lm_head.weight
        init_weights(self)

    @classmethod
    def from_checkpoint(cls, state: dict) -> "GPT":
        """The model of a checkpoint (minigpt.load_checkpoint), on the CPU."""
        model = cls(GPTConfig.from_dict(state["model_config"]))
        model.load_state_dict(state["model"])
        return model

    @classmethod
    def from_pretrained(cls, path_or_name: str, *, block_size: Optional[int] = None,
                        dtype: torch.dtype = torch.float32) -> "GPT":
        """A Hugging Face GPT-2 or Llama-architecture model (a directory or a hub name), on the
        CPU, its context cut to block_size (default: the model's own), its parameters in dtype.
        The matching tokenizer: minigpt.hf.pretrained.load_tokenizer(path_or_name).

        Raises:
            minigpt.hf.pretrained.PretrainedError: no such model, offline without a local copy,
                unreadable files, or a feature minigpt does not have (named).
        """
        from minigpt.hf.pretrained import pretrained_state

        state = pretrained_state(path_or_name, block_size=block_size, dtype=dtype, tokenizer=False)
        with torch.device("meta"):  # no random init of weights about to be replaced
            model = cls(GPTConfig.from_dict(state["model_config"]))
        model.load_state_dict(state["model"], assign=True)
        if model.config.tie_embeddings:
            model.transformer.wte.weight = model.lm_head.weight
        return model.to(dtype)

    def num_params(self) -> int:
        """Number of parameters (a tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def embed(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Token embeddings of idx (B, T) plus the absolute encodings of positions pos (T,),
        if any: (B, T, C). With sinusoids the token embeddings are scaled by sqrt(n_embd), as
        Vaswani et al. 2017 do (sec. 3.4)."""
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.pos_embedding == "learned":
            x = x + self.transformer.wpe(pos)  # (T, C) broadcast over the batch
        elif self.config.pos_embedding == "sinusoidal":
            pe = sinusoidal_encoding(pos, self.config.n_embd).to(x.dtype)  # (T, C)
            x = x * math.sqrt(self.config.n_embd) + pe
        return self.transformer.drop(x)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None):
        """Logits for every position, and the mean cross-entropy loss if targets are given.

        Args:
            idx: (B, T) int64 token ids, 1 <= T <= block_size (with kv_cache: the new tokens).
            targets: (B, T) int64 next-token ids, or None; ids of -1 are left out of the loss.
            kv_cache: a KVCache for incremental decoding.

        Returns:
            (logits (B, T, vocab_size) float, or (B, 1, vocab_size) with a last_logits_only
            cache; loss, a scalar tensor, or None).

        Raises:
            ValueError: idx out of shape or range, targets not of idx's shape (check_input).
        """
        check_input(idx, self.config, kv_cache, targets)
        B, T = idx.size()
        start = 0 if kv_cache is None else kv_cache.length
        pos = torch.arange(start, start + T, device=idx.device)  # (T,) int64
        x = self.embed(idx, pos)  # (B, T, C)
        cfg, skips = self.config, []  # U-net skips: the first half's outputs, in reverse order
        ves = [ve(idx) for ve in self.transformer.ve] if cfg.value_embeds else []  # (B, T, nkv hd)
        for layer, block in enumerate(self.transformer.h):
            if cfg.unet_skips and layer >= cfg.n_layer - cfg.n_layer // 2:
                x = x + self.skip_weights[layer - (cfg.n_layer - cfg.n_layer // 2)] * skips.pop()
            table = cfg.value_embed_table(layer)  # this layer's value embeddings, or None
            x = block(x, pos, kv_cache, layer, None if table is None else ves[table])
            if cfg.unet_skips and layer < cfg.n_layer // 2:
                skips.append(x)
        if kv_cache is not None:
            kv_cache.advance(T)
            if kv_cache.last_logits_only:
                x = x[:, -1:]  # (B, 1, C)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        if cfg.logit_softcap is not None:
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # not bf16
            logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k=None, top_p=None, generator=None, use_cache=True, callback=None,
                 stop_tokens=None) -> torch.Tensor:
        """Sample max_new_tokens tokens after the prompt idx (B, T): (B, T + n) int64 ids.
        The arguments are minigpt.generation.generate's."""
        from minigpt.generation import generate

        return generate(self, idx, max_new_tokens, temperature, top_k, top_p, generator,
                        use_cache, callback, stop_tokens)

    def with_block_size(self, block_size: int, generator=None) -> "GPT":
        """A copy of this model for contexts up to block_size (minigpt.positions)."""
        return with_block_size(self, block_size, generator)

    def attention_maps(self, idx: torch.Tensor) -> torch.Tensor:
        """(n_layer, n_head, T, T) attention probabilities: minigpt.analysis.maps."""
        from minigpt.analysis.maps import attention_maps

        return attention_maps(self, idx)

    def gated_heads(self, head_mask: torch.Tensor):
        """Context manager scaling each head's output by head_mask (n_layer, n_head):
        minigpt.analysis.maps.gated_heads."""
        from minigpt.analysis.maps import gated_heads

        return gated_heads(self, head_mask)
