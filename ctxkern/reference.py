"""Pure-PyTorch references for every op: the test oracle (run in float64) and the "torch" backend.

Each reference computes in fp32 at least (float64 stays float64) and returns the input's dtype, so its
low-precision results follow DESIGN.md's numerics: statistics in fp32 whatever the storage dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def layer_norm_ref(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5, residual: Optional[Tensor] = None) -> Tensor:
    """LayerNorm of (x + residual) over the last dim, biased variance, as torch.nn.LayerNorm."""
    ct = _compute_dtype(x.dtype)
    s = x.to(ct) if residual is None else x.to(ct) + residual.to(ct)
    mean = s.mean(dim=-1, keepdim=True)
    var = (s - mean).square().mean(dim=-1, keepdim=True)
    y = (s - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)
