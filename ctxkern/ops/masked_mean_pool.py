"""ops.masked_mean_pool and ops.masked_mean_pool_varlen: the mean of each sequence's real tokens, fp32
accumulation, zeros for a sequence with no token, optionally L2-normalized in the same kernel.

The cpu and cuda backends are the operators torch.ops.ctxkern.masked_mean_pool[_varlen]_{fwd,bwd} (schemas in
csrc/ops.cpp), dispatched by device; the triton backend is a custom_op around kernels/masked_mean_pool.py (a
custom_op rather than triton_op for the reason ctxkern/ops/layer_norm.py gives). All get the same fake kernels and
autograd. The kernels take a bool (B, S) mask and int32 cu_seqlens; this layer validates once and converts.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ctxkern import _dispatch
from ctxkern.ops import _autograd_modes
from ctxkern.ops._checks import (INT32_MAX, check_cu_seqlens, check_float_dtype, check_offsets, check_tensor,
                                 cu_seqlens_values, keep_mask, last_dim_contiguous)
from ctxkern.ops._register import register_op
from ctxkern.reference import masked_mean_pool_ref, masked_mean_pool_varlen_ref

def _fwd_fake(hidden: Tensor, index: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    """index is the mask (B, S) or cu_seqlens (B + 1,): either way B is its first size (less one when packed)."""
    b = index.shape[0] if hidden.dim() == 3 else index.shape[0] - 1
    d = hidden.shape[-1]
    return hidden.new_empty((b, d)), hidden.new_empty((b, d if normalize else 0), dtype=torch.float32)


def _bwd_fake(dout: Tensor, mask: Tensor, mean: Optional[Tensor]) -> Tensor:
    return dout.new_empty((mask.shape[0], mask.shape[1], dout.shape[1]))


def _varlen_bwd_fake(dout: Tensor, cu_seqlens: Tensor, mean: Optional[Tensor], total: int) -> Tensor:
    return dout.new_empty((total, dout.shape[1]))


@torch.library.custom_op("ctxkern::masked_mean_pool_fwd_triton", mutates_args=())
def _fwd_triton(hidden: Tensor, mask: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    from ctxkern.kernels.masked_mean_pool import masked_mean_pool_fwd_triton

    return masked_mean_pool_fwd_triton(hidden, mask, normalize)


@torch.library.custom_op("ctxkern::masked_mean_pool_bwd_triton", mutates_args=())
def _bwd_triton(dout: Tensor, mask: Tensor, mean: Optional[Tensor]) -> Tensor:
    from ctxkern.kernels.masked_mean_pool import masked_mean_pool_bwd_triton

    return masked_mean_pool_bwd_triton(dout, mask, mean)


@torch.library.custom_op("ctxkern::masked_mean_pool_varlen_fwd_triton", mutates_args=())
def _varlen_fwd_triton(hidden: Tensor, cu_seqlens: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    from ctxkern.kernels.masked_mean_pool import masked_mean_pool_varlen_fwd_triton

    return masked_mean_pool_varlen_fwd_triton(hidden, cu_seqlens, normalize)


@torch.library.custom_op("ctxkern::masked_mean_pool_varlen_bwd_triton", mutates_args=())
def _varlen_bwd_triton(dout: Tensor, cu_seqlens: Tensor, mean: Optional[Tensor], total: int) -> Tensor:
    from ctxkern.kernels.masked_mean_pool import masked_mean_pool_varlen_bwd_triton

    return masked_mean_pool_varlen_bwd_triton(dout, cu_seqlens, mean, total)


def _setup_context(ctx, inputs, output):
    hidden, index, normalize = inputs
    _out, mean = output
    # hidden only for a differentiable backward with normalize (the unnormalized mean is linear in hidden).
    ctx.save_for_backward(index, mean if normalize else None, hidden if normalize else None)
    ctx.total = hidden.shape[0]
    ctx.normalize = normalize


def _reference_backward(reference, ctx, dout, index, hidden):
    """create_graph=True: the backward kernel is not differentiable, the reference's backward is. Without
    normalize the pool is linear, so its backward does not depend on hidden: a zero stand-in of its shape
    serves."""
    if hidden is None:
        shape = (*index.shape, dout.shape[-1]) if reference is masked_mean_pool_ref else (ctx.total, dout.shape[-1])
        hidden = dout.new_zeros((), requires_grad=True).expand(shape)
    dhidden, _, _ = _autograd_modes.reference_vjp(reference, (hidden, index, ctx.normalize), (dout,))
    return dhidden, None, None


def _backward(bwd_op, ctx, dout, _dmean):
    mask, mean, hidden = ctx.saved_tensors
    if torch.is_grad_enabled():
        return _reference_backward(masked_mean_pool_ref, ctx, dout, mask, hidden)
    return bwd_op(dout.contiguous(), mask, mean), None, None


def _varlen_backward(bwd_op, ctx, dout, _dmean):
    cu_seqlens, mean, hidden = ctx.saved_tensors
    if torch.is_grad_enabled():
        return _reference_backward(masked_mean_pool_varlen_ref, ctx, dout, cu_seqlens, hidden)
    return bwd_op(dout.contiguous(), cu_seqlens, mean, ctx.total), None, None


# backend -> forward operator, dense and packed
_FWD = register_op(("ctxkern::masked_mean_pool_fwd_triton", "ctxkern::masked_mean_pool_bwd_triton"),
                   ("ctxkern::masked_mean_pool_fwd", "ctxkern::masked_mean_pool_bwd"),
                   _fwd_fake, _bwd_fake, _setup_context, _backward)
_VARLEN_FWD = register_op(("ctxkern::masked_mean_pool_varlen_fwd_triton",
                           "ctxkern::masked_mean_pool_varlen_bwd_triton"),
                          ("ctxkern::masked_mean_pool_varlen_fwd", "ctxkern::masked_mean_pool_varlen_bwd"),
                          _fwd_fake, _varlen_bwd_fake, _setup_context, _varlen_backward)


def _check_hidden(hidden: Tensor, dims: int, layout: str) -> None:
    check_tensor(hidden, "hidden")
    if hidden.dim() != dims:
        raise ValueError(f"hidden must be {dims}-D {layout}, got shape {tuple(hidden.shape)}")
    check_float_dtype(hidden, "hidden", _autograd_modes.ACCEPTED_DTYPES)


def masked_mean_pool(hidden: Tensor, mask: Tensor, *, normalize: bool = False, backend: str = "auto") -> Tensor:
    """Mean of hidden (B, S, D) over the tokens where mask (B, S) is nonzero -> (B, D) in hidden's dtype.

    mask may be bool, integer (>= 0) or float (0 and 1: Hugging Face's attention_mask as is); nonzero = token.
    A float mask with other values (an additive 0 / -inf mask) raises ValueError. Accumulates in fp32; a row
    with no token gives zeros. normalize=True returns x / max(||x||2, 1e-12) of the fp32 mean.
    hidden: float32, float16, bfloat16 (the kernels) or float64 (the reference, on every backend).
    Differentiable in hidden, in every autograd mode: double backward, forward-mode AD and torch.func
    transforms run the reference (ctxkern/ops/_autograd_modes.py). backend: "auto", "torch", "cpu", "cuda" or
    "triton".
    """
    _check_hidden(hidden, 3, "(B, S, D)")
    check_tensor(mask, "mask")
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"mask must have shape (B, S) = {tuple(hidden.shape[:2])}, got {tuple(mask.shape)}")
    if mask.device != hidden.device:
        raise ValueError(f"mask must be on hidden's device {hidden.device}, got {mask.device}")
    keep = keep_mask(mask, "mask")
    name = _dispatch.resolve(backend, hidden.device)
    if name == "torch" or hidden.numel() == 0 or _autograd_modes.reference_needed(hidden.dtype):
        return masked_mean_pool_ref(hidden, keep, normalize)
    out, _mean = _FWD[name](last_dim_contiguous(hidden), keep, bool(normalize))
    return out


def _check_cu_seqlens(cu_seqlens: Tensor, hidden: Tensor) -> None:
    check_cu_seqlens(cu_seqlens, "cu_seqlens", hidden, "hidden")
    total = hidden.shape[0]
    if total > INT32_MAX:
        raise ValueError(f"hidden has {total} tokens; cu_seqlens is int32 in the kernels, so at most {INT32_MAX}")
    # One read of the values (a device sync on a GPU): the kernels trust cu_seqlens to delimit hidden's rows.
    # None while torch.compile traces, when the values are not known yet (the CPU kernel checks them itself).
    values = cu_seqlens_values(cu_seqlens)
    if values is not None:
        check_offsets(values[0], "cu_seqlens", total, "hidden's length")


def masked_mean_pool_varlen(hidden: Tensor, cu_seqlens: Tensor, *, normalize: bool = False,
                            backend: str = "auto") -> Tensor:
    """Mean of each packed sequence hidden[cu_seqlens[b]:cu_seqlens[b + 1]] of hidden (total, D) -> (B, D).

    cu_seqlens: (B + 1,) int32 or int64, starting at 0, non-decreasing, ending at total (flash-attn's varlen
    convention); checking it reads its values, a device sync on a GPU. Otherwise as masked_mean_pool.
    """
    _check_hidden(hidden, 2, "(total, D)")
    _check_cu_seqlens(cu_seqlens, hidden)
    name = _dispatch.resolve(backend, hidden.device)
    if name == "torch" or hidden.numel() == 0 or _autograd_modes.reference_needed(hidden.dtype):
        if hidden.is_meta:  # the reference reads the offsets, which meta tensors lack: the operator's fake serves
            return _VARLEN_FWD["triton"].op(hidden, cu_seqlens.to(torch.int32), bool(normalize))[0]
        return masked_mean_pool_varlen_ref(hidden, cu_seqlens, normalize)
    cu = cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)
    out, _mean = _VARLEN_FWD[name](last_dim_contiguous(hidden), cu.contiguous(), bool(normalize))
    return out
