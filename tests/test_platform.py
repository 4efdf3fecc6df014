"""Every machine: the build decisions (CUDA toolkit, OpenMP, platforms), GPUs the kernels cannot
run on, the first-use self-check, devices and precisions, and the package itself. Platforms that
this machine is not (macOS, Windows, an old GPU) are faked."""

import importlib
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import minigpt
from minigpt.attention import _build
from minigpt.attention import _ext
attention_module = importlib.import_module("minigpt.attention.backends")
from minigpt.attention import attention
from minigpt.attention import resolve_backend as _resolve_backend
from minigpt.positions import RotaryEmbedding
from minigpt.runtime import DeviceError, pick_device, resolve_precision

from reference import check_rule, reference_attention

ROOT = Path(__file__).resolve().parent.parent
EXT = _ext.unavailable_reason() is None
needs_ext = pytest.mark.skipif(not EXT, reason=f"minigpt._C unavailable: {_ext.unavailable_reason()}")


# --- CUDA toolkit detection -------------------------------------------------------------------

def _toolkit(path: Path) -> Path:
    (path / "include").mkdir(parents=True)
    (path / "include" / "cuda_runtime.h").write_text("")
    return path


def test_cuda_home_from_the_environment_is_used_when_usable(tmp_path):
    kit = _toolkit(tmp_path / "cuda-13.0")
    assert _build.find_cuda_home({"CUDA_HOME": str(kit)}, which=lambda _: None)[0] == str(kit)
    assert _build.find_cuda_home({"CUDA_PATH": str(kit)}, which=lambda _: None)[0] == str(kit)
    home, why = _build.find_cuda_home({"CUDA_HOME": str(tmp_path)}, which=lambda _: None)
    assert home is None and "CUDA_HOME" in why and "cuda_runtime.h" in why


def test_a_wrapper_nvcc_does_not_mislead_the_toolkit_guess(tmp_path, monkeypatch):
    # /usr/local/bin/nvcc as a wrapper script: torch guesses /usr/local, which has no headers.
    wrapper = tmp_path / "usr" / "local" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text("#!/bin/sh\nexec /usr/local/cuda-13.0/bin/nvcc \"$@\"\n")
    monkeypatch.setattr(_build, "_has_runtime_header",
                        lambda home: home == "/usr/local/cuda")
    home, why = _build.find_cuda_home({}, which=lambda _: str(wrapper))
    assert home == "/usr/local/cuda", why
    monkeypatch.setattr(_build, "_has_runtime_header", lambda home: False)
    home, why = _build.find_cuda_home({}, which=lambda _: str(wrapper))
    assert home is None and str(tmp_path / "usr" / "local") in why and "/usr/local/cuda" in why


def test_torch_guess_is_kept_when_it_holds_the_headers(tmp_path):
    kit = _toolkit(tmp_path / "cuda")
    (kit / "bin").mkdir()
    nvcc = kit / "bin" / "nvcc"
    nvcc.write_text("")
    assert _build.find_cuda_home({}, which=lambda _: str(nvcc))[0] == str(kit)


@pytest.mark.parametrize("mode, torch_cuda, nvcc, expect", [
    ("auto", "13.0", "13.0", True),
    ("auto", "13.0", "12.8", False),   # major versions differ
    ("auto", None, "13.0", False),     # CPU torch
    ("0", "13.0", "13.0", False),
    ("1", "13.0", "13.0", True),
], ids=["auto-match", "auto-mismatch", "cpu-torch", "off", "forced-match"])
def test_cuda_plan(tmp_path, mode, torch_cuda, nvcc, expect):
    kit = _toolkit(tmp_path / "cuda")
    env = {"MINIGPT_CUDA": mode, "CUDA_HOME": str(kit)}
    with_cuda, why, home = _build.plan_cuda(torch_cuda, env, version_of=lambda _: nvcc)
    assert with_cuda is expect, why
    assert (home == str(kit)) is expect
    if torch_cuda and nvcc != torch_cuda and mode == "auto":
        assert "12.8" in why and "13.0" in why


def test_minigpt_cuda_1_fails_with_the_reason(monkeypatch):
    monkeypatch.setattr(_build, "_has_runtime_header", lambda home: False)  # no toolkit anywhere
    with pytest.raises(_build.BuildError, match="MINIGPT_CUDA=1.*torch is a CPU build"):
        _build.plan_cuda(None, {"MINIGPT_CUDA": "1"})
    with pytest.raises(_build.BuildError, match="MINIGPT_CUDA=1.*no CUDA toolkit"):
        _build.plan_cuda("13.0", {"MINIGPT_CUDA": "1"}, which=lambda _: None)
    with pytest.raises(_build.BuildError, match="MINIGPT_CUDA must be one of"):
        _build.plan_cuda("13.0", {"MINIGPT_CUDA": "yes"})


def test_apply_cuda_home_reaches_an_imported_cpp_extension(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local")
    monkeypatch.setenv("CUDA_HOME", "/usr/local")
    _build.apply_cuda_home("/opt/cuda-test")
    assert cpp_extension.CUDA_HOME == "/opt/cuda-test"
    assert os.environ["CUDA_HOME"] == "/opt/cuda-test"


def test_build_plan_summary_says_what_and_why():
    plan = _build.build_plan(torch, {"MINIGPT_CUDA": "0"})
    assert plan.summary.startswith("minigpt: building CPU kernels only") and "MINIGPT_CUDA=0" in plan.summary
    kw = plan.extension_kwargs()
    assert kw["sources"] == sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    assert not any(s.endswith(".cu") for s in kw["sources"])


def test_setup_py_reports_its_decision_in_one_line():
    env = {**os.environ, "MINIGPT_CUDA": "0"}
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stderr.splitlines() if l.startswith("minigpt:")]
    assert len(lines) == 1 and "CPU kernels only" in lines[0] and "MINIGPT_CUDA=0" in lines[0]
    assert out.stdout.strip().splitlines()[-1] == minigpt.__version__


def test_setup_py_without_torch_stops_with_advice(tmp_path):
    # A build environment without torch (pip's isolated build): stop before compiling anything.
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['torch'] = None\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "setup.py", "build_ext"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "--no-build-isolation" in out.stderr and "pip install torch" in out.stderr


# --- OpenMP and platforms ---------------------------------------------------------------------

def test_openmp_falls_back_to_libomp_then_to_one_thread(tmp_path, monkeypatch):
    _build.openmp_flags.cache_clear()
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(_build.shutil, "which", lambda _: None)  # no brew
    # Apple clang: rejects -fopenmp, takes -Xpreprocessor -fopenmp with libomp.
    monkeypatch.setattr(_build, "_try_compile", lambda flags, ld: "-Xpreprocessor" in flags)
    libomp = tmp_path / "libomp"
    (libomp / "include").mkdir(parents=True)
    (libomp / "include" / "omp.h").write_text("")
    real_is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda p: real_is_file(
        Path(str(p).replace("/opt/homebrew/opt/libomp", str(libomp)))))
    try:
        flags, ld, note = _build.openmp_flags()
        assert flags[:2] == ("-Xpreprocessor", "-fopenmp") and "-lomp" in ld, note
        _build.openmp_flags.cache_clear()
        monkeypatch.setattr(_build, "_try_compile", lambda flags, ld: False)
        flags, ld, note = _build.openmp_flags()
        assert flags == () and ld == () and "one thread" in note and "libomp" in note
    finally:
        _build.openmp_flags.cache_clear()


def test_this_machine_gets_openmp():
    flags, ld, note = _build.openmp_flags()
    assert flags == ("-fopenmp",), note


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared objects")
def test_the_module_links_the_libstdcxx_torch_loaded(monkeypatch):
    """The built module loads the shared libstdc++ (a copy of its own crashed on formatting an
    error message); a compiler made to link a static one (-static-libstdc++ in $LDFLAGS) is given
    the path of the libstdc++ torch loaded, and links that instead."""
    import minigpt._C as C
    needed = _build.elf_needed(C.__file__)
    assert "libc10.so" in needed and "libstdc++.so.6" in needed, needed
    assert _build.elf_needed(__file__) is None
    lib = _build.loaded_libstdcxx()
    assert lib is not None and Path(lib).name.startswith("libstdc++.so.6")
    _build.libstdcxx_flags.cache_clear()
    try:
        flags, note = _build.libstdcxx_flags()
        if _build._links_libstdcxx([]):  # the usual compiler: nothing to do
            assert (flags, note) == ((), "")
        else:  # one that links a static libstdc++ by default
            assert flags == (lib,) and "static libstdc++" in note
        monkeypatch.setenv("LDFLAGS", "-static-libstdc++")
        if _build._links_libstdcxx([]) is not False:
            pytest.skip("this compiler has no static libstdc++ to link")
        _build.libstdcxx_flags.cache_clear()
        flags, note = _build.libstdcxx_flags()
        assert flags == (lib,) and "static libstdc++" in note and lib in note
        assert _build._links_libstdcxx(list(flags)) is True
    finally:
        _build.libstdcxx_flags.cache_clear()


def test_windows_skips_the_cpu_kernels_with_a_reason():
    assert "MSVC" in _build.cpu_build_reason("win32")
    assert _build.cpu_build_reason("linux") is None and _build.cpu_build_reason("darwin") is None


def test_import_minigpt_needs_no_fcntl():
    code = ("import sys; sys.modules['fcntl'] = None\n"
            "import minigpt, torch\n"
            "q = torch.randn(1, 2, 5, 8)\n"
            "print(minigpt.attention(q, q, q, backend='naive').shape)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "torch.Size([1, 2, 5, 8])" in out.stdout, out.stderr


def test_rope_with_float32_angles_matches_float64(monkeypatch):
    # MPS has no float64: there the angles are float32. Check that path against float64.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 3, 64, generator=g)
    pos = torch.arange(4096 - 16, 4096)  # late positions: the largest angles
    rope = RotaryEmbedding(64, 10000.0)
    assert RotaryEmbedding.angle_dtype(torch.device("cpu")) is torch.float64
    exact = rope(x.double(), pos)
    monkeypatch.setattr(RotaryEmbedding, "angle_dtype", staticmethod(lambda d: torch.float32))
    approx = rope(x.double(), pos)
    err = (approx - exact).abs().max().item()
    # float32 angle error grows with the angle: about eps32 * position radians per unit vector.
    assert 0 < err <= 4 * torch.finfo(torch.float32).eps * 4096 * x.abs().max().item(), err


def test_rope_angle_dtype_on_mps_is_float32():
    from minigpt.positions import RotaryEmbedding as R

    assert R.angle_dtype(torch.device("mps")) is torch.float32


# --- GPUs the kernels cannot run on -----------------------------------------------------------

@pytest.mark.parametrize("capability, archs, runs", [
    ((7, 5), "8.0_9.0+PTX", False),   # T4: below sm_80
    ((7, 0), "8.0_9.0+PTX", False),   # V100
    ((8, 0), "8.0_9.0+PTX", True),
    ((8, 6), "8.0_9.0+PTX", True),    # sm_80 cubin runs on 8.x
    ((9, 0), "8.0_9.0+PTX", True),
    ((10, 0), "8.0_9.0+PTX", True),   # through the PTX
    ((12, 0), "8.0_9.0+PTX", True),
    ((10, 0), "8.0_9.0", False),      # no PTX: sm_100 cannot run it
    ((9, 0), "8.0", False),           # an sm_80 cubin does not run on 9.0
])
def test_gpu_arch_rule(capability, archs, runs):
    why = _build.gpu_unsupported_reason(capability, archs)
    assert (why is None) is runs, why


def _fake_cuda_build(monkeypatch, capability):
    monkeypatch.setattr(_ext, "unavailable_reason", lambda: None)
    monkeypatch.setattr(_ext, "build_info", lambda: {
        "cuda": True, "cuda_archs": "8.0_9.0+PTX", "cuda_head_dims": [32, 64, 96, 128],
        "dtypes": {"cpu": ["float32", "float64"], "cuda": ["bfloat16", "float16", "float32"]}})
    for name in ("_EXT_DTYPES", "_EXT_CUDA_HEAD_DIMS", "_EXT_FEATURES"):  # restored after
        monkeypatch.setattr(attention_module, name, getattr(attention_module, name))
    attention_module._read_kernel_support()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setenv("MINIGPT_SELF_CHECK", "0")


def test_old_gpu_uses_sdpa_by_default_and_ext_raises(monkeypatch):
    _fake_cuda_build(monkeypatch, (7, 5))
    cuda = torch.device("cuda")
    assert _resolve_backend(None, cuda, torch.float16, 64, True) == "sdpa"
    with pytest.raises(RuntimeError, match="compute capability 8.0 or newer.*7.5"):
        _resolve_backend("ext", cuda, torch.float16, 64, True)


def test_supported_gpu_runs_ext(monkeypatch):
    # The default there is measured, not assumed (tests/test_cuda_default.py); asked for, it runs.
    _fake_cuda_build(monkeypatch, (9, 0))
    assert _resolve_backend("ext", torch.device("cuda"), torch.bfloat16, 64, True) == "ext"
    # a head dim the CUDA kernels lack
    with pytest.raises(RuntimeError, match="head dims"):
        _resolve_backend("ext", torch.device("cuda"), torch.bfloat16, 48, True)


def test_attention_backends_reports_the_gpu_reason(monkeypatch):
    _fake_cuda_build(monkeypatch, (7, 5))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    report = minigpt.attention_backends()
    assert report["ext"]["cuda_available"] is False and "7.5" in report["ext"]["cuda_reason"]


def test_default_arch_list_carries_ptx_on_its_newest_entry():
    archs = _build.DEFAULT_CUDA_ARCHS.split(";")
    assert archs[-1].endswith("+PTX") and archs[0] == "8.0"


# --- first-use self-check ---------------------------------------------------------------------

@pytest.fixture
def cpu_self_check(monkeypatch):
    """Self-check the CPU kernels too (by default only CUDA is), from a clean slate."""
    monkeypatch.setattr(attention_module, "_SELF_CHECK_DEVICES", {"cpu", "cuda"})
    monkeypatch.setattr(attention_module, "_self_checks", {})
    monkeypatch.delenv("MINIGPT_SELF_CHECK", raising=False)
    monkeypatch.delenv("MINIGPT_ATTENTION_BACKEND", raising=False)


@pytest.fixture
def wrong_kernel(monkeypatch):
    """Replace the compiled forward with one whose output is 1% off."""
    real = torch.ops.minigpt.attention_forward
    calls = []

    def forward(q, k, v, causal, scale):
        calls.append(q.shape)
        out, lse = real(q, k, v, causal, scale)
        return out * 1.01, lse

    monkeypatch.setattr(torch.ops.minigpt, "attention_forward", forward)
    return calls


def _qkv(seed=0, T=40, D=32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, T, D, generator=g) for _ in range(3)]


@needs_ext
def test_self_check_catches_a_wrong_kernel_and_uses_sdpa(cpu_self_check, wrong_kernel):
    q, k, v = _qkv()
    with pytest.warns(RuntimeWarning, match=r"self-check .* failed .*out error .* > 2 x naive"):
        out = attention(q, k, v, causal=True)
    expected = reference_attention(q, k, v, causal=True)
    check_rule("out", out, attention(q, k, v, causal=True, backend="naive"), expected,
               torch.float32)
    calls = len(wrong_kernel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        attention(q, k, v, causal=True)
    assert len(wrong_kernel) == calls  # the wrong kernel is not used again
    with pytest.raises(RuntimeError, match="self-check"):
        attention(q, k, v, causal=True, backend="ext")
    # another combination is checked on its own
    with pytest.warns(RuntimeWarning, match="causal=False"):
        attention(q, k, v, causal=False)


@needs_ext
def test_self_check_passes_the_real_kernels(cpu_self_check):
    q, k, v = _qkv(1, T=70, D=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = attention(q, k, v, causal=True)
    assert list(attention_module._self_checks.values()) == [None]
    expected, _ = torch.ops.minigpt.attention_forward(q, k, v, True, 64 ** -0.5)
    assert torch.equal(out, expected)


@needs_ext
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_self_check_passes_when_first_used_without_grad(cpu_self_check, mode):
    # Found on an H100: a first use under no_grad (sampling, the profiler's forward timing)
    # made the check's naive backward raise, and 'ext' was dropped for that combination.
    q, k, v = _qkv(2, T=70, D=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with mode():
            out = attention(q, k, v, causal=True)
    assert list(attention_module._self_checks.values()) == [None]
    expected, _ = torch.ops.minigpt.attention_forward(q, k, v, True, 64 ** -0.5)
    assert torch.equal(out, expected)


@needs_ext
def test_self_check_can_be_turned_off(cpu_self_check, wrong_kernel, monkeypatch):
    monkeypatch.setenv("MINIGPT_SELF_CHECK", "0")
    q, k, v = _qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention(q, k, v, causal=True)
    assert wrong_kernel and attention_module._self_checks == {}


@needs_ext
@pytest.mark.parametrize("broken", [False, True], ids=["good-kernel", "wrong-kernel"])
def test_self_check_under_torch_compile_fullgraph(cpu_self_check, monkeypatch, broken):
    if broken:
        real = torch.ops.minigpt.attention_forward
        monkeypatch.setattr(torch.ops.minigpt, "attention_forward",
                            lambda q, k, v, c, s: (real(q, k, v, c, s)[0] * 1.01,
                                                   real(q, k, v, c, s)[1]))
    torch._dynamo.reset()
    q, k, v = _qkv(2)
    fn = torch.compile(lambda q, k, v: attention(q, k, v, causal=True), fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the failure warning, if any
        out = fn(q, k, v)
    naive = attention(q, k, v, causal=True, backend="naive")
    check_rule("out", out, naive, reference_attention(q, k, v, causal=True), torch.float32)
    key = next(iter(attention_module._self_checks))
    assert key.startswith("cpu|torch.float32|32|True")
    assert (attention_module._self_checks[key] is not None) is broken
    torch._dynamo.reset()


def test_the_constant_mark_is_dynamos_and_import_does_not_load_dynamo():
    """minigpt marks its self-check functions as dynamo's assume_constant_result does, without
    importing torch._dynamo (about a second of every command's start-up)."""
    def f():
        return 1

    marked = torch._dynamo.assume_constant_result(f)
    assert vars(marked) == vars(attention_module._assume_constant_result(lambda: 1)) == {
        "_dynamo_marked_constant": True}
    code = "import sys, minigpt, minigpt.cli.train; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


# --- devices and precision --------------------------------------------------------------------

def test_unavailable_devices_name_the_available_ones():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    for name in ("cdua", "tpu", "cuda:7" if torch.cuda.is_available() else "cuda", "mps"):
        if name == "mps" and torch.backends.mps.is_available():
            continue
        with pytest.raises(DeviceError, match=r"available here: cpu"):
            pick_device(name)


def _tiny_checkpoint(path: Path) -> Path:
    from minigpt import CharTokenizer, GPT, GPTConfig, save_checkpoint

    tok = CharTokenizer("abcdefghij \n")
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    save_checkpoint({"model": GPT(cfg).state_dict(), "model_config": cfg.to_dict(),
                     "tokenizer": tok.state_dict()}, path)
    return path


@pytest.mark.parametrize("script", ["train.py", "sample.py"])
def test_scripts_exit_2_with_one_line_on_a_missing_device(script, tmp_path, text_file):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    if script == "train.py":
        args = ["--data", str(text_file), "--out-dir", str(tmp_path / "run")]
    else:
        args = ["--checkpoint", str(_tiny_checkpoint(tmp_path / "ckpt.pt")), "--prompt", "ab"]
    out = subprocess.run([sys.executable, script, "--device", "cuda", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    errors = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(errors) == 1 and "device 'cuda' is not available" in errors[0], out.stderr
    assert "available here: cpu" in errors[0]


def test_precision_auto_picks_bf16_or_float16_with_a_scaler(monkeypatch):
    from minigpt import runtime

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not runtime.bf16_supported(cpu)
    assert resolve_precision("auto", cpu).autocast_dtype is None  # no bf16 instructions
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    p = resolve_precision("auto", cpu)  # AVX512_BF16 (Zen 4, Cooper Lake)
    assert p.autocast_dtype is torch.bfloat16 and not p.needs_grad_scaler
    assert resolve_precision("auto", torch.device("mps")).autocast_dtype is None
    cuda = torch.device("cuda")
    monkeypatch.setattr(runtime, "bf16_supported", lambda d: True)
    p = resolve_precision("auto", cuda)
    assert p.autocast_dtype is torch.bfloat16 and not p.needs_grad_scaler
    monkeypatch.setattr(runtime, "bf16_supported", lambda d: False)  # T4, V100
    p = resolve_precision("auto", cuda)
    assert p.autocast_dtype is torch.float16 and p.needs_grad_scaler
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    with pytest.raises(DeviceError, match="bfloat16.*7.5.*float16"):
        resolve_precision("bfloat16", cuda)
    with pytest.raises(DeviceError, match="dtype must be one of"):
        resolve_precision("fp8", cuda)


def test_float16_training_uses_a_grad_scaler_and_resumes(text_file, tmp_path):
    from minigpt.checkpoint import load_checkpoint
    from minigpt.train.loop import TrainConfig, train

    cfg = dict(data=str(text_file), n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4,
               max_iters=4, eval_interval=2, eval_iters=1, warmup_iters=1, progress=False,
               dtype="float16", device="cpu", out_dir=str(tmp_path / "run"))
    result = train(TrainConfig(**cfg), log=lambda *_: None)
    assert result.iters == 4 and torch.isfinite(torch.tensor(result.final_val_loss))
    state = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert state["grad_scaler"]["scale"] > 0
    resumed = train(TrainConfig(**{**cfg, "max_iters": 6, "resume": True}), log=lambda *_: None)
    assert resumed.iters == 6


# --- the package ------------------------------------------------------------------------------

def test_version_and_console_scripts():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "minigpt-kernels"
    assert meta["tool"]["setuptools"]["dynamic"]["version"]["attr"] == "minigpt.__version__"

    for script, target in meta["project"]["scripts"].items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), script
    assert set(meta["project"]["scripts"]) == {"minigpt", "minigpt-train", "minigpt-sample",
                                               "minigpt-profile", "minigpt-heads",
                                               "minigpt-export"}
    assert meta["project"]["optional-dependencies"]["hf"] == [
        "transformers", "tokenizers", "safetensors", "huggingface_hub"]
    assert minigpt.__version__.count(".") == 2


# The module names of minigpt 0.1 (`python -m minigpt.profile`, ...) keep working beside the
# new places and `python -m minigpt <command>`.
@pytest.mark.parametrize("args", [
    ["minigpt.cli.train"], ["minigpt.cli.sample"], ["minigpt.bench.profile"],
    ["minigpt.analysis.heads"], ["minigpt.hf.export"], ["minigpt.train"],
    ["minigpt.profile"], ["minigpt.heads"], ["minigpt.export"], ["minigpt.sample"],
    ["minigpt.bench_generate"], ["minigpt.plot"], ["minigpt.data"], ["minigpt.experiments"],
    ["minigpt", "train"], ["minigpt", "profile"], ["minigpt", "bench-generate"]])
def test_python_m_entry_points_show_help(args):
    out = subprocess.run([sys.executable, "-m", *args, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr


def test_sdist_manifest_carries_every_header():
    manifest = (ROOT / "MANIFEST.in").read_text()
    headers = list((ROOT / "csrc").rglob("*.h")) + list((ROOT / "csrc").rglob("*.cuh"))
    assert headers
    assert "recursive-include csrc" in manifest and "*.h" in manifest and "*.cuh" in manifest


@needs_ext
def test_build_info_holds_the_build_plan_line():
    plan = ROOT / "minigpt" / "_build_plan.txt"
    if not plan.is_file():
        pytest.skip("minigpt._C was not built by setup.py here")
    info = _ext.build_info()
    assert info["plan"].startswith("minigpt: building") and info["plan"] == plan.read_text().strip()
    # the reason names CUDA: "no CUDA kernels: ...", "CUDA 13.0 toolkit ..." or "MINIGPT_CUDA=0"
    assert ("CUDA" in info["plan"]) and (info["cuda"] == ("CPU and CUDA" in info["plan"]))


@needs_ext
def test_build_info_declares_what_the_kernels_implement():
    info = _ext.build_info()
    assert info["dtypes"]["cpu"] == ["float32", "float64", "bfloat16", "float16"]
    if info["cuda"]:
        assert info["dtypes"]["cuda"] == ["bfloat16", "float16", "float32"]
        assert info["cuda_head_dims"] == [32, 64, 96, 128]
    else:
        assert "cuda" not in info["dtypes"] and info["cuda_head_dims"] == []
    # the C++ checks name the same list
    q = torch.randn(1, 1, 4, 8).to(torch.int32)
    with pytest.raises(RuntimeError,
                       match="must be float32, float64, bfloat16 or float16 on cpu"):
        torch.ops.minigpt.attention_forward(q, q, q, True, 0.5)


_HEAP_SCRIPT = """
import ctypes, torch
from minigpt.runtime import keep_freed_memory
class Mallinfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Mallinfo2
applied = keep_freed_memory()
blocks = [torch.empty(6 << 20).fill_(1.0) for _ in range(3)]  # a step's: 3 x 24 MiB
del blocks
print(applied, mallinfo2().fordblks)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc"
                    or tuple(map(int, platform.libc_ver()[1].split(".")[:2])) < (2, 33),
                    reason="glibc's malloc only (mallinfo2: glibc 2.33 or later)")
def test_keep_freed_memory_keeps_a_steps_freed_tensors_for_the_next():
    """keep_freed_memory (every command line calls it): the 72 MiB a step frees stay in the
    heap for the next step (by default, blocks that large are mapped and unmapped, to be faulted
    in again, zeroed, page by page); a MALLOC_* variable leaves malloc alone."""
    def heap_free_bytes(**env):
        proc = subprocess.run([sys.executable, "-c", _HEAP_SCRIPT], cwd=ROOT, timeout=120,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        applied, free = proc.stdout.split()
        return applied, int(free)
    applied, kept = heap_free_bytes()
    skipped, left = heap_free_bytes(MALLOC_ARENA_MAX="8")
    assert (applied, skipped) == ("True", "False")
    assert kept >= 72 << 20, kept
    assert left < 24 << 20, left
