"""python -m minigpt experiments: the ablation runs every variant to the same time budget; positions
and window write their tables and figures."""

import json

from minigpt.train.config import apply_overrides, default_settings
from minigpt.experiments import main, positions, window
from minigpt.experiments import ablation as ablation_module
from minigpt.experiments.ablation import ABLATIONS


def test_ablation_runs_each_variant_for_the_budget(text_file, tmp_path, capsys, monkeypatch):
    # A smaller default model, so that a 2 s budget holds several steps on a slow machine.
    small = apply_overrides(default_settings(), {"model": {"n_layer": 2, "n_embd": 32,
                                                           "block_size": 16},
                                                 "batch_size": 8, "eval_iters": 2})
    monkeypatch.setattr(ablation_module, "default_settings", lambda: small)
    out = tmp_path / "ablation"
    assert main(["ablation", "--max-time", "2", "--runs", "default", "adamw", "previous_default",
                 "--data", str(text_file), "--out-dir", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in rows] == ["default", "adamw", "previous_default"]
    for r in rows:
        assert r["iters"] > 0 and r["final_val_loss"] > 0 and r["wall_time_s"] >= 2.0
        metrics = [json.loads(line) for line in (out / r["name"] / "metrics.jsonl").open()]
        assert metrics[-1]["time_s"] >= 2.0
    saved = [json.loads((out / n / "config.json").read_text()) for n in ("default", "adamw")]
    assert saved[0]["optimizer"] == "muon" and saved[1]["optimizer"] == "adamw"
    assert saved[0]["max_time"] == saved[1]["max_time"] == 2.0
    printed = capsys.readouterr().out
    table = (out / "results.md").read_text()
    assert table.strip() in printed
    assert table.count("\n| `") == 3 and ABLATIONS["adamw"][0] in table


def test_positions_trains_each_encoding_and_evaluates_four_lengths(text_file, tmp_path, capsys,
                                                                   monkeypatch):
    small = apply_overrides(default_settings(), {"model": {"n_layer": 1, "n_embd": 32},
                                                 "batch_size": 4, "eval_iters": 1})
    monkeypatch.setattr(positions, "default_settings", lambda: small)
    out = tmp_path / "positions"
    assert main(["positions", "--block-size", "8", "--max-iters", "3", "--eval-tokens", "300",
                 "--data", str(text_file), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["lengths"] == [8, 16, 32, 64] and results["eval_tokens"] == 256
    assert [r["name"] for r in results["rows"]] == list(positions.ENCODINGS)
    for r in results["rows"]:
        assert r["iters"] == 3 and set(r["val_loss"]) == {"8", "16", "32", "64"}
        assert all(0 < v < 10 for v in r["val_loss"].values())
        saved = json.loads((out / r["name"] / "config.json").read_text())
        assert saved["model"]["pos_embedding"] == r["name"] and saved["model"]["block_size"] == 8
    table = (out / "results.md").read_text()
    assert table.count("\n| `") == 5 and "| 64 (8x) |" in table
    assert table.strip() in capsys.readouterr().out
    assert (out / "positions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every length predicts the same tokens: a model that ignores its context scores the same
    # at each.
    import numpy as np
    import torch

    from minigpt.model import GPT, GPTConfig

    class Unigram(GPT):
        def forward(self, idx, targets=None, kv_cache=None):
            logits = self.lm_head.weight[:, 0].expand(*idx.shape, -1)
            return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                             targets.flatten())

    model = Unigram(GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=4))
    tokens = np.random.default_rng(0).integers(0, 7, 100)
    losses = positions.eval_at_lengths(model, tokens, [4, 8, 16, 32], 64)
    assert max(losses.values()) - min(losses.values()) < 1e-6
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(
            model.lm_head.weight[:, 0].expand(64, -1), torch.from_numpy(tokens[1:65]))
    assert abs(losses[4] - want.item()) < 1e-6


def test_window_measures_cost_and_loss_and_writes_three_files(text_file, tmp_path, capsys,
                                                              monkeypatch):
    small = apply_overrides(default_settings(), {"model": {"n_layer": 1, "n_embd": 32,
                                                           "n_head": 2},
                                                 "eval_iters": 1})
    monkeypatch.setattr(window, "default_settings", lambda: small)
    out = tmp_path / "window"
    assert main(["window", "--seq", "32", "64", "--windows", "16", "--step-max-seq", "32",
                 "--loss-windows", "4", "--block-size", "16", "--batch-size", "4",
                 "--train-iters", "3", "--warmup", "0", "--repeats", "1", "--threads", "1",
                 "--data", str(text_file), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["setup"]["n_head"] == 2 and results["setup"]["head_dim"] == 16
    att = [(r["T"], r["variant"]) for r in results["attention"]]
    assert att == [(32, "full"), (32, "window 16"), (64, "full"), (64, "window 16")]
    for r in results["attention"]:
        assert r["ms"] > 0 and r["peak_mib"] > 0
        assert r["ms_vs_full"] > 0 and (r["window"] is not None or r["ms_vs_full"] == 1.0)
    assert [(r["T"], r["variant"]) for r in results["step"]] == [(32, "full"), (32, "window 16")]
    loss = results["loss"]
    assert (loss["block_size"], loss["batch_size"], loss["max_iters"]) == (16, 4, 3)
    assert [r["variant"] for r in loss["rows"]] == ["full", "window 4"]
    assert all(r["iters"] == 3 and 0 < r["final_val_loss"] < 10 for r in loss["rows"])
    saved = json.loads((out / "window_4" / "config.json").read_text())
    assert saved["model"]["window"] == 4 and saved["model"]["block_size"] == 16
    table = (out / "results.md").read_text()
    assert "| 64 |" in table and "| window 16 ms |" in table and "| window 4 |" in table
    assert table.strip() in capsys.readouterr().out
    assert (out / "window.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_window_times_the_windowed_attention():
    """The function attention_cost times computes attention with the window, not without."""
    import torch

    from minigpt.attention import attention, unavailable_reason

    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, 2, 40, 8, generator=g, dtype=torch.float64)
                     for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = attention(*leaves, window=5, backend="naive")
    want_grads = torch.autograd.grad(want, leaves, dout)
    full = attention(q, k, v, backend="naive")
    backends = ["naive", "sdpa"]
    if unavailable_reason("ext", q.device, q.dtype, 8, True, ("window",)) is None:
        backends.append("ext")
    for backend in backends:
        out, grads = window.attention_step(q, k, v, dout, 5, backend)()
        assert torch.allclose(out, want) and not torch.allclose(out, full)
        assert all(torch.allclose(a, b) for a, b in zip(grads, want_grads))
    out, _ = window.attention_step(q, k, v, dout, None, "naive")()
    assert torch.allclose(out, full)


def test_eval_at_lengths_is_the_mean_over_every_predicted_token():
    """Batches cut to fit batch_tokens give the mean over all tokens, not a mean of batch means
    of different sizes."""
    import numpy as np
    import torch

    from minigpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    tokens = np.random.default_rng(1).integers(0, 11, 60)
    losses = positions.eval_at_lengths(model, tokens, [4, 8], 24, batch_tokens=8)
    span = torch.from_numpy(tokens[:25].astype(np.int64))
    for L in (4, 8):
        with torch.no_grad():
            logits, _ = model(span[:-1].view(-1, L))
        want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), span[1:])
        assert abs(losses[L] - want.item()) < 1e-5, (L, losses[L], want.item())


def test_quick_gives_its_defaults_and_a_flag_given_wins():
    from minigpt.experiments import build_parser

    assert build_parser().parse_args(["positions"]).max_iters == positions.MAX_ITERS
    quick = build_parser(quick=True)
    assert quick.parse_args(["positions", "--quick"]).max_iters == positions.QUICK["max_iters"]
    assert quick.parse_args(["positions", "--quick", "--max-iters", "5"]).max_iters == 5
    assert quick.parse_args(["window", "--quick"]).seq == list(window.WINDOW_QUICK["seqs"])


def _flags(parser):
    """(parser, action) for every flag of parser and of its subcommands."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _flags(sub)
        elif action.option_strings and action.dest != "help":
            yield parser, action


def test_every_flag_of_experiments_and_data_has_help_and_shows_its_default():
    from minigpt.experiments import EXPERIMENTS, build_parser
    from minigpt.train import data

    flags = list(_flags(build_parser())) + list(_flags(data.build_parser()))
    commands = {parser.prog.split()[-1] for parser, _ in flags}
    assert commands >= set(EXPERIMENTS) | {"data"}
    for parser, action in flags:
        # The text says what the flag does; the formatter appends the default, once.
        assert action.help and "default" not in action.help, (parser.prog, action.dest)
        shown = parser._get_formatter()._get_help_string(action)
        assert shown.endswith(" (default: %(default)s)"), (parser.prog, action.dest)
        assert action.option_strings[0] in parser.format_help()
