"""The profiler's output: the rows of ``python -m minigpt profile`` as a text table, a markdown
table (the format of docs/kernels.md), a picture, JSON and CSV.

A row is a dict with the shape (backend, B, H, Hkv, T, D, dtype, causal, layout) and either the
figures (fwd_ms, fwd_bwd_ms, fwd_gflops, fwd_bwd_gflops, fwd_peak_mb, fwd_bwd_peak_mb; where
measured, the %GEMM shares, the ratios to sdpa and naive, err_out, err_grad and rule_ok), or
"skipped" / "error" with the reason; minigpt.bench.profile.run_case makes them. Decode rows
(run_decode_case) carry Tq, us and kv_gbps instead.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Dict, List, Optional

import torch

from minigpt.checkpoint import atomic_write_text


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


def write_rows(rows: List[dict], args, meta: Optional[dict] = None) -> None:
    """The rows as JSON (--json, with the run's metadata when given) and CSV (--csv), each
    written atomically."""
    if args.json:
        atomic_write_text(args.json, json.dumps(rows if meta is None else {**meta, "rows": rows},
                                                indent=1))
    if args.csv:
        keys = sorted({k for r in rows for k in r})
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(args.csv, buf.getvalue())
