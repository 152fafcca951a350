"""Drop-in modules: same constructors, parameters and state_dict as their torch.nn counterparts."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ctxkern import _dispatch
from ctxkern import ops
from ctxkern.lstm import LSTM
from ctxkern.reference import layer_norm_ref

__all__ = ["LayerNorm", "LSTM", "MaskedMeanPool"]

_REDUCED = (torch.float16, torch.bfloat16)


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm on ctxkern's fused kernel; forward also takes an optional residual to add first.

    Subclasses torch.nn.LayerNorm, so construction, parameters, state_dict and isinstance checks are torch's.
    Runs every dtype combination torch.nn.LayerNorm runs, with its output dtype: input and parameters of
    one dtype (float32, float16, bfloat16 on the kernels, float64 on the reference), and float32 parameters
    with a float16 or bfloat16 input (mixed precision: computed in float32 and returned in the input's dtype,
    through the reference, since the kernels take parameters in the input's dtype and rounding the
    parameters to it would not give torch's result).
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
        weight = None if self.weight is None else self.weight.reshape(n)
        bias = None if self.bias is None else self.bias.reshape(n)
        residual = None if residual is None else residual.reshape(flat.shape)
        if self._mixed_precision(input, weight, bias):
            if residual is not None and residual.dtype != input.dtype:
                raise ValueError(f"residual must have input's dtype {input.dtype}, got {residual.dtype}")
            _dispatch.resolve(self.backend, input.device)  # a backend that cannot run still says so
            y = layer_norm_ref(flat, weight, bias, self.eps, residual)
        else:
            y = ops.layer_norm(flat, weight, bias, self.eps, residual=residual, backend=self.backend)
        return y.view(input.shape)

    @staticmethod
    def _mixed_precision(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
        """float32 parameters with a float16 / bfloat16 input, which torch.nn.LayerNorm accepts on a CPU."""
        params = [p for p in (weight, bias) if p is not None]
        if not isinstance(input, Tensor) or all(p.dtype == input.dtype for p in params):
            return False
        return input.dtype in _REDUCED and all(p.dtype == torch.float32 for p in params)

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
