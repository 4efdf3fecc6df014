"""python -m minigpt.profile: the FLOP counts, ratios, peak memory and correctness verdict it
prints, and the README's memory figures, which it produced."""

import csv
import json
import re
from pathlib import Path

import matplotlib.image
import pytest
import torch

from minigpt import attention_backends, profile

from conftest import ext_required
from reference import rand_qkv

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
EXT = attention_backends()["ext"]["available"]
needs_ext = pytest.mark.skipif(not EXT and not ext_required(), reason="minigpt._C unavailable")


@pytest.fixture
def threads():
    """Sets torch's intra-op thread count for one test and restores it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("Tq, Tk", [(1, 1), (5, 5), (17, 17), (3, 10), (64, 200), (1, 300)])
def test_visible_pairs_counts_the_mask(Tq, Tk):
    i, j = torch.arange(Tq)[:, None], torch.arange(Tk)[None, :]
    assert profile.visible_pairs(Tq, Tk, causal=False) == Tq * Tk
    assert profile.visible_pairs(Tq, Tk, causal=True) == int((j <= i + (Tk - Tq)).sum())
    if Tq == Tk:
        assert profile.visible_pairs(Tq, Tk, causal=True) == Tq * (Tq + 1) // 2


def _case(backends, B=2, H=2, T=40, D=16, causal=True, check=True):
    rows = profile.run_case(B, H, H, T, D, torch.float32, causal, CPU, backends, warmup=0,
                            repeats=1, check=check)
    return {r["backend"]: r for r in rows}


@pytest.mark.parametrize("causal", [True, False])
def test_flops_ratios_and_verdict_of_a_case(causal):
    backends = ["sdpa", "naive"] + (["ext"] if EXT or ext_required() else [])
    B, H, T, D = 2, 2, 40, 16
    rows = _case(backends, B, H, T, D, causal)
    flops = 4 * B * H * (T * (T + 1) // 2 if causal else T * T) * D  # QK^T and PV, 2 FLOPs a MAC
    for name, r in rows.items():
        assert r["fwd_gflops"] * 1e9 * r["fwd_ms"] / 1e3 == pytest.approx(flops, rel=1e-9)
        assert r["fwd_bwd_gflops"] * 1e9 * r["fwd_bwd_ms"] / 1e3 == pytest.approx(3.5 * flops,
                                                                                rel=1e-9)
        for base in ("sdpa", "naive"):
            assert r[f"fwd_vs_{base}"] == pytest.approx(r["fwd_ms"] / rows[base]["fwd_ms"])
            assert r[f"fwd_bwd_vs_{base}"] == pytest.approx(
                r["fwd_bwd_ms"] / rows[base]["fwd_bwd_ms"])
        assert 0 < r["err_out"] < 1e-5 and 0 < r["err_grad"] < 1e-4
        assert r["rule_ok"] is True, name
    assert rows["naive"]["fwd_vs_naive"] == 1.0


_ATTENTION = profile.attention


def _perturbed(name, rel):
    """profile.attention with the backend `name` off by a relative error rel."""
    real = _ATTENTION

    def attention(q, k, v, causal=True, backend=None):
        out = real(q, k, v, causal=causal, backend=backend)
        return out * (1 + rel) if backend == name else out

    return attention


def test_rule_verdict_fails_an_inaccurate_backend(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(profile, "attention", _perturbed("sdpa", 1e-3))
    rows = _case(["sdpa", "naive"])
    assert rows["sdpa"]["rule_ok"] is False and rows["naive"]["rule_ok"] is True
    # Within the rule (2x naive's error + 1e-6): a perturbation far below float32 rounding.
    monkeypatch.setattr(profile, "attention", _perturbed("sdpa", 1e-9))
    assert _case(["sdpa", "naive"])["sdpa"]["rule_ok"] is True

    monkeypatch.setattr(profile, "attention", _perturbed("sdpa", 1e-3))
    args = ["--seq", "32", "--batch", "1", "--heads", "2", "--head-dim", "16", "--warmup", "0",
            "--repeats", "1", "--backends", "sdpa", "naive"]
    assert profile.main(args) == 1
    captured = capsys.readouterr()
    assert "1 row(s) break the correctness rule" in captured.err
    assert re.search(r"^sdpa .* FAIL$", captured.out, re.M), captured.out


def test_peak_memory_of_known_allocations():
    def allocate():
        a = torch.empty(2**20)            # 4 MiB
        b = torch.empty(2**19)            # + 2 MiB: the peak, 6 MiB
        del a, b
        torch.empty(2**18)                # 1 MiB, after both were freed

    assert profile.peak_memory(allocate, CPU) == 6 * 2**20
    before = torch.empty(2**20)  # allocated before the run: not counted
    assert profile.peak_memory(lambda: torch.empty(2**10), CPU) == 4 * 2**10
    del before


@needs_ext
@pytest.mark.parametrize("n_threads", [1, 2])
def test_peak_memory_includes_the_kernels_scratch(threads, n_threads):
    """Counted beside the outputs: the forward's tile buffers, and the backward's delta (one
    float per query row) and dQ partial sums (at least one copy of dQ over all threads)."""
    threads(n_threads)
    q, k, v = rand_qkv(1, 4, 4, 256, 256, 64, requires_grad=False, seed=3)
    fwd = torch.ops.minigpt.attention_forward
    out, lse = fwd(q, k, v, True, 0.125)
    tile = 4 * (3 * 64 * 64 + 3 * 64)  # bytes of one thread's forward tile buffers at D = 64
    outputs = out.nbytes + lse.nbytes
    assert profile.peak_memory(lambda: fwd(q, k, v, True, 0.125), CPU) >= outputs + tile

    dout = torch.randn_like(out)
    grads = 3 * q.nbytes  # dq, dk, dv (Hq == Hkv)
    delta = lse.nbytes
    peak = profile.peak_memory(lambda: torch.ops.minigpt.attention_backward(
        dout, q, k, v, out, lse, True, 0.125), CPU)
    assert peak >= grads + q.nbytes + delta
    assert peak <= grads + n_threads * q.nbytes + delta + 2**20  # parts never exceed a dQ each


def _readme_memory_rows():
    """{T: (ext, sdpa, naive)} MB from the README's CPU profile table."""
    rows = {}
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| (\d+) \|.*\| ([\d.]+) / ([\d.]+) / ([\d.]+) \|$", line)
        if m:
            rows[int(m.group(1))] = tuple(float(x) for x in m.groups()[1:])
    return rows


@needs_ext
@pytest.mark.parametrize("T", [512, 1024])
def test_readme_memory_figures_match_a_measurement(threads, T):
    """The README's table: `python -m minigpt.profile --batch 1 --seq 512 1024 2048 4096` on 2
    threads (fp32, causal, D=64, 8 heads). Memory is deterministic, so its figures are checked;
    the two shortest rows keep this quick."""
    threads(2)
    readme = _readme_memory_rows()
    assert sorted(readme) == [512, 1024, 2048, 4096]
    rows = _case(["ext", "sdpa", "naive"], B=1, H=8, T=T, D=64, check=False)
    measured = tuple(round(rows[b]["fwd_bwd_peak_mb"], 1) for b in ("ext", "sdpa", "naive"))
    assert measured == readme[T]


def test_main_writes_json_csv_and_plot(tmp_path, capsys):
    out = {ext: tmp_path / f"p.{ext}" for ext in ("json", "csv", "png")}
    args = ["--seq", "32", "64", "--batch", "1", "--heads", "2", "--kv-heads", "1",
            "--head-dim", "16", "--warmup", "0", "--repeats", "1", "--backends", "sdpa", "naive",
            "--json", str(out["json"]), "--csv", str(out["csv"]), "--plot", str(out["png"])]
    assert profile.main(args) == 0
    text = capsys.readouterr().out
    assert "f+b/sdpa" in text and len(re.findall(r"^(sdpa|naive) ", text, re.M)) == 4
    rows = json.loads(out["json"].read_text())
    assert [(r["backend"], r["T"], r["Hkv"]) for r in rows] == [
        ("sdpa", 32, 1), ("naive", 32, 1), ("sdpa", 64, 1), ("naive", 64, 1)]
    assert all(r["rule_ok"] for r in rows)
    with open(out["csv"], newline="") as fh:
        assert [r["backend"] for r in csv.DictReader(fh)] == [r["backend"] for r in rows]
    image = matplotlib.image.imread(str(out["png"]))
    assert image.shape[0] > 300 and image.shape[1] > 800 and image[..., :3].std() > 0.05
    with pytest.raises(SystemExit):
        profile.main(["--seq", "32", "64", "--batch", "1", "2", "3"])
