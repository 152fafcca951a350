"""Backend availability and choice, as DESIGN.md's dispatch rules say.

`auto` picks, for a CUDA tensor, cuda if built, else triton if importable, else torch; for a CPU tensor,
cpu if built, else torch. CTXKERN_BACKEND overrides `auto`; like TRITON_INTERPRET it is read once, when ctxkern
is imported (a lookup per call cost more than some ops' kernels). Asking for a backend that cannot run raises
RuntimeError with the reason.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import warnings
from typing import Optional

import torch

BACKENDS = ("torch", "cpu", "cuda", "triton")
CHOICES = BACKENDS + ("auto",)
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


# Builds of the CPU kernels, widest first, with the /proc/cpuinfo flags each needs (setup.py's flags).
_CPU_BUILDS = {"avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"},
               "avx2": {"avx2", "fma", "f16c"}}


def _cpu_flags() -> Optional[set[str]]:
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return None


def _cpu_build_candidates() -> tuple[list[str], str]:
    """The CPU-kernel builds this CPU runs, widest first (CTXKERN_CPU_CAPABILITY narrows it to one), or a reason."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["default"], ""
    flags = _cpu_flags()
    # Running code built for an instruction set the CPU lacks is an illegal instruction, not an exception,
    # so a build is loaded only when the CPU is known to have everything it was compiled for.
    runnable = [name for name, needs in _CPU_BUILDS.items() if flags is not None and needs <= flags]
    wanted = os.environ.get("CTXKERN_CPU_CAPABILITY")
    if wanted:
        if wanted not in _CPU_BUILDS:
            return [], f"CTXKERN_CPU_CAPABILITY must be one of {', '.join(_CPU_BUILDS)}; got {wanted!r}"
        if wanted not in runnable:
            return [], f"CTXKERN_CPU_CAPABILITY={wanted} but this CPU lacks the instructions it needs"
        return [wanted], ""
    if not runnable:
        return [], "this x86 CPU has no AVX2, which ctxkern's CPU kernels need"
    return runnable, ""


def _load_cpu_kernels():
    """Imports the widest runnable build of the CPU kernels; returns (its name or None, reason)."""
    candidates, reason = _cpu_build_candidates()
    errors = []
    for name in candidates:
        try:
            importlib.import_module(f"ctxkern._cpu_{name}")
            return name, ""
        except ImportError as err:
            errors.append(f"ctxkern._cpu_{name} is not built ({err})")
    return None, reason or "; ".join(errors)


def _load_extension():
    try:
        from ctxkern import _C
    except ImportError as err:
        return None, f"ctxkern._C is not built ({err})"
    return _C, ""


_C, _C_REASON = _load_extension()
HAS_EXTENSION = _C is not None  # the compiled operators (torch.ops.ctxkern.*) are registered
if HAS_EXTENSION:
    CPU_KERNELS, _CPU_REASON = _load_cpu_kernels()
else:
    CPU_KERNELS, _CPU_REASON = None, _C_REASON
# Triton reads TRITON_INTERPRET when its kernels are defined, so the value at ctxkern's import is the one in force.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


_HAS_TRITON = _installed("triton")
_HAS_CUDA_DEVICE = torch.cuda.is_available()


def _status() -> dict[str, str]:
    status = {"torch": "available"}
    status["cpu"] = "available" if CPU_KERNELS is not None else f"unavailable: {_CPU_REASON}"
    if _C is None:
        status["cuda"] = f"unavailable: {_C_REASON}"
    elif not _C.with_cuda:
        status["cuda"] = "unavailable: ctxkern._C was built without CUDA"
    elif not _HAS_CUDA_DEVICE:
        status["cuda"] = "unavailable: torch sees no CUDA device"
    else:
        status["cuda"] = "available"
    if not _HAS_TRITON:
        status["triton"] = "unavailable: triton is not installed"
    elif not _HAS_CUDA_DEVICE and not TRITON_INTERPRET:
        status["triton"] = "unavailable: no CUDA device (set TRITON_INTERPRET=1 before import to run on CPU tensors)"
    else:
        status["triton"] = "available"
    return status


_STATUS = _status()


def backends() -> dict[str, str]:
    """{backend: "available" | "unavailable: <reason>"} for torch, cpu, cuda and triton."""
    return dict(_STATUS)


def _runs_on(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and TRITON_INTERPRET)
    return device.type == backend


def check_choice(backend: str, name: str = "backend") -> str:
    if backend not in CHOICES:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, CHOICES))}; got {backend!r}")
    return backend


# CTXKERN_BACKEND as it was when ctxkern was imported; an invalid value is reported by every resolve("auto").
ENV_BACKEND = os.environ.get("CTXKERN_BACKEND", "") or "auto"
# (backend asked for, device type) -> the backend that serves it: the answer depends on nothing else that can
# change after import, and this lookup is most of what a call of an op at a small shape spends on dispatch.
_RESOLVED: dict[tuple[str, str], str] = {}


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend that serves a tensor on `device` when the caller asked for `backend`."""
    try:
        return _RESOLVED[backend, device.type]
    except (KeyError, TypeError):  # TypeError: an unhashable backend, which _resolve reports
        name = _RESOLVED[backend, device.type] = _resolve(backend, device)  # raises, caching nothing, if bad
        return name


def _resolve(backend: str, device: torch.device) -> str:
    if check_choice(backend) == "auto":
        backend = check_choice(ENV_BACKEND, "CTXKERN_BACKEND")
    if backend == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            if _STATUS[candidate] == "available" and _runs_on(candidate, device):
                return candidate
        return "torch"
    if _STATUS[backend] != "available":
        raise RuntimeError(f"backend {backend!r} {_STATUS[backend]}")
    if not _runs_on(backend, device):
        raise RuntimeError(f"backend {backend!r} cannot run on a tensor on {device}")
    return backend


def warn_if_degraded() -> None:
    """Warns once, at import, when the compiled kernels are missing and the torch backend serves."""
    if _C is None:
        warnings.warn(f"ctxkern: {_C_REASON}; the pure-PyTorch backend serves every op", RuntimeWarning,
                      stacklevel=3)
    elif CPU_KERNELS is None:
        warnings.warn(f"ctxkern: {_CPU_REASON}; the pure-PyTorch backend serves CPU tensors", RuntimeWarning,
                      stacklevel=3)
