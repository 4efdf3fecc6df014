"""Training options of issue "train faster": the Muon/AdamW split, configs saved before an
option existed, and the model options QK-norm, ReLU^2, untied and zero-initialised layers."""

import math

import pytest
import torch
import torch.nn.functional as F

from minigpt.config import ConfigError, GPTConfig
from minigpt.train.config import TrainConfig
from minigpt.model import GPT
from minigpt.train.optim import Muon, Optimizers, build_optimizer


def tiny_model(**kw):
    cfg = dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32, attn_backend="naive")
    cfg.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**cfg))


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = tiny_model(qk_norm=True, tie_embeddings=False, bias=True)
    opt = build_optimizer(model, TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr_scale=20.0),
                          "cpu")
    adamw, muon = opt.members
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_muon == {n for n, p in model.named_parameters()
                       if p.dim() == 2 and n.startswith("transformer.h.")}
    assert in_muon | in_adamw == set(names.values()) and not in_muon & in_adamw
    assert "lm_head.weight" in in_adamw and "transformer.wte.weight" in in_adamw
    # One schedule drives both: Muon's rate is muon_lr_scale times AdamW's.
    opt.set_lr(1e-3)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.02)
    assert all(g["lr"] == pytest.approx(1e-3) for g in adamw.param_groups)
    opt.set_lr(1e-4)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.002)


def test_adamw_alone_keeps_a_plain_state_dict_and_a_mismatch_is_refused():
    model = tiny_model()
    adamw = build_optimizer(model, TrainConfig(optimizer="adamw"), "cpu")
    assert len(adamw.members) == 1 and "state" in adamw.state_dict()
    muon = build_optimizer(model, TrainConfig(optimizer="muon"), "cpu")
    assert set(muon.state_dict()) == {"members"}
    with pytest.raises(ValueError, match="holds 1 optimizer"):
        muon.load_state_dict(adamw.state_dict())


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_each_optimizer_fits_a_batch(optimizer):
    model = tiny_model(qk_norm=True)
    cfg = TrainConfig(optimizer=optimizer, learning_rate=3e-3)
    opt = build_optimizer(model, cfg, "cpu")
    opt.set_lr(cfg.learning_rate)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(50, (4, 16), generator=g), torch.randint(50, (4, 16), generator=g)
    first = None
    for _ in range(60):
        _, loss = model(x, y)
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.5 * first


def test_a_saved_config_without_the_new_settings_means_what_it_meant():
    """A checkpoint saved before optimizer/lr_schedule/qk_norm existed trained with AdamW, the
    cosine schedule and no QK-norm; resuming it must not switch to today's defaults."""
    today = TrainConfig()
    assert (today.optimizer, today.lr_schedule, today.model.qk_norm) == ("muon", "wsd", True)
    saved = today.to_dict()
    for key in ("optimizer", "lr_schedule", "cooldown_frac", "max_time", "muon_lr_scale",
                "muon_momentum", "muon_weight_decay"):
        saved.pop(key)
    saved["model"].pop("qk_norm")
    old = TrainConfig.from_saved(saved)
    assert (old.optimizer, old.lr_schedule, old.model.qk_norm) == ("adamw", "cosine", False)
    flat = {k: v for k, v in saved.items() if k != "model"}
    flat.update({k: v for k, v in saved["model"].items()})
    assert TrainConfig.from_saved(flat) == old
    assert TrainConfig.from_saved(today.to_dict()) == today  # a new config reads back as is


@pytest.mark.parametrize("kw, name", [
    (dict(optimizer="sgd"), "optimizer"), (dict(lr_schedule="step"), "lr_schedule"),
    (dict(cooldown_frac=0.0), "cooldown_frac"), (dict(muon_lr_scale=0.0), "muon_lr_scale"),
    (dict(muon_momentum=1.0), "muon_momentum"), (dict(max_time=-1.0), "max_time"),
    (dict(activation="tanh"), "activation"), (dict(qk_norm=1), "qk_norm"),
])
def test_new_settings_are_checked(kw, name):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**kw)
    assert info.value.name == name


def test_qk_norm_normalises_each_query_and_key_head_before_rope():
    model = tiny_model(qk_norm=True, n_kv_head=2)
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, 32)
    pos = torch.arange(7)
    q, k, v = attn.qkv(x, pos)
    nh, nkv, hd = 4, 2, 8
    q0, k0, v0 = attn.c_attn(x).split([nh * hd, nkv * hd, nkv * hd], dim=2)
    rms = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    want_q = attn.rotary(rms(q0.view(2, 7, nh, hd), attn.q_norm.weight), pos).transpose(1, 2)
    want_k = attn.rotary(rms(k0.view(2, 7, nkv, hd), attn.k_norm.weight), pos).transpose(1, 2)
    torch.testing.assert_close(q, want_q)
    torch.testing.assert_close(k, want_k)
    torch.testing.assert_close(v, v0.view(2, 7, nkv, hd).transpose(1, 2))
    # The probabilities the analysis shows come from the same normalised queries and keys.
    idx = torch.randint(50, (1, 9))
    maps = model.attention_maps(idx)
    assert maps.shape == (2, 4, 9, 9)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 4, 9))


def test_relu2_untied_and_zero_init():
    model = tiny_model(activation="relu2", tie_embeddings=False, zero_init_proj=True)
    x = torch.randn(3, 5, 32)
    mlp = model.transformer.h[0].mlp
    torch.nn.init.normal_(mlp.c_proj.weight)
    torch.testing.assert_close(mlp(x), mlp.c_proj(F.relu(mlp.c_fc(x)) ** 2))
    fresh = tiny_model(activation="relu2", tie_embeddings=False, zero_init_proj=True)
    assert fresh.lm_head.weight is not fresh.transformer.wte.weight
    assert not fresh.lm_head.weight.any()
    for name, p in fresh.named_parameters():
        if name.endswith("c_proj.weight"):
            assert not p.any(), name
    # Every block starts as the identity and the head predicts uniformly.
    logits, loss = fresh(torch.randint(50, (2, 8)), torch.randint(50, (2, 8)))
    assert not logits.any() and loss.item() == pytest.approx(math.log(50))
    # Untied: the head is a second V x C matrix.
    tied = tiny_model()
    assert fresh.num_params() == tied.num_params() + 50 * 32


@pytest.mark.parametrize("nesterov, weight_decay, adjust", [(True, 0.0, None),
                                                            (False, 0.1, "match_rms_adamw")])
def test_batched_muon_matches_torch_muon(nesterov, weight_decay, adjust):
    """minigpt.train.optim.Muon batches same-shaped matrices; its steps are torch.optim.Muon's (both
    orthogonalise in bfloat16, so agreement is to bfloat16 rounding of the update)."""
    from minigpt.train.optim import Muon

    g = torch.Generator().manual_seed(5)
    shapes = [(24, 8), (8, 24), (8, 24), (16, 16), (24, 8), (5, 7)]  # tall, wide, square, odd
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    kw = dict(lr=0.02, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay,
              adjust_lr_fn=adjust)
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    opt_ours, opt_theirs = Muon(ours, **kw), torch.optim.Muon(theirs, **kw)
    for step in grads:
        for p, q, gr in zip(ours, theirs, step):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt_ours.step()
        opt_theirs.step()
    for p, q, p0 in zip(ours, theirs, start):
        moved = (q - p0).abs().max().item()
        assert moved > 1e-3  # the steps did something
        torch.testing.assert_close(p, q, atol=0.02 * moved, rtol=0)
    # Same state layout: a checkpoint of one loads into the other.
    opt_theirs.load_state_dict(opt_ours.state_dict())
    for p, q in zip(ours, theirs):
        assert torch.equal(opt_ours.state[p]["momentum_buffer"],
                           opt_theirs.state[q]["momentum_buffer"])


def test_weight_decay_shrinks_each_group_by_its_rate_times_its_decay():
    """Decoupled weight decay (Loshchilov & Hutter 2019): with zero gradients a step multiplies
    Muon's hidden matrices by 1 - lr muon_weight_decay, AdamW's other matrices by 1 - lr
    weight_decay, and leaves gains and biases alone."""
    model = tiny_model(qk_norm=True, bias=True)
    cfg = TrainConfig(learning_rate=1e-3, muon_lr_scale=10.0, weight_decay=0.1,
                      muon_weight_decay=0.05)
    opt = build_optimizer(model, cfg, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # gains and biases away from their 1 and 0
            p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        if p.dim() < 2:
            factor = 1.0
        elif n.startswith("transformer.h."):
            factor = 1 - 1e-2 * 0.05  # Muon's rate is muon_lr_scale x learning_rate
        else:
            factor = 1 - 1e-3 * 0.1
        torch.testing.assert_close(p.detach(), before[n] * factor, rtol=1e-6, atol=0, msg=n)
