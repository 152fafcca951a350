"""Builds ctxkern._C (the operator schemas, and the CUDA kernels when torch has CUDA and nvcc is found) and
the C++ CPU kernels, always, as ctxkern._cpu_<instruction set>.

CTXKERN_CUDA=auto (default) | 0 | 1 chooses the CUDA part. Build with `pip install --no-build-isolation -e .`
so the extension is compiled against the torch already installed (an isolated build would fetch another).
"""
import glob
import os
import platform

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as err:
    raise SystemExit(
        "ctxkern builds against an installed torch: install torch first, then "
        "`pip install --no-build-isolation -e .`"
    ) from err


def build_cuda() -> bool:
    mode = os.environ.get("CTXKERN_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"CTXKERN_CUDA must be auto, 0 or 1, not {mode!r}")
    if mode == "0":
        return False
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if mode == "1" and not possible:
        raise SystemExit("CTXKERN_CUDA=1 but torch was built without CUDA or nvcc was not found")
    return possible


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
# -fopenmp: at::parallel_for is inline OpenMP in the headers; without it the loops run on one thread.
# The modules then share torch's libgomp (same soname, already loaded), so torch.set_num_threads governs.
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp"]


def cpu_extensions() -> list:
    sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    return [
        CppExtension(f"ctxkern._cpu_{name}", sources, extra_link_args=["-fopenmp"],
                     extra_compile_args={"cxx": CXX_FLAGS + flags + [f"-DCTXKERN_CPU_CAPABILITY_NAME={name}"]})
        for name, flags in CPU_CAPABILITY_FLAGS.items()
    ]


def core_extension():
    """ctxkern._C: every operator schema, and the CUDA kernels when they are built."""
    if not build_cuda():
        return CppExtension("ctxkern._C", ["csrc/ops.cpp"], extra_compile_args={"cxx": CXX_FLAGS})
    archs = os.environ.get("CTXKERN_CUDA_ARCHS", "80;90").split(";")
    # No --use_fast_math: its approximate division and flush-to-zero buy nothing in memory-bound kernels
    # and cost accuracy against the references.
    nvcc = ["-O3", "-std=c++17", "-lineinfo", "-DCTXKERN_WITH_CUDA"]
    nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # PTX of the newest architecture too, so that a newer GPU can JIT-compile the kernels.
    nvcc.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cuda/*.cu")), "csrc/cuda/bindings.cpp"]
    return CUDAExtension("ctxkern._C", sources,
                         extra_compile_args={"cxx": CXX_FLAGS + ["-DCTXKERN_WITH_CUDA"], "nvcc": nvcc})


setup(
    packages=["ctxkern", "ctxkern.ops", "ctxkern.bench", "ctxkern.kernels"],
    package_dir={"ctxkern.kernels": "kernels"},
    ext_modules=[core_extension(), *cpu_extensions()],
    cmdclass={"build_ext": BuildExtension},
)
