"""The experiments on a pretrained model: head pruning (minigpt.experiments.pruning) and loss
against position (minigpt.experiments.length), on tiny random Llama-shaped GPTs with grouped
query heads, through the code paths the real runs take."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from minigpt.analysis.importance import head_importance
from minigpt.analysis.prune import prune_heads
from minigpt.config import GPTConfig
from minigpt.experiments import length, pruning
from minigpt.experiments import main as experiments_main
from minigpt.model import GPT


def _llama(n_head=6, n_kv_head=2, n_layer=3, block_size=32, seed=0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=50, block_size=block_size, n_layer=n_layer, n_head=n_head,
                    n_kv_head=n_kv_head, n_embd=48, norm="rmsnorm", mlp="glu", bias=False,
                    tie_embeddings=True)
    return GPT(cfg).double().eval()


def _tokens(n, seed=1):
    return torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(seed))


def test_ablation_with_replayed_layers_equals_head_importance():
    model = _llama()
    batches = pruning.windows(_tokens(8 * 16 + 1), 16, rows=4)
    fast, ref = pruning.ablation_importance(model, batches), head_importance(model, batches)
    assert torch.allclose(fast["loss"], ref["loss"], atol=1e-6, rtol=0)
    assert abs(fast["base_loss"] - ref["base_loss"]) < 1e-6
    assert not fast["masked"].any() and len(model.transformer.h) == 3
    assert all(type(b).__name__ == "Block" for b in model.transformer.h)  # blocks put back


def test_windows_are_equal_batches_of_consecutive_tokens():
    tokens = torch.arange(6 * 4 + 1)
    batches = pruning.windows(tokens, 4, rows=4)
    assert [x.shape[0] for x, _ in batches] == [3, 3]  # 6 windows: rows 4 -> 3 per batch
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert torch.equal(x.flatten(), tokens[:-1]) and torch.equal(y.flatten(), tokens[1:])
    with pytest.raises(ValueError, match="multiple of context 4"):
        pruning.windows(torch.arange(10), 4)


def test_one_shot_order_follows_the_scores_in_multi_head_layers():
    """MHA (each head its own key/value head): the ranking removes heads in increasing order
    of their single-head increase, as Michel et al. prune, as long as no layer reaches one."""
    cfg = _llama(n_head=4, n_kv_head=4).config
    increase = torch.tensor([[0.5, 0.01, 0.9, 0.03], [0.02, 0.7, 0.04, 0.6],
                             [0.8, 0.05, 0.3, 0.2]], dtype=torch.float64)
    assert pruning.one_shot_order(cfg, increase, 5) == [(0, 1), (1, 0), (0, 3), (1, 2), (2, 1)]
    assert pruning.one_shot_order(cfg, increase, 0) == []


@pytest.mark.parametrize("n_head,n_kv_head", [(6, 2), (6, 3), (4, 1)])
def test_one_shot_order_keeps_key_value_groups_equal(n_head, n_kv_head):
    model = _llama(n_head=n_head, n_kv_head=n_kv_head)
    cfg = model.config
    increase = torch.rand(cfg.n_layer, cfg.n_head, generator=torch.Generator().manual_seed(3),
                          dtype=torch.float64)
    for n in range(0, cfg.n_layer * (n_head - 1) + 1):
        order = pruning.one_shot_order(cfg, increase, n)
        assert n - (n_kv_head - 1) <= len(order) <= n  # short only by a unit of n_kv_head
        assert len(set(order)) == len(order)
        pruned = prune_heads(model, order)  # raises on unequal groups or an empty layer
        for layer in range(cfg.n_layer):
            nq, nkv = pruned.config.heads(layer)
            assert nq % nkv == 0 and nq >= 1


def test_prune_experiment_rows_counts_and_the_unpruned_perplexity():
    model = _llama()  # 3 layers x 6 heads = 18 query heads, groups of 3
    tokens = _tokens(2 * 64 + 2)
    heldout = pruning.windows(tokens[:65], 16)
    calibration = pruning.windows(tokens[65:], 16)
    results = pruning.prune_experiment(model, calibration, heldout, [0.1, 0.25, 0.5],
                                       heldout[0][0][:1], timing_runs=1, log=lambda s: None)
    rows = results["rows"]
    assert results["heads"] == 18 and [r["fraction"] for r in rows] == [0.0, 0.1, 0.25, 0.5]
    assert [r["target"] for r in rows] == [0, 2, 4, 9]
    for r in rows:
        assert r["target"] - 2 <= r["removed"] <= r["target"] == round(r["fraction"] * 18)
        assert sum(r["layer_heads"]) == 18 - r["removed"] and len(r["heads"]) == r["removed"]
        assert r["tokens_per_s"] > 0
    # fraction 0 is the model itself: its perplexity is exp of the mean next-token loss
    logits, _ = model(tokens[:64].view(4, 16))  # the 4 held-out windows
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[1:65]).item()
    assert rows[0]["removed"] == 0 and rows[0]["speedup"] == 1.0
    assert rows[0]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)
    assert rows[-1]["params"] < rows[0]["params"]
    table = pruning.markdown(dict(results, source="tiny", calibration_tokens=64,
                                  eval_tokens=64, context=16, timing_shape="1 x 16"))
    assert table.count("\n| ") == 2 + len(rows)


def test_prune_experiment_refuses_fractions_by_name():
    cfg = _llama(n_head=2, n_kv_head=2).config  # 6 heads, at most 3 removable
    for bad, says in ((0.9, "at most 3"), (0.0, "in (0, 1)"), (1.0, "in (0, 1)")):
        with pytest.raises(ValueError, match=r"--fractions: .*" + says.replace("(", r"\(")
                           .replace(")", r"\)")):
            pruning.check_fractions(cfg, [bad])


def test_position_losses_equal_one_forward_and_extrapolate_past_the_context():
    model = _llama(block_size=32)
    tokens = _tokens(2 * 48 + 1)
    losses = length.position_losses(model, tokens, 48, 2, chunk=10, log=lambda s: None)
    assert losses.shape == (2, 48) and losses.dtype == torch.float64
    longer = model.with_block_size(48)
    for s in range(2):
        x = tokens[s * 48:(s + 1) * 48 + 1]
        logits, _ = longer(x[None, :-1])
        ref = F.cross_entropy(logits[0], x[1:], reduction="none")
        assert torch.allclose(losses[s], ref.detach(), atol=1e-5, rtol=0)
    assert model.config.block_size == 32  # the model itself is unchanged
    overlapping = length.position_losses(model, tokens, 48, 3, chunk=16, stride=24,
                                         log=lambda s: None)
    assert torch.allclose(overlapping[[0, 2]], losses, atol=1e-9)  # starts 0, 24, 48
    with pytest.raises(ValueError, match="need 97 tokens, got 96"):
        length.position_losses(model, tokens[:96], 48, 2)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        length.position_losses(model, tokens, 48, 2, chunk=0)


def test_buckets_cover_every_position_once():
    losses = torch.rand(3, 1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert length.bucket_edges(1000, 256) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768,
                                              1000]
    assert length.bucket_edges(10, 1) == list(range(11))
    rows = length.bucketed(losses, 256)
    assert rows[0]["start"] == 0 and rows[-1]["end"] == 1000
    assert all(a["end"] == b["start"] for a, b in zip(rows, rows[1:]))
    assert sum(r["tokens"] for r in rows) == losses.numel()
    weighted = sum(r["loss"] * r["tokens"] for r in rows) / losses.numel()
    assert weighted == pytest.approx(losses.mean().item(), rel=1e-12)
    assert rows[1]["loss"] == pytest.approx(losses[:, 1].mean().item())
    with pytest.raises(ValueError, match="bucket must be in 1..length 10"):
        length.bucket_edges(10, 11)
    summary = length.summarize(losses, 500)
    assert list(summary) == ["0-128", "128-500", "500-1000", "last 125 before 500", "last 125"]
    assert summary["500-1000"] == pytest.approx(losses[:, 500:].mean().item())
    assert summary["last 125"] == pytest.approx(losses[:, -125:].mean().item())
    assert length.summarize(losses[:, :400], 500)["500-400"] is None


def test_same_tokens_compares_each_token_inside_and_past_the_context():
    # 2 sequences of 8, stride 4, context 4: text tokens 4..7 are read at positions 4..7 in
    # sequence 0 (past) and 0..3 in sequence 1 (inside)
    losses = torch.tensor([[0.0, 0, 0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 0, 0, 0, 0]],
                          dtype=torch.float64)
    same = length.same_tokens(losses, stride=4, context=4)
    assert same == {"tokens": 4, "inside": 2.5, "past": 6.5}
    assert length.same_tokens(losses, stride=8, context=4) is None  # no overlap


def _one_line(capsys, argv, says):
    with pytest.raises(SystemExit) as info:
        experiments_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and says in err[-1], err
    assert err[-1].startswith("python -m minigpt experiments")


def test_bad_arguments_end_in_one_line(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("some text")
    base = ["--init-from", str(tmp_path / "none.gguf"), "--data", str(text)]
    _one_line(capsys, ["prune", *base, "--fractions", "1.5"], "argument --fractions: each "
              "must be in (0, 1), got 1.5")
    _one_line(capsys, ["prune", *base, "--eval-tokens", "100"], "argument --eval-tokens: must "
              "be a positive multiple of --context 512, got 100")
    _one_line(capsys, ["length", *base, "--bucket", "0"], "argument --bucket: must be >= 1")
    _one_line(capsys, ["length", *base[:2], "--data", str(tmp_path / "missing.txt")],
              "missing.txt: no such file")
    assert experiments_main(["length", *base]) == 2  # a model file that is not there
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.gguf" in err


def test_both_commands_on_a_tiny_gguf_model(tmp_path, capsys):
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    from test_gguf import write_tiny_gguf

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)  # 2 layers x 4 query heads, 2 key/value heads, context 64
    text = tmp_path / "book.txt"
    text.write_text("hello there, the hall is still. " * 20)
    out = tmp_path / "prune"
    assert experiments_main(["prune", "--init-from", str(path), "--data", str(text),
                             "--fractions", "0.25", "--context", "16", "--calibration-tokens",
                             "32", "--eval-tokens", "64", "--timing-runs", "1",
                             "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["removed"] for r in results["rows"]] == [0, 2]
    assert (out / "prune.png").stat().st_size > 0 and "| 2 | 25% |" in (
        out / "results.md").read_text()
    out = tmp_path / "length"
    assert experiments_main(["length", "--init-from", str(path), "--data", str(text),
                             "--bucket", "16", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["context"] == 64 and results["length"] == 128
    assert results["buckets"][-1]["end"] == 128 and (out / "length.png").stat().st_size > 0
    short = tmp_path / "short.txt"
    short.write_text("hello")
    assert experiments_main(["length", "--init-from", str(path), "--data", str(short),
                             "--bucket", "16", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("tokens, this experiment needs 257") and err.count("\n") == 1
