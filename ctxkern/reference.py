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


def _normalize_rows(x: Tensor) -> Tensor:
    """x / max(||x||2, 1e-12) per row: F.normalize, as sentence-transformers' Normalize module calls it."""
    return torch.nn.functional.normalize(x, p=2.0, dim=-1, eps=1e-12)


def masked_mean_pool_ref(hidden: Tensor, mask: Tensor, normalize: bool = False) -> Tensor:
    """Mean of hidden (B, S, D) over the tokens where mask (B, S) is nonzero -> (B, D); no token gives zeros."""
    ct = _compute_dtype(hidden.dtype)
    keep = (mask != 0).to(ct).unsqueeze(-1)                      # (B, S, 1)
    mean = (hidden.to(ct) * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1)
    return (_normalize_rows(mean) if normalize else mean).to(hidden.dtype)


def masked_mean_pool_varlen_ref(hidden: Tensor, cu_seqlens: Tensor, normalize: bool = False) -> Tensor:
    """Mean of each packed sequence hidden[cu_seqlens[b]:cu_seqlens[b + 1]] of hidden (total, D) -> (B, D)."""
    ct = _compute_dtype(hidden.dtype)
    lengths = cu_seqlens.diff().long()                           # (B,)
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=hidden.device), lengths,
                                   output_size=hidden.shape[0])  # (total,) the sequence of each token
    summed = hidden.new_zeros((lengths.numel(), hidden.shape[1]), dtype=ct).index_add(0, rows, hidden.to(ct))
    mean = summed / lengths.clamp_min(1).to(ct).unsqueeze(-1)
    return (_normalize_rows(mean) if normalize else mean).to(hidden.dtype)
