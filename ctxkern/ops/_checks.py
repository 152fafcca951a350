"""Boundary checks shared by every op: one message style, always naming the offending argument."""
from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float_dtype(t: Tensor, name: str, allowed: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{name} must be one of {names}; got {str(t.dtype).removeprefix('torch.')}")


def check_like(t: Tensor, x: Tensor, name: str, x_name: str = "x") -> None:
    """t shares x's dtype and device."""
    check_tensor(t, name)
    if t.dtype != x.dtype:
        raise ValueError(f"{name} must have {x_name}'s dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on {x_name}'s device {x.device}, got {t.device}")


def check_shape(t: Tensor, shape: tuple[int, ...], name: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def as_rows(t: Tensor, n: int) -> Tensor:
    """(..., n) -> (M, n) with a contiguous last dim; a view whenever the layout allows, else a copy."""
    rows = t.reshape(-1, n)
    return rows if rows.stride(-1) == 1 or n == 1 else rows.contiguous()
