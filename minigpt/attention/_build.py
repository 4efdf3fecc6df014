"""How minigpt._C is built, decided in one place for setup.py and the just-in-time build.

    plan = build_plan(torch)            # what to build on this machine, and why
    print(plan.summary)                 # one line: CPU kernels only / CPU + CUDA, and the reason
    kwargs = plan.extension_kwargs()    # sources, include dirs and flags for CppExtension /
                                        # CUDAExtension (setup.py) or cpp_extension.load (JIT)

The CUDA kernels are built when MINIGPT_CUDA (auto | 0 | 1, default auto) allows it, torch is a
CUDA build, and a usable CUDA toolkit is found (find_cuda_home) whose nvcc has torch's CUDA major
version; MINIGPT_CUDA=1 turns a missing piece into an error (BuildError) instead of a CPU-only
build. OpenMP flags are chosen by compiling a test program (openmp_flags), so Apple clang without
libomp builds too, single-threaded. A compiler that would copy libstdc++ into the module (a static
libstdc++, by its defaults or $LDFLAGS) is made to link the libstdc++ that torch has loaded
instead (libstdcxx_flags): a second copy crashed on formatting an error message.

torch.utils.cpp_extension reads CUDA_HOME once, when it is first imported: apply_cuda_home()
sets the environment variable and, if the module is already imported, its CUDA_HOME too. This
file imports nothing from minigpt, so setup.py can load it by path before minigpt is installed.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]  # the source checkout: minigpt/attention/_build.py
CSRC = ROOT / "csrc"

# nvcc flags of our own; torch adds its COMMON_NVCC_FLAGS (-D__CUDA_NO_HALF_OPERATORS__ ...).
NVCC_FLAGS = ["--use_fast_math", "--expt-relaxed-constexpr"]
# The newest entry carries PTX, so GPUs newer than the list (sm_100, sm_120) JIT-compile it.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
CUDA_MODES = ("auto", "0", "1")


class BuildError(RuntimeError):
    """The build cannot go ahead as asked (e.g. MINIGPT_CUDA=1 without a usable toolkit)."""


def _has_runtime_header(home: str) -> bool:
    return (Path(home) / "include" / "cuda_runtime.h").is_file()


def find_cuda_home(env=None, which=shutil.which) -> Tuple[Optional[str], str]:
    """Find the CUDA toolkit: (path or None, how it was found or why none was).

    Order: $CUDA_HOME or $CUDA_PATH when set (used as given, but it must hold
    include/cuda_runtime.h); torch's own guess, the parent of the directory of the `nvcc` on PATH,
    only if it holds include/cuda_runtime.h (a wrapper script at /usr/local/bin/nvcc makes that
    guess /usr/local); the same for nvcc with symbolic links resolved; /usr/local/cuda.
    """
    env = os.environ if env is None else env
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = env.get(var)
        if home:
            if _has_runtime_header(home):
                return home, f"${var}={home}"
            return None, f"${var}={home} has no include/cuda_runtime.h"
    tried = []
    nvcc = which("nvcc")
    if nvcc:
        for path in dict.fromkeys((nvcc, os.path.realpath(nvcc))):  # unique, in order
            home = os.path.dirname(os.path.dirname(path))
            if _has_runtime_header(home):
                return home, f"from nvcc at {path}"
            tried.append(f"{home} (from nvcc at {path})")
    if _has_runtime_header("/usr/local/cuda"):
        return "/usr/local/cuda", "the default /usr/local/cuda"
    tried.append("/usr/local/cuda")
    return None, f"no CUDA toolkit with include/cuda_runtime.h in {', '.join(tried)}"


def nvcc_version(home: str) -> Optional[str]:
    """The CUDA release of home/bin/nvcc, e.g. "13.0", or None if it does not run."""
    nvcc = Path(home) / "bin" / ("nvcc.exe" if sys.platform == "win32" else "nvcc")
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def apply_cuda_home(home: str) -> None:
    """Make torch.utils.cpp_extension use this toolkit, whether or not it is imported yet."""
    os.environ["CUDA_HOME"] = home
    mod = sys.modules.get("torch.utils.cpp_extension")
    if mod is not None:
        mod.CUDA_HOME = home


def _compiler() -> str:
    return os.environ.get("CXX") or "c++"


def _try_compile(flags: List[str], ldflags: List[str]) -> bool:
    src = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        c = Path(tmp) / "omp_check.cpp"
        c.write_text(src)
        cmd = [_compiler(), *flags, str(c), "-o", str(Path(tmp) / "omp_check"), *ldflags]
        try:
            return subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


@functools.lru_cache(maxsize=None)
def openmp_flags() -> Tuple[Tuple[str, ...], Tuple[str, ...], str]:
    """(compile flags, link flags, note) that give the CPU kernels OpenMP threads.

    -fopenmp where the compiler takes it (GCC, LLVM clang). Apple clang rejects -fopenmp; there
    Homebrew's libomp is used when installed (the way llm.c's Makefile finds it:
    -Xpreprocessor -fopenmp with libomp's include and lib dirs). Otherwise no flags: at::parallel_for
    then runs on one thread, and the note says so.
    """
    if _try_compile(["-fopenmp"], ["-fopenmp"]):
        return ("-fopenmp",), ("-fopenmp",), "OpenMP (-fopenmp)"
    if sys.platform == "darwin":
        prefixes = []
        brew = shutil.which("brew")
        if brew:
            try:
                prefixes.append(subprocess.run([brew, "--prefix", "libomp"], capture_output=True,
                                               text=True, timeout=60).stdout.strip())
            except (OSError, subprocess.SubprocessError):
                pass
        prefixes += ["/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"]
        for prefix in filter(None, prefixes):
            flags = ("-Xpreprocessor", "-fopenmp", f"-I{prefix}/include")
            ldflags = (f"-L{prefix}/lib", "-lomp")
            if Path(prefix, "include", "omp.h").is_file() and _try_compile(list(flags),
                                                                             list(ldflags)):
                return flags, ldflags, f"OpenMP (libomp at {prefix})"
    return (), (), (f"no OpenMP: {_compiler()} rejects -fopenmp (on macOS: brew install libomp); "
                    "the CPU kernels will run on one thread")


def elf_needed(path: str) -> Optional[List[str]]:
    """The DT_NEEDED entries (the shared libraries it links) of a 64-bit little-endian ELF file,
    read from its section headers; None if it is not one."""
    data = Path(path).read_bytes()
    if data[:6] != b"\x7fELF\x02\x01":
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    # Elf64_Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    needed = []
    for _, kind, _, _, offset, size, link, _, _, _ in sections:
        if kind != 6:  # SHT_DYNAMIC; its sh_link is its string table
            continue
        strings = sections[link][4]
        for at in range(offset, offset + size, 16):
            tag, value = struct.unpack_from("<qQ", data, at)
            if tag == 0:  # DT_NULL
                break
            if tag == 1:  # DT_NEEDED
                start = strings + value
                needed.append(data[start:data.index(b"\0", start)].decode())
    return needed


def loaded_libstdcxx() -> Optional[str]:
    """The libstdc++ this process has loaded (torch's, once torch is imported), or None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        if len(fields) == 6 and Path(fields[5]).name.startswith("libstdc++.so"):
            return fields[5].strip()
    return None


def _links_libstdcxx(ldflags: List[str]) -> Optional[bool]:
    """Whether a shared object that this compiler links (with $LDFLAGS and ldflags) loads the
    shared libstdc++ (True) or carries a copy of its own (False); None if the test did not
    build or is not an ELF file."""
    src = ('#include <sstream>\n#include <string>\n'
           'extern "C" int minigpt_check(long n) { std::ostringstream s; s << n; '
           'return static_cast<int>(s.str().size()); }\n')
    with tempfile.TemporaryDirectory() as tmp:
        c, so = Path(tmp) / "libstdcxx_check.cpp", Path(tmp) / "libstdcxx_check.so"
        c.write_text(src)
        cmd = [_compiler(), "-shared", "-fPIC", str(c), "-o", str(so),
               *shlex.split(os.environ.get("LDFLAGS", "")), *ldflags]
        try:
            if subprocess.run(cmd, capture_output=True, timeout=120).returncode != 0:
                return None
        except (OSError, subprocess.SubprocessError):
            return None
        needed = elf_needed(str(so))
    if needed is None:
        return None
    return any(n.startswith(("libstdc++.so", "libc++.so")) for n in needed)


@functools.lru_cache(maxsize=None)
def libstdcxx_flags() -> Tuple[Tuple[str, ...], str]:
    """(link flags, note): none where the compiler links the shared libstdc++ (the usual case);
    where it would copy a static libstdc++ into the module (some toolchains' defaults, or
    -static-libstdc++ in $LDFLAGS), the path of the libstdc++ this process has loaded (torch's),
    which the linker then takes ahead of the static one. Two copies in one process crashed
    (a segmentation fault while formatting a TORCH_CHECK message), so the module must use
    torch's. The note says what was done; empty when nothing was."""
    if not sys.platform.startswith("linux") or _links_libstdcxx([]) is not False:
        return (), ""
    lib = loaded_libstdcxx()
    if lib is None:
        return (), (f"{_compiler()} links a static libstdc++ and no shared one is loaded to "
                    "link instead; error messages may crash")
    if _links_libstdcxx([lib]):
        return (lib,), f"{_compiler()} links a static libstdc++: linking {lib} instead"
    return (), (f"{_compiler()} links a static libstdc++ even with {lib} named; error messages "
                "may crash")


@dataclass
class BuildPlan:
    """What to build: the CPU kernels always (where the platform can), the CUDA ones if with_cuda."""

    cpu_reason: Optional[str]        # None if the CPU kernels can be built here, else why not
    with_cuda: bool
    cuda_reason: str                 # why the CUDA kernels are (not) built
    cuda_home: Optional[str] = None
    cuda_archs: str = ""
    debug: bool = False
    cxx_flags: List[str] = field(default_factory=list)
    ld_flags: List[str] = field(default_factory=list)
    openmp_note: str = ""
    libstdcxx_note: str = ""

    @property
    def summary(self) -> str:
        """One line for the build log: what is built, and why."""
        if self.cpu_reason is not None:
            return f"minigpt: not building the compiled kernels: {self.cpu_reason}"
        what = "CPU and CUDA kernels" if self.with_cuda else "CPU kernels only"
        notes = "; ".join(filter(None, (self.cuda_reason, self.openmp_note, self.libstdcxx_note)))
        return f"minigpt: building {what} ({notes})"

    def sources(self) -> List[str]:
        """Source files, by glob (never listed by hand), relative to the repo root."""
        files = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
        if self.with_cuda:
            files += sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cuda").glob("*.cpp"))
            files += sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cuda").glob("*.cu"))
        return files

    def extension_kwargs(self) -> Dict[str, object]:
        """Keyword arguments shared by setup.py's extension and the JIT build's load()."""
        opt = ["-O0", "-g"] if self.debug else ["-O3"]
        defines = []
        if self.with_cuda:
            token = "_".join(self.cuda_archs.replace(";", " ").split())  # "8.0;9.0" -> 8.0_9.0
            defines = ["-DMINIGPT_WITH_CUDA", f"-DMINIGPT_CUDA_ARCHS={token}"]
        return {
            "sources": self.sources(),
            "include_dirs": [str(CSRC)],
            "cxx": opt + self.cxx_flags + defines,
            "nvcc": opt + NVCC_FLAGS + defines,
            "ldflags": list(self.ld_flags),
        }


def cuda_mode(env=None) -> str:
    """$MINIGPT_CUDA: auto (default), 0 or 1. Raises BuildError for anything else."""
    env = os.environ if env is None else env
    mode = (env.get("MINIGPT_CUDA") or "auto").strip().lower()
    if mode not in CUDA_MODES:
        raise BuildError(f"MINIGPT_CUDA must be one of {', '.join(CUDA_MODES)}, got "
                         f"{env.get('MINIGPT_CUDA')!r}")
    return mode


def cpu_build_reason(platform: str = sys.platform) -> Optional[str]:
    """None if the CPU kernels can be compiled on this platform, else why not."""
    if platform == "win32":
        return ("the CPU kernels use GCC/Clang vector extensions, which MSVC does not compile; "
                "on Windows attention runs on PyTorch's sdpa")
    return None


def plan_cuda(torch_cuda: Optional[str], env=None, which=shutil.which,
              version_of=nvcc_version) -> Tuple[bool, str, Optional[str]]:
    """(build CUDA kernels?, why, toolkit path). torch_cuda is torch.version.cuda."""
    env = os.environ if env is None else env
    mode = cuda_mode(env)
    if mode == "0":
        return False, "MINIGPT_CUDA=0", None
    home, how = find_cuda_home(env, which)
    if torch_cuda is None:
        why = "torch is a CPU build"
    elif not list((CSRC / "cuda").glob("*.cu")):
        why = f"no CUDA sources in {CSRC / 'cuda'}"
    elif home is None:
        why = how
    else:
        nvcc = version_of(home)
        if nvcc is None:
            why = f"nvcc in {home}/bin does not run ({how})"
        elif nvcc.split(".")[0] != torch_cuda.split(".")[0]:
            why = (f"nvcc in {home} is CUDA {nvcc} but torch was built with CUDA {torch_cuda} "
                   "(the major versions must match; set CUDA_HOME to a matching toolkit)")
        else:
            return True, f"CUDA {nvcc} toolkit {how}", home
    if mode == "1":
        raise BuildError(f"MINIGPT_CUDA=1 but the CUDA kernels cannot be built: {why}")
    return False, f"no CUDA kernels: {why}", None


def build_plan(torch_module, env=None) -> BuildPlan:
    """Decide what to build on this machine for this torch. Raises BuildError (see cuda_mode,
    plan_cuda). Sets CUDA_HOME (apply_cuda_home) when the CUDA kernels are built."""
    env = os.environ if env is None else env
    cpu_reason = cpu_build_reason()
    if cpu_reason is not None:
        return BuildPlan(cpu_reason=cpu_reason, with_cuda=False, cuda_reason="")
    with_cuda, why, home = plan_cuda(torch_module.version.cuda, env)
    archs = ""
    if with_cuda:
        apply_cuda_home(home)
        archs = env.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
        if env is os.environ:  # torch's build helpers read the list from the environment
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    cflags, ldflags, note = openmp_flags()
    std_flags, std_note = libstdcxx_flags()
    return BuildPlan(cpu_reason=None, with_cuda=with_cuda, cuda_reason=why, cuda_home=home,
                     cuda_archs=archs, debug=env.get("MINIGPT_DEBUG", "0") == "1",
                     cxx_flags=list(cflags), ld_flags=list(ldflags) + list(std_flags),
                     openmp_note=note, libstdcxx_note=std_note)


def gpu_unsupported_reason(capability: Tuple[int, int], archs: str) -> Optional[str]:
    """None if kernels built for archs (build_info()["cuda_archs"], e.g. "8.0_9.0+PTX" or
    "8.0;9.0+PTX") run on a GPU of this compute capability, else why not.

    The kernels need sm_80 (bf16 mma.sync, cp.async). A cubin for X.Y runs on X.Z with Z >= Y;
    PTX for X.Y is compiled by the driver for any capability >= X.Y.
    """
    major, minor = capability
    if (major, minor) < (8, 0):
        return (f"the CUDA kernels need compute capability 8.0 or newer (Ampere); this GPU is "
                f"{major}.{minor}")
    built = [a for a in re.split(r"[;_\s]+", archs) if a]
    for arch in built:
        m = re.fullmatch(r"(\d+)\.(\d+)a?(\+PTX)?", arch, flags=re.IGNORECASE)
        if m is None:
            continue
        a_major, a_minor, ptx = int(m.group(1)), int(m.group(2)), m.group(3)
        if a_major == major and a_minor <= minor:
            return None
        if ptx and (a_major, a_minor) <= (major, minor):
            return None
    return (f"minigpt._C was built for CUDA archs {archs or '(none)'}, which do not run on "
            f"compute capability {major}.{minor}; rebuild with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\"")


def torch_nvcc_flags() -> List[str]:
    """The nvcc flags a torch build passes for our .cu files, ours included (for compile checks
    that must see what the real build sees): torch's COMMON_NVCC_FLAGS, NVCC_FLAGS, -O3 and the
    C++ standard torch's build helpers use."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return list(dict.fromkeys(list(COMMON_NVCC_FLAGS) + NVCC_FLAGS + ["-O3", "-std=c++20"]))

