"""Decoding: the KV cache's last-position logits, generate()'s column-major weights on the CPU,
and the two decode benchmarks (python -m minigpt profile --decode, python -m
minigpt.bench.generate) run end to end on tiny shapes."""

import importlib.util
import json

import pytest
import torch

from minigpt.bench import profile
from minigpt.model import GPT, GPTConfig, KVCache

HAVE_HF = importlib.util.find_spec("transformers") is not None


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=50, block_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def test_kv_cache_last_logits_only():
    model = tiny().double()
    idx = torch.randint(50, (2, 9))
    full, _ = model(idx)
    cache = KVCache(model.config, 2, last_logits_only=True)
    first, _ = model(idx[:, :7], kv_cache=cache)
    assert first.shape == (2, 1, 50)
    torch.testing.assert_close(first[:, 0], model(idx[:, :7])[0][:, -1], atol=1e-12, rtol=0)
    step, _ = model(idx[:, 7:], kv_cache=cache)
    torch.testing.assert_close(step[:, 0], full[:, -1], atol=1e-12, rtol=0)


def _greedy_by_hand(model, idx, n):
    cache = KVCache(model.config, idx.shape[0])
    feed = idx
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(feed, kv_cache=cache)
            feed = logits[:, -1].argmax(-1, keepdim=True)
            idx = torch.cat((idx, feed), 1)
    return idx


def test_generate_stores_weights_column_major_and_restores_them():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = torch.randint(50, (1, 5))
    strides = []

    def look(step, nxt):
        if step == 0:
            strides.append((model.lm_head.weight.stride(),
                            model.transformer.h[0].attn.c_attn.weight.stride()))

    out = model.generate(prompt, 70, temperature=0.0, callback=look)  # >= 64: switched
    assert strides == [((1, 50), (1, 64))]  # (out, in) values, column-major storage
    assert torch.equal(out, _greedy_by_hand(model, prompt, 70))
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    for k, v in model.state_dict().items():
        assert v.is_contiguous(), k
        assert torch.equal(v, before[k]), k
    model.generate(prompt, 3, temperature=0.0, callback=lambda s, n: strides.append(
        model.lm_head.weight.stride()))
    assert strides[-1] == (32, 1)  # short runs keep the layout


def test_generate_restores_the_layout_when_interrupted():
    model = tiny()

    def stop(step, nxt):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        model.generate(torch.randint(50, (1, 5)), 80, temperature=0.0, callback=stop)
    assert all(p.is_contiguous() for p in model.parameters())


def test_profile_decode_mode(tmp_path, capsys):
    path = tmp_path / "decode.json"
    rc = profile.main(["--decode", "--seq", "40", "300", "--queries", "2", "--heads", "4",
                       "--kv-heads", "2", "--head-dim", "16", "--repeats", "2", "--calls", "2",
                       "--warmup", "0", "--json", str(path)])
    assert rc == 0
    rows = json.loads(path.read_text())
    names = {r["backend"] for r in rows}
    assert {"sdpa", "naive"} <= names and len(rows) == 2 * len(names)
    for r in rows:
        assert r["Tq"] == 2 and r["H"] == 4 and r["Hkv"] == 2 and r["us"] > 0
        assert r["kv_gbps"] == pytest.approx(2 * 4 * r["T"] * 2 * 16 / (r["us"] * 1e3))
        assert r["rule_ok"] is True and r["err_out"] < 1e-5
        assert r["vs_sdpa"] == pytest.approx(
            r["us"] / next(s["us"] for s in rows if s["backend"] == "sdpa" and s["T"] == r["T"]))
    assert "us/call" in capsys.readouterr().out


@pytest.mark.skipif(not HAVE_HF, reason="transformers is not installed")
def test_bench_generate_runs(tmp_path, capsys):
    from minigpt.bench import generate as bench_generate

    path = tmp_path / "gen.json"
    rc = bench_generate.main(["--prompt", "8", "--new", "5", "--layers", "1", "--heads", "2",
                              "--embd", "16", "--vocab", "50", "--block", "32", "--repeats", "2",
                              "--hf-attn", "sdpa", "minigpt", "--json", str(path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "transformers[minigpt] tokens equal transformers[sdpa]'s" in out
    results = {r["model"]: r for r in json.loads(path.read_text())["results"]}
    assert set(results) == {"minigpt", "transformers[sdpa]", "transformers[minigpt]"}
    for r in results.values():
        assert r["tokens_per_s"] == pytest.approx(5 / r["seconds"]) and len(r["runs_s"]) == 2
    assert results["transformers[sdpa]"]["speedup_vs_hf"] == 1.0
