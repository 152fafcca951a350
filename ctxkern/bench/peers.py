"""What a user would pick instead of ctxkern, and which ctxkern backends can run, for the benchmark cases."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ctxkern import backends


def ctxkern_backends(device: str) -> list[str]:
    """ctxkern's compiled backends that run on `device` here (Triton's CPU interpreter is not benchmarked)."""
    wanted = ("cuda", "triton") if device == "cuda" else ("cpu",)
    status = backends()
    return [name for name in wanted if status[name] == "available"]


def compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def liger_layer_norm(x, w, b, r) -> Optional[Callable]:
    """Liger-Kernel's Triton LayerNorm when it is installed (a GPU peer); it has no residual input."""
    if x.device.type != "cuda" or r is not None:
        return None
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except ImportError:
        return None
    return lambda: LigerLayerNormFunction.apply(x, w, b, 1e-5)
