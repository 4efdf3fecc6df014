"""The machine a speed figure was measured on, and how fast it is (STYLE.md 22: a figure names
its machine, and the same-dtype GEMM rate measured in the same run is the ceiling to quote).

- time_fn, peak_memory: median wall time (CUDA events on a GPU) and peak allocation of a call.
- machine_info, format_machine: the CPU model and ISA, threads, our kernels' vector ISA, torch's
  version, the load average; the GPU on CUDA.
- gemm_rate, measure_gemm, format_gemm: the same-dtype matmul rates of this run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, List, Optional

import torch

from minigpt.attention import _ext


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of `repeats` runs of fn() after `warmup` untimed ones: CUDA events around
    each run on a GPU, time.perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
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
    """Peak bytes allocated while fn() runs, above what was allocated before it (its inputs
    excluded): on CUDA from torch.cuda.max_memory_allocated, on the CPU from the allocation
    events of torch.profiler (every tensor allocation, kernel scratch included)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
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
    """One line with measure_gemm's rates (TFLOP/s on CUDA, GFLOP/s on the CPU)."""
    unit, div = ("TFLOP/s", 1e3) if device.type == "cuda" else ("GFLOP/s", 1.0)
    qk = ", ".join(f"D={D} {rate / div:.1f}" for D, rate in gemm["qk_gflops"].items())
    return (f"GEMM {gemm['dtype']} on {device.type}, median of {gemm['repeats']}: "
            f"{gemm['size']}^3 matmul {gemm['square_gflops'] / div:.1f} {unit} (timed again in "
            f"each shape's rounds: the %GEMM columns' base); QK^T-shaped 16 x (1024 x D) x "
            f"(D x 1024): {qk} {unit}")
