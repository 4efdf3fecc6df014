"""Attention benchmark and correctness table: ``python -m minigpt.profile``.

Times the forward and forward+backward of every available backend ("ext", "sdpa", "naive") on
the same fresh random inputs over a grid of (B, H, T, D), dtype and causal, and prints per row:
median time (ms), achieved GFLOP/s (TFLOP/s on CUDA), peak memory, speedup against "sdpa" and
"naive", and the max error of out and of the gradients against a float64 reference, with the
verdict of the correctness rule of DESIGN.md (error <= 2x naive's error + 1e-6 for float32).

    python -m minigpt.profile                                     # CPU defaults: fp32, causal, D=64
    python -m minigpt.profile --seq 1024 2048 --heads 8 --batch 2 1
    python -m minigpt.profile --device cuda --dtype bfloat16 --head-dim 64 128 --seq 512 8192
    python -m minigpt.profile --json out.json --csv out.csv --plot out.png --trace trace.json
    python -m minigpt.profile --decode --seq 1024 4096            # one decode step vs a KV cache

--decode times a decode step instead: Tq = --queries (default 1) new query rows against a KV cache
of T = --seq keys (B=1, 12 heads, D=64 by default: GPT-2 small), forward only, in microseconds per
call, with the bandwidth it implies (bytes of K and V read per call / time) and the error of out
against float64. Whole-model generation speed against Hugging Face transformers is
``python -m minigpt.bench_generate``.

Timing: on CPU, warm-up runs then the median of --repeats runs timed with time.perf_counter;
on CUDA, CUDA events around each run, median. FLOPs count the visible (query, key) pairs:
forward 4 * B * H * pairs * D (QK^T and PV), forward+backward 3.5x that (FlashAttention-2's
convention: the backward does 2.5x the forward's matmul work). Peak memory is measured in a
separate untimed run: on CUDA with torch.cuda.max_memory_allocated, on CPU from the allocation
events of torch.profiler (every tensor allocation, kernel scratch included), above what was
allocated before the run (inputs excluded).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch

from .attention import BACKENDS, attention, unavailable_reason
from .checkpoint import atomic_write_text
from .runtime import ArgumentParser, PathError, check_file_target, cli_main

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


def visible_pairs(Tq: int, Tk: int, causal: bool) -> int:
    """Number of (query, key) pairs attended: Tq * Tk, or the bottom-right causal count."""
    if not causal:
        return Tq * Tk
    off = Tk - Tq
    return sum(min(Tk, i + off + 1) for i in range(Tq))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of fn() after warm-up (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated while fn() runs, above what was allocated before it."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = [e["args"] for e in json.load(fh)["traceEvents"]
                      if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    if not events:
        return 0
    base = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - base


def _inputs(B, H, Hkv, T, D, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    # The model's layout: (B, T, H, D) transposed to (B, H, T, D), no copy.
    q = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    k = torch.randn(B, T, Hkv, D, generator=g).transpose(1, 2)
    v = torch.randn(B, T, Hkv, D, generator=g).transpose(1, 2)
    dout = torch.randn(B, H, T, D, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, dout)]


def _errors(backend, q, k, v, dout, causal, ref, ref_grads):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, causal=causal, backend=backend)
    grads = torch.autograd.grad(out, leaves, dout)
    e_out = (out.double() - ref).abs().max().item()
    e_grad = max((g.double() - r).abs().max().item() for g, r in zip(grads, ref_grads))
    return e_out, e_grad


def run_case(B, H, Hkv, T, D, dtype, causal, device, backends, warmup, repeats, check=True,
             seed=0) -> List[dict]:
    """Benchmark one shape on every backend; one result row per backend."""
    q, k, v, dout = _inputs(B, H, Hkv, T, D, dtype, device, seed)
    flops_fwd = 4 * B * H * visible_pairs(T, T, causal) * D
    ref = ref_grads = None
    if check:
        leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
        ref = attention(*leaves, causal=causal, backend="naive")
        ref_grads = [g.to(device) for g in torch.autograd.grad(ref, leaves, dout.cpu().double())]
        ref = ref.detach().to(device)
    rows = []
    for backend in backends:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]

        def forward():
            with torch.no_grad():
                attention(q, k, v, causal=causal, backend=backend)

        def forward_backward():
            out = attention(*leaves, causal=causal, backend=backend)
            torch.autograd.grad(out, leaves, dout)

        try:
            t_fwd = time_fn(forward, device, warmup, repeats)
            t_fb = time_fn(forward_backward, device, warmup, repeats)
            mem_fwd = peak_memory(forward, device)
            mem_fb = peak_memory(forward_backward, device)
        except (torch.OutOfMemoryError, MemoryError):
            rows.append(dict(backend=backend, B=B, H=H, Hkv=Hkv, T=T, D=D, dtype=str(dtype)[6:],
                             causal=causal, error="out of memory"))
            continue
        row = dict(backend=backend, B=B, H=H, Hkv=Hkv, T=T, D=D, dtype=str(dtype)[6:],
                   causal=causal, fwd_ms=t_fwd * 1e3, fwd_bwd_ms=t_fb * 1e3,
                   fwd_gflops=flops_fwd / t_fwd / 1e9, fwd_bwd_gflops=3.5 * flops_fwd / t_fb / 1e9,
                   fwd_peak_mb=mem_fwd / 2**20, fwd_bwd_peak_mb=mem_fb / 2**20)
        if check:
            row["err_out"], row["err_grad"] = _errors(backend, q, k, v, dout, causal, ref,
                                                      ref_grads)
        rows.append(row)
    by_name = {r["backend"]: r for r in rows if "fwd_ms" in r}
    for r in by_name.values():
        for base in ("sdpa", "naive"):
            if base in by_name:
                r[f"fwd_vs_{base}"] = r["fwd_ms"] / by_name[base]["fwd_ms"]
                r[f"fwd_bwd_vs_{base}"] = r["fwd_bwd_ms"] / by_name[base]["fwd_bwd_ms"]
        if check and "naive" in by_name:
            floor = 1e-6 if dtype == torch.float32 else 0.0
            scale_out = max(1.0, ref.abs().max().item())
            scale_grad = max(1.0, max(g.abs().max().item() for g in ref_grads))
            n = by_name["naive"]
            r["rule_ok"] = (r["err_out"] <= 2 * n["err_out"] + floor * scale_out
                            and r["err_grad"] <= 2 * n["err_grad"] + floor * scale_grad)
    return rows


def run_decode_case(B, H, Hkv, Tq, Tk, D, dtype, device, backends, warmup, repeats,
                    check=True, calls=20, seed=0) -> List[dict]:
    """Time one decode step, Tq query rows against Tk cached keys (forward only, no grad), on
    every backend: one row per backend with us per call (median over repeats of `calls` calls,
    the backends timed in turn within each repeat),
    the K/V read bandwidth it implies, ratios to sdpa and naive and the error of out."""
    g = torch.Generator().manual_seed(seed)
    # The model's layouts: q a (B, Tq, H, D) view transposed, k and v a KV cache (B, Hkv, T, D).
    q = torch.randn(B, Tq, H, D, generator=g).transpose(1, 2).to(device=device, dtype=dtype)
    k, v = (torch.randn(B, Hkv, Tk, D, generator=g).to(device=device, dtype=dtype)
            for _ in range(2))
    kv_bytes = 2 * k.numel() * k.element_size()
    ref = attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), causal=True,
                    backend="naive") if check else None
    def step(backend):
        with torch.no_grad():
            for _ in range(calls):
                attention(q, k, v, causal=True, backend=backend)

    # Round-robin: every repeat times each backend once, so that a burst of load on a shared
    # machine hits them alike instead of whichever ran during it.
    times: Dict[str, List[float]] = {name: [] for name in backends}
    for _ in range(repeats):
        for backend in backends:
            times[backend].append(time_fn(lambda: step(backend), device, warmup, 1))
    rows = []
    for backend in backends:
        t = statistics.median(times[backend]) / calls
        row = dict(backend=backend, B=B, H=H, Hkv=Hkv, Tq=Tq, T=Tk, D=D, dtype=str(dtype)[6:],
                   us=t * 1e6, kv_gbps=kv_bytes / t / 1e9)
        if check:
            with torch.no_grad():
                out = attention(q, k, v, causal=True, backend=backend)
            row["err_out"] = (out.double().cpu() - ref).abs().max().item()
        rows.append(row)
    by_name = {r["backend"]: r for r in rows}
    for r in rows:
        for base in ("sdpa", "naive"):
            if base in by_name:
                r[f"vs_{base}"] = r["us"] / by_name[base]["us"]
        if check and "naive" in by_name:
            floor = 1e-6 if dtype == torch.float32 else 0.0
            r["rule_ok"] = (r["err_out"] <= 2 * by_name["naive"]["err_out"]
                            + floor * max(1.0, ref.abs().max().item()))
    return rows


def format_decode_table(rows: List[dict]) -> str:
    head = (f"{'backend':<7} {'B':>2} {'H':>3} {'Hkv':>3} {'Tq':>3} {'T (keys)':>8} {'D':>4} "
            f"{'dtype':<8} {'us/call':>9} {'K+V GB/s':>9} {'vs sdpa':>8} {'vs naive':>8} "
            f"{'err out':>8} {'rule':>4}")
    lines = [head, "-" * len(head)]
    for r in rows:
        def ratio(key):
            return f"{r[key]:.2f}x" if key in r else "-"

        err = (f"{r['err_out']:>8.1e} {'ok' if r.get('rule_ok', True) else 'FAIL':>4}"
               if "err_out" in r else f"{'-':>8} {'-':>4}")
        lines.append(f"{r['backend']:<7} {r['B']:>2} {r['H']:>3} {r['Hkv']:>3} {r['Tq']:>3} "
                     f"{r['T']:>8} {r['D']:>4} {r['dtype']:<8} {r['us']:>9.1f} "
                     f"{r['kv_gbps']:>9.1f} {ratio('vs_sdpa'):>8} {ratio('vs_naive'):>8} {err}")
    return "\n".join(lines)


def format_table(rows: List[dict], device: torch.device) -> str:
    unit, div = ("TFLOP/s", 1e3) if device.type == "cuda" else ("GFLOP/s", 1.0)
    head = (f"{'backend':<7} {'B':>2} {'H':>3} {'T':>6} {'D':>4} {'dtype':<8} {'causal':<6} "
            f"{'fwd ms':>9} {'f+b ms':>9} {'fwd ' + unit:>12} {'f+b ' + unit:>12} "
            f"{'fwd MB':>8} {'f+b MB':>8} {'f+b/sdpa':>8} {'f+b/naive':>9} {'fwd/sdpa':>8} "
            f"{'err out':>8} {'err grad':>8} {'rule':>4}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['backend']:<7} {r['B']:>2} {r['H']:>3} {r['T']:>6} {r['D']:>4} "
                         f"{r['dtype']:<8} {str(r['causal']):<6} {r['error']}")
            continue

        def ratio(key):
            return f"{r[key]:.2f}x" if key in r else "-"

        err = (f"{r['err_out']:>8.1e} {r['err_grad']:>8.1e} {'ok' if r.get('rule_ok', True) else 'FAIL':>4}"
               if "err_out" in r else f"{'-':>8} {'-':>8} {'-':>4}")
        lines.append(
            f"{r['backend']:<7} {r['B']:>2} {r['H']:>3} {r['T']:>6} {r['D']:>4} {r['dtype']:<8} "
            f"{str(r['causal']):<6} {r['fwd_ms']:>9.2f} {r['fwd_bwd_ms']:>9.2f} "
            f"{r['fwd_gflops'] / div:>12.1f} {r['fwd_bwd_gflops'] / div:>12.1f} "
            f"{r['fwd_peak_mb']:>8.1f} {r['fwd_bwd_peak_mb']:>8.1f} {ratio('fwd_bwd_vs_sdpa'):>8} "
            f"{ratio('fwd_bwd_vs_naive'):>9} {ratio('fwd_vs_sdpa'):>8} {err}")
    return "\n".join(lines)


def plot(rows: List[dict], path: str) -> None:
    """Time (forward+backward) and peak memory against T, one line per backend and head dim."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: Dict[tuple, List[dict]] = {}
    for r in rows:
        if "fwd_ms" in r:
            series.setdefault((r["backend"], r["D"], r["dtype"], r["causal"]), []).append(r)
    for (backend, D, dtype, causal), rs in sorted(series.items(), key=str):
        rs = sorted(rs, key=lambda r: r["T"])
        label = f"{backend} D={D} {dtype}{' causal' if causal else ''}"
        ax_t.plot([r["T"] for r in rs], [r["fwd_bwd_ms"] for r in rs], "o-", label=label)
        ax_m.plot([r["T"] for r in rs], [r["fwd_bwd_peak_mb"] for r in rs], "o-", label=label)
    for ax, title, ylabel in ((ax_t, "forward + backward time", "ms (median)"),
                              (ax_m, "forward + backward peak memory", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def trace(path: str, B, H, Hkv, T, D, dtype, causal, device, backends) -> None:
    """A torch.profiler Chrome trace (chrome://tracing, Perfetto) of one forward+backward per
    backend, each inside a record_function region named after it."""
    from torch.profiler import ProfilerActivity, profile, record_function

    q, k, v, dout = _inputs(B, H, Hkv, T, D, dtype, device, seed=0)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for backend in backends:
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            with record_function(f"attention[{backend}]"):
                out = attention(*leaves, causal=causal, backend=backend)
                torch.autograd.grad(out, leaves, dout)
            _sync(device)
    prof.export_chrome_trace(path)


def _available_backends(device, dtype, wanted) -> List[str]:
    names = []
    for name in wanted:
        why = unavailable_reason(name, device, dtype)
        if why is not None:
            print(f"note: skipping {name!r}: {why}", file=sys.stderr)
            continue
        names.append(name)
    return names


def _check_args(p: argparse.ArgumentParser, args) -> None:
    """Refuse out-of-range sizes and unusable output paths before anything is timed."""
    least = {"seq": 1, "batch": 1, "heads": 1, "kv_heads": 1, "head_dim": 1, "warmup": 0,
             "repeats": 1, "calls": 1, "threads": 1, "queries": 1}
    for name, low in least.items():
        value = getattr(args, name)
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if v is not None and v < low]
        if bad:
            p.error(f"argument --{name.replace('_', '-')}: every value must be >= {low}, "
                    f"got {bad[0]}")
    for name in ("json", "csv", "plot", "trace"):
        if getattr(args, name):
            try:
                check_file_target(getattr(args, name), f"--{name}")
            except PathError as e:
                p.error(f"argument {e}")


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    p = ArgumentParser(prog="python -m minigpt.profile",
                                description="Benchmark attention backends side by side.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--decode", action="store_true",
                   help="time a decode step: --queries query rows against a KV cache of --seq "
                        "keys, forward only (defaults: B=1, 12 heads, T=1024 4096)")
    p.add_argument("--queries", type=int, default=1, help="Tq of a --decode step")
    p.add_argument("--calls", type=int, default=20,
                   help="calls per timed run with --decode (times are per call)")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="B per T (one value, or one per --seq); default keeps B*T fixed")
    p.add_argument("--heads", type=int, default=None,
                   help="H (default 8 on CPU, 2048/D on CUDA; 12 with --decode)")
    p.add_argument("--kv-heads", type=int, default=None, help="Hkv for GQA (default: H)")
    p.add_argument("--seq", type=int, nargs="+", default=None,
                   help="T values (default CPU: 256 512 1024 2048; CUDA: 512 ... 8192)")
    p.add_argument("--head-dim", type=int, nargs="+", default=[64])
    p.add_argument("--causal", choices=["true", "false", "both"], default="true")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the float64 error columns")
    p.add_argument("--json", help="write the rows as JSON to this file")
    p.add_argument("--csv", help="write the rows as CSV to this file")
    p.add_argument("--plot", help="write a PNG of time and memory against T")
    p.add_argument("--trace", help="write a torch.profiler Chrome trace of the first shape")
    args = p.parse_args(argv)
    _check_args(p, args)

    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"argument --device: not a device name, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: CUDA is not available on this machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = _DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if args.decode:
        return _main_decode(p, args, device, dtype)
    seqs = args.seq or ([256, 512, 1024, 2048] if device.type == "cpu"
                        else [512, 1024, 2048, 4096, 8192])
    # B * T fixed: 2048 tokens per head on CPU (B*H = 16 at T=1024 with H=8), 16k on CUDA
    # (FlashAttention-2's benchmark convention, with H = 2048 / D).
    tokens = 2048 if device.type == "cpu" else 16384
    if args.batch and len(args.batch) not in (1, len(seqs)):
        p.error("argument --batch: give one value or one per --seq value")
    batches = (args.batch * len(seqs) if args.batch and len(args.batch) == 1
               else args.batch or [max(1, tokens // T) for T in seqs])
    causals = {"true": [True], "false": [False], "both": [True, False]}[args.causal]
    backends = _available_backends(device, dtype, args.backends)

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    print(f"device {device} ({where}), torch {torch.__version__}, backends {', '.join(backends)}")
    def heads_for(D):
        H = args.heads or (8 if device.type == "cpu" else max(1, 2048 // D))
        Hkv = args.kv_heads or H
        if H % Hkv:
            p.error(f"argument --kv-heads: {Hkv} must divide --heads {H}")
        return H, Hkv

    rows = []
    for D in args.head_dim:
        H, Hkv = heads_for(D)
        for causal in causals:
            for B, T in zip(batches, seqs):
                case = run_case(B, H, Hkv, T, D, dtype, causal, device, backends, args.warmup,
                                args.repeats, args.check)
                text = format_table(case, device)
                print(text if not rows else text.split("\n", 2)[2], flush=True)
                rows += case
    _write_rows(rows, args)
    if args.plot:
        plot(rows, args.plot)
    if args.trace:
        trace(args.trace, batches[0], *heads_for(args.head_dim[0]), seqs[0], args.head_dim[0],
              dtype, causals[0], device, backends)
    failed = [r for r in rows if r.get("rule_ok") is False]
    if failed:
        print(f"{len(failed)} row(s) break the correctness rule", file=sys.stderr)
        return 1
    return 0


def _write_rows(rows: List[dict], args) -> None:
    """The rows as JSON (--json) and CSV (--csv), each written atomically."""
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=1))
    if args.csv:
        import io

        keys = sorted({k for r in rows for k in r})
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(args.csv, buf.getvalue())


def _main_decode(p, args, device, dtype) -> int:
    if args.queries < 1:
        p.error(f"argument --queries: must be >= 1, got {args.queries}")
    seqs = args.seq or [1024, 4096]
    if any(T < args.queries for T in seqs):
        p.error(f"argument --seq: every T must be >= --queries ({args.queries})")
    if args.batch and len(args.batch) not in (1, len(seqs)):
        p.error("argument --batch: give one value or one per --seq value")
    batches = args.batch * len(seqs) if args.batch and len(args.batch) == 1 else (
        args.batch or [1] * len(seqs))
    H = args.heads or 12
    Hkv = args.kv_heads or H
    if H % Hkv:
        p.error(f"argument --kv-heads: {Hkv} must divide --heads {H}")
    backends = _available_backends(device, dtype, args.backends)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    print(f"decode step, device {device} ({where}), torch {torch.__version__}, "
          f"backends {', '.join(backends)}; median of {args.repeats} runs of {args.calls} calls")
    rows = []
    for D in args.head_dim:
        for B, T in zip(batches, seqs):
            case = run_decode_case(B, H, Hkv, args.queries, T, D, dtype, device, backends,
                                   args.warmup, args.repeats, args.check, args.calls)
            text = format_decode_table(case)
            print(text if not rows else text.split("\n", 2)[2], flush=True)
            rows += case
    _write_rows(rows, args)
    failed = [r for r in rows if r.get("rule_ok") is False]
    if failed:
        print(f"{len(failed)} row(s) break the correctness rule", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
