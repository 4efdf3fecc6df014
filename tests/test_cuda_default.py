"""The default backend on CUDA: "ext" only where minigpt.attention.gpu_table has it measured at least as
fast as SDPA for the GPU's compute capability and the dtype; "sdpa" elsewhere, with the reason
in attention_backends(); backend="ext", $MINIGPT_ATTENTION_BACKEND=ext and --attn-backend ext
still force ours. Runs on CPU: the GPU's compute capability and the CUDA build are faked."""

import importlib
import json
from pathlib import Path

import pytest
import torch

import minigpt
from minigpt.attention import _ext
from minigpt.attention import gpu_table
from minigpt.config import GPTConfig

backends_module = importlib.import_module("minigpt.attention.backends")
resolve_backend = backends_module.resolve_backend
CUDA = torch.device("cuda")

FAST = gpu_table.Measurement((8, 0), "bfloat16", "v2", "NVIDIA A100", (0.8, 0.95), "test")
SLOW = gpu_table.Measurement((8, 0), "float16", "v2", "NVIDIA A100", (0.9, 1.2), "test")


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA build of minigpt._C whose kernels may run on a faked GPU of the capability set by
    the returned function (default 9.0); the self-check off, no backend from the environment."""
    monkeypatch.setattr(_ext, "unavailable_reason", lambda: None)
    monkeypatch.setattr(_ext, "build_info", lambda: {
        "cuda": True, "cuda_archs": "8.0_9.0+PTX", "cuda_head_dims": [32, 64, 96, 128],
        "dtypes": {"cpu": ["float32", "float64"], "cuda": ["bfloat16", "float16", "float32"]},
        "features": {"cpu": ["alibi", "window"], "cuda": ["alibi", "window"]}})
    for name in ("_EXT_DTYPES", "_EXT_CUDA_HEAD_DIMS", "_EXT_FEATURES"):  # restored after
        monkeypatch.setattr(backends_module, name, getattr(backends_module, name))
    backends_module._read_kernel_support()
    monkeypatch.setenv("MINIGPT_SELF_CHECK", "0")
    monkeypatch.delenv("MINIGPT_ATTENTION_BACKEND", raising=False)
    monkeypatch.delenv(gpu_table.KERNELS_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def set_capability(capability):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    set_capability((9, 0))
    return set_capability


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (9, 0), (10, 0), (12, 0)])
def test_sdpa_is_the_default_on_every_gpu_today(fake_gpu, capability, dtype):
    fake_gpu(capability)
    assert resolve_backend(None, CUDA, dtype, 64, True) == "sdpa"
    # ours still runs there when asked for
    assert resolve_backend("ext", CUDA, dtype, 64, True) == "ext"


def test_env_and_the_training_option_force_ext(fake_gpu, monkeypatch):
    monkeypatch.setenv("MINIGPT_ATTENTION_BACKEND", "ext")
    assert resolve_backend(None, CUDA, torch.bfloat16, 64, True) == "ext"
    monkeypatch.delenv("MINIGPT_ATTENTION_BACKEND")
    # --attn-backend ext reaches resolve_backend as GPTConfig.attn_backend (minigpt.train.loop)
    cfg = GPTConfig(attn_backend="ext")
    assert resolve_backend(cfg.attn_backend, CUDA, torch.bfloat16, 64, True) == "ext"


def test_ext_is_the_default_where_measured_as_fast(fake_gpu, monkeypatch):
    monkeypatch.setattr(gpu_table, "MEASURED", (FAST, SLOW))
    fake_gpu((8, 0))
    assert resolve_backend(None, CUDA, torch.bfloat16, 64, True) == "ext"
    assert resolve_backend(None, CUDA, torch.float16, 64, True) == "sdpa"  # worst shape 1.2x
    assert resolve_backend(None, CUDA, torch.float32, 64, True) == "sdpa"  # not measured
    # a head dim the kernels lack still falls back
    assert resolve_backend(None, CUDA, torch.bfloat16, 48, True) == "sdpa"
    # the measurement is of the v2 kernels: it says nothing about v1
    monkeypatch.setenv(gpu_table.KERNELS_ENV, "v1")
    assert resolve_backend(None, CUDA, torch.bfloat16, 64, True) == "sdpa"
    fake_gpu((9, 0))  # another compute capability
    monkeypatch.delenv(gpu_table.KERNELS_ENV)
    assert resolve_backend(None, CUDA, torch.bfloat16, 64, True) == "sdpa"


def test_attention_backends_says_why(fake_gpu, monkeypatch):
    # a table of its own: v1 measured on two GPUs of one capability, v2 on one, float16 on none
    v1_h100 = gpu_table.Measurement((9, 0), "bfloat16", "v1", "NVIDIA H100", (2.5, 3.9), "t")
    v1_h200 = gpu_table.Measurement((9, 0), "bfloat16", "v1", "NVIDIA H200", (2.44, 3.85), "t")
    v2_h200 = gpu_table.Measurement((9, 0), "bfloat16", "v2", "NVIDIA H200", (1.62, 2.52), "t")
    monkeypatch.setattr(gpu_table, "MEASURED", (v1_h100, v1_h200))
    monkeypatch.setenv(gpu_table.KERNELS_ENV, "v1")
    report = minigpt.attention_backends()
    bf16 = report["cuda_default"]["bfloat16"]
    assert bf16["backend"] == "sdpa"
    # the worst of the set's rows is the one named
    assert "2.5-3.9x SDPA's forward+backward time on NVIDIA H100" in bf16["reason"], bf16
    assert report["cuda_default"]["float16"]["backend"] == "sdpa"
    assert "no GPU profile" in report["cuda_default"]["float16"]["reason"]
    monkeypatch.delenv(gpu_table.KERNELS_ENV)
    reason = minigpt.attention_backends()["cuda_default"]["bfloat16"]["reason"]
    assert "no GPU profile shows ext (v2 kernels)" in reason and "v1 kernels measured 2.5-3.9x" \
        in reason and "v1 kernels measured 2.4-3.9x SDPA's time on NVIDIA H200" in reason, reason
    monkeypatch.setattr(gpu_table, "MEASURED", (v1_h100, v2_h200))
    reason = minigpt.attention_backends()["cuda_default"]["bfloat16"]["reason"]
    assert "ext (v2 kernels) measured 1.6-2.5x SDPA's forward+backward time on NVIDIA H200" \
        in reason, reason
    monkeypatch.setattr(gpu_table, "MEASURED", (FAST,))
    fake_gpu((8, 0))
    report = minigpt.attention_backends()
    assert report["cuda_default"]["bfloat16"] == {"backend": "ext", "reason": None}


def test_the_committed_h200_rows_match_their_profile():
    # each H200 row is the (best, worst) forward+backward ratio of the committed JSON
    path = Path(__file__).resolve().parent.parent / "docs" / "gpu" / "h200_profile.json"
    if not path.is_file():
        pytest.skip("docs/gpu/ is not in this tree (an installed package)")
    profile = json.loads(path.read_text())
    rows = [m for m in gpu_table.MEASURED if m.gpu == "NVIDIA H200"]
    assert {(m.kernels, m.dtype) for m in rows} == {(k, d) for k in ("v2", "v1")
                                                    for d in ("bfloat16", "float16")}
    for m in rows:
        ratios = [r["fwd_bwd"] for r in profile["ratios"]
                  if r["backend"] == f"ext-{m.kernels}" and r["dtype"] == m.dtype]
        assert len(ratios) == 8, m  # T 1024-8192, head dims 64 and 128
        assert m.ext_over_sdpa == (round(min(ratios), 2), round(max(ratios), 2)), m
        assert profile["gpu"] == m.gpu and "docs/gpu/h200_profile.json" in m.source


def test_cpu_default_stays_ext(fake_gpu):
    assert resolve_backend(None, torch.device("cpu"), torch.float32, 64, True) == "ext"
    assert minigpt.attention_backends()["default"] == "ext"


def test_unknown_kernel_set_is_an_error(monkeypatch):
    monkeypatch.setenv(gpu_table.KERNELS_ENV, "v9")
    with pytest.raises(ValueError, match=r"MINIGPT_CUDA_KERNELS must be one of \('v2', 'v1'\), "
                                         r"got 'v9'"):
        gpu_table.kernels_in_use()


def test_table_rows_are_well_formed():
    for m in gpu_table.MEASURED:
        assert m.kernels in gpu_table.KERNEL_SETS and m.dtype in ("bfloat16", "float16",
                                                                  "float32")
        assert 0 < m.ext_over_sdpa[0] <= m.ext_over_sdpa[1] and m.source
