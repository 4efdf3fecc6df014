"""Where minigpt's CUDA kernels were measured against SDPA, and what attention() picks from that.

On CUDA, ``attention(backend=None)`` runs our kernels ("ext") only for a (compute capability,
dtype, kernel set) that a committed GPU profile showed at least as fast as PyTorch's SDPA in
forward+backward over every profiled shape; everywhere else it runs "sdpa" and
``attention_backends()`` says why. ``backend="ext"``, ``MINIGPT_ATTENTION_BACKEND=ext`` and
``--attn-backend ext`` still force our kernels.

A row is added from the JSON that ``csrc/cuda/device_check.sh`` writes on a GPU (its
``ratios`` entry: ext's time over SDPA's, causal, T 1024-8192, head dims 64 and 128). No row
has ext at least as fast today, so the default on every GPU is "sdpa".

MINIGPT_CUDA_KERNELS selects the kernel set the CUDA host launches: "v2" (default, the current
kernels) or "v1" (the kernels of the first H100 run; on an H200, v2's forward+backward takes
0.60-0.67x v1's time). A measurement applies to the set it was taken with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ["Measurement", "MEASURED", "KERNEL_SETS", "kernels_in_use", "cuda_default_reason"]

KERNELS_ENV = "MINIGPT_CUDA_KERNELS"
KERNEL_SETS = ("v2", "v1")  # the first is the default; csrc/cuda/attention_cuda.cpp reads the same


@dataclass(frozen=True)
class Measurement:
    """One GPU profile of ext against SDPA for one dtype."""

    capability: Tuple[int, int]  # torch.cuda.get_device_capability(), e.g. (9, 0)
    dtype: str                   # "bfloat16", "float16" or "float32"
    kernels: str                 # the kernel set measured (KERNEL_SETS)
    gpu: str                     # torch.cuda.get_device_name()
    ext_over_sdpa: Tuple[float, float]  # (best, worst) ratio of ext's forward+backward time
    #                                     to SDPA's over the profiled shapes; <= 1 is as fast
    source: str                  # where the figures are committed


# Filled from committed GPU profiles (docs/platforms.md, "Platforms"; docs/gpu/): ext slower
# everywhere so far, so the rows only explain the default.
_H200 = ("docs/gpu/h200_profile.json: csrc/cuda/device_check.sh, torch 2.11.0+cu130, causal, "
         "B*T 16k, T 1024-8192, head dims 64 and 128")
MEASURED: Tuple[Measurement, ...] = (
    Measurement((9, 0), "bfloat16", "v2", "NVIDIA H200", (1.62, 2.52), _H200),
    Measurement((9, 0), "float16", "v2", "NVIDIA H200", (1.54, 2.47), _H200),
    Measurement((9, 0), "bfloat16", "v1", "NVIDIA H200", (2.44, 3.85), _H200),
    Measurement((9, 0), "float16", "v1", "NVIDIA H200", (2.32, 3.75), _H200),
    Measurement((9, 0), "bfloat16", "v1", "NVIDIA H100", (2.5, 3.9),
                "the H100 run of docs/platforms.md's table: python -m minigpt profile --device "
                "cuda, torch 2.11+cu130, causal, B*T 16k, T 1024-8192, head dims 64 and 128; "
                "forward alone 2.3-3.1x"),
    Measurement((9, 0), "float32", "v1", "NVIDIA H100", (3.4, 4.5),
                "the H100 run of docs/platforms.md's table: python -m minigpt profile --device "
                "cuda, torch 2.11+cu130, causal, B*T 16k, T 1024-8192, head dims 64 and 128"),
)


def kernels_in_use() -> str:
    """The CUDA kernel set that runs: $MINIGPT_CUDA_KERNELS if it names one, else the default.

    Raises:
        ValueError: $MINIGPT_CUDA_KERNELS set to an unknown name.
    """
    name = os.environ.get(KERNELS_ENV) or KERNEL_SETS[0]
    if name not in KERNEL_SETS:
        raise ValueError(f"${KERNELS_ENV} must be one of {KERNEL_SETS}, got {name!r}")
    return name


def cuda_default_reason(capability: Tuple[int, int], dtype: str,
                        kernels: Optional[str] = None,
                        table: Optional[Tuple[Measurement, ...]] = None) -> Optional[str]:
    """None if ext was measured at least as fast as SDPA (forward+backward, every profiled
    shape) on this compute capability and dtype with this kernel set (default: the one in use),
    else why attention() runs "sdpa" there by default, with the measured figure if any.

    capability: (major, minor); dtype: "bfloat16", "float16" or "float32"; table: default
    MEASURED.

    Raises:
        ValueError: $MINIGPT_CUDA_KERNELS set to an unknown name (when kernels is None).
    """
    kernels = kernels_in_use() if kernels is None else kernels
    table = MEASURED if table is None else table
    cc = f"{capability[0]}.{capability[1]}"
    rows = [m for m in table if tuple(m.capability) == tuple(capability) and m.dtype == dtype]
    mine = [m for m in rows if m.kernels == kernels]
    if mine and all(m.ext_over_sdpa[1] <= 1.0 for m in mine):
        return None
    if mine:
        m = max(mine, key=lambda m: m.ext_over_sdpa[1])
        return (f"ext ({kernels} kernels) measured {m.ext_over_sdpa[0]:.1f}-"
                f"{m.ext_over_sdpa[1]:.1f}x SDPA's forward+backward time on {m.gpu} (compute "
                f"capability {cc}, {dtype}; {m.source}); sdpa is the default there")
    older = "".join(f"; the {m.kernels} kernels measured {m.ext_over_sdpa[0]:.1f}-"
                    f"{m.ext_over_sdpa[1]:.1f}x SDPA's time on {m.gpu}" for m in rows)
    return (f"no GPU profile shows ext ({kernels} kernels) at least as fast as SDPA on compute "
            f"capability {cc} for {dtype}{older}; sdpa is the default there (backend='ext' "
            f"forces ours)")
