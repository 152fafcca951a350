"""ops.layer_norm: y = LayerNorm(x + residual) over the last dim, statistics in fp32.

The cpu and cuda backends are one operator, torch.ops.ctxkern.layer_norm_fwd (schema in csrc/ops.cpp),
dispatched by device; the triton backend is a custom_op around kernels/layer_norm.py's launchers (a
custom_op rather than triton_op because triton_op's fake-tensor tracing runs the kernel itself under
TRITON_INTERPRET, which breaks torch.compile and opcheck on CPU). Both get the same fake kernels and autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ctxkern import _dispatch
from ctxkern.ops import _autograd_modes
from ctxkern.ops._checks import (as_rows, check_float_dtype, check_like, check_shape, check_tensor,
                                 last_dim_contiguous)
from ctxkern.ops._register import register_op
from ctxkern.reference import layer_norm_ref


def _fwd_fake(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
              eps: float) -> tuple[Tensor, Tensor, Tensor]:
    stats = x.new_empty((x.shape[0],), dtype=torch.float32)
    return x.new_empty(x.shape), stats, torch.empty_like(stats)


def _bwd_fake(dy: Tensor, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], mean: Tensor,
              rstd: Tensor, has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    dweight = weight.new_empty(weight.shape) if weight is not None else x.new_empty((0,))
    return x.new_empty(x.shape), dweight, x.new_empty((x.shape[1] if has_bias else 0,))


@torch.library.custom_op("ctxkern::layer_norm_fwd_triton", mutates_args=())
def _layer_norm_fwd_triton(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                           bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    from ctxkern.kernels.layer_norm import layer_norm_fwd_triton

    return layer_norm_fwd_triton(x, residual, weight, bias, eps)


@torch.library.custom_op("ctxkern::layer_norm_bwd_triton", mutates_args=())
def _layer_norm_bwd_triton(dy: Tensor, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                           mean: Tensor, rstd: Tensor, has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    from ctxkern.kernels.layer_norm import layer_norm_bwd_triton

    return layer_norm_bwd_triton(dy, x, residual, weight, mean, rstd, has_bias)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.eps = eps


def _backward(bwd_op, ctx, dy, _dmean, _drstd):
    x, residual, weight, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True: the backward kernel is not differentiable, the reference's backward is. The bias
        # is not saved: its gradient is the column sum of dy, and it does not change the other gradients.
        dx, dres, dweight = _autograd_modes.reference_vjp(
            lambda x, r, w: layer_norm_ref(x, w, None, ctx.eps, r), (x, residual, weight), (dy,))
        return dx, dres, dweight, dy.sum(0) if ctx.has_bias else None, None
    dx, dweight, dbias = bwd_op(last_dim_contiguous(dy), x, residual, weight, mean, rstd, ctx.has_bias)
    # y depends on x and residual only through their sum, so both get the same gradient.
    return (dx, dx if residual is not None else None, dweight if weight is not None else None,
            dbias if ctx.has_bias else None, None)


# backend -> forward operator
_FWD = register_op(("ctxkern::layer_norm_fwd_triton", "ctxkern::layer_norm_bwd_triton"),
                   ("ctxkern::layer_norm_fwd", "ctxkern::layer_norm_bwd"),
                   _fwd_fake, _bwd_fake, _setup_context, _backward)


def _check(x, weight, bias, residual) -> None:
    check_tensor(x, "x")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalized last dim); got a 0-d tensor")
    check_float_dtype(x, "x", _autograd_modes.ACCEPTED_DTYPES)
    n = x.shape[-1]
    if weight is not None:
        check_like(weight, x, "weight")
        check_shape(weight, (n,), "weight")
    if bias is not None:
        check_like(bias, x, "bias")
        check_shape(bias, (n,), "bias")
    if residual is not None:
        check_like(residual, x, "residual")
        check_shape(residual, x.shape, "residual")


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5, *,
               residual: Optional[Tensor] = None, prenorm: bool = False, backend: str = "auto"):
    """y = LayerNorm(x + residual) over the last dim; weight, bias: (N,) or None; statistics in fp32.

    x: float32, float16, bfloat16 (the kernels) or float64 (the reference, on every backend); weight, bias and
    residual in x's dtype. Differentiable in x, residual, weight and bias, in every autograd mode: double
    backward, forward-mode AD and torch.func transforms run the reference (ctxkern/ops/_autograd_modes.py).
    prenorm=True (needs residual): returns (y, x + residual), the sum a pre-LN block carries as its residual
    stream, differentiable in both outputs.
    backend: "auto", "torch", "cpu", "cuda" or "triton".
    """
    if prenorm:
        if residual is None:
            raise ValueError("prenorm=True needs a residual: it returns (y, x + residual)")
        _check(x, weight, bias, residual)
        total = x + residual
        return layer_norm(total, weight, bias, eps, backend=backend), total
    _check(x, weight, bias, residual)
    if not 0 <= eps < float("inf"):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    name = _dispatch.resolve(backend, x.device)
    if name == "torch" or x.numel() == 0 or _autograd_modes.reference_needed(x.dtype):
        return layer_norm_ref(x, weight, bias, eps, residual)
    y, _mean, _rstd = _FWD[name](
        as_rows(x),
        None if residual is None else as_rows(residual),
        None if weight is None else weight.contiguous(),
        None if bias is None else bias.contiguous(),
        float(eps),
    )
    return y if x.dim() == 2 else y.view(x.shape)
