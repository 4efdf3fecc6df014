"""Builds minigpt and its compiled attention kernels (minigpt._C).

    pip install --no-build-isolation -e .      # torch must already be installed

Sources are found by glob: csrc/*.cpp always; csrc/cuda/*.cpp and *.cu too when a CUDA toolkit
and a CUDA build of torch are present (arch list: $TORCH_CUDA_ARCH_LIST, default "8.0;9.0").
Switches: MINIGPT_CUDA=0 skips the CUDA kernels, MINIGPT_DEBUG=1 builds with -O0 -g,
MAX_JOBS limits ninja's parallel jobs (torch's own variable).
"""

import glob
import os

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # metadata-only steps (e.g. building an sdist) need no compiler
    torch = None

if torch is not None and glob.glob("csrc/*.cpp"):
    debug = os.environ.get("MINIGPT_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-fopenmp"]  # the C++ standard is the one torch's build helpers choose
    with_cuda = (os.environ.get("MINIGPT_CUDA", "1") != "0" and torch.version.cuda is not None
                 and CUDA_HOME is not None and glob.glob("csrc/cuda/*.cu"))
    sources = sorted(glob.glob("csrc/*.cpp"))
    include_dirs = [os.path.abspath("csrc")]
    if with_cuda:
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        token = "_".join(archs.replace(";", " ").split())  # "8.0;9.0" -> 8.0_9.0
        defines = ["-DMINIGPT_WITH_CUDA", f"-DMINIGPT_CUDA_ARCHS={token}"]
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension(
            "minigpt._C", sources, include_dirs=include_dirs, extra_link_args=["-fopenmp"],
            extra_compile_args={"cxx": cxx + defines,
                                "nvcc": opt + ["--use_fast_math",
                                               "--expt-relaxed-constexpr"] + defines})
    else:
        ext = CppExtension("minigpt._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    ext_modules = [ext]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(
    packages=find_packages(include=["minigpt", "minigpt.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
