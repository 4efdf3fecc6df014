"""Attention benchmark and correctness table: ``python -m minigpt profile``.

Times the forward and forward+backward of every backend ("ext", "sdpa", "naive") on the same
fresh random inputs over a grid of (B, H, T, D), dtype and causal, and prints per row: median
time (ms), achieved GFLOP/s (TFLOP/s on CUDA) and its percentage of the same-dtype GEMM rate,
peak memory, speedup against "sdpa" and "naive", and the max error of out and of the gradients
against a float64 reference, with the verdict of the correctness rule (minigpt.attention.rule:
error <= 2x naive's error in the same dtype, + 1e-6 for float32). A backend that cannot run the dtype on the
device (the registry says so, or a tiny trial call raises) is listed as skipped with the reason.

Above the table: the machine and the same-dtype GEMM rates of this run (minigpt.bench.machine)
and the layout of q, k, v (--layout). --json writes {"machine", "gemm", "layout", "rows"}
(--decode: the list of rows); --markdown prints the table of docs/kernels.md (minigpt.bench.report).

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
GEMM, the base of the % GEMM columns), median (minigpt.bench.machine.time_fn). FLOPs count the
visible (query, key) pairs: forward 4 * B * H * pairs * D (QK^T and PV), forward+backward 3.5x
that (FlashAttention-2's convention: the backward does 2.5x the forward's matmul work). Peak
memory is measured in a separate untimed run (minigpt.bench.machine.peak_memory).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable, Dict, List, Optional

import torch

from minigpt.attention import BACKENDS, attention, unavailable_reason
from minigpt.attention.rule import rule_bound
from minigpt.bench.machine import (format_gemm, format_machine, gemm_fn, machine_info,
                                   measure_gemm, peak_memory, sync, time_fn)
from minigpt.bench.report import (format_decode_table, format_markdown, format_table, plot,
                                  write_rows)
from minigpt.runtime import ArgumentParser, PathError, check_file_target, cli_main

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


def visible_pairs(Tq: int, Tk: int, causal: bool) -> int:
    """Number of (query, key) pairs attended: Tq * Tk, or the bottom-right causal count."""
    if not causal:
        return Tq * Tk
    off = Tk - Tq
    return sum(min(Tk, i + off + 1) for i in range(Tq))


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
    verdict (minigpt.attention.rule.rule_bound, relative to max |ref|).
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
        size_out = ref.abs().max().item()
        size_grad = max(g.abs().max().item() for g in ref_grads)
        for r in timed:
            r["err_out"], r["err_grad"] = (naive if r["backend"] == "naive" else
                                           _errors(r["backend"], q, k, v, dout, causal, ref,
                                                   ref_grads))
            r["naive_err_out"], r["naive_err_grad"] = naive
            r["rule_ok"] = (r["err_out"] <= rule_bound(naive[0], dtype, size_out)
                            and r["err_grad"] <= rule_bound(naive[1], dtype, size_grad))
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
            r["rule_ok"] = r["err_out"] <= rule_bound(by_name["naive"]["err_out"], dtype,
                                                      ref.abs().max().item())
    return rows


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
            sync(device)
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


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m minigpt profile``."""
    p = ArgumentParser(prog="python -m minigpt profile",
                       description="Benchmark attention backends side by side.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help='device to profile on: "cpu", "cuda", "cuda:1"')
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="dtype of q, k, v; None = float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--decode", action="store_true",
                   help="time a decode step: --queries query rows against a KV cache of --seq "
                        "keys, forward only (then B=1, 12 heads, T=1024 4096 unless given)")
    p.add_argument("--queries", type=int, default=1, help="Tq of a --decode step")
    p.add_argument("--calls", type=int, default=20,
                   help="calls per timed run with --decode (times are per call)")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="B per T (one value, or one per --seq); None keeps B*T fixed (2048 "
                        "tokens on CPU, 16384 on CUDA; 1 with --decode)")
    p.add_argument("--heads", type=int, default=None,
                   help="H, query heads; None = 8 on CPU, 2048/D on CUDA, 12 with --decode")
    p.add_argument("--kv-heads", type=int, default=None,
                   help="Hkv, key/value heads (grouped-query attention); None = H")
    p.add_argument("--seq", type=int, nargs="+", default=None,
                   help="sequence lengths T; None = 256 512 1024 2048 on CPU, 512 ... 8192 on "
                        "CUDA, 1024 4096 with --decode")
    p.add_argument("--head-dim", type=int, nargs="+", default=[64], help="head dims D")
    p.add_argument("--causal", choices=["true", "false", "both"], default="true",
                   help="causal attention, not, or both")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                   help="the attention backends to time, side by side")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs of each backend first")
    p.add_argument("--repeats", type=int, default=7,
                   help="timed rounds (each times every backend once); the median is kept")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (CPU); None = torch's default")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the errors against float64 and judge them by the correctness "
                        "rule; --no-check skips the error columns")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="model",
                   help="q, k, v memory layout: model = (B, T, H, D) buffers viewed as "
                        "(B, H, T, D), as the model makes them; contiguous = (B, H, T, D)")
    p.add_argument("--gemm-size", type=int, default=2048,
                   help="N of the N x N x N same-dtype matmul whose rate the %%GEMM columns "
                        "are quoted against")
    p.add_argument("--markdown", action="store_true",
                   help="also print the rows as a markdown table (the format of docs/kernels.md)")
    p.add_argument("--json", help="write the machine, the GEMM rates and the rows as JSON to "
                                  "this file ({machine, gemm, layout, rows}; --decode: the rows)")
    p.add_argument("--csv", help="write the rows as CSV to this file")
    p.add_argument("--plot", help="write a PNG of time and memory against T")
    p.add_argument("--trace", help="write a torch.profiler Chrome trace of the first shape")
    return p


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    """Run the profiler; 0 when every checked row meets the correctness rule, else 1; 2 for
    bad arguments."""
    p = build_parser()
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
        rows = _main_decode(p, args, device, dtype)
    else:
        rows = _main_grid(p, args, device, dtype, sys.argv[1:] if argv is None else argv)
    failed = [r for r in rows if r.get("rule_ok") is False]
    if failed:
        print(f"{len(failed)} row(s) break the correctness rule", file=sys.stderr)
        return 1
    return 0


def _main_grid(p: argparse.ArgumentParser, args, device: torch.device, dtype: torch.dtype,
               argv: List[str]) -> List[dict]:
    """The timing grid (head dims x causal x (B, T)): prints the tables, writes --json, --csv,
    --plot and --trace, returns the rows."""
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
              f"`python -m minigpt profile {' '.join(argv)}`\n\n{format_markdown(rows)}")
    write_rows(rows, args, meta)
    if args.plot:
        plot(rows, args.plot)
    if args.trace:
        first = [r for r in rows[:len(backends)] if "fwd_ms" in r]  # the first shape's, run
        trace(args.trace, batches[0], *heads_for(args.head_dim[0]), seqs[0], args.head_dim[0],
              dtype, causals[0], device, [r["backend"] for r in first], args.layout)
    return rows


def _main_decode(p: argparse.ArgumentParser, args, device: torch.device,
                 dtype: torch.dtype) -> List[dict]:
    """--decode: one decode step per (head dim, B, T); prints the tables, writes --json and
    --csv, returns the rows."""
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
    write_rows(rows, args)
    return rows


if __name__ == "__main__":
    sys.exit(main())
