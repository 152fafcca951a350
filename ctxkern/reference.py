"""Pure-PyTorch references for every op: the test oracle (run in float64) and the "torch" backend.

Each reference computes in fp32 at least (float64 stays float64) and returns the input's dtype, so its
low-precision results follow DESIGN.md's numerics: statistics in fp32 whatever the storage dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def layer_norm_ref(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5, residual: Optional[Tensor] = None) -> Tensor:
    """LayerNorm of (x + residual) over the last dim, biased variance, as torch.nn.LayerNorm (which gives NaN
    or finite garbage on fp32 rows beyond about 1e19, where this gives the float64 result)."""
    ct = _compute_dtype(x.dtype)
    s = x.to(ct) if residual is None else x.to(ct) + residual.to(ct)
    # In fp32 the squares of a row beyond about 1e19 overflow (and below 1e-19 lose digits), which would make
    # rstd 0 and y the bias: finite garbage. Each row is first divided by a power of two near its largest
    # magnitude (exact, and a constant to autograd), and eps by its square: the same function of s.
    unit = 1.0
    if ct == torch.float32 and s.shape[-1] > 0:
        peak = s.detach().abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(ct).tiny)
        unit = torch.exp2(torch.log2(peak).floor())  # a row holding inf or NaN stays NaN, as in torch
        s = s / unit
    mean = s.mean(dim=-1, keepdim=True)
    var = (s - mean).square().mean(dim=-1, keepdim=True)
    y = (s - mean) * torch.rsqrt(var + eps / unit**2 if eps else var)  # eps / 0 when unit**2 underflows
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)


def _normalize_rows(x: Tensor, eps: float = 1e-12) -> Tensor:
    """x / max(||x||2, 1e-12) per row: F.normalize, as sentence-transformers' Normalize module calls it.

    A zero row (the mean of a sequence with no token) is x / eps, with F.normalize's value and gradient, but
    not taken through the norm, whose forward-mode and second derivatives at 0 are 0 / 0 = NaN.
    """
    zero = (x == 0).all(dim=-1, keepdim=True)
    normalized = torch.nn.functional.normalize(torch.where(zero, 1.0, x), p=2.0, dim=-1, eps=eps)
    return torch.where(zero, x / eps, normalized)


def masked_mean_pool_ref(hidden: Tensor, mask: Tensor, normalize: bool = False) -> Tensor:
    """Mean of hidden (B, S, D) over the tokens where mask (B, S) is nonzero -> (B, D); no token gives zeros."""
    ct = _compute_dtype(hidden.dtype)
    keep = (mask != 0).to(ct).unsqueeze(-1)                      # (B, S, 1)
    mean = (hidden.to(ct) * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1)
    return (_normalize_rows(mean) if normalize else mean).to(hidden.dtype)


def masked_mean_pool_varlen_ref(hidden: Tensor, cu_seqlens: Tensor, normalize: bool = False) -> Tensor:
    """Mean of each packed sequence hidden[cu_seqlens[b]:cu_seqlens[b + 1]] of hidden (total, D) -> (B, D)."""
    ct = _compute_dtype(hidden.dtype)
    lengths = cu_seqlens.diff().long()                           # (B,)
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=hidden.device), lengths,
                                   output_size=hidden.shape[0])  # (total,) the sequence of each token
    summed = hidden.new_zeros((lengths.numel(), hidden.shape[1]), dtype=ct).index_add(0, rows, hidden.to(ct))
    mean = summed / lengths.clamp_min(1).to(ct).unsqueeze(-1)
    return (_normalize_rows(mean) if normalize else mean).to(hidden.dtype)


def attention_ref(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None, causal: bool = False,
                  scale: Optional[float] = None, *, compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """softmax(scale * q k^T, masked) v in flash-attn's layout: q (B, Sq, H, D), k, v (B, Sk, H, D) -> (B, Sq, H, D).

    key_padding_mask (B, Sk), nonzero = attend; causal: query i sees keys j <= i + Sk - Sq (bottom-right
    aligned). A query row that may see no key gives zeros, and no gradient flows through it. The products
    run in compute_dtype (default: fp32, or float64 for float64 inputs); tests pass the storage dtype to get
    PyTorch's own low-precision error, the yardstick for fp16/bf16 kernels.
    """
    ct = compute_dtype or _compute_dtype(q.dtype)
    d, sq, sk = q.shape[-1], q.shape[1], k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(ct), k.to(ct)) * scale  # (B, H, Sq, Sk)
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.ones_like(allowed).tril(sk - sq)
    allowed = allowed.expand(q.shape[0], 1, sq, sk)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool()[:, None, None, :]
    # A row with no allowed key would be softmax(all -inf) = NaN, and NaN poisons its gradient even when
    # multiplied by zero afterwards; such rows are given finite scores and then zeroed.
    sees_a_key = allowed.any(dim=-1, keepdim=True)
    scores = torch.where(allowed, scores, float("-inf"))
    scores = torch.where(sees_a_key, scores, 0.0)
    p = torch.softmax(scores, dim=-1) * allowed
    return torch.einsum("bhqk,bkhd->bqhd", p, v.to(ct)).to(q.dtype)


def attention_varlen_ref(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                         causal: bool = False, scale: Optional[float] = None, *,
                         compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """attention_ref on each packed sequence: q (total_q, H, D), k, v (total_k, H, D), cu_seqlens int (B+1,)
    offsets of the sequences (flash_attn_varlen_func's convention) -> (total_q, H, D)."""
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = [attention_ref(q[bq[i]:bq[i + 1]][None], k[bk[i]:bk[i + 1]][None], v[bk[i]:bk[i + 1]][None],
                          causal=causal, scale=scale, compute_dtype=compute_dtype)[0]
            for i in range(len(bq) - 1)]
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


def lstm_cell_ref(input_gates: Tensor, hidden_gates: Tensor, c: Tensor, bias: Optional[Tensor] = None,
                  cell_clip: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """One LSTM step, torch's gate order i, f, g, o -> (h, c_new); the eager composition users write.

    c_new = sigmoid(f) * c + sigmoid(i) * tanh(g), clamped to +-cell_clip before h = sigmoid(o) * tanh(c_new),
    as AllenNLP's LSTM with projection clips its memory cell.
    """
    ct = _compute_dtype(input_gates.dtype)
    gates = input_gates.to(ct) + hidden_gates.to(ct)
    if bias is not None:
        gates = gates + bias.to(ct)
    i, f, g, o = gates.chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c.to(ct) + torch.sigmoid(i) * torch.tanh(g)
    if cell_clip is not None:
        c_new = torch.clamp(c_new, -cell_clip, cell_clip)
    h = torch.sigmoid(o) * torch.tanh(c_new)
    return h.to(c.dtype), c_new.to(c.dtype)
