"""Builds ctxkern._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

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


def cpu_flags() -> list[str]:
    # -fopenmp: at::parallel_for is inline OpenMP in the headers; without it the loops run on one thread.
    # The extension then shares torch's libgomp (same soname, already loaded), so torch.set_num_threads governs.
    flags = ["-O3", "-std=c++17", "-fopenmp"]
    # ATen's Vectorized<float> is 256-bit only when CPU_CAPABILITY_AVX2 is defined; ctxkern/_dispatch.py
    # refuses to load the extension on an x86 CPU without AVX2, so this never meets an illegal instruction.
    if platform.machine() in ("x86_64", "AMD64"):
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags


with_cuda = build_cuda()
sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
extra = {"cxx": cpu_flags()}
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/cuda/bindings.cpp"]
    archs = os.environ.get("CTXKERN_CUDA_ARCHS", "80;90")
    extra["nvcc"] = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"] + [
        f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs.split(";")
    ]
    extra["cxx"].append("-DCTXKERN_WITH_CUDA")
    extra["nvcc"].append("-DCTXKERN_WITH_CUDA")
    ext = CUDAExtension("ctxkern._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])
else:
    ext = CppExtension("ctxkern._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])

setup(
    packages=["ctxkern", "ctxkern.ops", "ctxkern.bench", "ctxkern.kernels"],
    package_dir={"ctxkern.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
)
