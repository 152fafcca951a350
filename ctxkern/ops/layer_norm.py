"""ops.layer_norm: y = LayerNorm(x + residual) over the last dim, statistics in fp32 (and, prenorm, x + residual).

The cpu and cuda backends are one operator, torch.ops.ctxkern.layer_norm_fwd (schema in csrc/ops.cpp),
dispatched by device; the triton backend is a custom_op around kernels/layer_norm.py's launchers (a
custom_op rather than triton_op because triton_op's fake-tensor tracing runs the kernel itself under
TRITON_INTERPRET, which breaks torch.compile and opcheck on CPU). Both get the same fake kernels and autograd.
Plain eager calls on the cpu and cuda backends go through csrc/eager/layer_norm.cpp, which calls the same
operator with its checks and autograd in C++ (a Python boundary cost more than the kernel at small shapes).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

from ctxkern import _dispatch
from ctxkern.ops import _autograd_modes
from ctxkern.ops._checks import (as_rows, check_float_dtype, check_like, check_shape, check_tensor,
                                 last_dim_contiguous)
from ctxkern.ops._register import register_op
from ctxkern.reference import layer_norm_ref


def _fwd_fake(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
              eps: float, prenorm: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    stats = x.new_empty((x.shape[0],), dtype=torch.float32)
    return x.new_empty(x.shape), stats, torch.empty_like(stats), x.new_empty(x.shape if prenorm else (0,))


def _bwd_fake(dy: Tensor, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], mean: Tensor,
              rstd: Tensor, has_bias: bool, dsum: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    dweight = weight.new_empty(weight.shape) if weight is not None else x.new_empty((0,))
    return x.new_empty(x.shape), dweight, x.new_empty((x.shape[1] if has_bias else 0,))


@torch.library.custom_op("ctxkern::layer_norm_fwd_triton", mutates_args=())
def _layer_norm_fwd_triton(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                           bias: Optional[Tensor], eps: float, prenorm: bool = False
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ctxkern.kernels.layer_norm import layer_norm_fwd_triton

    return layer_norm_fwd_triton(x, residual, weight, bias, eps, prenorm)


@torch.library.custom_op("ctxkern::layer_norm_bwd_triton", mutates_args=())
def _layer_norm_bwd_triton(dy: Tensor, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                           mean: Tensor, rstd: Tensor, has_bias: bool, dsum: Optional[Tensor] = None
                           ) -> tuple[Tensor, Tensor, Tensor]:
    from ctxkern.kernels.layer_norm import layer_norm_bwd_triton

    return layer_norm_bwd_triton(dy, x, residual, weight, mean, rstd, has_bias, dsum)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, *prenorm = inputs
    _y, mean, rstd, _sum = output
    ctx.save_for_backward(x, residual, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.eps = eps
    ctx.prenorm = bool(prenorm and prenorm[0])
    ctx.set_materialize_grads(False)


def _differentiable_backward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], has_bias: bool,
                             eps: float, dy: Optional[Tensor], dsum: Optional[Tensor]) -> tuple:
    """The backward as a graph of its own (create_graph=True: double backward, gradient penalties), through the
    reference, whose backward is differentiable where the kernels' is not; -> (dx, dresidual, dweight, dbias).
    The bias is not needed: its gradient is the column sum of dy, and it does not change the other gradients.
    Both the Python path and the C++ eager entry (csrc/eager/layer_norm.cpp) call this."""
    dx, dres, dweight = _autograd_modes.reference_vjp(
        lambda x, r, w: layer_norm_ref(x, w, None, eps, r), (x, residual, weight), (dy,))
    if dsum is not None:  # the prenorm sum x + residual passes its gradient to both unchanged
        dx = dsum if dx is None else dx + dsum
        dres = None if residual is None else (dsum if dres is None else dres + dsum)
    dbias = dy.reshape(-1, dy.shape[-1]).sum(0) if has_bias and dy is not None else None
    return dx, dres, dweight, dbias


def _backward(bwd_op, ctx, dy, _dmean, _drstd, dsum):
    x, residual, weight, mean, rstd = ctx.saved_tensors
    if not ctx.prenorm:  # the (0,) placeholder output: AOT autograd may hand it a (0,) gradient
        dsum = None
    if torch.is_grad_enabled():
        return (*_differentiable_backward(x, residual, weight, ctx.has_bias, ctx.eps, dy, dsum), None, None)
    if dy is None:  # only the prenorm sum reaches the loss
        return dsum, dsum if residual is not None else None, None, None, None, None
    dx, dweight, dbias = bwd_op(last_dim_contiguous(dy), x, residual, weight, mean, rstd, ctx.has_bias,
                                None if dsum is None else last_dim_contiguous(dsum))
    # y depends on x and residual only through their sum, so both get the same gradient.
    return (dx, dx if residual is not None else None, dweight if weight is not None else None,
            dbias if ctx.has_bias else None, None, None)


# backend -> forward operator
_FWD = register_op(("ctxkern::layer_norm_fwd_triton", "ctxkern::layer_norm_bwd_triton"),
                   ("ctxkern::layer_norm_fwd", "ctxkern::layer_norm_bwd"),
                   _fwd_fake, _bwd_fake, _setup_context, _backward)


def _eager_entry():
    """The C++ eager entry (csrc/eager/layer_norm.cpp) and {backend asked for: device types it serves
    (bit 0 CPU, bit 1 CUDA)}: the backends whose kernels it calls, resolved once, as `auto` is."""
    if not _dispatch.HAS_EXTENSION:
        return None, {}
    _dispatch._C.set_layer_norm_differentiable_backward(_differentiable_backward)
    devices = {}
    for backend in ("auto", "cpu", "cuda"):
        bits = 0
        for bit, device in ((1, torch.device("cpu")), (2, torch.device("cuda"))):
            try:
                bits |= bit if _dispatch.resolve(backend, device) == device.type else 0
            except (RuntimeError, ValueError):  # unavailable: the Python path says why
                pass
        if bits:
            devices[backend] = bits
    return _dispatch._C.layer_norm_eager, devices


_EAGER, _EAGER_DEVICES = _eager_entry()
_functorch_stack = torch._C._functorch.peek_interpreter_stack


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
    residual in x's dtype. prenorm=True (needs residual): returns (y, x + residual), the sum (in x's dtype) that
    a pre-LN block carries as its residual stream, from the same fused pass; differentiable in both outputs.
    Differentiable in x, residual, weight and bias, in every autograd mode: double backward, forward-mode AD and
    torch.func transforms run the reference (ctxkern/ops/_autograd_modes.py).
    backend: "auto", "torch", "cpu", "cuda" or "triton".
    """
    # The plain eager case on the C++ backends, checks and autograd included, in one C++ call; None when the
    # call is anything else (while compiling, Dynamo takes the operator path below).
    if (not torch.compiler.is_compiling() and backend.__class__ is str and backend in _EAGER_DEVICES
            and forward_ad._current_level < 0 and _functorch_stack() is None):
        out = _EAGER(x, weight, bias, residual, eps, prenorm, _EAGER_DEVICES[backend])
        if out is not None:
            return out
    _check(x, weight, bias, residual)
    if prenorm and residual is None:
        raise ValueError("prenorm=True needs a residual: it returns (y, x + residual)")
    if not 0 <= eps < float("inf"):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    name = _dispatch.resolve(backend, x.device)
    if name == "torch" or x.numel() == 0 or _autograd_modes.reference_needed(x.dtype):
        y = layer_norm_ref(x, weight, bias, eps, residual)
        return (y, x + residual) if prenorm else y
    y, _mean, _rstd, total = _FWD[name](
        as_rows(x),
        None if residual is None else as_rows(residual),
        None if weight is None else weight.contiguous(),
        None if bias is None else bias.contiguous(),
        float(eps),
        bool(prenorm),
    )
    if x.dim() != 2:
        y = y.view(x.shape)
        total = total.view(x.shape) if prenorm else total
    return (y, total) if prenorm else y
