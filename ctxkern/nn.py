"""Drop-in modules: same constructors, parameters and state_dict as their torch.nn counterparts."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ctxkern import _dispatch
from ctxkern import ops
from ctxkern.lstm import LSTM

__all__ = ["LayerNorm", "LSTM"]


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm on ctxkern's fused kernel; forward also takes an optional residual to add first.

    Subclasses torch.nn.LayerNorm, so construction, parameters, state_dict and isinstance checks are torch's.
    backend (keyword-only): which ctxkern backend serves it ("auto" by default).
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, backend: str = "auto") -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.backend = _dispatch.check_choice(backend)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        k = len(self.normalized_shape)
        if k == 1 and isinstance(input, Tensor) and input.dim() and input.shape[-1] == self.normalized_shape[0]:
            # One normalized dim, the common case: ops.layer_norm's checks cover the rest, and no reshape (a
            # view node per parameter in the autograd graph) is needed.
            return ops.layer_norm(input, self.weight, self.bias, self.eps, residual=residual, backend=self.backend)
        if tuple(input.shape[-k:]) != tuple(self.normalized_shape):
            raise ValueError(f"input's trailing dims must be normalized_shape {tuple(self.normalized_shape)}, "
                             f"got input of shape {tuple(input.shape)}")
        if residual is not None and residual.shape != input.shape:
            raise ValueError(f"residual must have input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
        n = math.prod(self.normalized_shape)
        # Normalizing over k trailing dims is normalizing over one flattened dim of their product.
        flat = input.reshape(*input.shape[:input.dim() - k], n)
        y = ops.layer_norm(
            flat,
            None if self.weight is None else self.weight.reshape(n),
            None if self.bias is None else self.bias.reshape(n),
            self.eps,
            residual=None if residual is None else residual.reshape(flat.shape),
            backend=self.backend,
        )
        return y.view(input.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


class MaskedMeanPool(torch.nn.Module):
    """Sentence embedding from token states: the mean over the real tokens, optionally L2-normalized.

    forward(hidden (B, S, D), mask (B, S) bool / integer / float, nonzero = token) -> (B, D), as
    sentence-transformers' Pooling (mean mode), followed by its Normalize when normalize=True.
    backend (keyword-only): which ctxkern backend serves it ("auto" by default).
    """

    def __init__(self, normalize: bool = False, *, backend: str = "auto") -> None:
        super().__init__()
        self.normalize = bool(normalize)
        self.backend = _dispatch.check_choice(backend)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        return ops.masked_mean_pool(hidden, mask, normalize=self.normalize, backend=self.backend)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}, backend={self.backend!r}"
