"""Each vector path of the CPU kernels (AVX-512, AVX2+FMA, portable), forced with
MINIGPT_CPU_ISA in a process of its own, passes the same float64-reference checks
(tests/cpu_isa_check.py). A path this CPU lacks is skipped after checking that asking for it
falls back to a path the CPU has instead of crashing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt.attention import _ext

from conftest import ext_required

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
EXT = _ext.unavailable_reason() is None
needs_ext = pytest.mark.skipif(not EXT and not ext_required(),
                               reason=f"minigpt._C unavailable: {_ext.unavailable_reason()}")

# MINIGPT_CPU_ISA value -> build_info()["vector_isa"] when the path runs.
PATHS = {"avx512": "avx512", "avx2": "avx2+fma", "portable": "portable"}
RANK = {"portable": 0, "avx2+fma": 1, "avx512": 2}


def _cpu_has(isa):
    """Whether this CPU runs `isa`, by torch's own detection (ATen's AVX512 kernels need the same
    AVX-512 F/BW/VL/DQ subset as ours)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return {"avx512": capability == "AVX512",
            "avx2": capability in ("AVX2", "AVX512"), "portable": True}[isa]


def _run(args, isa, timeout=600, **extra_env):
    env = {**os.environ, "MINIGPT_CPU_ISA": isa, **extra_env}
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@needs_ext
@pytest.mark.parametrize("isa", list(PATHS))
def test_vector_path_against_reference(isa):
    r = _run([str(TESTS / "cpu_isa_check.py")], isa)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.split()
    used = lines[0]
    if not _cpu_has(isa):
        assert RANK[used] < RANK[PATHS[isa]], f"asked for {isa}, ran {used}"
        pytest.skip(f"this CPU lacks {isa}; the checks passed on {used}")
    assert used == PATHS[isa], f"MINIGPT_CPU_ISA={isa} ran {used}"
    # Our AMX tiles, or our AVX512-BF16 tiles, on the avx512 path of a CPU with them; ATen's
    # brgemm otherwise.
    best = _best_products() if isa == "avx512" else "brgemm"
    assert lines[1] == best, lines[1]
    assert lines[-1] == "ok"


def _best_products():
    """What should compute bf16 tile products on this CPU's avx512 path, by torch's own
    detection: AMX tiles, else AVX512-BF16 dot products, else ATen's brgemm."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512" or \
            not torch.cpu._is_avx512_bf16_supported():
        return "brgemm"
    return "amx" if torch.cpu._is_amx_tile_supported() else "avx512_bf16"


PRODUCTS_RANK = {"brgemm": 0, "avx512_bf16": 1, "amx": 2}


@needs_ext
@pytest.mark.parametrize("products", ["amx", "avx512_bf16"])
def test_bf16_products_against_reference(products):
    """MINIGPT_CPU_BF16_PRODUCTS=amx|avx512_bf16 on the best vector path: the same checks pass
    on our AMX tiles and on our vdpbf16ps blocks. Asked for on a CPU without them, the kernels
    warn and fall back to the best it has."""
    r = _run([str(TESTS / "cpu_isa_check.py")], "", MINIGPT_CPU_BF16_PRODUCTS=products)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.split()
    assert lines[-1] == "ok", r.stdout[-500:]
    if PRODUCTS_RANK[_best_products()] < PRODUCTS_RANK[products]:
        assert lines[1] == _best_products(), lines[1]
        assert f"MINIGPT_CPU_BF16_PRODUCTS={products}: not available here" in r.stderr
        pytest.skip(f"this CPU lacks {products}; the checks passed on {lines[1]}")
    assert lines[1] == products, lines[1]


INFO = """
from minigpt import _ext
print(_ext.build_info()["vector_isa"])
"""


@needs_ext
def test_default_is_the_best_path():
    best = "avx512" if _cpu_has("avx512") else "avx2" if _cpu_has("avx2") else "portable"
    r = _run(["-c", INFO], "")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == PATHS[best]


CALL = """
import torch
from minigpt.attention import attention
q = torch.randn(1, 1, 4, 8)
attention(q, q, q, backend="ext")
"""


@needs_ext
def test_unknown_path_is_refused():
    r = _run(["-c", CALL], "avx3")
    assert r.returncode != 0
    assert "MINIGPT_CPU_ISA='avx3' is not one of avx512, avx2, portable" in r.stderr


@needs_ext
def test_bf16_products_can_be_forced_to_brgemm():
    """MINIGPT_CPU_BF16_PRODUCTS=brgemm: the bf16 checks pass on ATen's brgemm on the best path."""
    r = _run([str(TESTS / "cpu_isa_check.py")], "", MINIGPT_CPU_BF16_PRODUCTS="brgemm")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.split()
    assert lines[1] == "brgemm" and lines[-1] == "ok", r.stdout[:200]


@needs_ext
def test_unknown_bf16_products_are_refused():
    call = CALL.replace("torch.randn(1, 1, 4, 8)", "torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)")
    r = _run(["-c", call], "", MINIGPT_CPU_BF16_PRODUCTS="amx_fp16")
    assert r.returncode != 0
    assert "MINIGPT_CPU_BF16_PRODUCTS='amx_fp16' is not one of amx, avx512_bf16, brgemm" in r.stderr
