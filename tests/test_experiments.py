"""python -m minigpt.experiments: the ablation runs every variant to the same time budget."""

import json

import minigpt.experiments as experiments
from minigpt.config import apply_overrides, default_settings
from minigpt.experiments import ABLATIONS, main


def test_ablation_runs_each_variant_for_the_budget(text_file, tmp_path, capsys, monkeypatch):
    # A smaller default model, so that a 2 s budget holds several steps on a slow machine.
    small = apply_overrides(default_settings(), {"model": {"n_layer": 2, "n_embd": 32,
                                                           "block_size": 16},
                                                 "batch_size": 8, "eval_iters": 2})
    monkeypatch.setattr(experiments, "default_settings", lambda: small)
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
