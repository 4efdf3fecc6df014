"""Attention maps, head masks, head importance, and the pictures (heatmaps, curves)."""

import argparse
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F

from minigpt.analysis import heads, importance
from minigpt.analysis import curves as plot
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import CharTokenizer, GPT2Tokenizer
from minigpt.cli.train import draw_curves
from minigpt.train.loop import TrainConfig, train
from minigpt.analysis.curves import read_metrics
from minigpt.analysis.pictures import (display_token, draw_attention, plot_head_importance,
                                       token_labels)

from conftest import tiktoken_available, train_tiny_run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: on a busy 2-core machine, two intra-op threads waiting for each
    other make every matmul tens of times slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**kw):
    cfg = dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32, attn_backend="naive")
    cfg.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**cfg)).eval()


def reference_maps(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """(n_layer, n_head, T, T) attention probabilities recomputed in float64 from the weights,
    written independently of minigpt.model (RoPE as a complex rotation, GQA by index)."""
    cfg, T = model.config, idx.shape[0]
    nh, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    sd = {k: v.double() for k, v in model.state_dict().items()}

    def ln(x, name):
        return F.layer_norm(x, (cfg.n_embd,), sd[name + ".weight"], sd.get(name + ".bias"), 1e-5)

    def lin(x, name):
        return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))

    pos = torch.arange(T, dtype=torch.float64)
    freq = cfg.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    rot = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64), pos[:, None] * freq)

    def rope(x):  # (T, H, hd): pairs (x[2i], x[2i+1]) as complex numbers times e^(i pos freq)
        z = torch.view_as_complex(x.reshape(T, x.shape[1], hd // 2, 2).contiguous())
        return torch.view_as_real(z * rot[:, None, :]).reshape(x.shape)

    x = sd["transformer.wte.weight"][idx]
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    maps = []
    for l in range(cfg.n_layer):
        p = f"transformer.h.{l}."
        qkv = lin(ln(x, p + "ln_1"), p + "attn.c_attn")
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q, k, v = rope(q.view(T, nh, hd)), rope(k.view(T, nkv, hd)), v.view(T, nkv, hd)
        probs, outs = [], []
        for h in range(nh):
            kv = h // (nh // nkv)
            s = (q[:, h] @ k[:, kv].T) / math.sqrt(hd)
            a = torch.softmax(s.masked_fill(future, float("-inf")), dim=-1)
            probs.append(a)
            outs.append(a @ v[:, kv])
        maps.append(torch.stack(probs))
        x = x + lin(torch.cat(outs, dim=-1), p + "attn.c_proj")
        x = x + lin(F.gelu(lin(ln(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
    return torch.stack(maps)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_attention_maps_are_causal_distributions_equal_to_float64_reference(n_kv_head):
    model = tiny(n_kv_head=n_kv_head, n_layer=3)
    idx = torch.randint(50, (13,), generator=torch.Generator().manual_seed(1))
    maps = model.attention_maps(idx)
    assert maps.shape == (3, 4, 13, 13) and maps.dtype == torch.float32
    torch.testing.assert_close(maps.sum(-1), torch.ones(3, 4, 13), atol=1e-6, rtol=0)
    assert torch.all(maps.triu(1) == 0) and torch.all(maps >= 0)
    torch.testing.assert_close(maps.double(), reference_maps(model, idx), atol=2e-6, rtol=0)
    # Heads differ (GQA query heads sharing a key/value head included).
    assert not torch.allclose(maps[0, 0], maps[0, 1])


def test_attention_maps_ignore_dropout_and_keep_the_mode():
    model = tiny(dropout=0.5).train()
    idx = torch.randint(50, (1, 10))
    a, b = model.attention_maps(idx), model.attention_maps(idx)
    assert model.training and torch.equal(a, b)
    torch.testing.assert_close(a.double(), reference_maps(model, idx[0]), atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="block_size"):
        model.attention_maps(torch.zeros(17, dtype=torch.long))


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_head_mask_of_ones_is_exactly_no_mask(backend):
    model = tiny(attn_backend=backend, n_kv_head=2)
    idx, targets = torch.randint(50, (2, 16)), torch.randint(50, (2, 16))
    logits, loss = model(idx, targets)
    with model.gated_heads(torch.ones(2, 4)):
        logits1, loss1 = model(idx, targets)
    assert torch.equal(logits, logits1) and torch.equal(loss, loss1)
    with pytest.raises(ValueError, match="head_mask"):
        with model.gated_heads(torch.ones(4, 2)):
            model(idx)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_masking_a_head_equals_zeroing_its_slice_of_c_proj_input(backend):
    model = tiny(attn_backend=backend).double()
    layer, head, hd = 1, 2, model.config.head_dim
    idx, targets = torch.randint(50, (2, 16)), torch.randint(50, (2, 16))
    gates = torch.ones(2, 4, dtype=torch.float64)
    gates[layer, head] = 0.0
    with model.gated_heads(gates):
        masked, masked_loss = model(idx, targets)

    def zero_slice(module, args):
        y = args[0].clone()
        y[..., head * hd:(head + 1) * hd] = 0.0
        return (y,)

    hook = model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(zero_slice)
    try:
        by_hand, by_hand_loss = model(idx, targets)
    finally:
        hook.remove()
    torch.testing.assert_close(masked, by_hand, atol=1e-12, rtol=0)
    _, full_loss = model(idx, targets)
    assert abs(masked_loss.item() - full_loss.item()) > 1e-6  # the head mattered


def test_head_mask_gradient_flows():
    model = tiny()
    gates = torch.ones(2, 4, requires_grad=True)
    with model.gated_heads(gates):
        _, loss = model(torch.randint(50, (2, 16)), torch.randint(50, (2, 16)))
    loss.backward()
    assert gates.grad.shape == (2, 4) and gates.grad.abs().sum() > 0


def test_head_importance_is_zero_for_a_head_removed_by_hand():
    model = tiny()
    batches = [(torch.randint(50, (3, 16)), torch.randint(50, (3, 16))) for _ in range(2)]
    hd = model.config.head_dim
    with torch.no_grad():  # head 3 of layer 0 removed by hand: its c_proj columns are zero
        model.transformer.h[0].attn.c_proj.weight[:, 3 * hd:4 * hd] = 0.0
    result = importance.head_importance(model, batches)
    assert result["increase"].shape == (2, 4) and not result["masked"].any()
    assert abs(result["increase"][0, 3].item()) < 1e-6
    assert result["increase"].abs().max() > 1e-4
    pre = importance.parse_mask(["1:0"], 2, 4)
    again = importance.head_importance(model, batches, pre)
    assert again["masked"][1, 0] and math.isnan(again["increase"][1, 0].item())
    assert again["base_loss"] != result["base_loss"]
    with pytest.raises(ValueError, match="out of range"):
        importance.parse_mask(["2:0"], 2, 4)
    with pytest.raises(ValueError, match="LAYER:HEAD"):
        importance.parse_mask(["1-0"], 2, 4)


def assert_picture(path, min_h, min_w, colours):
    """A PNG of at least min_h x min_w pixels, not blank, showing every colour (RGB in [0, 1])
    of `colours` in at least 20 pixels."""
    rgb = matplotlib.image.imread(str(path))[..., :3]
    h, w = rgb.shape[:2]
    assert h >= min_h and w >= min_w, (h, w)
    assert (rgb.min(-1) < 0.9).mean() > 0.02, "the picture is (nearly) blank"
    for name, colour in colours.items():
        close = (abs(rgb - torch.tensor(colour).numpy()).max(-1) < 0.04).sum()
        assert close >= 20, f"{name} {colour}: {close} pixels"


VIRIDIS_MAX = (0.993, 0.906, 0.144)   # probability 1
HATCH_GREY = (0.933, 0.933, 0.933)    # #eeeeee behind the masked (future) cells


def test_labels_make_whitespace_visible():
    tok = CharTokenizer("ab \n\t")
    assert token_labels(tok, tok.encode("a b\n\t")) == ["a", "␣", "b", "⏎", "⇥"]
    assert display_token("\x07") == "\\x07" and display_token("") == "∅"
    assert display_token("🙂") == "U+1F642"  # not in the label font: no empty box
    assert len(display_token("x" * 40)) == 12 and display_token("x" * 40).endswith("…")


@pytest.mark.skipif(not tiktoken_available(), reason="the GPT-2 encoding is not available")
def test_gpt2_labels_are_readable():
    tok = GPT2Tokenizer()
    labels = token_labels(tok, tok.encode(" hello world\n\n🙂"))
    assert labels[:2] == ["␣hello", "␣world"] and any("⏎" in s for s in labels)
    assert not any("\ufffd" in s for s in labels)  # partial UTF-8 bytes as \xNN escapes


def test_draw_attention_crops_to_block_size(tmp_path):
    model = tiny(n_layer=2, n_head=4)
    tok = CharTokenizer("abcdefghij \n" + "".join(chr(0x41 + i) for i in range(38)))
    ids = [random.Random(0).randrange(50) for _ in range(40)]
    info = draw_attention(model, tok, ids, tmp_path / "attn.png", layer=-1, heads=[0, 3],
                          max_tokens=64, n_prompt=30)
    assert info["tokens"] == 16 and info["total"] == 40 and info["layer"] == 1
    assert info["maps"].shape == (2, 16, 16)
    torch.testing.assert_close(info["maps"].sum(-1), torch.ones(2, 16), atol=1e-6, rtol=0)
    # Each window's first query sees only itself: probability 1, viridis's brightest yellow.
    assert torch.all(info["maps"][:, 0, 0] == 1)
    assert_picture(tmp_path / "attn.png", 300, 600,
                   {"probability 1": VIRIDIS_MAX, "causal mask": HATCH_GREY})
    with pytest.raises(ValueError, match="head 4"):
        draw_attention(model, tok, ids, tmp_path / "x.png", heads=[4])


def test_head_importance_heatmap(tmp_path):
    inc = torch.tensor([[0.5, -0.01, float("nan")], [0.002, 0.0, 0.1]])
    plot_head_importance(inc, tmp_path / "h.png", base_loss=1.5, masked=inc.isnan())
    # The largest increase at the red end of RdBu_r; the masked head in grey (#bbbbbb).
    assert_picture(tmp_path / "h.png", 200, 300,
                   {"largest increase": (0.404, 0.0, 0.122), "masked": (0.733, 0.733, 0.733)})


@pytest.mark.parametrize("module, command", [(heads, "heads"), (plot, "plot")])
def test_every_flag_has_help_and_shows_its_default(module, command):
    parser = module.build_parser()
    assert parser.prog == f"python -m minigpt {command}"
    formatter = parser.formatter_class(parser.prog)
    flags = [a for a in parser._actions
             if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert len(flags) >= (15 if module is heads else 1)
    for action in flags:
        assert action.help, action.option_strings
        assert "(default: %(default)s)" in formatter._get_help_string(action), action.option_strings
    text = " ".join(parser.format_help().split())
    assert "(default: None)" in text
    if module is heads:
        assert "seed of the batch positions (default: 1337)" in text
        assert "timed forward passes per model" in text and "(default: 7)" in text


def test_plot_reads_the_last_run_of_a_metrics_log(tmp_path, capsys):
    rows = [dict(event="eval", iter=i, train_loss=3.0 - i / 100, val_loss=3.1 - i / 120,
                 lr=1e-3, time_s=float(i)) for i in (0, 50, 100)]
    lines = [json.dumps(dict(iter=i, train_loss=9.0, val_loss=9.0, lr=1e-3))  # an older run
             for i in (0, 50, 100, 150)]
    lines += [json.dumps(dict(event="whole_split", iter=150, val_loss=8.5, tokens=64))]
    lines += [json.dumps(r) for r in rows[:2]]
    lines += [json.dumps(dict(event="nonfinite", iter=60, loss="nan", skipped=1))]
    lines += [json.dumps(rows[2]), json.dumps({**rows[2], "val_loss": 2.0})]  # --resume at 100
    lines += ['{"iter": 150, "train_lo']  # a torn last line
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    log = read_metrics(tmp_path / "metrics.jsonl")
    assert log["runs"] == 2 and [r["iter"] for r in log["rows"]] == [0, 50, 100]
    assert log["rows"][-1]["val_loss"] == 2.0
    assert log["whole_split"] is None  # the older run's, at iter 150, is not this run's
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps(dict(event="whole_split", iter=100, val_loss=2.25, tokens=64)) + "\n")
    assert read_metrics(tmp_path / "metrics.jsonl")["whole_split"]["val_loss"] == 2.25
    assert plot.main([str(tmp_path)]) == 0
    assert_picture(tmp_path / "curves.png", 500, 700, CURVE_COLOURS)
    assert plot.main([str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny char model trained for a few steps on generated text (shared by the CLI tests)."""
    base = tmp_path_factory.mktemp("tiny_run")
    draw_curves(train_tiny_run(base), log=lambda *a: None)
    return base / "out"


CURVE_COLOURS = {"train loss": (0.122, 0.467, 0.706), "val loss": (1.0, 0.498, 0.055),
                 "learning rate": (0.173, 0.627, 0.173)}


def test_training_writes_the_curves(tiny_run):
    assert_picture(tiny_run / "curves.png", 500, 700, CURVE_COLOURS)


def test_training_without_matplotlib_says_so(tmp_path, monkeypatch):
    text = tmp_path / "corpus.txt"
    text.write_text("abc def ghi\n" * 200, encoding="utf-8")
    monkeypatch.setitem(sys.modules, "minigpt.analysis.curves", None)  # import fails
    msgs = []
    cfg = TrainConfig(data=str(text), out_dir=str(tmp_path / "out"), n_layer=1, n_head=2,
                      n_embd=16, block_size=8, batch_size=2, max_iters=2, eval_interval=2,
                      eval_iters=1, progress=False, attn_backend="sdpa")
    train(cfg, log=msgs.append)
    draw_curves(cfg, log=msgs.append)
    assert "no loss-curve plot" in msgs[-1] and not (tmp_path / "out" / "curves.png").exists()


def test_heads_cli_table_png_and_mask(tiny_run, tmp_path, capsys):
    common = ["--checkpoint", str(tiny_run), "--batches", "2", "--batch-size", "4"]
    assert heads.main(common + ["--out", str(tmp_path / "a.png"),
                                "--json", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "base val loss" in out and "layer 1" in out and "increase" in out
    assert_picture(tmp_path / "a.png", 200, 300, {"largest increase": (0.404, 0.0, 0.122)})
    assert heads.main(common + ["--mask", "1:0", "--out", str(tmp_path / "b.png"),
                                "--json", str(tmp_path / "b.json")]) == 0
    assert "masked" in capsys.readouterr().out
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["increase"][1][0] is None and a["increase"][1][0] is not None
    assert a["base_loss"] != b["base_loss"] and a["increase"] != b["increase"]
    assert b["masked_by_hand"] == [[1, 0]]
    for bad in (["--mask", "5:0"], ["--out", str(tmp_path / "heads.txt")]):
        with pytest.raises(SystemExit):
            heads.main(common + bad)


def run(args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_sample_attention_map(tiny_run, tmp_path):
    args = ["sample.py", "--checkpoint", str(tiny_run), "--prompt", "abc de", "--seed", "2",
            "--max-new-tokens", "20"]
    plain = run(args)
    drawn = run(args + ["--attention-map", str(tmp_path / "attn.png"), "--layer", "0",
                        "--head", "1"])
    assert drawn.returncode == 0, drawn.stderr
    assert drawn.stdout == plain.stdout  # the sample itself is unchanged
    assert "attention map" in drawn.stderr and "last 16 of 26 tokens" in drawn.stderr
    assert_picture(tmp_path / "attn.png", 200, 200,
                   {"probability 1": VIRIDIS_MAX, "causal mask": HATCH_GREY})


@pytest.mark.parametrize("flags, pattern", [
    (["--head", "7"], "--head: the model has 2 heads"),
    (["--layer", "2"], "--layer: the model has 2 layers"),
    (["--max-tokens", "0"], "--max-tokens"),
])
def test_sample_rejects_bad_attention_flags(tiny_run, tmp_path, capsys, flags, pattern):
    spec = importlib.util.spec_from_file_location("sample_script", ROOT / "sample.py")
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--checkpoint", str(tiny_run), "--attention-map", str(tmp_path / "a.png"),
                     "--max-new-tokens", "1", *flags])
    assert exit_info.value.code == 2 and pattern in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()
