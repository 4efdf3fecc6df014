"""Position encodings (GPTConfig.pos_embedding), sliding-window attention (GPTConfig.window)
and longer contexts (GPT.with_block_size)."""

import math
from typing import get_args

import pytest
import torch

from minigpt.config import ConfigError, PosEmbedding
from minigpt.model import GPT, GPTConfig, KVCache
from minigpt.positions import alibi_slopes, sinusoidal_encoding
from minigpt.train.config import TrainConfig
from minigpt.train.optim import build_optimizer

ENCODINGS = get_args(PosEmbedding)
EXTRAPOLATING = ("rope", "sinusoidal", "alibi", "none")


def tiny(**kw):
    cfg = dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    cfg.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**cfg)).eval()


def paper_slopes(n):
    """Press et al.'s get_slopes (github.com/ofirpress/attention_with_linear_biases), as
    published."""
    def get_slopes_power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        ratio = start
        return [start * ratio ** i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (get_slopes_power_of_2(closest_power_of_2)
            + paper_slopes(2 * closest_power_of_2)[0::2][:n - closest_power_of_2])


@pytest.mark.parametrize("pos_embedding", ENCODINGS)
def test_each_encoding_learns(pos_embedding):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=32,
                          pos_embedding=pos_embedding, window=8 if pos_embedding == "alibi"
                          else None))
    opt = build_optimizer(model, TrainConfig(optimizer="adamw", weight_decay=0.0,
                                             learning_rate=3e-3, beta2=0.99), "cpu")
    x = torch.randint(20, (4, 16), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    losses = []
    for _ in range(40):
        _, loss = model(x, y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 1.0, losses


def test_alibi_slopes_are_the_papers():
    assert alibi_slopes(8).tolist() == [2.0 ** -h for h in range(1, 9)]
    # 6 heads: the 4-head sequence, then every other slope of the 8-head one.
    assert alibi_slopes(6).tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8,
                                        2.0 ** -1, 2.0 ** -3]
    for n in (1, 2, 3, 5, 6, 8, 12, 16, 20):
        s = alibi_slopes(n)
        assert s.shape == (n,) and s.dtype == torch.float32
        torch.testing.assert_close(s, torch.tensor(paper_slopes(n), dtype=torch.float32),
                                   atol=0, rtol=1e-7)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="n_head"):
            alibi_slopes(bad)


def test_sinusoidal_values_are_the_formula():
    pos = torch.tensor([0, 1, 7, 100, 5000])
    for dim in (32, 7):
        pe = sinusoidal_encoding(pos, dim)
        assert pe.shape == (5, dim)
        for r, p in enumerate(pos.tolist()):
            for c in range(dim):
                angle = p / 10000 ** (2 * (c // 2) / dim)
                want = math.sin(angle) if c % 2 == 0 else math.cos(angle)
                assert pe[r, c].item() == pytest.approx(want, abs=1e-12)
    # The model adds it to the token embeddings scaled by sqrt(n_embd) (Vaswani sec. 3.4).
    model = tiny(pos_embedding="sinusoidal").double()
    idx = torch.randint(50, (2, 9))
    pos = torch.arange(9)
    want = model.transformer.wte(idx) * math.sqrt(32) + sinusoidal_encoding(pos, 32)
    torch.testing.assert_close(model.embed(idx, pos), want, atol=0, rtol=0)
    assert not any("wpe" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("window", [None, 3])
def test_alibi_layer_equals_the_formula_by_hand(window):
    """One attention layer of an ALiBi model (GQA: 4 query heads on 2 key/value heads) against
    softmax_j(q_i . k_j / sqrt(d) - m_h (i - j)) v_j written out, j <= i (and i - j < window)."""
    model = tiny(pos_embedding="alibi", n_head=4, n_kv_head=2, window=window,
                 attn_backend="sdpa").double()
    attn = model.transformer.h[0].attn
    T, hd = 6, 8
    x = torch.randn(1, T, 32, dtype=torch.float64)
    pos = torch.arange(T)
    q, k, v = attn.qkv(x, pos)  # (1, 4, T, 8), (1, 2, T, 8), (1, 2, T, 8)
    m = alibi_slopes(4).double()
    y = torch.zeros(1, T, 4, hd, dtype=torch.float64)
    for h in range(4):
        g = h // 2  # the key/value head this query head reads
        for i in range(T):
            seen = [j for j in range(i + 1) if window is None or i - j < window]
            s = torch.stack([q[0, h, i] @ k[0, g, j] / math.sqrt(hd) - m[h] * (i - j)
                             for j in seen])
            p = torch.softmax(s, dim=0)
            y[0, i, h] = sum(p[n] * v[0, g, j] for n, j in enumerate(seen))
    want = attn.c_proj(y.reshape(1, T, 4 * hd))
    for backend in ("sdpa", "naive", None):
        attn.backend = backend
        torch.testing.assert_close(attn(x, pos), want, atol=1e-12, rtol=0)
    # The slopes are per query head: a model whose heads all share one key/value head keeps
    # n_head distinct slopes.
    assert torch.equal(tiny(pos_embedding="alibi", n_kv_head=1).transformer.h[1].attn
                       .alibi_slopes, alibi_slopes(4))


@pytest.mark.parametrize("pos_embedding, window", [("rope", 4), ("alibi", 4), ("alibi", None),
                                                   ("learned", 5), ("sinusoidal", 3),
                                                   ("none", 1)])
def test_window_and_alibi_decode_with_the_cache_as_without(pos_embedding, window):
    model = tiny(pos_embedding=pos_embedding, window=window, attn_backend="naive").double()
    idx = torch.randint(50, (2, 16))
    cache = KVCache(model.config, batch_size=2)
    logits, _ = model(idx[:, :5], kv_cache=cache)
    torch.testing.assert_close(logits, model(idx[:, :5])[0], atol=1e-12, rtol=0)
    for t in range(5, 16):
        step, _ = model(idx[:, t:t + 1], kv_cache=cache)
        torch.testing.assert_close(step[:, -1], model(idx[:, :t + 1])[0][:, -1], atol=1e-12,
                                   rtol=0)
    model.config.attn_backend = None
    for block in model.transformer.h:
        block.attn.backend = None  # the default backend, in float32 as sample.py runs it
    model = model.float()
    prompt = idx[:1, :4]
    # 30 tokens > block_size 16: generate then refills the cache from the last 16 tokens.
    a = model.generate(prompt, 26, temperature=0.0, use_cache=True)
    b = model.generate(prompt, 26, temperature=0.0, use_cache=False)
    assert torch.equal(a, b)


def test_window_limits_what_each_token_sees():
    model = tiny(window=3, attn_backend="naive")
    idx = torch.randint(50, (1, 12))
    changed = idx.clone()
    changed[0, 0] = (changed[0, 0] + 1) % 50
    # Two layers of a 3-token window: position i depends on tokens i - 4 .. i.
    la, lb = model(idx)[0], model(changed)[0]
    assert not torch.allclose(la[0, 4], lb[0, 4])
    torch.testing.assert_close(la[0, 5:], lb[0, 5:], atol=0, rtol=0)
    maps = model.attention_maps(idx[0])  # (n_layer, n_head, T, T)
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    assert torch.all(maps[:, :, (j > i) | (i - j >= 3)] == 0)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 4, 12))


@pytest.mark.parametrize("pos_embedding", ENCODINGS)
def test_with_block_size_takes_longer_contexts(pos_embedding):
    model = tiny(pos_embedding=pos_embedding).double()
    long = model.with_block_size(64)
    assert long.config.block_size == 64 and model.config.block_size == 16
    idx = torch.randint(50, (2, 64))
    with pytest.raises(ValueError, match="with_block_size"):
        model(idx)
    logits, loss = long(idx, idx)
    assert logits.shape == (2, 64, 50) and torch.isfinite(loss)
    # Causal: the first 16 positions see what the short model saw, so their logits are its.
    torch.testing.assert_close(logits[:, :16], model(idx[:, :16])[0], atol=1e-12, rtol=0)
    assert long.generate(idx[:, :60], 8, temperature=0.0).shape == (2, 68)
    if pos_embedding == "learned":
        old, new = model.transformer.wpe.weight, long.transformer.wpe.weight
        assert new.shape == (64, 32) and torch.equal(new[:16], old)
        assert 0.015 < new[16:].std().item() < 0.025  # drawn as at initialisation, untrained
        again = model.with_block_size(64).transformer.wpe.weight
        assert torch.equal(again, new)  # the same rows each time (a seeded generator)
        assert torch.equal(model.with_block_size(8).transformer.wpe.weight, old[:8])
    else:
        assert long.state_dict().keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        model.with_block_size(0)


def test_bad_options_are_refused_by_name():
    base = dict(vocab_size=10, block_size=8, n_layer=1, n_head=4, n_embd=32)
    for window in (0, -3, 2.5, True, "4"):
        with pytest.raises(ConfigError,
                           match=r"GPTConfig\.window must be (a positive int|an int)"):
            GPTConfig(**base, window=window)
    with pytest.raises(ConfigError, match=r"GPTConfig\.pos_embedding must be one of rope, "
                                          r"learned, sinusoidal, alibi, none, got 'xpos'"):
        GPTConfig(**base, pos_embedding="xpos")
    # RoPE needs an even head_dim; the others do not.
    for pe in ("learned", "sinusoidal", "alibi", "none"):
        assert GPT(GPTConfig(**base, head_dim=9, pos_embedding=pe))(
            torch.zeros(1, 3, dtype=torch.long))[0].shape == (1, 3, 10)


def test_old_config_dicts_and_checkpoints_load_unchanged():
    old = dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=4, n_embd=32,
               dropout=0.0, bias=False, rope_theta=10000.0, attn_backend=None,
               pos_embedding="rope")
    cfg = GPTConfig.from_dict(old)
    assert cfg.window is None and cfg.pos_embedding == "rope"
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    # The ALiBi slopes are not weights: an ALiBi model's state dict is a NoPE model's.
    alibi, nope = tiny(pos_embedding="alibi", window=4), tiny(pos_embedding="none")
    assert alibi.state_dict().keys() == nope.state_dict().keys()
    back = GPT.from_checkpoint({"model": alibi.state_dict(),
                                "model_config": alibi.config.to_dict()}).eval()
    idx = torch.randint(50, (1, 10))
    assert torch.equal(back(idx)[0], alibi(idx)[0])


def test_train_command_line_reaches_the_options(capsys):
    from minigpt.cli.train import parse_config

    cfg = parse_config(["--pos-embedding", "alibi", "--window", "32"])
    assert (cfg.model.pos_embedding, cfg.model.window) == ("alibi", 32)
    assert parse_config([]).model.window is None
    with pytest.raises(SystemExit):
        parse_config(["--window", "0"])
    assert "argument --window: must be a positive int" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--pos-embedding", "xpos"])
    assert "argument --pos-embedding: invalid choice" in capsys.readouterr().err


def test_export_refuses_what_transformers_cannot_compute():
    from minigpt.hf.convert import PretrainedError, export_architecture

    gpt2 = dict(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=16, bias=True,
                pos_embedding="learned", activation="gelu_tanh")
    assert export_architecture(GPTConfig(**gpt2)) == "gpt2"
    with pytest.raises(PretrainedError, match=r"window=4 \(neither has sliding-window"):
        export_architecture(GPTConfig(**gpt2, window=4))
    for pe in ("sinusoidal", "alibi", "none"):
        with pytest.raises(PretrainedError, match=f"pos_embedding='{pe}'"):
            export_architecture(GPTConfig(**{**gpt2, "pos_embedding": pe}))
