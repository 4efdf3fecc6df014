"""The profiling part of csrc/cuda/device_check.sh: ext (each CUDA kernel set) against SDPA on the
GPU, side by side in one run, written to one JSON that names the GPU.

    python csrc/cuda/device_profile.py --out DIR [--kernels v2 v1] [--seq 1024 2048 4096 8192]

For bfloat16 and float16, head dims 64 and 128, causal, T in --seq with B * T = 16384 tokens and
H * D = 2048: the median forward and forward+backward times of "sdpa" and of "ext" with each
kernel set of --kernels (MINIGPT_CUDA_KERNELS, read by the CUDA host at every call), CUDA events
after warm-up (minigpt.bench.machine.time_fn). Then, with torch.profiler, the names of the CUDA kernels
SDPA launched for each dtype and head dim (FlashAttention-2, cuDNN or FlashAttention-3?).

Writes DIR/profile.json: {"gpu", "capability", "torch", "cuda", "rows", "ratios",
"sdpa_kernels", "table_rows"}; "table_rows" are minigpt.attention.gpu_table.Measurement rows ready to
commit. Prints the ratios as a table. Exits 1 if any case failed (its error is in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

# This checkout's minigpt (built in place by device_check.sh), not an installed one.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from minigpt import attention
from minigpt.attention import gpu_table  # noqa: E402
from minigpt.bench.machine import time_fn  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENS = 16384   # B * T
WIDTH = 2048     # H * D


def _inputs(B, H, T, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, dout = (torch.randn(B, T, H, D, device="cuda", dtype=dtype, generator=g)
                     .transpose(1, 2) for _ in range(4))  # the model's layout
    return q, k, v, dout


def time_case(backend, kernels, q, k, v, dout, warmup, repeats):
    """Median forward and forward+backward seconds of one backend (and kernel set)."""
    if kernels is not None:
        os.environ[gpu_table.KERNELS_ENV] = kernels
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def forward():
        with torch.no_grad():
            attention(q, k, v, causal=True, backend=backend)

    def forward_backward():
        out = attention(*leaves, causal=True, backend=backend)
        torch.autograd.grad(out, leaves, dout)

    return time_fn(forward, q.device, warmup, repeats), time_fn(forward_backward, q.device,
                                                                 warmup, repeats)


def sdpa_kernel_names(dtype, D, T=4096):
    """The CUDA kernels one SDPA forward+backward launches (torch.profiler), with a guess of
    which implementation they are."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v, dout = _inputs(TOKENS // T, WIDTH // D, T, D, dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    for _ in range(2):  # warm-up outside the profile
        torch.autograd.grad(attention(*leaves, causal=True, backend="sdpa"), leaves, dout)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.autograd.grad(attention(*leaves, causal=True, backend="sdpa"), leaves, dout)
        torch.cuda.synchronize()
    names = sorted({e.key for e in prof.key_averages()
                    if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
                    or "kernel" in e.key.lower() or "::" in e.key})
    text = " ".join(names).lower()
    if "cudnn" in text or "sm90_flash" in text or "cudnn_generated" in text:
        guess = "cuDNN"
    elif "flash3" in text or "flash_fwd_splitkv_kernel<hopper" in text or "hopper" in text:
        guess = "FlashAttention-3"
    elif "flash" in text:
        guess = "FlashAttention-2 (pytorch_flash)"
    elif "fmha" in text or "efficient" in text or "cutlass" in text:
        guess = "memory-efficient (xformers/cutlass)"
    else:
        guess = "unknown"
    return {"kernels": names, "guess": guess}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--kernels", nargs="+", default=list(gpu_table.KERNEL_SETS),
                   choices=gpu_table.KERNEL_SETS, help="CUDA kernel sets to time")
    p.add_argument("--seq", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    p.add_argument("--head-dim", nargs="+", type=int, default=[64, 128])
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("device_profile: no CUDA GPU visible", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    os.environ["MINIGPT_SELF_CHECK"] = "0"  # the CUDA tests check correctness; time only here
    dev = torch.device("cuda")
    cap = torch.cuda.get_device_capability(dev)
    report = {"gpu": torch.cuda.get_device_name(dev), "capability": list(cap),
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "tokens": TOKENS, "width": WIDTH, "causal": True, "rows": [], "ratios": [],
              "sdpa_kernels": {}, "table_rows": []}
    failed = False
    t_start = time.perf_counter()
    for dname in args.dtype:
        dtype = DTYPES[dname]
        for D in args.head_dim:
            for T in args.seq:
                B, H = TOKENS // T, WIDTH // D
                q, k, v, dout = _inputs(B, H, T, D, dtype)
                times = {}
                for backend, kernels in [("sdpa", None)] + [("ext", ks) for ks in args.kernels]:
                    name = backend if kernels is None else f"ext-{kernels}"
                    row = dict(backend=name, dtype=dname, B=B, H=H, T=T, D=D, causal=True)
                    try:
                        t_fwd, t_fb = time_case(backend, kernels, q, k, v, dout, args.warmup,
                                                args.repeats)
                        row.update(fwd_ms=t_fwd * 1e3, fwd_bwd_ms=t_fb * 1e3)
                        times[name] = (t_fwd, t_fb)
                    except Exception as e:  # recorded, and the run goes on with the others
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                        failed = True
                    report["rows"].append(row)
                if "sdpa" in times:
                    for name, (t_fwd, t_fb) in times.items():
                        if name != "sdpa":
                            report["ratios"].append(dict(
                                backend=name, dtype=dname, T=T, D=D,
                                fwd=t_fwd / times["sdpa"][0], fwd_bwd=t_fb / times["sdpa"][1]))
                del q, k, v, dout
            try:
                report["sdpa_kernels"][f"{dname} D={D}"] = sdpa_kernel_names(dtype, D)
            except Exception as e:
                report["sdpa_kernels"][f"{dname} D={D}"] = {"error": f"{type(e).__name__}: {e}"}
    os.environ.pop(gpu_table.KERNELS_ENV, None)
    for ks in args.kernels:
        for dname in args.dtype:
            fb = [r["fwd_bwd"] for r in report["ratios"]
                  if r["backend"] == f"ext-{ks}" and r["dtype"] == dname]
            if fb:
                report["table_rows"].append(
                    f"Measurement({tuple(cap)}, {dname!r}, {ks!r}, {report['gpu']!r}, "
                    f"({min(fb):.2f}, {max(fb):.2f}), 'csrc/cuda/device_check.sh, torch "
                    f"{torch.__version__}, causal, T {min(args.seq)}-{max(args.seq)}, head dims "
                    f"{' and '.join(map(str, args.head_dim))}')")
    report["seconds"] = time.perf_counter() - t_start
    path = os.path.join(args.out, "profile.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(report, fh, indent=1)
    os.replace(path + ".tmp", path)

    print(f"{report['gpu']} (compute capability {cap[0]}.{cap[1]}), torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}; causal, B*T = {TOKENS}, H*D = {WIDTH}")
    print("time ratio to sdpa (< 1: ext faster)")
    print(f"{'backend':8} {'dtype':9} {'D':>4} {'T':>5} {'fwd':>6} {'fwd+bwd':>8}")
    for r in report["ratios"]:
        print(f"{r['backend']:8} {r['dtype']:9} {r['D']:>4} {r['T']:>5} {r['fwd']:6.2f} "
              f"{r['fwd_bwd']:8.2f}")
    for key, val in report["sdpa_kernels"].items():
        print(f"sdpa kernels, {key}: {val.get('guess', val.get('error'))}")
    for row in report["rows"]:
        if "error" in row:
            print(f"FAILED: {row['backend']} {row['dtype']} D={row['D']} T={row['T']}: "
                  f"{row['error']}")
    print("gpu_table rows:")
    for line in report["table_rows"]:
        print("    " + line + ",")
    print(f"wrote {path} ({report['seconds']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
