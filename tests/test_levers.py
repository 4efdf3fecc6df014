"""The training levers: from the modded-nanogpt speedrun value embeddings, U-net skips, logit
soft-capping (GPTConfig), and the batch-size / sequence-length ramps (TrainConfig); gated
attention (GPTConfig.attn_gate)."""

import json
import math

import numpy as np
import pytest
import torch

from minigpt.hf.convert import export_architecture
from minigpt.hf.pretrained import PretrainedError
from minigpt.model import GPT, GPTConfig
from minigpt.train.config import TrainConfig, batch_shape
from minigpt.train.data import BatchSampler
from minigpt.train.optim import build_optimizer

BASE = dict(vocab_size=50, block_size=16, n_layer=4, n_head=4, n_embd=32, attn_backend="naive")


def build(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**BASE, **kw})).double().eval()


def shared_weights(src: GPT, dst: GPT) -> None:
    """Copy the parameters the two models share from src into dst."""
    theirs = src.state_dict()
    mine = dst.state_dict()
    common = {k: v for k, v in theirs.items() if k in mine}
    assert len(common) >= len(mine) - 6 and len(common) >= len(theirs) - 6
    dst.load_state_dict(common, strict=False)


def perturb(model: GPT, seed=1) -> None:
    """Random values for every parameter: a model right after init hides mistakes (zero-
    initialised scalars, identity mixes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def test_value_embeddings_mix_into_v_of_the_first_and_last_layers():
    cfg = GPTConfig(**BASE, value_embeds=1)
    assert [cfg.value_embed_table(i) for i in range(4)] == [0, None, None, 0]
    cfg = GPTConfig(**BASE, value_embeds=2)
    assert [cfg.value_embed_table(i) for i in range(4)] == [0, 1, 0, 1]
    model = build(value_embeds=2)
    assert len(model.transformer.ve) == 2 and model.transformer.ve[0].weight.shape == (50, 32)
    # With the mix at (1, 0) the values are the plain ones: the model equals one without tables.
    plain = build()
    perturb(plain)
    shared_weights(plain, model)
    idx = torch.randint(50, (3, 16))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.value_mix.copy_(torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(model(idx)[0], plain(idx)[0], rtol=0, atol=1e-12)
    # With (0, 1) layer 0's values are its table's rows of the tokens: attention output by hand.
    with torch.no_grad():
        model.transformer.h[0].attn.value_mix.copy_(torch.tensor([0.0, 1.0]))
    attn = model.transformer.h[0].attn
    x = model.transformer.h[0].ln_1(model.embed(idx, torch.arange(16)))
    ve = model.transformer.ve[0](idx)
    q, k, v = attn.qkv(x, torch.arange(16), ve)
    torch.testing.assert_close(v, ve.view(3, 16, 4, 8).transpose(1, 2), rtol=0, atol=0)
    assert not torch.allclose(model(idx)[0], plain(idx)[0])


def test_unet_skips_add_the_first_half_in_reverse_order():
    model = build(unet_skips=True)
    perturb(model)
    assert model.skip_weights.shape == (2,)
    idx = torch.randint(50, (2, 16))
    # By hand: outputs of blocks 0 and 1 come back before blocks 3 and 2.
    pos = torch.arange(16)
    h = model.transformer.h
    w = model.skip_weights
    x0 = h[0](model.embed(idx, pos), pos)
    x1 = h[1](x0, pos)
    x2 = h[2](x1 + w[0] * x1, pos)
    x3 = h[3](x2 + w[1] * x0, pos)
    expected = model.lm_head(model.transformer.ln_f(x3))
    torch.testing.assert_close(model(idx)[0], expected, rtol=0, atol=1e-12)
    # Zero weights give the plain model.
    plain = build()
    shared_weights(model, plain)
    with torch.no_grad():
        model.skip_weights.zero_()
    torch.testing.assert_close(model(idx)[0], plain(idx)[0], rtol=0, atol=1e-12)


def test_logit_softcap_bounds_the_logits():
    capped = build(logit_softcap=0.5)
    perturb(capped)
    plain = build()
    shared_weights(capped, plain)
    idx = torch.randint(50, (2, 16))
    raw = plain(idx)[0]
    assert raw.abs().max() > 1.0  # the cap is doing something
    logits, loss = capped(idx, idx)
    torch.testing.assert_close(logits, 0.5 * torch.tanh(raw / 0.5), rtol=0, atol=1e-12)
    assert logits.abs().max() < 0.5
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 50), idx.view(-1))
    torch.testing.assert_close(loss, expected)


def test_levers_get_gradients_and_the_right_optimizer():
    model = build(value_embeds=2, unet_skips=True, logit_softcap=3.0).float().train()
    idx = torch.randint(50, (4, 16))
    _, loss = model(idx, idx.roll(1, dims=1))
    loss.backward()
    names = dict(model.named_parameters())
    for name in ("transformer.ve.0.weight", "transformer.ve.1.weight", "skip_weights",
                 "transformer.h.0.attn.value_mix", "transformer.h.3.attn.value_mix"):
        assert names[name].grad is not None and names[name].grad.abs().sum() > 0, name
    opt = build_optimizer(model, TrainConfig(), "cpu")
    adamw, muon = opt.members
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    for name in ("transformer.ve.0.weight", "skip_weights", "transformer.h.0.attn.value_mix"):
        assert id(names[name]) not in muon_ids, name  # embeddings and scalars: AdamW


def test_attention_gates_scale_each_head_by_two_sigmoids_of_the_input():
    gated = build(attn_gate=True)
    plain = build()
    perturb(plain)
    shared_weights(plain, gated)
    idx = torch.randint(50, (3, 16))
    # Zero-initialised, every gate is 2 sigmoid(0) = 1: the model is the ungated one.
    assert all(not b.attn.gate.weight.any() for b in build(attn_gate=True).transformer.h)
    torch.testing.assert_close(gated(idx)[0], plain(idx)[0], rtol=0, atol=1e-12)
    # With random gates, one layer's output by hand: head h's output times 2 sigmoid(x . w_h).
    perturb(gated, seed=2)
    attn = gated.transformer.h[1].attn
    x = torch.randn(3, 16, 32, dtype=torch.float64)
    pos = torch.arange(16)
    q, k, v = attn.qkv(x, pos)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2)  # (B, T, nh, hd)
    g = 2 * torch.sigmoid(x @ attn.gate.weight.t())  # (B, T, nh)
    want = attn.c_proj((y * g.unsqueeze(-1)).reshape(3, 16, 32))
    torch.testing.assert_close(attn(x, pos), want, rtol=0, atol=1e-12)
    # The gates learn with AdamW without weight decay, as gains do, not with Muon.
    model = build(attn_gate=True).float().train()
    _, loss = model(idx, idx.roll(1, dims=1))
    loss.backward()
    gate = model.transformer.h[0].attn.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    adamw, muon = build_optimizer(model, TrainConfig(), "cpu").members
    assert all(id(gate) != id(p) for g in muon.param_groups for p in g["params"])
    assert [g["weight_decay"] for g in adamw.param_groups if any(p is gate for p in g["params"])] \
        == [0.0]


def test_param_count_includes_the_tables():
    model = build(value_embeds=2, unet_skips=True)
    assert model.num_params() == build().num_params() + 2 * 50 * 32 + 2 + 4 * 2  # tables, skips, mixes
    embed, _ = GPTConfig(**BASE, value_embeds=2).num_params_estimate()
    assert embed == 50 * 32 + 2 * 50 * 32


@pytest.mark.parametrize("kw, pattern", [
    (dict(value_embeds=3), r"value_embeds must be in \[0, n_layer // 2 = 2\]"),
    (dict(value_embeds=-1), "value_embeds"),
    (dict(logit_softcap=0.0), "logit_softcap must be a positive number"),
    (dict(logit_softcap=float("inf")), "logit_softcap"),
    (dict(value_embeds=1, layer_heads=(4, 2, 4, 4)), "value_embeds must be 0 when layers"),
])
def test_lever_config_errors(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        GPTConfig(**{**BASE, **kw})


@pytest.mark.parametrize("kw, name", [(dict(value_embeds=1), "value_embeds"),
                                      (dict(unet_skips=True), "unet_skips"),
                                      (dict(logit_softcap=30.0), "logit_softcap"),
                                      (dict(attn_gate=True), "attn_gate")])
def test_export_names_the_lever_transformers_lacks(kw, name):
    cfg = GPTConfig(**{**BASE, "pos_embedding": "learned", **kw})
    with pytest.raises(PretrainedError, match=name):
        export_architecture(cfg)


def test_batch_shape_ramps_linearly_then_holds():
    cfg = TrainConfig(batch_size=32, batch_size_start=8, block_size_start=16, ramp_iters=100,
                      block_size=64, seq_warmup=None)
    assert batch_shape(0, cfg) == (8, 16)
    assert batch_shape(50, cfg) == (20, 40)
    assert batch_shape(100, cfg) == (32, 64)
    assert batch_shape(10_000, cfg) == (32, 64)
    shapes = [batch_shape(i, cfg) for i in range(101)]
    assert all(a <= b for a, b in zip(shapes, shapes[1:]))  # never shrinks
    no_warmup = dict(block_size=64, seq_warmup=None)
    assert batch_shape(0, TrainConfig(**no_warmup)) == (8, 64)  # no ramp by default
    assert batch_shape(0, TrainConfig(batch_size_start=4, **no_warmup)) == (8, 64)


def test_seq_warmup_stages_then_the_ramps():
    cfg = TrainConfig(seq_warmup=(8, 24, 100), seq_warmup_iters=5, seq_warmup_batch_scale=3,
                      batch_size=4, block_size=64)
    shapes = [batch_shape(i, cfg) for i in range(17)]
    assert shapes[:15] == [(12, 8)] * 5 + [(12, 24)] * 5 + [(12, 64)] * 5  # 100: at most 64
    assert shapes[15:] == [(4, 64)] * 2
    # At scale 1 the warmup keeps batch_size; the ramps count their steps from step 0.
    cfg = TrainConfig(seq_warmup=(16,), seq_warmup_iters=10, seq_warmup_batch_scale=1,
                      batch_size=8, batch_size_start=2, ramp_iters=20, block_size=64)
    assert batch_shape(9, cfg) == (8, 16) and batch_shape(10, cfg) == (5, 64)
    assert batch_shape(20, cfg) == (8, 64)
    for off in (dict(seq_warmup=None), dict(seq_warmup_iters=0)):
        assert batch_shape(0, TrainConfig(block_size=64, **off)) == (8, 64)
    default = TrainConfig()
    assert [batch_shape(i, default) for i in (0, 100, 200)] == [(24, 32), (24, 64), (8, 256)]
    assert batch_shape(0, TrainConfig(batch_size=1, seq_warmup_batch_scale=0.1)) == (1, 32)


@pytest.mark.parametrize("kw, pattern", [
    (dict(batch_size_start=0), "batch_size_start must be in"),
    (dict(batch_size_start=9), r"batch_size_start must be in \[1, batch_size=8\]"),
    (dict(block_size_start=65, block_size=64), r"block_size_start must be in \[1, block_size=64\]"),
    (dict(ramp_iters=-1), "ramp_iters must be >= 0"),
    (dict(seq_warmup=(32, 0)), "seq_warmup must be window lengths > 0"),
    (dict(seq_warmup=()), "seq_warmup must be window lengths > 0"),
    (dict(seq_warmup_iters=-1), "seq_warmup_iters must be >= 0"),
    (dict(seq_warmup_batch_scale=0), "seq_warmup_batch_scale must be > 0"),
])
def test_ramp_config_errors(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        TrainConfig(**kw)


def test_sampler_draws_the_asked_shape_from_the_corpus():
    tokens = np.random.default_rng(0).integers(0, 50, 1000).astype(np.uint16)
    sampler = BatchSampler(tokens, block_size=64, batch_size=8, seed=3)
    x, y = sampler.next("cpu", batch_size=3, block_size=10)
    assert x.shape == y.shape == (3, 10) and x.dtype == torch.int64
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    text = tokens.tolist()
    for row in x.tolist():  # each row is a window of the corpus
        assert any(text[s:s + 10] == row for s in range(len(text) - 10))
    assert sampler.next("cpu")[0].shape == (8, 64)
    assert sampler.next("cpu", block_size=500)[0].shape == (8, 64)  # at most block_size


def test_ramped_run_trains_and_resumes_exactly(tmp_path):
    from minigpt.train.loop import train

    text = tmp_path / "corpus.txt"
    text.write_text("".join(chr(97 + (i * 7 + i // 13) % 26) for i in range(20_000)))
    kw = dict(data=str(text), n_layer=2, n_head=2, n_embd=16, block_size=16, batch_size=8,
              batch_size_start=2, block_size_start=4, ramp_iters=6, eval_interval=4, eval_iters=2,
              progress=False, learning_rate=1e-2, dtype="float32", device="cpu",
              seq_warmup=(2, 8), seq_warmup_iters=3, seq_warmup_batch_scale=0.5)
    full = train(TrainConfig(out_dir=str(tmp_path / "full"), max_iters=8, **kw), log=lambda m: None)
    assert math.isfinite(full.final_val_loss) and full.final_val_loss < math.log(26)
    # Resume from step 4: the same weights at step 8 as the uninterrupted run.
    half = train(TrainConfig(out_dir=str(tmp_path / "half"), max_iters=4, **kw),
                 log=lambda m: None)
    assert half.iters == 4
    resumed = train(TrainConfig(out_dir=str(tmp_path / "half"), max_iters=8, resume=True, **kw),
                    log=lambda m: None)
    a = torch.load(full.checkpoint, weights_only=False)["model"]
    b = torch.load(resumed.checkpoint, weights_only=False)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_update_ema_is_the_moving_average():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**BASE)).float()
    ema = GPT(GPTConfig(**BASE)).float().requires_grad_(False)
    before = {n: p.clone() for n, p in ema.named_parameters()}
    from minigpt.train.loop import update_ema

    update_ema(ema, model, 0.9)
    for (name, e), m in zip(ema.named_parameters(), model.parameters()):
        torch.testing.assert_close(e, 0.9 * before[name] + 0.1 * m, rtol=1e-6, atol=1e-7)
    assert ema.transformer.wte.weight is ema.lm_head.weight  # the tie survives


def test_final_evaluation_reads_at_most_the_cap(tmp_path, monkeypatch):
    """On a validation split longer than WHOLE_SPLIT_MAX_TOKENS the final evaluation reads its
    first windows only, and its row and log line say so."""
    from minigpt.train import loop, whole_split

    monkeypatch.setattr(whole_split, "WHOLE_SPLIT_MAX_TOKENS", 500)
    text = tmp_path / "corpus.txt"
    text.write_text("".join(chr(97 + (i * 7 + i // 13) % 26) for i in range(20_000)))
    cfg = TrainConfig(data=str(text), n_layer=1, n_head=2, n_embd=16, block_size=16,
                      batch_size=8, max_iters=2, eval_interval=2, eval_iters=1, progress=False,
                      dtype="float32", device="cpu", out_dir=str(tmp_path / "run"))
    lines = []
    result = loop.train(cfg, log=lines.append)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    final = [r for r in rows if r.get("event") == "whole_split"]
    assert [(r["tokens"], r["whole"]) for r in final] == [(31 * 16, False)]
    assert any("the split's first 500 tokens (496 tokens, 31 windows of 16)" in m for m in lines)
    tokens = torch.tensor([ord(c) - 97 for c in text.read_text()][int(0.9 * 20_000):][:497])
    x, y = tokens[:496].view(31, 16), tokens[1:497].view(31, 16)
    with torch.no_grad():
        _, loss = GPT.from_checkpoint(torch.load(result.checkpoint, weights_only=False)).eval()(x, y)
    assert result.val_loss_whole_split == pytest.approx(loss.item(), abs=1e-5)


@pytest.mark.parametrize("decay", [0.0, 0.8])
def test_ema_run_saves_and_evaluates_the_average(tmp_path, decay):
    """With an EMA the checkpoint's "model" is the average (the weights evaluated) and
    "train_weights" the trained ones; without, "model" is the trained weights."""
    from minigpt.train.loop import mean_loss, train

    text = tmp_path / "corpus.txt"
    text.write_text("".join(chr(97 + (i * 7 + i // 13) % 26) for i in range(20_000)))
    cfg = TrainConfig(data=str(text), n_layer=2, n_head=2, n_embd=16, block_size=16,
                      batch_size=8, max_iters=6, eval_interval=3, eval_iters=2, progress=False,
                      learning_rate=1e-2, dtype="float32", device="cpu", ema_decay=decay,
                      out_dir=str(tmp_path / "run"))
    result = train(cfg, log=lambda m: None)
    state = torch.load(result.checkpoint, weights_only=False)
    # The final whole-split loss is the saved model's, over every 16-token window of the
    # validation split (1,999 tokens: 124 windows), each predicting from its own context.
    tokens = torch.tensor([ord(c) - 97 for c in text.read_text()][int(0.9 * 20_000):])
    n = (len(tokens) - 1) // 16
    x, y = tokens[:n * 16].view(n, 16), tokens[1:n * 16 + 1].view(n, 16)
    with torch.no_grad():
        logits, _ = GPT.from_checkpoint(state).eval()(x, y)
    whole = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    assert result.val_loss_whole_split == pytest.approx(whole.item(), abs=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["tokens"] for r in rows if r.get("event") == "whole_split"] == [n * 16]
    # The last row with a val_loss is the whole split's, so a reader of the last one reads it.
    last = [r for r in rows if "val_loss" in r][-1]
    assert last["event"] == "whole_split"
    assert last["val_loss"] == pytest.approx(whole.item(), abs=1e-5)
    if decay == 0:
        assert state["train_weights"] is None
        return
    trained, averaged = state["train_weights"], state["model"]
    assert any(not torch.equal(trained[k], averaged[k]) for k in trained)
    # The reported validation loss is the average's.
    model = GPT.from_checkpoint(state)
    sampler = BatchSampler(np.array([ord(c) - 97 for c in text.read_text()], dtype=np.uint16)
                           [int(0.9 * 20_000):], 16, 8, seed=cfg.seed + 1_000_003)
    batches = [sampler.next() for _ in range(2)]
    assert mean_loss(model, batches).item() == pytest.approx(result.final_val_loss, abs=1e-5)
