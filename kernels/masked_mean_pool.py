"""Masked mean pooling in Triton: the mean of each sequence's real tokens, optionally L2-normalized, in fp32.

Dense sequences are rows of hidden (B, S, D) with a (B, S) mask; packed ones are slices
hidden[cu_seqlens[b]:cu_seqlens[b + 1]] of hidden (total, D). One kernel serves both (PACKED).
Forward: one program per sequence, holding the whole row of D columns so that normalize needs no second pass.
This does not split a sequence over programs, so a small batch leaves most of a GPU idle (the CUDA backend
splits S across blocks for that case).
Backward: a per-sequence kernel turns dout into the gradient g[b] that every real token receives, then a
token-parallel kernel writes dhidden: g[b] at real tokens, zeros at padding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import device_guard

# A program keeps the whole row (BLOCK_D >= D columns) of accumulators in registers.
MAX_D = 16384
# Target elements per program tile (tokens x columns).
_TILE_ELEMENTS = 4096
# The backward's broadcast tile is at most this wide: a token row is written in column strips.
_BCAST_MAX_COLS = 512
# Mask bytes per step when the backward counts a dense sequence's tokens.
_COUNT_BLOCK = 256


@triton.jit
def _masked_mean_pool_fwd_kernel(
    H,  # dense: (B, S, D), batch stride stride_hb, token stride stride_ht; packed: (total, D), token stride stride_ht
    Mask,  # (B, S) uint8 0/1, contiguous; None when packed
    CuSeqlens,  # (B + 1,) int32; None when dense
    Out,  # (B, D) contiguous, H's dtype
    Mean,  # (B, D) fp32, the un-normalized mean for the backward; None without normalize
    S,
    D,
    stride_hb,
    stride_ht,
    NORMALIZE: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program b owns sequence b and all D columns. It walks the sequence BLOCK_S tokens at a time; the loads of
    # padding tokens are masked off, so their memory is never read. The 2-D accumulator defers the reduction
    # over tokens to one tl.sum at the end.
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    if PACKED:
        start = tl.load(CuSeqlens + b)
        end = tl.load(CuSeqlens + b + 1)
        row = H
    else:
        start = 0
        end = S
        row = H + b * stride_hb
    acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    count = tl.zeros((BLOCK_S,), dtype=tl.int32)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        real = s < end
        if not PACKED:
            real = real & (tl.load(Mask + b * S + s, mask=real, other=0) != 0)
        count += real.to(tl.int32)
        x = tl.load(row + s.to(tl.int64)[:, None] * stride_ht + cols[None, :], mask=real[:, None] & col_mask[None, :],
                    other=0.0)
        acc += x.to(tl.float32)
    n = tl.sum(count, axis=0)
    # A sequence with no token has a zero sum; dividing it by 1 gives the zeros it must.
    mean = tl.sum(acc, axis=0) / tl.maximum(n, 1).to(tl.float32)
    if NORMALIZE:
        tl.store(Mean + b * D + cols, mean, mask=col_mask)
        norm = tl.sqrt_rn(tl.sum(mean * mean, axis=0))
        # propagate_nan: the default maximum drops a NaN norm (picks eps), so a row with a NaN would come out
        # finite; torch's clamp_min keeps it NaN.
        mean = mean / tl.maximum(norm, 1e-12, propagate_nan=tl.PropagateNan.ALL)
    tl.store(Out + b * D + cols, mean.to(Out.dtype.element_ty), mask=col_mask)


@triton.jit
def _masked_mean_pool_bwd_rows_kernel(
    DOut,  # (B, D) contiguous
    Mean,  # (B, D) fp32 from the forward; None without normalize
    Mask,  # (B, S) uint8 0/1, contiguous; None when packed
    CuSeqlens,  # (B + 1,) int32; None when dense
    Grad,  # (B, D) contiguous, DOut's dtype: the gradient of each real token of sequence b
    S,
    D,
    NORMALIZE: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program b owns sequence b: g = dL/dmean / count. With normalize, out = mean / max(n, eps), n = ||mean||:
    # dL/dmean = (dout - y (y . dout)) / n when n >= eps (torch's clamp_min passes the gradient at equality),
    # dout / eps on the clamped branch, with y the fp32 normalized mean.
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    if PACKED:
        n = (tl.load(CuSeqlens + b + 1) - tl.load(CuSeqlens + b)).to(tl.float32)
    else:
        count = tl.zeros((BLOCK_S,), dtype=tl.int32)
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            count += (tl.load(Mask + b * S + s, mask=s < S, other=0) != 0).to(tl.int32)
        n = tl.sum(count, axis=0).to(tl.float32)
    inv_count = tl.where(n > 0, 1.0 / tl.maximum(n, 1.0), 0.0)
    dy = tl.load(DOut + b * D + cols, mask=col_mask, other=0.0).to(tl.float32)
    if NORMALIZE:
        m = tl.load(Mean + b * D + cols, mask=col_mask, other=0.0)
        norm = tl.sqrt_rn(tl.sum(m * m, axis=0))
        c = tl.maximum(norm, 1e-12, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in the forward
        y = m / c
        shift = tl.where(norm >= 1e-12, tl.sum(y * dy, axis=0), 0.0)
        g = (dy - y * shift) * (inv_count / c)
    else:
        g = dy * inv_count
    tl.store(Grad + b * D + cols, g.to(Grad.dtype.element_ty), mask=col_mask)


@triton.jit
def _masked_mean_pool_bwd_kernel(
    Grad,  # (B, D) contiguous: the gradient of each real token of sequence b
    Mask,  # (B, S) uint8 0/1, contiguous; None when packed
    CuSeqlens,  # (B + 1,) int32; None when dense
    DH,  # (tokens, D) contiguous, tokens = B * S (dense) or total (packed)
    tokens,
    B,
    S,
    D,
    search_steps,  # ceil(log2(B)): binary-search steps that find a packed token's sequence
    PACKED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (i, j) owns tokens [i * BLOCK_T, (i + 1) * BLOCK_T) and the BLOCK_D columns of strip j of dhidden:
    # a pure write of g[b] (real token of sequence b) or zeros (padding), every element written once.
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_range = t < tokens
    col_mask = cols < D
    if PACKED:
        # The last b with cu_seqlens[b] <= t, kept as cu_seqlens[lo] <= t < cu_seqlens[hi].
        lo = tl.zeros((BLOCK_T,), dtype=tl.int64)
        hi = tl.zeros((BLOCK_T,), dtype=tl.int64) + B
        for _ in range(search_steps):
            mid = (lo + hi) // 2
            go_right = tl.load(CuSeqlens + mid, mask=in_range, other=0) <= t
            lo = tl.where(go_right, mid, lo)
            hi = tl.where(go_right, hi, mid)
        b = lo
        real = in_range
    else:
        b = t // S
        real = in_range & (tl.load(Mask + t, mask=in_range, other=0) != 0)
    g = tl.load(Grad + b[:, None] * D + cols[None, :], mask=real[:, None] & col_mask[None, :], other=0.0)
    tl.store(DH + t[:, None] * D + cols[None, :], g, mask=in_range[:, None] & col_mask[None, :])


def _row_config(D: int) -> tuple[int, int, int]:
    """BLOCK_S, BLOCK_D and num_warps for a program that owns a whole row of D columns."""
    if D > MAX_D:
        raise ValueError(f"masked_mean_pool (triton): D = {D} is above the supported maximum {MAX_D}; a whole row "
                         "must fit in one program's registers")
    block_d = triton.next_power_of_2(max(D, 1))
    block_s = max(1, min(_TILE_ELEMENTS // block_d, 64))
    tile = block_s * block_d
    num_warps = 4 if tile <= 2048 else 8 if tile <= 8192 else 16
    return block_s, block_d, num_warps


def _forward(hidden: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None, B: int, S: int,
             normalize: bool) -> tuple[Tensor, Tensor]:
    D = hidden.shape[-1]
    out = torch.empty((B, D), dtype=hidden.dtype, device=hidden.device)
    mean = torch.empty((B, D if normalize else 0), dtype=torch.float32, device=hidden.device)
    block_s, block_d, num_warps = _row_config(D)
    if B == 0 or D == 0:
        return out, mean
    packed = cu_seqlens is not None
    with device_guard(hidden):
        _masked_mean_pool_fwd_kernel[(B,)](
            hidden,
            None if packed else mask.view(torch.uint8),
            cu_seqlens,
            out,
            mean if normalize else None,
            S,
            D,
            0 if packed else hidden.stride(0),
            hidden.stride(-2),
            NORMALIZE=normalize,
            PACKED=packed,
            BLOCK_S=block_s,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )
    return out, mean


def _backward(dout: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None, mean: Tensor | None, S: int,
              tokens: int, dhidden_shape: tuple[int, ...]) -> Tensor:
    B, D = dout.shape
    dhidden = torch.empty(dhidden_shape, dtype=dout.dtype, device=dout.device)
    if tokens == 0 or D == 0:
        return dhidden
    packed = cu_seqlens is not None
    mask_u8 = None if packed else mask.view(torch.uint8)
    g = torch.empty((B, D), dtype=dout.dtype, device=dout.device)
    block_s, block_d, num_warps = _row_config(D)
    bcast_d = min(block_d, _BCAST_MAX_COLS)
    bcast_t = max(1, _TILE_ELEMENTS // bcast_d)
    with device_guard(dout):
        _masked_mean_pool_bwd_rows_kernel[(B,)](
            dout, mean, mask_u8, cu_seqlens, g, S, D,
            NORMALIZE=mean is not None, PACKED=packed, BLOCK_S=_COUNT_BLOCK, BLOCK_D=block_d, num_warps=num_warps,
        )
        _masked_mean_pool_bwd_kernel[(triton.cdiv(tokens, bcast_t), triton.cdiv(D, bcast_d))](
            g, mask_u8, cu_seqlens, dhidden, tokens, B, S, D, max(1, (B - 1).bit_length()),
            PACKED=packed, BLOCK_T=bcast_t, BLOCK_D=bcast_d, num_warps=4,
        )
    return dhidden


def masked_mean_pool_fwd_triton(hidden: Tensor, mask: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    """hidden (B, S, D), column stride 1; mask (B, S) bool contiguous -> (out (B, D), mean (B, D) fp32 or (B, 0))."""
    B, S, _ = hidden.shape
    return _forward(hidden, mask, None, B, S, normalize)


def masked_mean_pool_bwd_triton(dout: Tensor, mask: Tensor, mean: Tensor | None) -> Tensor:
    """dout (B, D) contiguous; mask (B, S) bool contiguous; mean (B, D) fp32 or None -> dhidden (B, S, D)."""
    B, S = mask.shape
    return _backward(dout, mask, None, mean, S, B * S, (B, S, dout.shape[1]))


def masked_mean_pool_varlen_fwd_triton(hidden: Tensor, cu_seqlens: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    """hidden (total, D), column stride 1; cu_seqlens (B + 1,) int32, validated -> (out (B, D), mean)."""
    return _forward(hidden, None, cu_seqlens, cu_seqlens.shape[0] - 1, 0, normalize)


def masked_mean_pool_varlen_bwd_triton(dout: Tensor, cu_seqlens: Tensor, mean: Tensor | None, total: int) -> Tensor:
    """dout (B, D) contiguous; cu_seqlens (B + 1,) int32, validated -> dhidden (total, D)."""
    return _backward(dout, None, cu_seqlens, mean, 0, total, (total, dout.shape[1]))
