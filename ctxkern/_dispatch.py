"""Backend availability and choice, as DESIGN.md's dispatch rules say.

`auto` picks, for a CUDA tensor, cuda if built, else triton if importable, else torch; for a CPU tensor,
cpu if built, else torch. CTXKERN_BACKEND overrides `auto`. Asking for a backend that cannot run raises
RuntimeError with the reason.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import warnings

import torch

BACKENDS = ("torch", "cpu", "cuda", "triton")
CHOICES = BACKENDS + ("auto",)
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


def _cpu_lacks_avx2() -> bool:
    # The extension's CPU kernels are compiled for AVX2 on x86; loading them elsewhere would be an illegal
    # instruction, not an exception, so this is checked before the import.
    if platform.machine() not in ("x86_64", "AMD64") or not os.path.exists("/proc/cpuinfo"):
        return False
    with open("/proc/cpuinfo") as f:
        return " avx2" not in f.read()


def _load_extension():
    if _cpu_lacks_avx2():
        return None, "this x86 CPU has no AVX2, which ctxkern._C's CPU kernels need"
    try:
        from ctxkern import _C
    except ImportError as err:
        return None, f"ctxkern._C is not built ({err})"
    return _C, ""


_C, _C_REASON = _load_extension()
HAS_EXTENSION = _C is not None  # the compiled operators (torch.ops.ctxkern.*) are registered
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
    status["cpu"] = "available" if _C is not None else f"unavailable: {_C_REASON}"
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


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend that serves a tensor on `device` when the caller asked for `backend`."""
    if check_choice(backend) == "auto":
        backend = check_choice(os.environ.get("CTXKERN_BACKEND", "auto") or "auto", "CTXKERN_BACKEND")
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
    """Warns once, at import, when the compiled extension is missing and the torch backend serves."""
    if _C is None:
        warnings.warn(f"ctxkern: {_C_REASON}; the pure-PyTorch backend serves every op", RuntimeWarning,
                      stacklevel=3)
