"""LayerNorm over the last dimension, with an optional fused residual add, in Triton.

Forward: y = (s - mean(s)) * rstd(s) * weight + bias with s = x + residual, statistics in fp32.
Backward: dx (= dresidual) row by row, and dweight / dbias reduced in two stages without atomics:
persistent programs each sum the rows they own into an fp32 workspace row, then a second kernel
sums the workspace over programs (the scheme of the Triton layer-norm tutorial and Liger-Kernel).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import device_guard

# A program keeps whole rows in registers. Wider rows spill to local memory long before this limit
# (above N = 16384 on sm_90); past it a kernel that splits rows would be needed.
MAX_N = 65536

# Target elements per program tile: small rows are packed several to a program so that a program
# still has enough independent loads in flight to keep memory busy.
_TILE_ELEMENTS = 1024

# Second-stage reduction tile: 32 fp32 columns are one 128-byte line per workspace row.
_DWDB_BLOCK_G = 64
_DWDB_BLOCK_N = 32

# Backward programs when there are no SMs to size the grid by (CPU tensors under TRITON_INTERPRET=1).
_CPU_BWD_PROGRAMS = 4


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (M, N), row stride stride_x_row, column stride 1
    R,  # (M, N), row stride stride_r_row, column stride 1; None without a residual
    W,  # (N,) or None
    B,  # (N,) or None
    Y,  # (M, N) contiguous
    Sum,  # (M, N) contiguous: x + residual (prenorm); None otherwise
    Mean,  # (M,) fp32
    Rstd,  # (M,) fp32
    stride_x_row,
    stride_r_row,
    M,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    STORE_SUM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Each program owns BLOCK_M whole rows (BLOCK_M = 1 unless rows are short): the full row must be
    # in registers so that the mean and then the variance of (s - mean) come from one read of memory,
    # which is both the cheapest and the numerically stable way (no E[s^2] - E[s]^2 cancellation).
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    # int64 before multiplying by the stride: M * stride can pass 2^31 for large batches.
    rows64 = rows.to(tl.int64)

    s = tl.load(X + rows64[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows64[:, None] * stride_r_row + cols[None, :], mask=mask, other=0.0)
        s += r.to(tl.float32)
    if STORE_SUM:
        tl.store(Sum + rows64[:, None] * N + cols[None, :], s.to(Sum.dtype.element_ty), mask=mask)

    mean = tl.sum(s, axis=1) / N
    # Padding columns must not contribute (0 - mean)^2 to the variance.
    diff = tl.where(mask, s - mean[:, None], 0.0)
    m2 = tl.sum(diff * diff, axis=1)
    # Correctly rounded: one per row costs nothing and keeps rstd within an ulp of the references.
    one = tl.full(m2.shape, 1.0, tl.float32)
    rstd = tl.div_rn(one, tl.sqrt_rn(m2 / N + eps))
    rstd_y = rstd

    # The fp32 moments are wrong when m2 overflows (|s - mean| from ~1e19 at N = 768: rstd would be 0, y the
    # bias) or is so small that its subnormal squares (|s - mean| < ~1e-19) lost digits var + eps would show:
    # each is off by at most 2^-150, below 2^-50 relative past N * 2^-100. NaN compares false: a row holding
    # inf or NaN goes through the rescaling too, and stays NaN there, as in torch.
    ok = (m2 <= 3.4028234663852886e38) & (m2 + N * eps >= N * 7.888609052210118e-31)  # 2^-100
    bad = row_mask & (ok == 0)
    if tl.max(bad.to(tl.int32), axis=0) > 0:
        # Such rows are taken again from s * 2^-k, 2^k about the row's max-abs (k clamped to [-126, 126] so
        # that 2^k and 2^-k are normal floats, built from their bits): the scaled row is in [2^-23, 4) and its
        # squares neither overflow nor underflow; scaling by a power of two is exact.
        amax = tl.max(tl.where(mask, tl.abs(s), 0.0), axis=1)
        k = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        k = tl.minimum(tl.maximum(k, -126), 126)
        up = ((k + 127) << 23).to(tl.float32, bitcast=True)
        down = ((127 - k) << 23).to(tl.float32, bitcast=True)
        t = s * down[:, None]
        mean_t = tl.sum(t, axis=1) / N
        diff_t = tl.where(mask, t - mean_t[:, None], 0.0)
        # eps * 2^-2k as (eps * down) * down: with eps = 0 it stays 0 (never 0 * inf).
        rstd_t = tl.div_rn(one, tl.sqrt_rn(tl.sum(diff_t * diff_t, axis=1) / N + eps * down * down))
        diff = tl.where(bad[:, None], diff_t, diff)
        rstd_y = tl.where(bad, rstd_t, rstd)
        # The statistics of s itself, for the backward: exact rescalings, normal while 2^-k / std(s) is.
        mean = tl.where(bad, mean_t * up, mean)
        rstd = tl.where(bad, rstd_t * down, rstd)

    y = diff * rstd_y[:, None]
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y + rows64[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # (M, N), row stride stride_dy_row, column stride 1
    X,  # (M, N), row stride stride_x_row, column stride 1
    R,  # (M, N), row stride stride_r_row, column stride 1; None without a residual
    W,  # (N,) or None
    Mean,  # (M,) fp32
    Rstd,  # (M,) fp32
    DS,  # (M, N), row stride stride_ds_row, column stride 1: the prenorm sum's gradient; None without
    DX,  # (M, N) contiguous
    DW_partial,  # (num_programs, N) fp32, or None without a weight
    DB_partial,  # (num_programs, N) fp32, or None without a bias
    stride_dy_row,
    stride_x_row,
    stride_r_row,
    stride_ds_row,
    M,
    N,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DSUM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # A persistent grid of a few programs per SM; each program owns the tiles of BLOCK_M whole rows
    # numbered pid, pid + num_programs, ... . dx needs whole rows (two row reductions), and dweight /
    # dbias need sums over rows: keeping them in this program's registers across all its tiles and
    # writing one fp32 workspace row at the end avoids both atomics and an (M, N) intermediate.
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N

    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_BIAS:
        db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)

    num_tiles = tl.cdiv(M, BLOCK_M)
    for tile in range(pid, num_tiles, num_programs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)

        # s is recomputed rather than saved: one more read of x (and residual) is cheaper than
        # writing and reading an (M, N) tensor in the forward.
        s = tl.load(X + rows64[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(R + rows64[:, None] * stride_r_row + cols[None, :], mask=mask, other=0.0)
            s += r.to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)

        # Padding lanes hold xhat = -mean * rstd, but dy (hence wdy) is 0 there, so every product
        # below that enters a sum is 0 on padding without an extra select.
        xhat = (s - mean[:, None]) * rstd[:, None]
        if HAS_WEIGHT:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        c1 = tl.sum(wdy * xhat, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DSUM:
            dx += tl.load(DS + rows64[:, None] * stride_ds_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)

        if HAS_WEIGHT:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS:
            db_acc += tl.sum(dy, axis=0)

    if HAS_WEIGHT:
        tl.store(DW_partial + pid * N + cols, dw_acc, mask=col_mask)
    if HAS_BIAS:
        tl.store(DB_partial + pid * N + cols, db_acc, mask=col_mask)


@triton.jit
def _layer_norm_bwd_dwdb_kernel(
    DW_partial,  # (G, N) fp32, or None without a weight
    DB_partial,  # (G, N) fp32, or None without a bias
    DW,  # (N,) in weight's dtype, or None
    DB,  # (N,) in x's dtype, or None
    G,
    N,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Each program owns a strip of BLOCK_N columns and sums it down all G workspace rows: columns are
    # independent, so strips need no communication, and narrow strips give enough programs to spread
    # the (small) workspace read over many SMs. The 2-D accumulator keeps BLOCK_G loads in flight per
    # step and defers the cross-row reduction to a single tl.sum at the end.
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_WEIGHT:
        dw_acc = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    if HAS_BIAS:
        db_acc = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        mask = (g < G)[:, None] & col_mask[None, :]
        offsets = g[:, None] * N + cols[None, :]
        if HAS_WEIGHT:
            dw_acc += tl.load(DW_partial + offsets, mask=mask, other=0.0)
        if HAS_BIAS:
            db_acc += tl.load(DB_partial + offsets, mask=mask, other=0.0)
    if HAS_WEIGHT:
        tl.store(DW + cols, tl.sum(dw_acc, axis=0).to(DW.dtype.element_ty), mask=col_mask)
    if HAS_BIAS:
        tl.store(DB + cols, tl.sum(db_acc, axis=0).to(DB.dtype.element_ty), mask=col_mask)


def _tile_config(M: int, N: int, backward: bool = False) -> tuple[int, int, int]:
    """BLOCK_M, BLOCK_N and num_warps for a program that owns BLOCK_M whole rows of length N."""
    if N > MAX_N:
        raise ValueError(
            f"layer_norm (triton): N = {N} is above the supported maximum {MAX_N}; a whole row must fit in registers"
        )
    block_n = triton.next_power_of_2(N)
    block_m = max(1, min(_TILE_ELEMENTS // block_n, triton.next_power_of_2(M)))
    # More warps for wider rows bound the registers per thread (the Triton tutorial's and Liger-Kernel's
    # rule). The backward keeps about twice as many row-sized values live (s, dy, w, two accumulators),
    # so it moves to more warps earlier. Compiled for sm_90 the forward is spill-free up to N = 16384
    # and the backward up to 8192; wider rows spill to local memory (still correct, slower).
    tile = block_m * block_n
    limits = (1024, 2048, 4096) if backward else (2048, 8192, 16384)
    if tile <= limits[0]:
        num_warps = 4
    elif tile <= limits[1]:
        num_warps = 8
    elif tile <= limits[2]:
        num_warps = 16
    else:
        num_warps = 32
    return block_m, block_n, num_warps


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _no_grad(x: Tensor) -> Tensor:
    # A fresh (0,) tensor each time: a custom op may not return two outputs that alias each other.
    return torch.empty(0, dtype=x.dtype, device=x.device)


def layer_norm_fwd_triton(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float,
    prenorm: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """LayerNorm of s = x + residual over the last dim -> (y, mean, rstd, sum); mean and rstd are fp32 of s;
    sum is s in x's dtype with prenorm (which needs a residual), else an empty tensor.

    x, residual: (M, N), column stride 1, any row stride. weight, bias: (N,) contiguous or None.
    """
    M, N = x.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    total = torch.empty((M, N) if prenorm else (0,), dtype=x.dtype, device=x.device)
    mean = torch.empty((M,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    block_m, block_n, num_warps = _tile_config(M, N)
    if M == 0:
        return y, mean, rstd, total
    grid = (triton.cdiv(M, block_m),)
    with device_guard(x):
        _layer_norm_fwd_kernel[grid](
            x,
            residual,
            weight,
            bias,
            y,
            total if prenorm else None,
            mean,
            rstd,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            M,
            N,
            float(eps),
            HAS_RESIDUAL=residual is not None,
            STORE_SUM=prenorm,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=num_warps,
        )
    return y, mean, rstd, total


def layer_norm_bwd_triton(
    dy: Tensor,
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    has_bias: bool,
    dsum: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of layer_norm_fwd_triton -> (dx, dweight, dbias); dresidual equals dx.

    dy, x, residual: (M, N), column stride 1, any row stride; mean, rstd: (M,) fp32 from the forward;
    dsum: the gradient of the prenorm sum (M, N), column stride 1, or None; it is added to dx.
    dweight is an empty tensor when weight is None, dbias an empty tensor when not has_bias.
    """
    M, N = x.shape
    device = x.device
    dx = torch.empty((M, N), dtype=x.dtype, device=device)
    has_weight = weight is not None
    block_m, block_n, num_warps = _tile_config(M, N, backward=True)
    if M == 0:
        # Sums over no rows are zero, not empty.
        dweight = torch.zeros((N,), dtype=weight.dtype, device=device) if has_weight else _no_grad(x)
        dbias = torch.zeros((N,), dtype=x.dtype, device=device) if has_bias else _no_grad(x)
        return dx, dweight, dbias

    num_tiles = triton.cdiv(M, block_m)
    if x.is_cuda:
        # A few programs per SM to cover memory latency, fewer as each program gets wider. Every choice
        # of num_warps above leaves this many programs co-resident on an SM (or exactly one wave at a
        # time), so no SM runs a lone trailing program while the others idle.
        num_programs = _sm_count(device) * max(1, 16 // num_warps)
    else:
        num_programs = _CPU_BWD_PROGRAMS
    num_programs = min(num_programs, num_tiles)

    dw_partial = torch.empty((num_programs, N), dtype=torch.float32, device=device) if has_weight else None
    db_partial = torch.empty((num_programs, N), dtype=torch.float32, device=device) if has_bias else None
    dweight = torch.empty((N,), dtype=weight.dtype, device=device) if has_weight else _no_grad(x)
    dbias = torch.empty((N,), dtype=x.dtype, device=device) if has_bias else _no_grad(x)

    with device_guard(x):
        _layer_norm_bwd_kernel[(num_programs,)](
            dy,
            x,
            residual,
            weight,
            mean,
            rstd,
            dsum,
            dx,
            dw_partial,
            db_partial,
            dy.stride(0),
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            dsum.stride(0) if dsum is not None else 0,
            M,
            N,
            HAS_RESIDUAL=residual is not None,
            HAS_DSUM=dsum is not None,
            HAS_WEIGHT=has_weight,
            HAS_BIAS=has_bias,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=num_warps,
        )
        if has_weight or has_bias:
            _layer_norm_bwd_dwdb_kernel[(triton.cdiv(N, _DWDB_BLOCK_N),)](
                dw_partial,
                db_partial,
                dweight if has_weight else None,
                dbias if has_bias else None,
                num_programs,
                N,
                HAS_WEIGHT=has_weight,
                HAS_BIAS=has_bias,
                BLOCK_G=_DWDB_BLOCK_G,
                BLOCK_N=_DWDB_BLOCK_N,
                num_warps=4,
            )
    return dx, dweight, dbias
