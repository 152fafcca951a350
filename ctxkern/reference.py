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


def lstm_cell_ref(input_gates: Tensor, hidden_gates: Tensor, c: Tensor, bias: Optional[Tensor] = None,
                  cell_clip: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """One LSTM step, torch's gate order i, f, g, o -> (h, c_new); the eager composition users write.

    c_new = sigmoid(f) * c + sigmoid(i) * tanh(g), clamped to +-cell_clip before h = sigmoid(o) * tanh(c_new),
    as AllenNLP's LSTM with projection clips its memory cell.
    """
    ct = _compute_dtype(input_gates.dtype)
    gates = input_gates.to(ct) + hidden_gates.to(ct)
    if bias is not None:
        gates = gates + bias.to(ct)
    i, f, g, o = gates.chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c.to(ct) + torch.sigmoid(i) * torch.tanh(g)
    if cell_clip is not None:
        c_new = torch.clamp(c_new, -cell_clip, cell_clip)
    h = torch.sigmoid(o) * torch.tanh(c_new)
    return h.to(c.dtype), c_new.to(c.dtype)
