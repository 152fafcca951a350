"""The LSTM cell (torch's gate order i, f, g, o, optional cell clip) in Triton.

Forward: h, c_new from input_gates + hidden_gates + bias and c, nothing saved. Backward: recomputes the
activations from the same inputs, writes dgates (the gradient of both gate inputs) and dc, and reduces dbias
over the batch in two stages without atomics: each program writes the fp32 column sums of its rows to a
workspace row, and torch sums the workspace over programs (a fixed order, so deterministic).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import device_guard

# A program's tile: BLOCK_B rows by BLOCK_H units, each unit with its four gates (4 * 16 * 64 fp32 values
# per operand), enough loads in flight per program while keeping registers well under the limit.
BLOCK_B = 16
BLOCK_H = 64
NUM_WARPS = 4


@triton.jit
def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1: exact in real arithmetic, absolute error of a few fp32 ulps near 0, and no
    # dependence on libdevice (which Triton's CPU interpreter lacks).
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _clip(x, clip):
    # torch.clamp keeps a NaN; the default minimum/maximum would turn it into a bound (or -inf, without a clip).
    return tl.clamp(x, -clip, clip, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _activations(IG, HG, C, Bias, rows64, cols, mask, stride_ig, stride_hg, stride_c, hidden, clip,
                 HAS_BIAS: tl.constexpr):
    """sigmoid(i), sigmoid(f), tanh(g), sigmoid(o), c, the unclamped c_raw and tanh(clamp(c_raw)) of a tile."""
    ig = IG + rows64[:, None] * stride_ig + cols[None, :]
    hg = HG + rows64[:, None] * stride_hg + cols[None, :]
    pre_i = tl.load(ig, mask=mask, other=0.0).to(tl.float32) + tl.load(hg, mask=mask, other=0.0).to(tl.float32)
    pre_f = tl.load(ig + hidden, mask=mask, other=0.0).to(tl.float32) + tl.load(hg + hidden, mask=mask, other=0.0).to(tl.float32)
    pre_g = (tl.load(ig + 2 * hidden, mask=mask, other=0.0).to(tl.float32)
             + tl.load(hg + 2 * hidden, mask=mask, other=0.0).to(tl.float32))
    pre_o = (tl.load(ig + 3 * hidden, mask=mask, other=0.0).to(tl.float32)
             + tl.load(hg + 3 * hidden, mask=mask, other=0.0).to(tl.float32))
    if HAS_BIAS:
        col_mask = cols < hidden
        pre_i += tl.load(Bias + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        pre_f += tl.load(Bias + hidden + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        pre_g += tl.load(Bias + 2 * hidden + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        pre_o += tl.load(Bias + 3 * hidden + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    c = tl.load(C + rows64[:, None] * stride_c + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    i = tl.sigmoid(pre_i)
    f = tl.sigmoid(pre_f)
    g = _tanh(pre_g)
    o = tl.sigmoid(pre_o)
    c_raw = f * c + i * g
    tanh_c = _tanh(_clip(c_raw, clip))
    return i, f, g, o, c, c_raw, tanh_c


@triton.jit
def _lstm_cell_fwd_kernel(
    IG,  # (batch, 4 * hidden), row stride stride_ig, column stride 1
    HG,  # (batch, 4 * hidden), row stride stride_hg, column stride 1
    C,  # (batch, hidden), row stride stride_c, column stride 1
    Bias,  # (4 * hidden,) or None
    Hout,  # (batch, hidden) contiguous
    Cout,  # (batch, hidden) contiguous
    stride_ig,
    stride_hg,
    stride_c,
    batch,
    hidden,
    clip,  # +inf without a clip
    HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # Each program owns a BLOCK_B x BLOCK_H tile of cell units and all four gates of each: the unit's whole
    # computation is elementwise across the four gate columns, so no data moves between programs.
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < batch)[:, None] & (cols < hidden)[None, :]
    rows64 = rows.to(tl.int64)  # rows * stride can pass 2^31
    i, f, g, o, c, c_raw, tanh_c = _activations(IG, HG, C, Bias, rows64, cols, mask, stride_ig, stride_hg,
                                                stride_c, hidden, clip, HAS_BIAS)
    out = rows64[:, None] * hidden + cols[None, :]
    tl.store(Hout + out, (o * tanh_c).to(Hout.dtype.element_ty), mask=mask)
    tl.store(Cout + out, _clip(c_raw, clip).to(Cout.dtype.element_ty), mask=mask)


@triton.jit
def _lstm_cell_bwd_kernel(
    DH,  # (batch, hidden), row stride stride_dh, column stride 1
    DCN,  # (batch, hidden), row stride stride_dcn, column stride 1
    IG,  # (batch, 4 * hidden), row stride stride_ig, column stride 1
    HG,  # (batch, 4 * hidden), row stride stride_hg, column stride 1
    C,  # (batch, hidden), row stride stride_c, column stride 1
    Bias,  # (4 * hidden,) or None
    DG,  # (batch, 4 * hidden) contiguous
    DC,  # (batch, hidden) contiguous
    DB_partial,  # (cdiv(batch, BLOCK_B), 4 * hidden) fp32, or None without a bias
    stride_dh,
    stride_dcn,
    stride_ig,
    stride_hg,
    stride_c,
    batch,
    hidden,
    clip,  # +inf without a clip
    HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # Each program owns the same BLOCK_B x BLOCK_H tile of units as in the forward, recomputes its
    # activations, and writes its gradients plus one workspace row of dbias column sums over its BLOCK_B rows.
    pid_b = tl.program_id(0)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < batch)[:, None] & (cols < hidden)[None, :]
    rows64 = rows.to(tl.int64)
    i, f, g, o, c, c_raw, tanh_c = _activations(IG, HG, C, Bias, rows64, cols, mask, stride_ig, stride_hg,
                                                stride_c, hidden, clip, HAS_BIAS)
    dh = tl.load(DH + rows64[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dcn = tl.load(DCN + rows64[:, None] * stride_dcn + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    dc_clamped = dcn + dh * o * (1.0 - tanh_c * tanh_c)
    # torch.clamp's gradient passes where -clip <= c_raw <= clip, the bounds included (not at a NaN c_raw);
    # without a clip (clip = inf) there is no clamp and it passes everywhere, NaN included. Masked lanes have
    # dh = dcn = 0, so every gradient below is 0 there and the column sums need no extra select.
    dc_raw = tl.where((tl.abs(c_raw) <= clip) | (clip == float("inf")), dc_clamped, 0.0)
    di = dc_raw * g * i * (1.0 - i)
    df = dc_raw * c * f * (1.0 - f)
    dg = dc_raw * i * (1.0 - g * g)
    do = dh * tanh_c * o * (1.0 - o)

    out = DG + rows64[:, None] * 4 * hidden + cols[None, :]
    tl.store(out, di.to(DG.dtype.element_ty), mask=mask)
    tl.store(out + hidden, df.to(DG.dtype.element_ty), mask=mask)
    tl.store(out + 2 * hidden, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(out + 3 * hidden, do.to(DG.dtype.element_ty), mask=mask)
    tl.store(DC + rows64[:, None] * hidden + cols[None, :], (dc_raw * f).to(DC.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        col_mask = cols < hidden
        part = DB_partial + pid_b.to(tl.int64) * 4 * hidden + cols
        tl.store(part, tl.sum(di, axis=0), mask=col_mask)
        tl.store(part + hidden, tl.sum(df, axis=0), mask=col_mask)
        tl.store(part + 2 * hidden, tl.sum(dg, axis=0), mask=col_mask)
        tl.store(part + 3 * hidden, tl.sum(do, axis=0), mask=col_mask)


def _clip_bound(cell_clip: float | None) -> float:
    return math.inf if cell_clip is None else float(cell_clip)


def lstm_cell_fwd_triton(input_gates: Tensor, hidden_gates: Tensor, c: Tensor, bias: Tensor | None,
                         cell_clip: float | None) -> tuple[Tensor, Tensor]:
    """One LSTM step -> (h, c_new), (B, H) contiguous.

    input_gates, hidden_gates: (B, 4H); c: (B, H); column stride 1, any row stride. bias: (4H,) contiguous or None.
    """
    B, H = c.shape
    h = torch.empty((B, H), dtype=c.dtype, device=c.device)
    c_new = torch.empty((B, H), dtype=c.dtype, device=c.device)
    if B == 0 or H == 0:
        return h, c_new
    grid = (triton.cdiv(B, BLOCK_B), triton.cdiv(H, BLOCK_H))
    with device_guard(c):
        _lstm_cell_fwd_kernel[grid](
            input_gates, hidden_gates, c, bias, h, c_new,
            input_gates.stride(0), hidden_gates.stride(0), c.stride(0), B, H, _clip_bound(cell_clip),
            HAS_BIAS=bias is not None, BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, num_warps=NUM_WARPS,
        )
    return h, c_new


def lstm_cell_bwd_triton(dh: Tensor, dc_new: Tensor, input_gates: Tensor, hidden_gates: Tensor, c: Tensor,
                         bias: Tensor | None, cell_clip: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of lstm_cell_fwd_triton -> (dgates (B, 4H), dc (B, H), dbias (4H,) or an empty tensor).

    dh, dc_new: (B, H), column stride 1, any row stride; the other arguments as in the forward.
    """
    B, H = c.shape
    device = c.device
    dgates = torch.empty((B, 4 * H), dtype=c.dtype, device=device)
    dc = torch.empty((B, H), dtype=c.dtype, device=device)
    if B == 0 or H == 0:
        # A sum over no rows is zero, not empty.
        dbias = torch.zeros((4 * H,), dtype=c.dtype, device=device) if bias is not None else c.new_empty((0,))
        return dgates, dc, dbias
    row_blocks = triton.cdiv(B, BLOCK_B)
    partial = torch.empty((row_blocks, 4 * H), dtype=torch.float32, device=device) if bias is not None else None
    with device_guard(c):
        _lstm_cell_bwd_kernel[(row_blocks, triton.cdiv(H, BLOCK_H))](
            dh, dc_new, input_gates, hidden_gates, c, bias, dgates, dc, partial,
            dh.stride(0), dc_new.stride(0), input_gates.stride(0), hidden_gates.stride(0), c.stride(0), B, H,
            _clip_bound(cell_clip), HAS_BIAS=bias is not None, BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, num_warps=NUM_WARPS,
        )
    dbias = partial.sum(dim=0).to(c.dtype) if bias is not None else c.new_empty((0,))
    return dgates, dc, dbias
