"""ops.attention and ops.attention_varlen: softmax(scale * q k^T) v with key padding, causality and packed
variable-length sequences, in flash-attn's layouts.

The cpu and cuda backends are the operators torch.ops.ctxkern.attention_fwd / attention_varlen_fwd (schemas in
csrc/ops.cpp), dispatched by device; the triton backend is a custom_op per schema around kernels/attention.py
(custom_op rather than triton_op, for the reason ops/layer_norm.py gives). All get the same fake kernels and
autograd: the backward operator recomputes the probabilities from the saved fp32 log-sum-exp.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ctxkern import _dispatch
from ctxkern.ops import _autograd_modes
from ctxkern.ops._checks import (check_cu_seqlens, check_float_dtype, check_like, check_max_seqlen, check_offsets,
                                 check_tensor, cu_seqlens_values, keep_mask, last_dim_contiguous)
from ctxkern.ops._register import register_op
from ctxkern.reference import attention_ref, attention_varlen_ref

# Head dims per backend: the CUDA kernels are instantiated for these (csrc/attention_checks.h has the same list);
# the cpu and triton kernels take any D up to 128, the torch reference any D.
CUDA_HEAD_DIMS = (32, 64, 80, 96, 128)
MAX_HEAD_DIM = 128


def supports_head_dim(d: int, backend: str) -> bool:
    """Whether the concrete backend ("torch", "cpu", "cuda" or "triton", as _dispatch.resolve names it) runs
    attention with head dim d. The one statement of the rule: the ops and the integrations ask it."""
    if backend == "torch":
        return True
    if backend == "cuda":
        return d in CUDA_HEAD_DIMS
    return 1 <= d <= MAX_HEAD_DIM


# ----------------------------------------------------------------------------- triton operators

@torch.library.custom_op("ctxkern::attention_fwd_triton", mutates_args=())
def _attention_fwd_triton(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool,
                          scale: float) -> tuple[Tensor, Tensor]:
    from ctxkern.kernels.attention import attention_fwd_triton

    return attention_fwd_triton(q, k, v, key_padding_mask, causal, scale)


@torch.library.custom_op("ctxkern::attention_bwd_triton", mutates_args=())
def _attention_bwd_triton(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          key_padding_mask: Optional[Tensor], causal: bool, scale: float
                          ) -> tuple[Tensor, Tensor, Tensor]:
    from ctxkern.kernels.attention import attention_bwd_triton

    return attention_bwd_triton(dout, q, k, v, out, lse, key_padding_mask, causal, scale)


@torch.library.custom_op("ctxkern::attention_varlen_fwd_triton", mutates_args=())
def _attention_varlen_fwd_triton(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                 max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float
                                 ) -> tuple[Tensor, Tensor]:
    from ctxkern.kernels.attention import attention_varlen_fwd_triton

    return attention_varlen_fwd_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                       scale)


@torch.library.custom_op("ctxkern::attention_varlen_bwd_triton", mutates_args=())
def _attention_varlen_bwd_triton(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                 cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                 causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    from ctxkern.kernels.attention import attention_varlen_bwd_triton

    return attention_varlen_bwd_triton(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k, causal, scale)


# ----------------------------------------------------------------------------- fake kernels and autograd

def _fwd_fake(q, k, v, key_padding_mask, causal, scale):
    b, sq, h, _d = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, sq), dtype=torch.float32)


def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _bwd_fake(dout, q, k, v, out, lse, *_rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    """Every input after q, k, v (mask or cu_seqlens, sizes, causal, scale) is passed through to the backward."""
    q, k, v, *rest = inputs
    tensors = [t for t in rest if isinstance(t, Tensor)]
    ctx.save_for_backward(q, k, v, *output, *tensors)
    # The optional mask may be None: remember where the saved tensors go among the other inputs.
    ctx.rest = [None if isinstance(t, Tensor) else t for t in rest]
    ctx.tensor_slots = [i for i, t in enumerate(rest) if isinstance(t, Tensor)]


def _backward(bwd_op, ctx, dout, _dlse):
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    rest = list(ctx.rest)
    for slot, t in zip(ctx.tensor_slots, tensors, strict=True):
        rest[slot] = t
    if torch.is_grad_enabled():
        # create_graph=True: the backward kernel is not differentiable, the reference's backward is.
        reference = attention_ref if len(rest) == 3 else _varlen_reference
        return _autograd_modes.reference_vjp(reference, (q, k, v, *rest), (dout,))
    dq, dk, dv = bwd_op(last_dim_contiguous(dout), q, k, v, out, lse, *rest)
    return (dq, dk, dv) + (None,) * len(rest)


def _varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, _max_seqlen_q, _max_seqlen_k, causal, scale):
    """attention_varlen_ref with the varlen operator's arguments."""
    return attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale)


# backend -> forward operator
_FWD = register_op(("ctxkern::attention_fwd_triton", "ctxkern::attention_bwd_triton"),
                   ("ctxkern::attention_fwd", "ctxkern::attention_bwd"),
                   _fwd_fake, _bwd_fake, _setup_context, _backward)
_VARLEN_FWD = register_op(("ctxkern::attention_varlen_fwd_triton", "ctxkern::attention_varlen_bwd_triton"),
                          ("ctxkern::attention_varlen_fwd", "ctxkern::attention_varlen_bwd"),
                          _varlen_fwd_fake, _bwd_fake, _setup_context, _backward)


# ----------------------------------------------------------------------------- checks

def _check_qkv(q, k, v, rank: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name)
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
    check_float_dtype(q, "q", _autograd_modes.ACCEPTED_DTYPES)
    check_like(k, q, "k", "q")
    check_like(v, q, "v", "q")
    q_shape, k_shape = q.shape, k.shape  # each .shape builds a torch.Size: read once
    if k_shape != v.shape:
        raise ValueError(f"v must have k's shape {tuple(k_shape)}, got {tuple(v.shape)}")
    if k_shape[-2] != q_shape[-2]:
        raise ValueError(f"k must have q's head count {q_shape[-2]}, got {k_shape[-2]} (dim -2 of {layout})")
    if k_shape[-1] != q_shape[-1]:
        raise ValueError(f"k and v must have q's head dim {q_shape[-1]}, got {k_shape[-1]}")


def _check_head_dim(d: int, backend: str) -> None:
    if supports_head_dim(d, backend):
        return
    if backend == "cuda":
        raise ValueError(f"q's head dim must be one of {CUDA_HEAD_DIMS} on the cuda backend, got {d}")
    raise ValueError(f"q's head dim must be between 1 and {MAX_HEAD_DIM} on the {backend} backend, got {d}")


def _check_common(causal, scale, dropout_p, d: int) -> float:
    """The scale to use (1/sqrt(D) by default)."""
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0: attention dropout is not supported (got dropout_p={dropout_p})")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is None:
        return 1.0 / math.sqrt(d) if d else 1.0
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _mask_as_bool(mask: Tensor, q: Tensor, k: Tensor) -> Tensor:
    check_tensor(mask, "key_padding_mask")
    if mask.device != q.device:
        raise ValueError(f"key_padding_mask must be on q's device {q.device}, got {mask.device}")
    if mask.shape != (k.shape[0], k.shape[1]):
        raise ValueError(f"key_padding_mask must have shape (B, Sk) = {(k.shape[0], k.shape[1])}, "
                         f"got {tuple(mask.shape)}")
    return keep_mask(mask, "key_padding_mask")


# ----------------------------------------------------------------------------- public ops

def attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Optional[Tensor] = None, causal: bool = False,
              scale: Optional[float] = None, dropout_p: float = 0.0, backend: str = "auto") -> Tensor:
    """softmax(scale * q k^T) v per head, in flash-attn's layout.

    q (B, Sq, H, D); k, v (B, Sk, H, D); any strides (views of a fused QKV projection need no copy when the
    last dim is contiguous). key_padding_mask (B, Sk), nonzero = attend: bool, integer (>= 0) or float (0 and 1
    only; an additive 0 / -inf mask raises ValueError: pass `mask == 0`). causal: query i sees keys
    j <= i + Sk - Sq (bottom-right aligned). scale defaults to 1/sqrt(D). A query row that may see no key
    gives zeros (and passes no gradient). -> (B, Sq, H, D) in q's dtype. q, k, v: float32, float16,
    bfloat16 (the kernels) or float64 (the reference, on every backend). Differentiable in q, k and v, in
    every autograd mode: double backward, forward-mode AD and torch.func transforms run the reference
    (ctxkern/ops/_autograd_modes.py).
    dropout_p must be 0.0: dropout is not supported, and a nonzero value raises ValueError rather than
    being ignored. backend: "auto", "torch", "cpu", "cuda" or "triton".
    """
    _check_qkv(q, k, v, 4, "(B, S, H, D)")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k must have q's batch size {q.shape[0]}, got {k.shape[0]}")
    scale = _check_common(causal, scale, dropout_p, q.shape[-1])
    mask = None if key_padding_mask is None else _mask_as_bool(key_padding_mask, q, k)
    name = _dispatch.resolve(backend, q.device)
    _check_head_dim(q.shape[-1], name)
    if name == "torch" or q.numel() == 0 or k.numel() == 0 or _autograd_modes.reference_needed(q.dtype):
        return attention_ref(q, k, v, mask, causal, scale)
    out, _lse = _FWD[name](last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v), mask, causal,
                           scale)
    return out


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False, scale: Optional[float] = None,
                     dropout_p: float = 0.0, backend: str = "auto") -> Tensor:
    """attention on packed sequences, flash_attn_varlen_func's convention.

    q (total_q, H, D); k, v (total_k, H, D); sequence b holds rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q
    and cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v. cu_seqlens: int32 (B + 1,), starting at 0,
    non-decreasing, ending at total (checking them reads them: a device sync on a GPU); max_seqlen_q/k, any
    integral value (int, numpy integer, 0-d integer tensor), at least every sequence's length. causal is bottom-right
    aligned per sequence. -> (total_q, H, D). dropout_p and backend as in `attention`.
    """
    _check_qkv(q, k, v, 3, "(total, H, D)")
    scale = _check_common(causal, scale, dropout_p, q.shape[-1])
    check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q, "q")
    check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q, "q")
    max_seqlen_q = check_max_seqlen(max_seqlen_q, "max_seqlen_q")
    max_seqlen_k = check_max_seqlen(max_seqlen_k, "max_seqlen_k")
    n = cu_seqlens_q.shape[0]
    if cu_seqlens_k.shape[0] != n:
        raise ValueError(f"cu_seqlens_k must have cu_seqlens_q's length {n} (B + 1), got {cu_seqlens_k.shape[0]}")
    # One read of both offset tensors (one device sync on a GPU for the two); None while torch.compile traces.
    values = cu_seqlens_values(cu_seqlens_q, cu_seqlens_k)
    if values is not None:
        check_offsets(values[0], "cu_seqlens_q", q.shape[0], "q's length", max_seqlen_q, "max_seqlen_q")
        check_offsets(values[1], "cu_seqlens_k", k.shape[0], "k's length", max_seqlen_k, "max_seqlen_k")
    cu_q = cu_seqlens_q if cu_seqlens_q.dtype == torch.int32 else cu_seqlens_q.to(torch.int32)
    cu_k = cu_seqlens_k if cu_seqlens_k.dtype == torch.int32 else cu_seqlens_k.to(torch.int32)
    cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()
    backend_name = _dispatch.resolve(backend, q.device)
    _check_head_dim(q.shape[-1], backend_name)
    if (backend_name == "torch" or q.numel() == 0 or k.numel() == 0
            or _autograd_modes.reference_needed(q.dtype)):
        if q.is_meta:  # the reference reads the offsets, which meta tensors lack: the operator's fake serves
            return _VARLEN_FWD["triton"].op(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, causal, scale)[0]
        return attention_varlen_ref(q, k, v, cu_q, cu_k, causal, scale)
    out, _lse = _VARLEN_FWD[backend_name](last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v),
                                          cu_q, cu_k, max_seqlen_q, max_seqlen_k, causal, scale)
    return out
