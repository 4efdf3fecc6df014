"""python -m minigpt profile: the FLOP counts, ratios, peak memory and correctness verdict it
prints, the machine and same-dtype GEMM rate in its header, the layout of its inputs, dtypes a
backend lacks, and the memory figures of docs/kernels.md, which it produced."""

import csv
import json
import platform
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import pytest
import torch

from minigpt import attention_backends
from minigpt.bench import machine, profile
from minigpt.attention import unavailable_reason

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

    assert machine.peak_memory(allocate, CPU) == 6 * 2**20
    before = torch.empty(2**20)  # allocated before the run: not counted
    assert machine.peak_memory(lambda: torch.empty(2**10), CPU) == 4 * 2**10
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
    assert machine.peak_memory(lambda: fwd(q, k, v, True, 0.125), CPU) >= outputs + tile

    dout = torch.randn_like(out)
    grads = 3 * q.nbytes  # dq, dk, dv (Hq == Hkv)
    delta = lse.nbytes
    peak = machine.peak_memory(lambda: torch.ops.minigpt.attention_backward(
        dout, q, k, v, out, lse, True, 0.125), CPU)
    assert peak >= grads + q.nbytes + delta
    assert peak <= grads + n_threads * q.nbytes + delta + 2**20  # parts never exceed a dQ each


def _markdown_tables(text):
    """Every markdown table in text, as a list of {column: cell} dicts per table."""
    tables, header = [], None
    for line in text.splitlines() + [""]:
        cells = ([c.strip() for c in line.strip().strip("|").split("|")]
                 if line.startswith("|") else None)
        if cells is None:
            header = None
        elif header is None:
            header = cells
            tables.append([])
        elif not all(set(c) <= set("-:") for c in cells):
            tables[-1].append(dict(zip(header, cells)))
    return tables


def _readme_memory_rows():
    """{(D, T): (ext, sdpa)} forward+backward peak MB from the fp32 CPU profile table of docs/kernels.md
    (the first table with that column; the bf16 table of the same machine follows it)."""
    readme = (ROOT / "docs" / "kernels.md").read_text(encoding="utf-8")
    col = "f+b peak MB ext / sdpa"
    table = next(t for t in _markdown_tables(readme) if any(col in r for r in t))
    return {(int(r["D"]), int(r["T"])): tuple(float(x) for x in r[col].split(" / "))
            for r in table}


@needs_ext
@pytest.mark.parametrize("T", [512, 1024])
def test_readme_memory_figures_match_a_measurement(threads, T):
    """The per-machine CPU table of docs/kernels.md: `python -m minigpt profile --threads 2 --batch 1
    --seq 512 1024 2048 4096 --head-dim 64 128 --backends ext sdpa` (fp32, causal, 8 heads).
    Memory is deterministic, so its figures are checked; the two shortest rows at D = 64 keep
    this quick."""
    threads(2)
    readme = _readme_memory_rows()
    assert sorted(readme) == [(D, T) for D in (64, 128) for T in (512, 1024, 2048, 4096)]
    rows = _case(["ext", "sdpa"], B=1, H=8, T=T, D=64, check=False)
    measured = tuple(round(rows[b]["fwd_bwd_peak_mb"], 1) for b in ("ext", "sdpa"))
    assert measured == readme[(64, T)]


def test_main_writes_json_csv_and_plot(tmp_path, capsys):
    out = {ext: tmp_path / f"p.{ext}" for ext in ("json", "csv", "png")}
    args = ["--seq", "32", "64", "--batch", "1", "--heads", "2", "--kv-heads", "1",
            "--head-dim", "16", "--warmup", "0", "--repeats", "1", "--backends", "sdpa", "naive",
            "--json", str(out["json"]), "--csv", str(out["csv"]), "--plot", str(out["png"])]
    assert profile.main(args) == 0
    text = capsys.readouterr().out
    assert "f+b/sdpa" in text and len(re.findall(r"^(sdpa|naive) ", text, re.M)) == 4
    rows = json.loads(out["json"].read_text())["rows"]
    assert [(r["backend"], r["T"], r["Hkv"]) for r in rows] == [
        ("sdpa", 32, 1), ("naive", 32, 1), ("sdpa", 64, 1), ("naive", 64, 1)]
    assert all(r["rule_ok"] for r in rows)
    with open(out["csv"], newline="") as fh:
        assert [r["backend"] for r in csv.DictReader(fh)] == [r["backend"] for r in rows]
    image = matplotlib.image.imread(str(out["png"]))
    assert image.shape[0] > 300 and image.shape[1] > 800 and image[..., :3].std() > 0.05
    with pytest.raises(SystemExit):
        profile.main(["--seq", "32", "64", "--batch", "1", "2", "3"])


_TINY = ["--seq", "32", "--batch", "1", "--heads", "2", "--head-dim", "16", "--warmup", "0",
         "--repeats", "2", "--gemm-size", "64"]


def test_header_names_the_machine_and_the_gemm_rate(tmp_path, capsys):
    """The lines above the table name the CPU, the threads, torch's CPU capability, our kernels'
    vector ISA and torch; the JSON carries them and the same-dtype GEMM rate, and each row's
    % of GEMM is its rate over the GEMM rate timed in its own rounds."""
    path = tmp_path / "p.json"
    assert profile.main(_TINY + ["--backends", "sdpa", "naive", "--json", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    info = machine.machine_info(CPU)
    assert lines[0].startswith("machine: ") and f"CPU {info['cpu']} " in lines[0]
    assert f"{torch.get_num_threads()} threads" in lines[0] and torch.__version__ in lines[0]
    assert str(torch.backends.cpu.get_cpu_capability()) in lines[0]
    assert f"vector ISA {info['ext_vector_isa'] or 'not built'}" in lines[0]
    assert lines[1].startswith("GEMM float32 on cpu") and "64^3 matmul" in lines[1]

    meta = json.loads(path.read_text())
    info.pop("load_avg"), meta["machine"].pop("load_avg")
    assert meta["machine"] == json.loads(json.dumps(info))
    assert meta["layout"] == "model"
    assert meta["gemm"]["dtype"] == "float32" and meta["gemm"]["square_gflops"] > 0
    assert meta["gemm"]["qk_gflops"]["16"] > 0
    assert [r["backend"] for r in meta["rows"]] == ["sdpa", "naive"]
    for r in meta["rows"]:
        assert r["gemm_gflops"] > 0
        assert r["fwd_pct_gemm"] == pytest.approx(100 * r["fwd_gflops"] / r["gemm_gflops"])
        assert r["fwd_bwd_pct_gemm"] == pytest.approx(100 * r["fwd_bwd_gflops"] / r["gemm_gflops"])
    assert re.search(r"^sdpa .* \d+\.\d% +\d+\.\d% ", "\n".join(lines), re.M)


@pytest.mark.skipif(shutil.which("lscpu") is None or platform.system() != "Linux",
                    reason="needs Linux's lscpu")
def test_cpu_model_name_is_lscpus():
    text = subprocess.run(["lscpu"], capture_output=True, text=True, env={"LC_ALL": "C"}).stdout
    names = re.findall(r"^Model name:\s*(.+)$", text, re.M)
    assert names and machine.cpu_model_name() == names[0].strip()


def test_cpu_model_name_without_proc_cpuinfo(monkeypatch):
    def no_file(*args, **kwargs):
        raise FileNotFoundError("/proc/cpuinfo")

    monkeypatch.setattr(machine, "open", no_file, raising=False)
    monkeypatch.setattr(machine.sys, "platform", "win32")
    monkeypatch.setattr(machine.platform, "processor", lambda: "Intel64 Family 6 Model 143")
    assert machine.cpu_model_name() == "Intel64 Family 6 Model 143"
    monkeypatch.setattr(machine.platform, "processor", lambda: "")
    assert machine.cpu_model_name() == platform.machine()


def test_gemm_rate_counts_two_flops_a_mac(monkeypatch):
    monkeypatch.setattr(machine, "time_fn", lambda fn, device, warmup, repeats: (fn(), 0.5)[1])
    rate = machine.gemm_rate(torch.float32, CPU, 32, 16, 8, batch=3)
    assert rate == 2 * 3 * 32 * 16 * 8 / 0.5 / 1e9


def _recording_attention(seen):
    real = _ATTENTION

    def attention(q, k, v, causal=True, backend=None):
        if q.shape[-2] > 3:  # not the trial call
            seen.add((backend, q.stride(), k.stride(), v.stride()))
        return real(q, k, v, causal=causal, backend=backend)

    return attention


@pytest.mark.parametrize("layout", ["model", "contiguous"])
def test_layout_option_reaches_the_backends(monkeypatch, tmp_path, capsys, layout):
    """--layout model times q, k, v as (B, T, H, D) buffers viewed as (B, H, T, D);
    --layout contiguous as (B, H, T, D) tensors; the values are the same either way."""
    B, H, T, D = 1, 2, 32, 16
    seen = set()
    monkeypatch.setattr(profile, "attention", _recording_attention(seen))
    path = tmp_path / "p.json"
    args = ["--backends", "sdpa", "--layout", layout, "--json", str(path)]
    assert profile.main(_TINY + args) == 0
    assert f"layout {layout}: q, k, v are" in capsys.readouterr().out
    strides = {"model": (T * H * D, D, H * D, 1), "contiguous": (H * T * D, T * D, D, 1)}[layout]
    assert {s[1:] for s in seen} == {(strides, strides, strides)}
    meta = json.loads(path.read_text())
    assert meta["layout"] == layout and all(r["layout"] == layout for r in meta["rows"])
    model = profile._inputs(B, H, H, T, D, torch.float32, CPU, 0, "model")
    contiguous = profile._inputs(B, H, H, T, D, torch.float32, CPU, 0, "contiguous")
    for a, b in zip(model, contiguous):
        assert torch.equal(a, b)
    with pytest.raises(SystemExit):
        profile.main(_TINY + ["--layout", "strided"])


def test_bfloat16_on_cpu_skips_what_cannot_run_and_applies_the_rule(tmp_path, capsys):
    """A backend without bf16 CPU kernels is listed as skipped with the registry's reason; the
    others are timed and judged by the rule in bf16 (<= 2x naive's bf16 error vs float64)."""
    path, trace = tmp_path / "p.json", tmp_path / "trace.json"
    assert profile.main(_TINY + ["--dtype", "bfloat16", "--json", str(path),
                                 "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    meta = json.loads(path.read_text())
    assert meta["gemm"]["dtype"] == "bfloat16" and meta["gemm"]["square_gflops"] > 0
    rows = {r["backend"]: r for r in meta["rows"]}
    assert set(rows) == set(profile.BACKENDS)
    for name, r in rows.items():
        why = unavailable_reason(name, CPU, torch.bfloat16, 16, True)
        if why is not None:
            assert r["skipped"] == why and "fwd_ms" not in r
            assert re.search(rf"^{name} .* skipped: {re.escape(why)}$", out, re.M)
        else:
            assert r["dtype"] == "bfloat16" and r["fwd_ms"] > 0 and r["rule_ok"] is True
            assert r["err_out"] <= 2 * r["naive_err_out"] and r["err_out"] > 1e-4  # bf16, not fp32
    assert "skipped" not in rows["sdpa"] and "skipped" not in rows["naive"]
    regions = {e["name"] for e in json.loads(trace.read_text())["traceEvents"]
               if e.get("name", "").startswith("attention[")}
    assert regions == {f"attention[{n}]" for n, r in rows.items() if "skipped" not in r}


def test_a_failing_trial_call_skips_the_backend(monkeypatch):
    """Support is asked of the backend, not assumed: where the registry says yes but a tiny
    call raises, the backend is skipped with the error, and the other backends still run."""
    monkeypatch.setattr(profile, "unavailable_reason", lambda *args: None)
    real = _ATTENTION

    def attention(q, k, v, causal=True, backend=None):
        if backend == "sdpa":
            raise RuntimeError("no kernel for this dtype\nC++ trace ...")
        return real(q, k, v, causal=causal, backend=backend)

    monkeypatch.setattr(profile, "attention", attention)
    assert profile.backend_support("sdpa", CPU, torch.float32, 16) == (
        "a trial call failed: no kernel for this dtype")
    rows = _case(["sdpa", "naive"])
    assert rows["sdpa"]["skipped"] == "a trial call failed: no kernel for this dtype"
    assert rows["naive"]["rule_ok"] is True and "fwd_vs_sdpa" not in rows["naive"]


def test_rule_is_judged_without_naive_among_the_timed(monkeypatch):
    """naive's error sets the rule's bound even when only other backends are timed."""
    monkeypatch.setattr(profile, "attention", _perturbed("sdpa", 1e-3))
    rows = _case(["sdpa"])
    assert set(rows) == {"sdpa"} and rows["sdpa"]["rule_ok"] is False
    assert rows["sdpa"]["err_out"] > 2 * rows["sdpa"]["naive_err_out"]


def test_backends_are_timed_in_turn(monkeypatch):
    """Every round times each backend's forward once, then each one's forward+backward."""
    order = []
    real_time_fn = profile.time_fn

    def time_fn(fn, device, warmup, repeats):
        # forward(backend=...) and forward_backward(backend=..., leaves=...); the GEMM a lambda
        order.append(f"{fn.__name__}:{fn.__defaults__[0] if fn.__defaults__ else 'gemm'}")
        return real_time_fn(fn, device, warmup, repeats)

    monkeypatch.setattr(profile, "time_fn", time_fn)
    profile.run_case(1, 2, 2, 32, 16, torch.float32, True, CPU, ["sdpa", "naive"], warmup=0,
                     repeats=2, check=False, gemm_size=32)
    one = ["<lambda>:gemm", "forward:sdpa", "forward:naive", "forward_backward:sdpa",
           "forward_backward:naive"]
    assert order == one * 2


def test_markdown_table(capsys):
    """--markdown prints the table of docs/kernels.md: backends side by side, ratios to sdpa, % of GEMM."""
    assert profile.main(_TINY + ["--seq", "32", "48", "--backends", "naive", "sdpa",
                                 "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "`python -m minigpt profile --seq 32" in out and "float32, causal, layout model" in out
    (table,) = _markdown_tables(out)
    assert [(r["D"], r["T"]) for r in table] == [("16", "32"), ("16", "48")]
    for r in table:
        assert re.fullmatch(r"\d+\.\d\d", r["naive fwd ms"])
        assert re.fullmatch(r"\d+\.\d\dx", r["fwd naive/sdpa"])
        assert re.fullmatch(r"\d+\.\d\dx", r["f+b naive/sdpa"])
        assert re.fullmatch(r"\d+ / \d+", r["sdpa % GEMM fwd / f+b"])
        assert r["rule naive / sdpa"] == "ok / ok"
