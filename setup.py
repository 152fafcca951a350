"""Builds ctxkern._C (the operator schemas, and the CUDA kernels when torch has CUDA and the CUDA toolkit is
complete) and the C++ CPU kernels, always, as ctxkern._cpu_<instruction set>.

CTXKERN_CUDA=auto (default) | 0 | 1 chooses the CUDA part. Build with `pip install --no-build-isolation .`
(or `-e .`) so the extension is compiled against the torch already installed (an isolated build would fetch
another, or none).
"""
import glob
import os
import platform
import re
import subprocess
import sys

import setuptools
from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as err:
    raise SystemExit(
        f"ctxkern builds against the installed torch, and this build cannot import torch ({err}).\n"
        "If torch is installed, the build ran in an isolated environment, which hides it: add "
        "--no-build-isolation (`pip install --no-build-isolation .`, or `-e .`; `python -m build --no-isolation`).\n"
        "If it is not, install torch first (`pip install torch`), then build that way."
    ) from err

# setuptools builds wheels (and editable installs) itself from 70.1 on; before that it needs the `wheel`
# package, and without it fails late with "invalid command 'bdist_wheel'".
if tuple(int(p) for p in re.findall(r"\d+", setuptools.__version__)[:2]) < (70, 1):
    try:
        import wheel  # noqa: F401
    except ImportError:
        raise SystemExit(f"ctxkern's build needs setuptools>=70.1 (this is {setuptools.__version__}) or the "
                         "`wheel` package: `pip install 'setuptools>=70.1'`, then build again") from None


def cuda_missing() -> list:
    """What a CUDA build against this torch lacks on this machine; empty when it can be built.

    torch finds CUDA_HOME from nvcc's location alone (nvcc in /usr/local/bin gives /usr/local), so a torch
    with CUDA and an nvcc on PATH do not mean the toolkit's headers are there, or that its CUDA major
    version is the one torch was built with (which torch requires of an extension). Checked before the
    build rather than found as a compile error after minutes of it."""
    if torch.version.cuda is None:
        return [f"a torch with CUDA (torch {torch.__version__} was built without it)"]
    if CUDA_HOME is None:
        return ["nvcc (not on PATH, and CUDA_HOME is not set)"]
    missing = []
    include_dirs = [os.path.join(CUDA_HOME, "include")] + [p for p in [os.environ.get("CUDA_INC_PATH")] if p]
    if not any(os.path.isfile(os.path.join(d, "cuda_runtime.h")) for d in include_dirs):
        missing.append(f"the CUDA headers (no cuda_runtime.h in {' or '.join(include_dirs)}; "
                       f"CUDA_HOME={CUDA_HOME}: set CUDA_HOME to the CUDA toolkit's root, e.g. /usr/local/cuda)")
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    try:
        release = re.search(r"release (\d+)\.(\d+)", subprocess.run(
            [nvcc, "--version"], capture_output=True, text=True, check=True).stdout)
    except (OSError, subprocess.CalledProcessError) as err:
        missing.append(f"a working nvcc ({nvcc} --version failed: {err})")
    else:
        torch_major = torch.version.cuda.split(".")[0]
        if release and release.group(1) != torch_major:
            missing.append(f"an nvcc of CUDA {torch_major}.x, as torch was built with CUDA {torch.version.cuda} "
                           f"({nvcc} is CUDA {release.group(1)}.{release.group(2)})")
    return missing


def build_cuda() -> bool:
    mode = os.environ.get("CTXKERN_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"CTXKERN_CUDA must be auto, 0 or 1, not {mode!r}")
    if mode == "0":
        return False
    missing = cuda_missing()
    if missing and mode == "1":
        raise SystemExit("CTXKERN_CUDA=1, but the CUDA kernels cannot be built: this machine lacks "
                         + "; and ".join(missing) + ". Install what is missing, or build with CTXKERN_CUDA=auto "
                         "or 0 to build without CUDA.")
    if missing and torch.version.cuda is not None:
        # A CUDA torch without a usable toolkit: worth saying, as the user may expect the CUDA kernels.
        print("ctxkern: building without the CUDA kernels (CTXKERN_CUDA=auto): this machine lacks "
              + "; and ".join(missing) + ". CTXKERN_CUDA=1 makes this an error.", file=sys.stderr)
    return not missing


# One build of the CPU kernels per instruction set; ctxkern/_dispatch.py loads the best one the CPU runs.
# Separate extension modules (rather than one with runtime dispatch inside) keep code compiled for
# AVX-512 out of the AVX2 library entirely, so no inline function shared between the two can ever carry
# an AVX-512 instruction onto a CPU without it. ATen's Vectorized<float> is 256 or 512 bits wide only when
# CPU_CAPABILITY_AVX2 / _AVX512 is defined, as torch does for its own kernels.
X86 = platform.machine() in ("x86_64", "AMD64")
CPU_CAPABILITY_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
} if X86 else {"default": []}
# No -std= flag, for the host compiler or nvcc: torch's BuildExtension then adds the C++ standard of the
# torch being built against (C++17 in older releases; C++20 in 2.13's and 2.14's, whose headers require it),
# so the standard follows torch instead of a number fixed here.
# -fopenmp: at::parallel_for is inline OpenMP in the headers; without it the loops run on one thread.
# The modules then share torch's libgomp (same soname, already loaded), so torch.set_num_threads governs.
CXX_FLAGS = ["-O3", "-fopenmp"]


def cpu_extensions() -> list:
    sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    return [
        CppExtension(f"ctxkern._cpu_{name}", sources, extra_link_args=["-fopenmp"],
                     extra_compile_args={"cxx": CXX_FLAGS + flags + [f"-DCTXKERN_CPU_CAPABILITY_NAME={name}"]})
        for name, flags in CPU_CAPABILITY_FLAGS.items()
    ]


# The schemas and the ops' eager entries (csrc/eager/: argument checks and autograd in C++ for the cpu and cuda
# backends, which call the operators through the dispatcher).
CORE_SOURCES = ["csrc/ops.cpp", *sorted(glob.glob("csrc/eager/*.cpp"))]


def core_extension():
    """ctxkern._C: every operator schema, and the CUDA kernels when they are built."""
    if not build_cuda():
        return CppExtension("ctxkern._C", CORE_SOURCES, extra_compile_args={"cxx": CXX_FLAGS})
    archs = os.environ.get("CTXKERN_CUDA_ARCHS", "80;90").split(";")
    # No --use_fast_math: its approximate division and flush-to-zero buy nothing in memory-bound kernels
    # and cost accuracy against the references.
    nvcc = ["-O3", "-lineinfo", "-DCTXKERN_WITH_CUDA"]
    nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # PTX of the newest architecture too, so that a newer GPU can JIT-compile the kernels.
    nvcc.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    sources = [*CORE_SOURCES, *sorted(glob.glob("csrc/cuda/*.cu")), "csrc/cuda/bindings.cpp"]
    return CUDAExtension("ctxkern._C", sources,
                         extra_compile_args={"cxx": CXX_FLAGS + ["-DCTXKERN_WITH_CUDA"], "nvcc": nvcc})


class SeparateObjectsBuildExtension(BuildExtension):
    """torch's BuildExtension with one object folder per extension: the CPU builds compile the same sources
    (csrc/cpu/*.cpp) with different flags, and in one folder each build's objects overwrote the other's, so
    every build recompiled both from scratch instead of only the changed files."""

    def build_extension(self, ext):
        shared_temp = self.build_temp
        self.build_temp = os.path.join(shared_temp, ext.name)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = shared_temp


def packages() -> list:
    """Every package under ctxkern/, and kernels/ installed as ctxkern.kernels (DESIGN.md's layout).

    Found, not listed, so a new subpackage cannot be left out of the wheel. A ctxkern/kernels link to
    ../kernels (what some development set-ups make) is skipped: kernels/ is mapped through package_dir."""
    found = [p for p in find_packages(include=["ctxkern", "ctxkern.*"])
             if p != "ctxkern.kernels" and not p.startswith("ctxkern.kernels.")]
    return found + ["ctxkern.kernels"] + [f"ctxkern.kernels.{p}" for p in find_packages("kernels")]


# The `ctxkern` command's entry point, outside the package so that it can run without ctxkern/__init__.py.
LAUNCHER = "_ctxkern_cli"

setup(
    packages=packages(),
    py_modules=[LAUNCHER],
    package_dir={"ctxkern.kernels": "kernels"},
    # Files other than .py modules that the packages read at run time (none today); include-package-data is
    # off in pyproject.toml so that this is the one list, which tests/test_packaging.py checks against the tree.
    package_data={},
    ext_modules=[core_extension(), *cpu_extensions()],
    cmdclass={"build_ext": SeparateObjectsBuildExtension},
)
