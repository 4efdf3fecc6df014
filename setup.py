"""Builds minigpt and its compiled attention kernels (minigpt._C).

    pip install --no-build-isolation -e .      # torch must already be installed

What is built is decided by minigpt/attention/_build.py (shared with the just-in-time build) and printed
as one line: the CPU kernels (csrc/*.cpp, by glob) always, the CUDA kernels (csrc/cuda/*.cpp,
*.cu) too when torch is a CUDA build and a CUDA toolkit of the same major version is found.
Switches: MINIGPT_CUDA=auto|0|1 (1: fail unless the CUDA kernels can be built),
TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX"), CUDA_HOME, MINIGPT_DEBUG=1 (-O0 -g),
MAX_JOBS (ninja's parallel jobs, torch's own variable).
"""

import importlib.util
import sys

from setuptools import find_packages, setup

# Commands that compile; metadata and sdist steps need neither torch nor a compiler.
COMPILING = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}
NEEDS_TORCH = """
minigpt: PyTorch is needed to build minigpt's kernels, and this build environment has none.
Install torch first, then build against it without build isolation:

    pip install torch
    pip install --no-build-isolation .        (or: pip install --no-build-isolation -e .)

(An isolated build would compile against a different torch than the one minigpt runs with.)
"""


def _load_build_module():
    spec = importlib.util.spec_from_file_location("minigpt_build", "minigpt/attention/_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


PLAN_FILE = "minigpt/_build_plan.txt"  # read by minigpt.attention._ext.build_info()
ext_modules, cmdclass = [], {}
try:
    import torch
except ImportError:
    torch = None

if torch is None:
    if COMPILING & set(sys.argv[1:]):
        sys.exit(NEEDS_TORCH)
else:
    _build = _load_build_module()
    try:
        plan = _build.build_plan(torch)  # sets CUDA_HOME before cpp_extension is imported
    except _build.BuildError as e:
        sys.exit(f"minigpt: {e}")
    print(plan.summary, file=sys.stderr)  # pip shows it with -v; the file keeps it for later
    if COMPILING & set(sys.argv[1:]):
        with open(PLAN_FILE, "w", encoding="utf-8") as fh:
            fh.write(plan.summary + "\n")
    if plan.cpu_reason is None:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

        kw = plan.extension_kwargs()
        Extension = CUDAExtension if plan.with_cuda else CppExtension
        compile_args = {"cxx": kw["cxx"], "nvcc": kw["nvcc"]} if plan.with_cuda else kw["cxx"]
        ext_modules = [Extension("minigpt._C", kw["sources"], include_dirs=kw["include_dirs"],
                                 extra_compile_args=compile_args,
                                 extra_link_args=kw["ldflags"])]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(
    packages=find_packages(include=["minigpt", "minigpt.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    license="MIT",  # here, not in pyproject.toml: see the note on dynamic there
)
