"""Head pruning (minigpt.analysis.prune; python -m minigpt heads --prune): a pruned model
computes exactly what the masked model computes, greedy re-measuring picks the least important
unit at every step, grouped-query layers stay valid, and the written checkpoint loads, samples,
resumes and fine-tunes."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from minigpt.analysis import heads, prune
from minigpt.analysis.importance import evaluate_loss, head_importance
from minigpt.checkpoint import load_checkpoint
from minigpt.config import ConfigError
from minigpt.model import GPT, GPTConfig, KVCache
from minigpt.train.loop import TrainConfig, train

from conftest import train_tiny_run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**kw):
    cfg = dict(vocab_size=50, block_size=16, n_layer=3, n_head=4, n_embd=32,
               attn_backend="naive", bias=True, qk_norm=True)
    cfg.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**cfg)).double().eval()


def gates_without(cfg, removed):
    g = torch.ones(cfg.n_layer, cfg.n_head, dtype=torch.float64)
    for layer, head in removed:
        g[layer, head] = 0.0
    return g


@pytest.mark.parametrize("n_kv_head, removed, layer_heads, layer_kv_heads, attn_gate", [
    (4, [(0, 1), (1, 0), (1, 3), (2, 2)], (3, 2, 3), (3, 2, 3), False),  # MHA: k, v go with q
    (2, [(0, 1), (0, 3), (1, 0), (1, 1)], (2, 2, 4), (2, 1, 2), False),  # GQA: shrink / drop
    (1, [(0, 1), (1, 0), (1, 3), (2, 2)], (3, 2, 3), (1, 1, 1), False),  # MQA: kv head stays
    (2, [(0, 1), (0, 3), (1, 0), (1, 1)], (2, 2, 4), (2, 1, 2), True),  # gates go with q
])
def test_pruned_model_equals_masked_model(n_kv_head, removed, layer_heads, layer_kv_heads,
                                          attn_gate):
    model = tiny(n_kv_head=n_kv_head, attn_gate=attn_gate)
    if attn_gate:  # random gates, so that keeping the wrong rows shows
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.gate.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    pruned = prune.prune_heads(model, removed)
    assert pruned.config.layer_heads == layer_heads
    assert pruned.config.layer_kv_heads == layer_kv_heads
    assert pruned.num_params() < model.num_params()
    x = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    with model.gated_heads(gates_without(model.config, removed)):
        want = model(x)[0]
    got = pruned(x)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # The KV-cache path (one token at a time) gives the same logits as the full forward.
    cache = KVCache(pruned.config, 2)
    steps = torch.cat([pruned(x[:, t:t + 1], kv_cache=cache)[0] for t in range(16)], dim=1)
    torch.testing.assert_close(steps, got, rtol=0, atol=1e-10)
    # Pruning again, in the pruned model's own numbering, still matches masking.
    nq, nkv = layer_heads[2], layer_kv_heads[2]
    more = [(2, 0)] if nkv in (1, nq) else [(2, 0), (2, nq // nkv)]  # one per group in GQA
    again = prune.prune_heads(pruned, more)
    g = gates_without(pruned.config, more)
    with pruned.gated_heads(g):
        torch.testing.assert_close(again(x)[0], pruned(x)[0], rtol=0, atol=1e-12)


def test_prune_heads_refuses_empty_layers_and_uneven_groups():
    with pytest.raises(ValueError, match="layer 0 would have no head left"):
        prune.prune_heads(tiny(), [(0, h) for h in range(4)])
    with pytest.raises(ValueError, match="layer 1 would keep unequal numbers"):
        prune.prune_heads(tiny(n_kv_head=2), [(1, 0)])
    with pytest.raises(ValueError, match=r"\(3, 0\) is not a head"):
        prune.prune_heads(tiny(), [(3, 0)])


def test_greedy_re_measures_after_each_removal():
    # Additive costs, except that head (0, 1) is redundant with (0, 0): once (0, 0) is gone,
    # removing (0, 1) costs 0.05 instead of 0.2. One-shot ranking would take (1, 0) second.
    cfg = GPTConfig(vocab_size=10, n_layer=2, n_head=2, n_embd=8)
    cost = {(0, 0): 0.1, (0, 1): 0.2, (1, 0): 0.15, (1, 1): 0.3}

    def loss_fn(gates):
        gone = {(l, h) for l in range(gates.shape[0]) for h in range(gates.shape[1])
                if gates[l, h] == 0}
        total = 1.0 + sum(cost[h] for h in gone)
        if {(0, 0), (0, 1)} <= gone:
            total -= 0.15
        return total

    result = prune.greedy_prune(cfg, 2, loss_fn)
    assert [s["removed"] for s in result["steps"]] == [[(0, 0)], [(1, 0)]]  # (0, 1) would
    # empty layer 0, so it is not a candidate at step 2; with 3 heads per layer it would be:
    cfg3 = GPTConfig(vocab_size=10, n_layer=2, n_head=3, n_embd=12)
    cost.update({(0, 2): 0.5, (1, 2): 0.5})
    result = prune.greedy_prune(cfg3, 2, loss_fn)
    assert [s["removed"] for s in result["steps"]] == [[(0, 0)], [(0, 1)]]
    assert result["steps"][1]["loss"] == pytest.approx(1.0 + 0.1 + 0.2 - 0.15)
    for step in result["steps"]:  # each step removes the unit of least loss among its candidates
        assert step["loss"] == min(loss for _, loss in step["candidates"])
    assert not result["alive"][0, 0] and not result["alive"][0, 1] and result["alive"][0, 2]
    with pytest.raises(ValueError, match="n must be in 0..4"):
        prune.greedy_prune(cfg3, 5, loss_fn)


def test_greedy_on_a_model_matches_head_importance_and_keeps_gqa_valid():
    model = tiny(n_kv_head=2).float()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 50, (2, 16), generator=gen),
                torch.randint(0, 50, (2, 16), generator=gen)) for _ in range(2)]
    result = prune.greedy_prune(model.config, 6, lambda g: evaluate_loss(model, batches, g))
    # GQA (2 groups of 2): a unit is one query head per group, so groups shrink together;
    # then single heads, each with its key/value head.
    removed = [h for s in result["steps"] for h in s["removed"]]
    assert len(removed) == 6 and all(len(s["removed"]) in (1, 2) for s in result["steps"])
    for step in result["steps"]:
        if len(step["removed"]) == 2:
            (l0, h0), (l1, h1) = step["removed"]
            assert l0 == l1 and h0 // 2 != h1 // 2  # one head from each group of one layer
    pruned = prune.prune_heads(model, removed)
    for layer in range(3):
        nq, nkv = pruned.config.heads(layer)
        assert nq >= 1 and nq % nkv == 0
    assert evaluate_loss(pruned, batches) == pytest.approx(result["steps"][-1]["loss"],
                                                                 abs=1e-5)
    # MHA: the first greedy step is the single-head ablation's least important head.
    mha = tiny().float()
    first = prune.greedy_prune(mha.config, 1, lambda g: evaluate_loss(mha, batches, g))
    importance = head_importance(mha, batches)["increase"]
    flat = int(importance.argmin())
    assert first["steps"][0]["removed"] == [divmod(flat, 4)]


def test_layer_heads_config_validation_and_old_dicts():
    with pytest.raises(ConfigError, match="GPTConfig.layer_heads must be None or 3 ints"):
        GPTConfig(n_layer=3, n_head=4, n_embd=32, layer_heads=[4, 2])
    with pytest.raises(ConfigError, match=r"GPTConfig.layer_heads must hold .* 1..n_head"):
        GPTConfig(n_layer=2, n_head=4, n_embd=32, layer_heads=[4, 0])
    with pytest.raises(ConfigError, match="GPTConfig.layer_kv_heads must divide"):
        GPTConfig(n_layer=2, n_head=4, n_embd=32, layer_heads=[4, 2], layer_kv_heads=[3, 1])
    with pytest.raises(ConfigError, match="GPTConfig.n_kv_head must divide"):
        GPTConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, layer_heads=[4, 1])
    with pytest.raises(ConfigError, match="GPTConfig.layer_kv_heads must be None"):
        GPTConfig(n_layer=2, n_head=4, n_embd=32, layer_kv_heads=[1, 1])
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=32, layer_heads=[4, 2])
    assert cfg.layer_kv_heads == (4, 2) and cfg.heads(1) == (2, 2)
    assert GPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = GPTConfig(n_layer=2, n_head=4, n_embd=32).to_dict()
    del old["layer_heads"], old["layer_kv_heads"]  # a config saved before the option
    assert GPTConfig.from_dict(old) == GPTConfig(n_layer=2, n_head=4, n_embd=32)


def test_attention_maps_and_export_of_a_pruned_model():
    pruned = prune.prune_heads(tiny(), [(1, 0), (1, 2)])
    maps = pruned.attention_maps(torch.arange(10))
    assert maps.shape == (3, 4, 10, 10)
    assert torch.allclose(maps[1, :2].sum(-1), torch.ones(2, 10))
    assert maps[1, 2:].isnan().all() and not maps[0].isnan().any()
    from minigpt.hf.convert import PretrainedError, export_architecture

    with pytest.raises(PretrainedError, match="layer_heads=.*one head count for every layer"):
        export_architecture(GPTConfig(n_layer=2, n_head=4, n_embd=32, pos_embedding="learned",
                                      layer_heads=[4, 2]))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny char model (2 layers x 4 heads) trained for a few steps on generated text."""
    base = tmp_path_factory.mktemp("prune_run")
    train_tiny_run(base, n_head=4)
    return base / "out"


def test_prune_cli_end_to_end(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "pruned"
    args = ["--checkpoint", str(tiny_ckpt), "--batches", "2", "--batch-size", "4",
            "--prune", "3", "--out", str(out), "--finetune-iters", "2", "--timing-runs", "3",
            "--json", str(tmp_path / "p.json")]
    assert heads.main(args) == 0
    text = capsys.readouterr().out
    assert "parameters" in text and "tokens/s" in text and "fine-tuned" in text
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["heads_removed"] == [0, 1, 2, 3] and len(report["loss_curve"]) == 4
    assert sum(report["layer_heads"]) == 5
    assert report["params"]["after"] < report["params"]["before"]
    assert report["loss"]["after"] == pytest.approx(report["loss"]["after_masked"], abs=1e-4)
    assert report["loss"]["finetuned"] is not None and report["finetuned_to_step"] == 14
    assert (out / "prune.png").stat().st_size > 1000
    state = load_checkpoint(out)
    model = GPT.from_checkpoint(state)
    assert list(model.config.layer_heads) == report["layer_heads"]
    assert state["iter_num"] == 14 and state["pruned"]["removed"]
    # sample.py and train.py --resume read it.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    sample = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(out), "--prompt",
                             "abc", "--max-new-tokens", "20"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("abc") and len(sample.stdout) > 20
    cfg = TrainConfig.from_saved(state["train_config"])
    result = train(replace(cfg, out_dir=str(out), resume=True, max_iters=16),
                   log=lambda *a: None)
    assert result.iters == 16


@pytest.mark.parametrize("extra, pattern", [
    (["--prune", "7", "--out", "OUT"], "argument --prune: at most 6 heads"),
    (["--prune", "2"], "argument --out: required with --prune"),
    (["--prune", "0", "--out", "OUT"], "argument --prune: must be >= 1"),
    (["--finetune-iters", "3"], "argument --finetune-iters: only with --prune"),
    (["--prune", "1", "--out", "OUT", "--mask", "0:0"], "argument --mask: not with --prune"),
    (["--prune", "1", "--out", "OUT", "--prune-plot", "curve.txt"], "argument --prune-plot"),
])
def test_prune_cli_rejects_bad_input(tiny_ckpt, tmp_path, capsys, extra, pattern):
    extra = [str(tmp_path / a) if a in ("OUT", "curve.txt") else a for a in extra]
    with pytest.raises(SystemExit) as info:
        heads.main(["--checkpoint", str(tiny_ckpt), "--batches", "1", "--batch-size", "2",
                    *extra])
    assert info.value.code == 2 and pattern in capsys.readouterr().err
    assert not (tmp_path / "OUT" / "ckpt.pt").exists()


def test_alibi_models_are_not_pruned():
    """ALiBi slopes follow a head's index among n_head, which a pruned layer does not record."""
    cfg = GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=4, n_embd=32,
                    pos_embedding="alibi")
    with pytest.raises(ValueError, match="alibi"):
        prune.prune_heads(GPT(cfg), [(0, 1)])
    with pytest.raises(ConfigError, match="layer_heads"):
        GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=4, n_embd=32,
                  pos_embedding="alibi", layer_heads=(3,))
