"""Attention benchmark and correctness table: ``python -m minigpt profile``.

Times the forward and forward+backward of every backend ("ext", "sdpa", "naive") on the same
fresh random inputs over a grid of (B, H, T, D), dtype and causal, and prints per row: median
time (ms), achieved GFLOP/s (TFLOP/s on CUDA) and its percentage of the same-dtype GEMM rate,
peak memory, speedup against "sdpa" and "naive", and the max error of out and of the gradients
against a float64 reference, with the verdict of the correctness rule of docs/design.md (error <= 2x
naive's error in the same dtype, + 1e-6 for float32). A backend that cannot run the dtype on the
device (the registry says so, or a tiny trial call raises) is listed as skipped with the reason.

Above the table: the machine (CPU model name, threads, torch's CPU capability and ISA flags, the
vector ISA of our kernels, torch's version, the load average; the GPU on CUDA), the GEMM rates
(a --gemm-size cube and a QK^T-shaped batch, in the profiled dtype on the profiled device) and
the layout of q, k, v (--layout model: (B, T, H, D) buffers viewed as (B, H, T, D), as the model
makes them; contiguous: (B, H, T, D)). --json writes {"machine", "gemm", "layout", "rows"}
(--decode: the list of rows); --markdown prints the README's table.

    python -m minigpt profile                                     # CPU defaults: fp32, causal, D=64
    python -m minigpt profile --seq 1024 2048 --heads 8 --batch 2 1
    python -m minigpt profile --dtype bfloat16 --layout contiguous   # bf16 on the CPU
    python -m minigpt profile --device cuda --dtype bfloat16 --head-dim 64 128 --seq 512 8192
    python -m minigpt profile --json out.json --csv out.csv --plot out.png --trace trace.json
    python -m minigpt profile --decode --seq 1024 4096            # one decode step vs a KV cache

--decode times a decode step instead: Tq = --queries (default 1) new query rows against a KV cache
of T = --seq keys (B=1, 12 heads, D=64 by default: GPT-2 small), forward only, in microseconds per
call, with the bandwidth it implies (bytes of K and V read per call / time) and the error of out
against float64. Whole-model generation speed against Hugging Face transformers is
``python -m minigpt bench-generate``.

Timing: warm-up runs, then --repeats rounds, each timing every backend once in turn (and the
GEMM, the base of the % GEMM columns), median; on CPU with time.perf_counter, on CUDA with CUDA
events around each run. FLOPs count the visible (query, key) pairs:
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
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch

from minigpt.attention import _ext
from minigpt.attention import BACKENDS, attention, rule_floor, unavailable_reason
from minigpt.checkpoint import atomic_write_text
from minigpt.runtime import ArgumentParser, PathError, check_file_target, cli_main

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


def cpu_model_name() -> str:
    """The CPU's model name, as lscpu prints it: /proc/cpuinfo's "model name" on Linux (or
    "Hardware" / "Processor" on some ARM kernels), `sysctl machdep.cpu.brand_string` on macOS,
    else platform.processor(), else platform.machine(), else "unknown CPU"."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        for key in ("model name", "Hardware", "Processor", "cpu model"):
            if fields.get(key):
                return fields[key]
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            name = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, timeout=5).stdout.strip()
            if name:
                return name
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_feature(name: str) -> Optional[bool]:
    """torch.cpu._is_<name>_supported() where this torch has it (private API: None if absent)."""
    fn = getattr(torch.cpu, f"_is_{name}_supported", None)
    try:
        return bool(fn()) if fn is not None else None
    except Exception:  # a private helper failing must not stop a benchmark
        return None


def _load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # Windows has no load average
        return None


def machine_info(device: torch.device) -> dict:
    """What a speed figure depends on (STYLE.md 22): CPU model, threads, the ISA torch's kernels
    dispatch to and the vector ISA our kernels were built for, torch's version; the GPU on CUDA.

    Returns a JSON-able dict: cpu (model name), arch (platform.machine()), os, threads
    (torch.get_num_threads()), logical_cpus (os.cpu_count()), cpu_capability
    (torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", "DEFAULT", ...), cpu_features
    ({"avx2", "avx512", "avx512_bf16", "amx_tile", "amx_fp16", "vnni": bool}, those this torch
    can report), ext_vector_isa and ext_dtypes (minigpt._C's build_info(): the vector ISA of our
    CPU kernels and the dtypes they implement per device; None / {} when it is not built),
    torch, load_avg (the 1-minute load average when the run started, os.getloadavg(); None
    where the OS has none: figures taken with it above logical_cpus shared the cores); on
    CUDA also gpu (name) and gpu_capability ("sm_90").
    """
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch: no such function
        capability = None
    features = {n: _cpu_feature(n) for n in ("avx2", "avx512", "avx512_bf16", "amx_tile",
                                              "amx_fp16", "vnni")}
    build = _ext.build_info()
    info = dict(cpu=cpu_model_name(), arch=platform.machine(), os=platform.system(),
                threads=torch.get_num_threads(), logical_cpus=os.cpu_count(),
                cpu_capability=capability,
                cpu_features={n: v for n, v in features.items() if v is not None},
                ext_vector_isa=build.get("vector_isa"), ext_dtypes=build.get("dtypes", {}),
                torch=torch.__version__, load_avg=_load_average())
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_capability=f"sm_{major}{minor}")
    return info


def format_machine(info: dict) -> str:
    """One line naming the machine, for the top of the profiler's output."""
    flags = ", ".join(f"{n} {'yes' if v else 'no'}" for n, v in info["cpu_features"].items())
    cpu = (f"CPU {info['cpu']} ({info['arch']}, {info['os']}), {info['threads']} threads of "
           f"{info['logical_cpus']} logical CPUs, torch CPU capability "
           f"{info['cpu_capability'] or 'unknown'}" + (f" ({flags})" if flags else ""))
    ext_isa = info["ext_vector_isa"] or "not built"
    ext_dtypes = "; ".join(f"{dev} {', '.join(names)}" for dev, names in info["ext_dtypes"].items())
    ext = f"ext kernels: vector ISA {ext_isa}" + (f", dtypes {ext_dtypes}" if ext_dtypes else "")
    gpu = f"GPU {info['gpu']} ({info['gpu_capability']}); " if "gpu" in info else ""
    load = f"; load average {info['load_avg']:.1f}" if info.get("load_avg") is not None else ""
    return f"machine: {gpu}{cpu}; {ext}; torch {info['torch']}{load}"


def gemm_fn(dtype: torch.dtype, device: torch.device, m: int, n: Optional[int] = None,
            k: Optional[int] = None, batch: int = 1, seed: int = 0):
    """(fn, flops): fn() runs torch.matmul of (batch, m, k) by (batch, k, n) random normal
    matrices in dtype on device (into a preallocated output); flops = 2 * batch * m * n * k.
    n and k default to m."""
    n, k = n or m, k or m
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, m, k, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(batch, k, n, generator=g).to(device=device, dtype=dtype)
    out = torch.empty(batch, m, n, device=device, dtype=dtype)
    return (lambda: torch.matmul(a, b, out=out)), 2 * batch * m * n * k


def gemm_rate(dtype: torch.dtype, device: torch.device, m: int = 2048, n: Optional[int] = None,
              k: Optional[int] = None, batch: int = 1, warmup: int = 1, repeats: int = 5,
              seed: int = 0) -> float:
    """GFLOP/s of gemm_fn's matmul: its FLOPs over the median time of `repeats` runs after
    `warmup` (time_fn). n and k default to m: a square m x m x m GEMM, the ceiling each
    backend's rate is quoted against. Raises what torch.matmul raises for an unsupported dtype."""
    fn, flops = gemm_fn(dtype, device, m, n, k, batch, seed)
    return flops / time_fn(fn, device, warmup, repeats) / 1e9


def measure_gemm(dtype: torch.dtype, device: torch.device, size: int, head_dims: List[int],
                 repeats: int = 5) -> dict:
    """The same-dtype GEMM rates of this run, in GFLOP/s: "square" (size x size x size, the
    rate each backend's share is quoted against) and, per head dim D, "qk" (QK^T-shaped: 16
    batched (1024 x D) by (D x 1024) products, the shape of attention's score matmuls).
    Returns {"dtype", "size", "repeats", "square_gflops", "qk_gflops": {D: rate}}."""
    return dict(dtype=str(dtype).replace("torch.", ""), size=size, repeats=repeats,
                square_gflops=gemm_rate(dtype, device, size, repeats=repeats),
                qk_gflops={D: gemm_rate(dtype, device, 1024, 1024, D, batch=16, repeats=repeats)
                           for D in head_dims})


def format_gemm(gemm: dict, device: torch.device) -> str:
    unit, div = ("TFLOP/s", 1e3) if device.type == "cuda" else ("GFLOP/s", 1.0)
    qk = ", ".join(f"D={D} {rate / div:.1f}" for D, rate in gemm["qk_gflops"].items())
    return (f"GEMM {gemm['dtype']} on {device.type}, median of {gemm['repeats']}: "
            f"{gemm['size']}^3 matmul {gemm['square_gflops'] / div:.1f} {unit} (timed again in "
            f"each shape's rounds: the %GEMM columns' base); QK^T-shaped 16 x (1024 x D) x "
            f"(D x 1024): {qk} {unit}")


# --layout: how q, k and v are laid out in memory (their values are the same either way).
LAYOUTS = {"model": "(B, T, H, D) buffers viewed as (B, H, T, D), as the model makes them",
           "contiguous": "contiguous (B, H, T, D) tensors"}


def _inputs(B, H, Hkv, T, D, dtype, device, seed, layout="model"):
    """q (B, H, T, D), k and v (B, Hkv, T, D) in `layout` (see LAYOUTS), and a contiguous
    dout (B, H, T, D); standard normal values, drawn in float32 from `seed` whatever the layout,
    then cast to dtype on device."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, got {layout!r}")
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    k = torch.randn(B, T, Hkv, D, generator=g).transpose(1, 2)
    v = torch.randn(B, T, Hkv, D, generator=g).transpose(1, 2)
    dout = torch.randn(B, H, T, D, generator=g)
    # .to() keeps the strides of the (B, T, H, D) views (preserve_format); contiguous copies them.
    qkv = [t.to(device=device, dtype=dtype) for t in (q, k, v)]
    if layout == "contiguous":
        qkv = [t.contiguous() for t in qkv]
    return qkv + [dout.to(device=device, dtype=dtype)]


def _errors(backend, q, k, v, dout, causal, ref, ref_grads):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, causal=causal, backend=backend)
    grads = torch.autograd.grad(out, leaves, dout)
    e_out = (out.double() - ref).abs().max().item()
    e_grad = max((g.double() - r).abs().max().item() for g, r in zip(grads, ref_grads))
    return e_out, e_grad


def backend_support(name: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                    causal: bool = True) -> Optional[str]:
    """None if backend `name` runs attention's forward and backward on this device, dtype and
    head dim, else why not: the registry's reason (unavailable_reason, which reads the dtypes
    minigpt._C declares per device), or the first line of the error that a tiny trial call
    (B = H = 1, T = 3, forward and backward) raised."""
    why = unavailable_reason(name, device, dtype, head_dim, causal)
    if why is not None:
        return why
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(1, 1, 3, head_dim, generator=g).to(device=device, dtype=dtype)
              .requires_grad_() for _ in range(3)]
    try:
        out = attention(*leaves, causal=causal, backend=name)
        torch.autograd.grad(out, leaves, torch.ones_like(out))
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"a trial call failed: {first}"
    return None


def run_case(B, H, Hkv, T, D, dtype, causal, device, backends, warmup, repeats, check=True,
             seed=0, layout="model", gemm_gflops: Optional[float] = None,
             gemm_size: Optional[int] = None) -> List[dict]:
    """Benchmark one shape on every backend of `backends`: one result row per backend, in order.

    q, k, v are laid out as `layout` says (LAYOUTS). A backend that cannot run this device,
    dtype and head dim (backend_support) gets a row with "skipped": the reason. The timing
    alternates: after `warmup` untimed runs of each backend, every one of the `repeats` rounds
    times each backend's forward, then each one's forward+backward, once in turn, so that a
    burst of load on a shared machine hits them alike; the median is kept. With gemm_size N,
    an N x N x N matmul in the same dtype is timed in every round too, and each row gets its
    rate, gemm_gflops, and fwd_pct_gemm and fwd_bwd_pct_gemm, the row's achieved rates as a
    percentage of it; gemm_gflops (GFLOP/s) gives that base rate instead. With check, err_out
    and err_grad are the max abs errors against float64, naive_err_out / naive_err_grad
    naive's in the same dtype (computed whether or not naive is timed), and rule_ok docs/design.md's
    verdict (<= 2x naive's error + rule_floor(dtype), relative to max(1, max |ref|)).
    """
    q, k, v, dout = _inputs(B, H, Hkv, T, D, dtype, device, seed, layout)
    flops_fwd = 4 * B * H * visible_pairs(T, T, causal) * D
    shape = dict(B=B, H=H, Hkv=Hkv, T=T, D=D, dtype=str(dtype)[6:], causal=causal,
                 layout=layout)
    rows: Dict[str, dict] = {}
    fns: Dict[str, Dict[str, Callable[[], None]]] = {}
    for backend in backends:
        why = backend_support(backend, device, dtype, D, causal)
        if why is not None:
            rows[backend] = dict(backend=backend, **shape, skipped=why)
            continue
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]

        def forward(backend=backend):
            with torch.no_grad():
                attention(q, k, v, causal=causal, backend=backend)

        def forward_backward(backend=backend, leaves=leaves):
            out = attention(*leaves, causal=causal, backend=backend)
            torch.autograd.grad(out, leaves, dout)

        try:
            for _ in range(warmup):
                forward()
                forward_backward()
            rows[backend] = dict(backend=backend, **shape,
                                 fwd_peak_mb=peak_memory(forward, device) / 2**20,
                                 fwd_bwd_peak_mb=peak_memory(forward_backward, device) / 2**20)
            fns[backend] = {"fwd": forward, "fwd_bwd": forward_backward}
        except (torch.OutOfMemoryError, MemoryError):
            rows[backend] = dict(backend=backend, **shape, error="out of memory")
    times: Dict[str, Dict[str, List[float]]] = {b: {"fwd": [], "fwd_bwd": []} for b in fns}
    gemm_run, gemm_flops = gemm_fn(dtype, device, gemm_size) if gemm_size and fns else (None, 0)
    gemm_times: List[float] = []
    if gemm_run is not None:
        gemm_run()  # warm-up
    for _ in range(repeats):
        if gemm_run is not None:
            gemm_times.append(time_fn(gemm_run, device, 0, 1))
        for kind in ("fwd", "fwd_bwd"):
            for backend in list(fns):
                try:
                    times[backend][kind].append(time_fn(fns[backend][kind], device, 0, 1))
                except (torch.OutOfMemoryError, MemoryError):
                    rows[backend] = dict(backend=backend, **shape, error="out of memory")
                    del fns[backend]
    if gemm_times:
        gemm_gflops = gemm_flops / statistics.median(gemm_times) / 1e9
    for backend in fns:
        r = rows[backend]
        t_fwd, t_fb = (statistics.median(times[backend][kind]) for kind in ("fwd", "fwd_bwd"))
        r.update(fwd_ms=t_fwd * 1e3, fwd_bwd_ms=t_fb * 1e3, fwd_gflops=flops_fwd / t_fwd / 1e9,
                 fwd_bwd_gflops=3.5 * flops_fwd / t_fb / 1e9)
        if gemm_gflops:
            r["gemm_gflops"] = gemm_gflops
            r["fwd_pct_gemm"] = 100 * r["fwd_gflops"] / gemm_gflops
            r["fwd_bwd_pct_gemm"] = 100 * r["fwd_bwd_gflops"] / gemm_gflops
    timed = [rows[b] for b in fns]
    if check and timed:
        leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
        ref = attention(*leaves, causal=causal, backend="naive")
        ref_grads = [g.to(device) for g in torch.autograd.grad(ref, leaves, dout.cpu().double())]
        ref = ref.detach().to(device)
        naive = _errors("naive", q, k, v, dout, causal, ref, ref_grads)
        floor = rule_floor(dtype)
        scale_out = max(1.0, ref.abs().max().item())
        scale_grad = max(1.0, max(g.abs().max().item() for g in ref_grads))
        for r in timed:
            r["err_out"], r["err_grad"] = (naive if r["backend"] == "naive" else
                                           _errors(r["backend"], q, k, v, dout, causal, ref,
                                                   ref_grads))
            r["naive_err_out"], r["naive_err_grad"] = naive
            r["rule_ok"] = (r["err_out"] <= 2 * naive[0] + floor * scale_out
                            and r["err_grad"] <= 2 * naive[1] + floor * scale_grad)
    for r in timed:
        for base in ("sdpa", "naive"):
            if base in fns:
                r[f"fwd_vs_{base}"] = r["fwd_ms"] / rows[base]["fwd_ms"]
                r[f"fwd_bwd_vs_{base}"] = r["fwd_bwd_ms"] / rows[base]["fwd_bwd_ms"]
    return [rows[b] for b in backends]


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
    """The rows as a fixed-width text table (the profiler's output). "fwd %GEMM" and "f+b %GEMM":
    a row's achieved rate as a percentage of the same-dtype GEMM rate of the run ("-" without
    it); rows of skipped backends carry the reason instead of figures."""
    unit, div = ("TFLOP/s", 1e3) if device.type == "cuda" else ("GFLOP/s", 1.0)
    head = (f"{'backend':<7} {'B':>2} {'H':>3} {'T':>6} {'D':>4} {'dtype':<8} {'causal':<6} "
            f"{'fwd ms':>9} {'f+b ms':>9} {'fwd ' + unit:>12} {'f+b ' + unit:>12} "
            f"{'fwd %GEMM':>9} {'f+b %GEMM':>9} "
            f"{'fwd MB':>8} {'f+b MB':>8} {'f+b/sdpa':>8} {'f+b/naive':>9} {'fwd/sdpa':>8} "
            f"{'err out':>8} {'err grad':>8} {'rule':>4}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r or "skipped" in r:
            what = r["error"] if "error" in r else f"skipped: {r['skipped']}"
            lines.append(f"{r['backend']:<7} {r['B']:>2} {r['H']:>3} {r['T']:>6} {r['D']:>4} "
                         f"{r['dtype']:<8} {str(r['causal']):<6} {what}")
            continue

        def ratio(key):
            return f"{r[key]:.2f}x" if key in r else "-"

        def pct(key):
            return f"{r[key]:.1f}%" if key in r else "-"

        err = (f"{r['err_out']:>8.1e} {r['err_grad']:>8.1e} {'ok' if r.get('rule_ok', True) else 'FAIL':>4}"
               if "err_out" in r else f"{'-':>8} {'-':>8} {'-':>4}")
        lines.append(
            f"{r['backend']:<7} {r['B']:>2} {r['H']:>3} {r['T']:>6} {r['D']:>4} {r['dtype']:<8} "
            f"{str(r['causal']):<6} {r['fwd_ms']:>9.2f} {r['fwd_bwd_ms']:>9.2f} "
            f"{r['fwd_gflops'] / div:>12.1f} {r['fwd_bwd_gflops'] / div:>12.1f} "
            f"{pct('fwd_pct_gemm'):>9} {pct('fwd_bwd_pct_gemm'):>9} "
            f"{r['fwd_peak_mb']:>8.1f} {r['fwd_bwd_peak_mb']:>8.1f} {ratio('fwd_bwd_vs_sdpa'):>8} "
            f"{ratio('fwd_bwd_vs_naive'):>9} {ratio('fwd_vs_sdpa'):>8} {err}")
    return "\n".join(lines)


def format_markdown(rows: List[dict]) -> str:
    """The rows as one markdown table, a line per shape (B, H, D, T; dtype, causal and layout
    are the run's and belong in the caption) and the backends side by side, in the order they
    ran: forward and forward+backward ms, each backend's time over sdpa's ("ext/sdpa"), the
    percentage of the GEMM rate (fwd / f+b), forward+backward peak MB, and the rule's verdict
    where checked. Skipped backends show "-" and their reasons are listed under the table."""
    names = list(dict.fromkeys(r["backend"] for r in rows))
    shapes: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        shapes.setdefault((r["B"], r["H"], r["D"], r["T"]), {})[r["backend"]] = r
    others = [n for n in names if n != "sdpa"] if "sdpa" in names else []
    checked = any("rule_ok" in r for r in rows)
    cols = (["B", "H", "D", "T"] + [f"{n} fwd ms" for n in names]
            + [f"fwd {n}/sdpa" for n in others] + [f"{n} f+b ms" for n in names]
            + [f"f+b {n}/sdpa" for n in others] + [f"{n} % GEMM fwd / f+b" for n in names]
            + [f"f+b peak MB {' / '.join(names)}"]
            + ([f"rule {' / '.join(names)}"] if checked else []))
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---:" for _ in cols) + " |"]
    for (B, H, D, T), by in shapes.items():
        def get(name, key, fmt):
            r = by.get(name, {})
            return format(r[key], fmt) if key in r else "-"

        def ratio(name, key):
            r, s = by.get(name, {}), by.get("sdpa", {})
            return f"{r[key] / s[key]:.2f}x" if key in r and key in s else "-"

        cells = ([str(B), str(H), str(D), str(T)] + [get(n, "fwd_ms", ".2f") for n in names]
                 + [ratio(n, "fwd_ms") for n in others]
                 + [get(n, "fwd_bwd_ms", ".2f") for n in names]
                 + [ratio(n, "fwd_bwd_ms") for n in others]
                 + [f"{get(n, 'fwd_pct_gemm', '.0f')} / {get(n, 'fwd_bwd_pct_gemm', '.0f')}"
                    for n in names]
                 + [" / ".join(get(n, "fwd_bwd_peak_mb", ".1f") for n in names)])
        if checked:
            cells.append(" / ".join({True: "ok", False: "FAIL"}.get(by.get(n, {}).get("rule_ok"),
                                                                     "-") for n in names))
        lines.append("| " + " | ".join(cells) + " |")
    reasons = {f"{r['backend']}: {r.get('skipped') or r.get('error')}" for r in rows
               if "skipped" in r or "error" in r}
    lines += [""] + [f"- skipped {why}" for why in sorted(reasons)] if reasons else []
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


def trace(path: str, B, H, Hkv, T, D, dtype, causal, device, backends,
          layout="model") -> None:
    """A torch.profiler Chrome trace (chrome://tracing, Perfetto) of one forward+backward per
    backend, each inside a record_function region named after it."""
    from torch.profiler import ProfilerActivity, profile, record_function

    q, k, v, dout = _inputs(B, H, Hkv, T, D, dtype, device, seed=0, layout=layout)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for backend in backends:
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            with record_function(f"attention[{backend}]"):
                out = attention(*leaves, causal=causal, backend=backend)
                torch.autograd.grad(out, leaves, dout)
            _sync(device)
    prof.export_chrome_trace(path)


def _header(device: torch.device, dtype: torch.dtype, gemm_size: int, head_dims: List[int],
            layout: str) -> dict:
    """Prints the lines above the table: the machine, the same-dtype GEMM rates measured now
    and the layout of q, k, v. Returns them for --json: {"machine", "gemm", "layout"}."""
    machine = machine_info(device)
    print(format_machine(machine), flush=True)
    try:
        gemm = measure_gemm(dtype, device, gemm_size, head_dims)
        print(format_gemm(gemm, device))
    except RuntimeError as e:  # a dtype torch.matmul lacks on this device
        gemm = dict(dtype=str(dtype)[6:], size=gemm_size, square_gflops=None, qk_gflops={},
                    error=str(e).strip().splitlines()[0])
        print(f"GEMM {gemm['dtype']} on {device.type}: not measured ({gemm['error']})")
    print(f"layout {layout}: q, k, v are {LAYOUTS[layout]}", flush=True)
    return dict(machine=machine, gemm=gemm, layout=layout)


def _available_backends(device, dtype, wanted, head_dims) -> List[str]:
    """The backends of `wanted` that run for every head dim (backend_support), with a note on
    stderr for each other one."""
    names = []
    for name in wanted:
        why = next(filter(None, (backend_support(name, device, dtype, D) for D in head_dims)),
                   None)
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
    p = ArgumentParser(prog="python -m minigpt profile",
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
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="model",
                   help="q, k, v memory layout: model = (B, T, H, D) buffers viewed as "
                        "(B, H, T, D), as the model makes them; contiguous = (B, H, T, D)")
    p.add_argument("--gemm-size", type=int, default=2048,
                   help="N of the N x N x N same-dtype matmul whose rate the %%GEMM columns "
                        "are quoted against")
    p.add_argument("--markdown", action="store_true",
                   help="also print the rows as a markdown table (the README's format)")
    p.add_argument("--json", help="write the machine, the GEMM rates and the rows as JSON to "
                                  "this file ({machine, gemm, layout, rows}; --decode: the rows)")
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
    if args.gemm_size < 1:
        p.error(f"argument --gemm-size: must be >= 1, got {args.gemm_size}")
    meta = _header(device, dtype, args.gemm_size, args.head_dim, args.layout)
    backends = args.backends
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
                                args.repeats, args.check, layout=args.layout,
                                gemm_size=args.gemm_size if meta["gemm"]["square_gflops"]
                                else None)
                text = format_table(case, device)
                print(text if not rows else text.split("\n", 2)[2], flush=True)
                rows += case
    if args.markdown:
        print(f"\n{str(dtype)[6:]}, {'causal' if causals == [True] else 'causal: ' + args.causal}"
              f", layout {args.layout}, {meta['machine']['threads']} threads; "
              f"`python -m minigpt profile {' '.join(argv if argv is not None else sys.argv[1:])}`"
              f"\n\n{format_markdown(rows)}")
    _write_rows(rows, args, meta)
    if args.plot:
        plot(rows, args.plot)
    if args.trace:
        first = [r for r in rows[:len(backends)] if "fwd_ms" in r]  # the first shape's, run
        trace(args.trace, batches[0], *heads_for(args.head_dim[0]), seqs[0], args.head_dim[0],
              dtype, causals[0], device, [r["backend"] for r in first], args.layout)
    failed = [r for r in rows if r.get("rule_ok") is False]
    if failed:
        print(f"{len(failed)} row(s) break the correctness rule", file=sys.stderr)
        return 1
    return 0


def _write_rows(rows: List[dict], args, meta: Optional[dict] = None) -> None:
    """The rows as JSON (--json, with the run's metadata when given) and CSV (--csv), each
    written atomically."""
    if args.json:
        atomic_write_text(args.json, json.dumps(rows if meta is None else {**meta, "rows": rows},
                                                indent=1))
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
    if args.markdown:
        p.error("argument --markdown: not available with --decode")
    print(format_machine(machine_info(device)))
    backends = _available_backends(device, dtype, args.backends, args.head_dim)
    print(f"decode step on {device}, backends {', '.join(backends)}; median of {args.repeats} "
          f"runs of {args.calls} calls")
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
