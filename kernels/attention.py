"""Attention in Triton, FlashAttention-2 style: dense, key-padded, causal and variable-length ("varlen").

Forward: each program owns a block of query rows of one (sequence, head) and streams the key/value blocks
that those rows may see through an online softmax, so the scores never exist beyond one tile; it saves the
log-sum-exp (fp32, +inf for a row that sees no key). Backward: a small kernel computes each row's
delta = rowsum(dout * out); P is recomputed from the saved log-sum-exp; one kernel owns a key block and accumulates its dk, dv over the query blocks that see it, another owns a
query block and accumulates its dq, so no gradient needs atomics.

One set of kernels serves both layouts. Dense tensors are (B, S, H, D) with any batch/sequence/head
strides; varlen ones are packed (total, H, D) with sequence b's rows at cu_seqlens[b]:cu_seqlens[b + 1], which
the kernels read as a batch stride of 0 plus a per-sequence row offset. Key blocks that no row of a query
block may see (past the causal diagonal, past the last real key of a padded sequence, past a varlen
sequence's end) are skipped, never computed.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import device_guard

# The softmax runs in base 2 (exp2 is one instruction): scores are scaled by log2(e) and lse converted back.
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _program_sequence(CU_Q, CU_K, H, Sq, Sk, IS_VARLEN: tl.constexpr):
    """Program axis 1 is b * H + h: -> b, h and the (first row, length) of sequence b's queries and keys;
    dense batches start every sequence at row 0."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        k_start = tl.load(CU_K + b)
        q_len = tl.load(CU_Q + b + 1) - q_start
        k_len = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = tl.full([], 0, tl.int32)
        k_start = tl.full([], 0, tl.int32)
        q_len = Sq
        k_len = Sk
    return b, h, q_start, q_len, k_start, k_len


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation. PRECISION "upcast" (interpreted bf16 only) multiplies the bf16 values in
    fp32, exactly as tensor cores do: the interpreter's bf16 tl.dot multiplies the raw bit patterns."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _real_keys(cols, b, k_len, Mask, stride_mask_b, HAS_MASK: tl.constexpr):
    """(len(cols),) bool: key j is in range and not padding. K and V tiles are loaded under it, so padding
    is never read: its P is 0, but 0 * NaN (or inf) in P V or dS K would still poison the row."""
    real = cols < k_len
    if HAS_MASK:
        real = real & (tl.load(Mask + b.to(tl.int64) * stride_mask_b + cols, mask=real, other=0) != 0)
    return real


@triton.jit
def _allowed(rows, cols, real, k_len, q_len, CAUSAL: tl.constexpr):
    """(len(rows), len(cols)) bool: query row i may see key j (real, not after the diagonal)."""
    ok = real[None, :]
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + (k_len - q_len))
    return ok


@triton.jit
def _key_end(pid_m, b, k_len, q_len, KvEnd, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr):
    """Keys at or past the result are invisible to every row of query block pid_m: past the causal diagonal of
    its last row, or past the sequence's last real key."""
    hi = k_len
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M + k_len - q_len)
    if HAS_MASK:
        hi = tl.minimum(hi, tl.load(KvEnd + b))
    return hi


@triton.jit
def _load_rows(X, rows, dims, stride_s, mask):
    """The (len(rows), len(dims)) tile of X's rows `rows`, zeros where mask is off."""
    return tl.load(X + rows[:, None].to(tl.int64) * stride_s + dims[None, :], mask=mask, other=0.0)


# The backward's two tile steps serve both orientations: the dq kernel's (query, key) tiles, called with
# (q, k) and (do, v), and the dk/dv kernel's transposed (key, query) tiles, called with (k, q) and (v, do);
# lse and delta come broadcast along the query axis.

@triton.jit
def _bwd_probs(s_lhs, s_rhs, lse, allowed, qk_scale_log2, PRECISION: tl.constexpr):
    """P = exp2(s_lhs s_rhs^T * qk_scale_log2 - lse) where allowed, 0 elsewhere: the forward's probabilities,
    recomputed from its log-sum-exp (base 2)."""
    s = _dot(s_lhs, tl.trans(s_rhs), PRECISION) * qk_scale_log2
    return tl.where(allowed, tl.exp2(s - lse), 0.0)


@triton.jit
def _bwd_dscores(p, dp_lhs, dp_rhs, delta, PRECISION: tl.constexpr):
    """dS = P * (dP - delta) with dP = dp_lhs dp_rhs^T: the gradient of the scaled scores."""
    return p * (_dot(dp_lhs, tl.trans(dp_rhs), PRECISION) - delta)


@triton.jit
def _fwd_key_block(acc, m_i, l_i, q, K, V, start_n, rows, offs_n, dims, dim_ok, b, k_len, q_len, Mask, stride_mask_b,
                   stride_ks, stride_vs, qk_scale_log2, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                   PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One step of the online softmax over keys [start_n, start_n + BLOCK_N): K, V point at the sequence's
    first key of this head. MASKED = False: every row sees every key of the block."""
    cols = start_n + offs_n
    kv_mask = dim_ok[None, :]
    if MASKED:
        real = _real_keys(cols, b, k_len, Mask, stride_mask_b, HAS_MASK)
        kv_mask = kv_mask & real[:, None]
    k = _load_rows(K, cols, dims, stride_ks, kv_mask)
    s = _dot(q, tl.trans(k), PRECISION) * qk_scale_log2
    if MASKED:
        s = tl.where(_allowed(rows, cols, real, k_len, q_len, CAUSAL), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no allowed key yet keeps m = -inf; subtracting 0 instead avoids inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(V, cols, dims, stride_vs, kv_mask)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attention_fwd_kernel(
    Q,  # (B, Sq, H, D) strided, or (total_q, H, D) when IS_VARLEN (stride_qb = 0); last dim contiguous
    K,  # (B, Sk, H, D) / (total_k, H, D), like Q
    V,  # (B, Sk, H, D) / (total_k, H, D), like Q
    Out,  # like Q, contiguous
    Lse,  # (B, H, Sq) or (H, total_q) fp32, contiguous
    Mask,  # (B, Sk) uint8 key padding mask, 1 = attend; None without HAS_MASK
    KvEnd,  # (B,) int32: 1 + the last attended key of each sequence; None without HAS_MASK
    CuQ,  # (B + 1,) int32 query row offsets; None unless IS_VARLEN
    CuK,  # (B + 1,) int32 key row offsets; None unless IS_VARLEN
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    stride_mask_b,
    H, Sq, Sk, D,
    qk_scale_log2,  # scale * log2(e): the softmax runs in base 2
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Program (m, b * H + h) owns query rows [m * BLOCK_M, (m + 1) * BLOCK_M) of sequence b, head h: their
    # running max, running sum and (BLOCK_M, BLOCK_D) fp32 accumulator stay in registers for the whole loop.
    pid_m = tl.program_id(0)
    b, h, q_start, q_len, k_start, k_len = _program_sequence(CuQ, CuK, H, Sq, Sk, IS_VARLEN)
    if pid_m * BLOCK_M >= q_len:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = rows < q_len
    dim_ok = dims < D
    b64 = b.to(tl.int64)
    q_rows = (q_start + rows).to(tl.int64)
    q = _load_rows(Q + b64 * stride_qb + h * stride_qh, q_start + rows, dims, stride_qs,
                   row_ok[:, None] & dim_ok[None, :])
    K += b64 * stride_kb + h * stride_kh + k_start.to(tl.int64) * stride_ks
    V += b64 * stride_vb + h * stride_vh + k_start.to(tl.int64) * stride_vs

    hi = _key_end(pid_m, b, k_len, q_len, KvEnd, CAUSAL, HAS_MASK, BLOCK_M)

    # Blocks before `full_end` are seen whole by every row (in range, below the diagonal, no padding mask)
    # and skip the masking; the rest, up to `hi`, are masked key by key.
    full_end = k_len // BLOCK_N * BLOCK_N
    if CAUSAL:
        full_end = tl.minimum(full_end, tl.maximum(0, pid_m * BLOCK_M + k_len - q_len + 1) // BLOCK_N * BLOCK_N)
    if HAS_MASK:
        full_end = 0
    full_end = tl.minimum(full_end, hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _fwd_key_block(acc, m_i, l_i, q, K, V, start_n, rows, offs_n, dims, dim_ok, b, k_len, q_len,
                                       Mask, stride_mask_b, stride_ks, stride_vs, qk_scale_log2,
                                       CAUSAL, HAS_MASK, PRECISION, False)
    for start_n in range(full_end, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_key_block(acc, m_i, l_i, q, K, V, start_n, rows, offs_n, dims, dim_ok, b, k_len, q_len,
                                       Mask, stride_mask_b, stride_ks, stride_vs, qk_scale_log2,
                                       CAUSAL, HAS_MASK, PRECISION, True)

    sees_a_key = l_i > 0
    out = acc / tl.where(sees_a_key, l_i, 1.0)[:, None]
    tl.store(Out + b64 * stride_ob + h * stride_oh + q_rows[:, None] * stride_os + dims[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    lse = tl.where(sees_a_key, (m_i + tl.log2(tl.where(sees_a_key, l_i, 1.0))) / LOG2E, float("inf"))
    tl.store(Lse + b64 * stride_lb + h * stride_lh + q_start + rows, lse, mask=row_ok)


@triton.jit
def _attention_bwd_delta_kernel(
    Out,  # (B, Sq, H, D) or (total_q, H, D), the forward's output
    DOut,  # like Out, strided, last dim contiguous
    Delta,  # (B, H, Sq) or (H, total_q) fp32, like the forward's Lse
    CuQ, CuK,  # as in the forward
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh,
    H, Sq, Sk, D,
    IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (m, b * H + h) owns query rows [m * BLOCK_M, (m + 1) * BLOCK_M) of sequence b, head h:
    # delta = rowsum(dout * out), the softmax-backward term every key of a row shares, in fp32.
    pid_m = tl.program_id(0)
    b, h, q_start, q_len, _k_start, _k_len = _program_sequence(CuQ, CuK, H, Sq, Sk, IS_VARLEN)
    if pid_m * BLOCK_M >= q_len:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    tile_mask = (rows < q_len)[:, None] & (dims < D)[None, :]
    b64 = b.to(tl.int64)
    o = _load_rows(Out + b64 * stride_ob + h * stride_oh, q_start + rows, dims, stride_os, tile_mask)
    do = _load_rows(DOut + b64 * stride_dob + h * stride_doh, q_start + rows, dims, stride_dos, tile_mask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + b64 * stride_lb + h * stride_lh + q_start + rows, delta, mask=rows < q_len)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V,  # as in the forward
    DOut,  # like Q (strided, last dim contiguous)
    Lse,  # (B, H, Sq) or (H, total_q) fp32, the forward's
    Delta,  # like Lse: rowsum(dout * out), fp32
    DK, DV,  # like K, contiguous
    Mask, KvEnd, CuQ, CuK,  # as in the forward
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_lb, stride_lh,
    stride_mask_b,
    H, Sq, Sk, D,
    scale,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Program (n, b * H + h) owns key rows [n * BLOCK_N, (n + 1) * BLOCK_N) of sequence b, head h: it keeps
    # their k, v and fp32 dk, dv accumulators in registers and walks the query blocks that may see them,
    # recomputing P^T = exp(k q^T * scale - lse) tile by tile.
    pid_n = tl.program_id(0)
    b, h, q_start, q_len, k_start, k_len = _program_sequence(CuQ, CuK, H, Sq, Sk, IS_VARLEN)
    if pid_n * BLOCK_N >= k_len:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    col_ok = cols < k_len
    dim_ok = dims < D
    tile_mask = col_ok[:, None] & dim_ok[None, :]
    b64 = b.to(tl.int64)
    k_rows = (k_start + cols).to(tl.int64)
    # Padding keys load as zeros (their dk, dv come out 0); the block's keys are fixed, so once per program.
    real = _real_keys(cols, b, k_len, Mask, stride_mask_b, HAS_MASK)
    kv_mask = real[:, None] & dim_ok[None, :]
    k = _load_rows(K + b64 * stride_kb + h * stride_kh, k_start + cols, dims, stride_ks, kv_mask)
    v = _load_rows(V + b64 * stride_vb + h * stride_vh, k_start + cols, dims, stride_vs, kv_mask)
    Q += b64 * stride_qb + h * stride_qh + q_start.to(tl.int64) * stride_qs
    DOut += b64 * stride_dob + h * stride_doh + q_start.to(tl.int64) * stride_dos
    Lse += b64 * stride_lb + h * stride_lh + q_start
    Delta += b64 * stride_lb + h * stride_lh + q_start

    # Queries before `lo` cannot see this block's first key under causality; a block wholly past the
    # sequence's last real key is seen by no query at all.
    lo = 0
    if CAUSAL:
        lo = tl.maximum(0, pid_n * BLOCK_N - (k_len - q_len)) // BLOCK_M * BLOCK_M
    if HAS_MASK:
        lo = tl.where(pid_n * BLOCK_N >= tl.load(KvEnd + b), q_len, lo)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(lo, q_len, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < q_len
        q_mask = row_ok[:, None] & dim_ok[None, :]
        q = _load_rows(Q, rows, dims, stride_qs, q_mask)
        do = _load_rows(DOut, rows, dims, stride_dos, q_mask)
        # +inf for rows out of range makes their P exactly 0, like rows that see no key.
        lse = tl.load(Lse + rows, mask=row_ok, other=float("inf")) * LOG2E
        delta = tl.load(Delta + rows, mask=row_ok, other=0.0)
        allowed_t = tl.trans(_allowed(rows, cols, real, k_len, q_len, CAUSAL))
        p_t = _bwd_probs(k, q, lse[None, :], allowed_t, scale * LOG2E, PRECISION)
        dv += _dot(p_t.to(do.dtype), do, PRECISION)
        ds_t = _bwd_dscores(p_t, v, do, delta[None, :], PRECISION)
        dk += _dot(ds_t.to(q.dtype), q, PRECISION)

    out_offsets = b64 * stride_dkb + h * stride_dkh + k_rows[:, None] * stride_dks + dims[None, :]
    tl.store(DK + out_offsets, (dk * scale).to(DK.dtype.element_ty), mask=tile_mask)
    tl.store(DV + out_offsets, dv.to(DV.dtype.element_ty), mask=tile_mask)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta,  # as in _attention_bwd_dkdv_kernel
    DQ,  # like Q, contiguous
    Mask, KvEnd, CuQ, CuK,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    stride_mask_b,
    H, Sq, Sk, D,
    scale,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Program (m, b * H + h) owns query rows [m * BLOCK_M, (m + 1) * BLOCK_M) of sequence b, head h: their
    # q, dout, lse, delta and fp32 dq accumulator, over the same key blocks the forward visited.
    pid_m = tl.program_id(0)
    b, h, q_start, q_len, k_start, k_len = _program_sequence(CuQ, CuK, H, Sq, Sk, IS_VARLEN)
    if pid_m * BLOCK_M >= q_len:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = rows < q_len
    dim_ok = dims < D
    tile_mask = row_ok[:, None] & dim_ok[None, :]
    b64 = b.to(tl.int64)
    q_rows = (q_start + rows).to(tl.int64)
    q = _load_rows(Q + b64 * stride_qb + h * stride_qh, q_start + rows, dims, stride_qs, tile_mask)
    do = _load_rows(DOut + b64 * stride_dob + h * stride_doh, q_start + rows, dims, stride_dos, tile_mask)
    stat_offsets = b64 * stride_lb + h * stride_lh + q_start + rows
    lse = tl.load(Lse + stat_offsets, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(Delta + stat_offsets, mask=row_ok, other=0.0)
    K += b64 * stride_kb + h * stride_kh + k_start.to(tl.int64) * stride_ks
    V += b64 * stride_vb + h * stride_vh + k_start.to(tl.int64) * stride_vs

    hi = _key_end(pid_m, b, k_len, q_len, KvEnd, CAUSAL, HAS_MASK, BLOCK_M)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        real = _real_keys(cols, b, k_len, Mask, stride_mask_b, HAS_MASK)
        kv_mask = real[:, None] & dim_ok[None, :]
        k = _load_rows(K, cols, dims, stride_ks, kv_mask)
        v = _load_rows(V, cols, dims, stride_vs, kv_mask)
        allowed = _allowed(rows, cols, real, k_len, q_len, CAUSAL)
        p = _bwd_probs(q, k, lse[:, None], allowed, scale * LOG2E, PRECISION)
        ds = _bwd_dscores(p, do, v, delta[:, None], PRECISION)
        dq += _dot(ds.to(k.dtype), k, PRECISION)

    tl.store(DQ + b64 * stride_dqb + h * stride_dqh + q_rows[:, None] * stride_dqs + dims[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=tile_mask)


# ----------------------------------------------------------------------------- launchers

def _tile_config(head_dim: int, dtype: torch.dtype, interpreted: bool) -> dict:
    """Block sizes and launch options. fp32 tiles are half the size (twice the bytes per element, and the
    exact "ieee" products run on CUDA cores, not tensor cores). The interpreter gets small blocks so that
    small test shapes still span several blocks and exercise the masking between them."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpreted:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d)
    wide = block_d > 64
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=block_d, num_warps=4, num_stages=2)
    # Three stages of K/V tiles in flight hide the load latency; (128, 64) tiles at D = 128 still fit
    # sm_80's shared memory.
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=block_d, num_warps=8 if wide else 4, num_stages=3)


def _bwd_tile_config(head_dim: int, dtype: torch.dtype, interpreted: bool) -> dict:
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpreted:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d, num_warps=4, num_stages=1)
    return dict(BLOCK_M=64 if block_d <= 64 else 32, BLOCK_N=64, BLOCK_D=block_d,
                num_warps=4 if block_d <= 64 else 8, num_stages=2)


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    """The products' precision: exact fp32 for fp32 inputs (the default, tf32, keeps 10 mantissa bits: 1e-3
    relative error); fp16/bf16 ones go to tensor cores as they are ("tf32" is then ignored)."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if dtype == torch.bfloat16 and device.type == "cpu" else "tf32"


def _strides4(t: Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, sequence, head) strides; a packed varlen tensor has batch stride 0."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _mask_args(key_padding_mask: Optional[Tensor]):
    """(mask as uint8, 1 + last attended key per sequence, batch stride), or Nones without a mask."""
    if key_padding_mask is None:
        return None, None, 0
    mask = key_padding_mask.view(torch.uint8)
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device, dtype=torch.int32)
    kv_end = (mask.to(torch.int32) * positions).amax(dim=1).to(torch.int32) if mask.shape[1] else \
        torch.zeros(mask.shape[0], dtype=torch.int32, device=mask.device)
    return mask, kv_end, mask.stride(0)


def _fwd(q, k, v, mask, cu_q, cu_k, batch, sq, sk, causal, scale, varlen):
    """Shared launcher of the forward: out contiguous in q's shape, lse (B, H, Sq) or (H, total_q)."""
    h, d = q.shape[-2], q.shape[-1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((h, q.shape[0]) if varlen else (batch, h, sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("inf"))
    mask_u8, kv_end, stride_mask_b = _mask_args(mask)
    cfg = _tile_config(d, q.dtype, q.device.type == "cpu")
    grid = (triton.cdiv(sq, cfg["BLOCK_M"]), batch * h)
    with device_guard(q):
        _attention_fwd_kernel[grid](
            q, k, v, out, lse, mask_u8, kv_end, cu_q, cu_k,
            *_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen), *_strides4(out, varlen),
            0 if varlen else lse.stride(0), lse.stride(-2), stride_mask_b,
            h, sq, sk, d, scale * LOG2E.value,
            CAUSAL=causal, HAS_MASK=mask is not None, IS_VARLEN=varlen, PRECISION=_precision(q.dtype, q.device),
            **cfg)
    return out, lse


def _bwd(dout, q, k, v, out, lse, mask, cu_q, cu_k, batch, sq, sk, causal, scale, varlen):
    """Shared launcher of the backward: dq, dk, dv contiguous in q's / k's / v's shapes."""
    h, d = q.shape[-2], q.shape[-1]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    mask_u8, kv_end, stride_mask_b = _mask_args(mask)
    cfg = _bwd_tile_config(d, q.dtype, q.device.type == "cpu")
    lse_strides = (0 if varlen else lse.stride(0), lse.stride(-2), stride_mask_b)
    delta = torch.empty_like(lse)
    common = dict(CAUSAL=causal, HAS_MASK=mask is not None, IS_VARLEN=varlen, PRECISION=_precision(q.dtype, q.device), **cfg)
    strides = (*_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen), *_strides4(dout, varlen))
    with device_guard(q):
        _attention_bwd_delta_kernel[(triton.cdiv(sq, cfg["BLOCK_M"]), batch * h)](
            out, dout, delta, cu_q, cu_k, *_strides4(out, varlen), *_strides4(dout, varlen), *lse_strides[:2],
            h, sq, sk, d, IS_VARLEN=varlen, BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"])
        _attention_bwd_dkdv_kernel[(triton.cdiv(sk, cfg["BLOCK_N"]), batch * h)](
            q, k, v, dout, lse, delta, dk, dv, mask_u8, kv_end, cu_q, cu_k,
            *strides, *_strides4(dk, varlen), *lse_strides, h, sq, sk, d, scale, **common)
        _attention_bwd_dq_kernel[(triton.cdiv(sq, cfg["BLOCK_M"]), batch * h)](
            q, k, v, dout, lse, delta, dq, mask_u8, kv_end, cu_q, cu_k,
            *strides, *_strides4(dq, varlen), *lse_strides, h, sq, sk, d, scale, **common)
    return dq, dk, dv


def attention_fwd_triton(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool,
                         scale: float) -> tuple[Tensor, Tensor]:
    """q (B, Sq, H, D), k, v (B, Sk, H, D), last dim contiguous; mask (B, Sk) bool contiguous or None.
    -> out (B, Sq, H, D) contiguous, lse (B, H, Sq) fp32."""
    return _fwd(q, k, v, key_padding_mask, None, None, q.shape[0], q.shape[1], k.shape[1], causal, scale, False)


def attention_bwd_triton(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         key_padding_mask: Optional[Tensor], causal: bool, scale: float
                         ) -> tuple[Tensor, Tensor, Tensor]:
    return _bwd(dout, q, k, v, out, lse, key_padding_mask, None, None, q.shape[0], q.shape[1], k.shape[1],
                causal, scale, False)


def attention_varlen_fwd_triton(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float
                                ) -> tuple[Tensor, Tensor]:
    """q (total_q, H, D), k, v (total_k, H, D); cu_seqlens int32 (B + 1,) validated by the caller.
    -> out (total_q, H, D) contiguous, lse (H, total_q) fp32."""
    return _fwd(q, k, v, None, cu_seqlens_q, cu_seqlens_k, cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k,
                causal, scale, True)


def attention_varlen_bwd_triton(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _bwd(dout, q, k, v, out, lse, None, cu_seqlens_q, cu_seqlens_k, cu_seqlens_q.shape[0] - 1,
                max_seqlen_q, max_seqlen_k, causal, scale, True)
