"""The model: shapes, RoPE, KV-cache decoding, learning, config errors."""

import pytest
import torch

from minigpt.model import GPT, GPTConfig, KVCache
from minigpt.positions import RotaryEmbedding
from minigpt.train.config import TrainConfig
from minigpt.train.optim import build_optimizer


def tiny(**kw):
    cfg = dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32, attn_backend="naive")
    cfg.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**cfg)).eval()


def test_shapes_and_loss():
    model = tiny()
    idx = torch.randint(50, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 50) and loss is None
    logits, loss = model(idx, torch.randint(50, (3, 16)))
    assert loss.dim() == 0
    # An untrained model predicts close to uniform: loss near ln(vocab_size) on random targets.
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.3


def test_weight_tying_and_param_count():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("kw, expected", [
    # The default preset shakespeare_char (0.8M, docs/training.md): V=65, C=128, 4 layers, 4 heads.
    # wte 65*128 (tied with lm_head); per layer ln_1 128, c_attn 128*384, c_proj 128*128,
    # ln_2 128, c_fc 128*512, mlp c_proj 512*128; ln_f 128.
    (dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128),
     65 * 128 + 4 * (128 + 128 * 384 + 128 * 128 + 128 + 2 * 128 * 512) + 128),
    # GQA shrinks c_attn to (4 + 2 * 1) heads of 8; biases add 128 + 4*32 + 6*8 + 32 + 32 per
    # layer (two LayerNorms, c_fc, c_attn, c_proj, mlp c_proj) and 32 for ln_f.
    (dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=1, n_embd=32, bias=True),
     50 * 32 + 2 * (2 * 32 + 32 * 48 + 32 * 32 + 2 * 32 * 128) + 2 * (2 * 32 + 128 + 48 + 32 + 32)
     + 2 * 32),
])
def test_num_params_by_hand(kw, expected):
    assert GPT(GPTConfig(**kw)).num_params() == expected


def test_gqa_projection_sizes():
    model = tiny(n_head=4, n_kv_head=2)
    hd = 32 // 4
    assert model.transformer.h[0].attn.c_attn.out_features == (4 + 2 * 2) * hd
    logits, _ = model(torch.randint(50, (2, 10)))
    assert logits.shape == (2, 10, 50)


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(16, 10000.0)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)

    def score(m, n):
        qm = rope(q, torch.tensor([m]))
        kn = rope(k, torch.tensor([n]))
        return (qm * kn).sum().item()

    for m, n, shift in [(5, 2, 7), (0, 0, 100), (40, 3, 1000)]:
        assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-10)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-6)  # but it does depend on m - n
    # A rotation: norms are preserved.
    assert rope(q, torch.tensor([9])).norm().item() == pytest.approx(q.norm().item(), rel=1e-12)


def test_model_is_position_aware():
    model = tiny()
    idx = torch.tensor([[1, 2, 3, 4]])
    swapped = torch.tensor([[2, 1, 3, 4]])
    la, _ = model(idx)
    lb, _ = model(swapped)
    assert not torch.allclose(la[0, -1], lb[0, -1])


def test_causality_future_tokens_do_not_change_past_logits():
    model = tiny()
    idx = torch.randint(50, (1, 12))
    idx2 = idx.clone()
    idx2[0, 8:] = (idx2[0, 8:] + 1) % 50
    la, _ = model(idx)
    lb, _ = model(idx2)
    torch.testing.assert_close(la[:, :8], lb[:, :8])


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_kv_cache_logits_equal_full_recompute(n_kv_head):
    model = tiny(n_kv_head=n_kv_head).double()
    idx = torch.randint(50, (2, 16))
    cache = KVCache(model.config, batch_size=2)
    prompt = 5
    logits, _ = model(idx[:, :prompt], kv_cache=cache)
    torch.testing.assert_close(logits, model(idx[:, :prompt])[0], atol=1e-12, rtol=0)
    for t in range(prompt, idx.shape[1]):
        step_logits, _ = model(idx[:, t:t + 1], kv_cache=cache)
        full_logits, _ = model(idx[:, :t + 1])
        torch.testing.assert_close(step_logits[:, -1], full_logits[:, -1], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="exceed block_size"):
        model(idx[:, :1], kv_cache=cache)


def test_generate_with_and_without_cache_agree():
    model = tiny().double()
    prompt = torch.randint(50, (2, 4))
    # 29 tokens > block_size 16: past it, the context is the last block_size tokens.
    a = model.generate(prompt, 25, temperature=0.0, use_cache=True)
    b = model.generate(prompt, 25, temperature=0.0, use_cache=False)
    assert a.shape == (2, 29)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", [None, "sdpa", "naive"], ids=["default", "sdpa", "naive"])
def test_generate_with_and_without_cache_agree_float32_sampled(backend):
    """What sample.py does: float32, temperature / top-k / top-p sampling from a seeded
    generator; --no-cache gives the same tokens as the KV cache."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=2,
                          n_embd=32, attn_backend=backend)).eval()
    prompt = torch.randint(50, (1, 5), generator=torch.Generator().manual_seed(1))
    for seed in range(4):
        runs = [model.generate(prompt, 30, temperature=0.9, top_k=20, top_p=0.95,
                               generator=torch.Generator().manual_seed(seed), use_cache=c)
                for c in (True, False)]
        assert runs[0].shape == (1, 35) and torch.equal(runs[0], runs[1]), seed


def test_generate_same_seed_same_tokens():
    model = tiny()
    prompt = torch.randint(50, (1, 3))
    runs = [model.generate(prompt, 20, temperature=1.0, top_k=10,
                           generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = model.generate(prompt, 20, temperature=1.0, top_k=10,
                           generator=torch.Generator().manual_seed(8))
    assert not torch.equal(runs[0], other)


def test_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=32,
                          attn_backend="sdpa"))
    opt = build_optimizer(model, TrainConfig(optimizer="adamw", weight_decay=0.0,
                                             learning_rate=3e-3, beta2=0.99), "cpu")
    x = torch.randint(20, (4, 16))
    y = torch.randint(20, (4, 16))
    first = None
    for _ in range(150):
        _, loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 2.5 and loss.item() < 0.1


def test_backends_give_the_same_model_output():
    torch.manual_seed(0)
    cfg = dict(vocab_size=30, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    naive = GPT(GPTConfig(**cfg, attn_backend="naive")).double()
    sdpa = GPT(GPTConfig(**cfg, attn_backend="sdpa")).double()
    sdpa.load_state_dict(naive.state_dict())
    idx = torch.randint(30, (2, 16))
    torch.testing.assert_close(naive(idx, idx)[1], sdpa(idx, idx)[1], atol=1e-12, rtol=0)


def test_weight_decay_groups():
    model = tiny(bias=True)
    cfg = TrainConfig(optimizer="adamw", weight_decay=0.1, learning_rate=1e-3, beta2=0.95)
    decay, no_decay = build_optimizer(model, cfg, "cpu").members[0].param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["params"]


@pytest.mark.parametrize("kw, pattern", [
    (dict(n_embd=30, n_head=4), "divisible"),
    (dict(n_embd=36, n_head=4), "even"),
    (dict(n_head=4, n_kv_head=3), "multiple"),
    (dict(block_size=0), "block_size"),
    (dict(dropout=1.0), "dropout"),
])
def test_config_errors(kw, pattern):
    base = dict(vocab_size=10, block_size=8, n_layer=1, n_head=4, n_embd=32)
    base.update(kw)
    with pytest.raises(ValueError, match=pattern):
        GPTConfig(**base)


def test_forward_input_errors():
    model = tiny()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.randint(50, (1, 17)))
    with pytest.raises(ValueError, match="int64"):
        model(torch.rand(1, 4))


# --- options for pretrained architectures (GPT-2, Llama): off by default ----------------------

LLAMA_LIKE = dict(pos_embedding="rope", norm="rmsnorm", norm_eps=1e-6, mlp="glu",
                  activation="silu", intermediate_size=44, n_kv_head=2, head_dim=10,
                  tie_embeddings=False)
GPT2_LIKE = dict(pos_embedding="learned", activation="gelu_tanh", bias=True, norm_eps=1e-4)


@pytest.mark.parametrize("options", [
    LLAMA_LIKE, GPT2_LIKE, dict(mlp="glu", activation="gelu"),
    dict(attn_bias=True, mlp_bias=False, norm_bias=False), dict(value_embeds=2, n_layer=4),
    dict(unet_skips=True, n_layer=4), dict(logit_softcap=3.0),
    dict(value_embeds=1, unet_skips=True, logit_softcap=3.0, n_layer=4), dict(attn_gate=True)],
    ids=["llama-like", "gpt2-like", "geglu", "attn-bias-only", "value_embeds", "unet", "softcap",
         "levers", "attn_gate"])
def test_model_options_decode_with_the_cache_as_without(options):
    """Learned positions must follow the cache's offset; every option runs through attention.
    Parameters are random (an initialised model hides mistakes: zero-initialised tables and
    scalars, identity mixes)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32,
                                    attn_backend="naive"), **options})).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    idx = torch.randint(50, (2, 12))
    cache = KVCache(model.config, 2)
    model(idx[:, :5], kv_cache=cache)
    for t in range(5, 12):
        step, _ = model(idx[:, t:t + 1], kv_cache=cache)
        torch.testing.assert_close(step[:, -1], model(idx[:, :t + 1])[0][:, -1], atol=1e-12,
                                   rtol=0)


@pytest.mark.parametrize("options, expected", [
    # V=50, C=32, 2 layers, 4 heads of 10 (q 40, k and v 2 x 20), SwiGLU of 44, untied head,
    # RMSNorm gains only: wte + head 2*50*32; per layer 2*32 + c_attn 32*80 + c_proj 40*32
    # + c_fc 32*88 + c_proj 44*32; ln_f 32.
    (LLAMA_LIKE, 2 * 50 * 32 + 2 * (2 * 32 + 32 * 80 + 40 * 32 + 32 * 88 + 44 * 32) + 32),
    # learned positions 16*32; biases everywhere: LayerNorms 2*2*32, c_attn 96, c_proj 32,
    # c_fc 128, mlp c_proj 32; tied head.
    (GPT2_LIKE, 50 * 32 + 16 * 32 + 2 * (4 * 32 + 32 * 96 + 32 * 32 + 2 * 32 * 128
                                         + 96 + 32 + 128 + 32) + 2 * 32),
])
def test_model_options_param_counts_by_hand(options, expected):
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32,
                          **options))
    assert model.num_params() == expected


def test_old_config_dicts_still_load():
    """A checkpoint's model_config from before the per-kind biases: "bias" sets all three."""
    old = dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=4, n_embd=32,
               dropout=0.0, bias=True, rope_theta=10000.0, attn_backend=None)
    cfg = GPTConfig.from_dict(old)
    assert (cfg.attn_bias, cfg.mlp_bias, cfg.norm_bias) == (True, True, True)
    assert (cfg.pos_embedding, cfg.norm, cfg.mlp, cfg.head_dim, cfg.intermediate_size) == \
        ("rope", "layernorm", "standard", 8, 128)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg


def test_activations_are_the_named_functions():
    from typing import get_args

    from minigpt.config import Activation
    from minigpt.model import ACTIVATIONS

    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    gelu_new = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)))
    torch.testing.assert_close(ACTIVATIONS["gelu_tanh"]()(x), gelu_new)
    torch.testing.assert_close(ACTIVATIONS["silu"]()(x), x * torch.sigmoid(x))
    assert tuple(ACTIVATIONS) == get_args(Activation)


@pytest.mark.parametrize("kw, pattern", [
    (dict(norm="rmsnorm", norm_bias=True), "RMSNorm has no bias"),
    (dict(pos_embedding="xpos"), "pos_embedding"),
    (dict(head_dim=9), "even for RoPE"),
    (dict(mlp="moe"), "mlp"),
    (dict(norm_eps=0.0), "norm_eps"),
])
def test_option_errors(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=4, n_embd=32, **kw)
    assert GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=4, n_embd=32, head_dim=9,
                     pos_embedding="learned").head_dim == 9


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rope_complex_form_matches_the_real_form(dtype):
    # forward() multiplies complex pairs; rotate_real (MPS's path) is the textbook real form
    # (Su et al. 2021, eq. 34). Same values, and gradients through both.
    g = torch.Generator().manual_seed(11)
    rope = RotaryEmbedding(32, 10000.0)
    pos = torch.arange(1000, 1000 + 9)
    x = torch.randn(2, 9, 3, 32, generator=g, dtype=torch.float64)
    angles = pos.double()[:, None] * 10000.0 ** (-torch.arange(0, 32, 2).double() / 32)
    want = RotaryEmbedding.rotate_real(x, angles)  # float64 reference
    xd = x.to(dtype).requires_grad_()
    got = rope(xd, pos)
    assert got.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=0)
    w = torch.randn(got.shape, generator=g, dtype=torch.float64)
    (got.double() * w).sum().backward()
    # the rotation is orthogonal: the gradient is w rotated back by -angles
    back = RotaryEmbedding.rotate_real(w, -angles)
    torch.testing.assert_close(xd.grad.double(), back, atol=tol, rtol=0)
