"""Boundary checks shared by every op: one message style, always naming the offending argument.

These run on every call, so the happy path of each is a few attribute reads and comparisons: no tuple
conversions, string formatting or device syncs unless an argument is wrong.
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT32_MAX = 2**31 - 1


def check_tensor(t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float_dtype(t: Tensor, name: str, allowed: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{name} must be one of {names}; got {str(t.dtype).removeprefix('torch.')}")


def check_like(t: Tensor, x: Tensor, name: str, x_name: str = "x") -> None:
    """t shares x's dtype and device."""
    check_tensor(t, name)
    if t.dtype != x.dtype:
        raise ValueError(f"{name} must have {x_name}'s dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on {x_name}'s device {x.device}, got {t.device}")


def check_shape(t: Tensor, shape: tuple[int, ...], name: str) -> None:
    if t.shape != shape:  # torch.Size compares equal to a tuple of the same ints
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def last_dim_contiguous(t: Tensor) -> Tensor:
    """t with a contiguous last dim, the one layout requirement of every kernel (other strides are free);
    a copy only when needed. A last dim of size 1 has no stride to speak of."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def as_rows(t: Tensor) -> Tensor:
    """(..., n) -> (M, n) with a contiguous last dim; a view whenever the layout allows, else a copy."""
    return last_dim_contiguous(t if t.dim() == 2 else t.reshape(-1, t.shape[-1]))


def keep_mask(mask: Tensor, name: str) -> Tensor:
    """mask as the kernels take it: a contiguous bool tensor, True = token (nonzero).

    A float mask must hold 0 / 1: a float mask of 0 and -inf (or the dtype's most negative value) is an additive
    mask, as Hugging Face builds them, and reading it as "nonzero = keep" would invert it. An integer mask may
    hold any value >= 0 (a count is still "nonzero = keep"), never a negative one. A bool mask is not read; the
    others are, once (a device sync on a GPU), except while compiling and on meta tensors, which have no values.
    """
    if mask.dtype == torch.bool:
        return mask if mask.is_contiguous() else mask.contiguous()
    if mask.dtype.is_complex:
        raise ValueError(f"{name} must be bool, integer or float, got {mask.dtype}")
    keep = mask != 0
    if not (torch.compiler.is_compiling() or mask.is_meta or mask.numel() == 0):
        if mask.is_floating_point():
            if not torch.equal(mask, keep.to(mask.dtype)):  # one comparison: 0 and 1 are exactly keep's values
                raise ValueError(
                    f"{name} must hold 0 (padding) and 1 (token) when it is a float tensor, got values other than "
                    f"0 and 1 (e.g. {_first_bad(mask, (mask != 0) & (mask != 1))}). An additive mask (0 = keep, "
                    f"-inf or the dtype's minimum = masked, as Hugging Face builds them) must be converted first: "
                    f"pass `{name} == 0`.")
        elif int(mask.min()) < 0:
            raise ValueError(f"{name} must be >= 0 (nonzero = token) when it is an integer tensor, got "
                             f"{_first_bad(mask, mask < 0)}")
    return keep.contiguous()


def _first_bad(t: Tensor, bad: Tensor) -> str:
    return repr(t[bad].flatten()[0].item())


def check_max_seqlen(value: object, name: str) -> int:
    """max_seqlen as an int: any integral value (int, numpy integer, 0-d integer tensor), >= 0; never a bool or a
    float, which would be a mistake rather than a length. A SymInt (torch.compile with dynamic shapes) passes."""
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool) or (isinstance(value, Tensor) and (value.dim() != 0 or value.dtype == torch.bool)):
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}") from None
    if n < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {n}")
    return n


def check_cu_seqlens(cu: Tensor, name: str, like: Tensor, like_name: str) -> None:
    """cu_seqlens' form: a 1-D int32 / int64 (B + 1,) tensor on like's device (its values: check_offsets)."""
    check_tensor(cu, name)
    if cu.dtype != torch.int32 and cu.dtype != torch.int64:
        raise ValueError(f"{name} must be int32 or int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D (B + 1,) with B >= 0, got shape {tuple(cu.shape)}")
    if cu.device != like.device:
        raise ValueError(f"{name} must be on {like_name}'s device {like.device}, got {cu.device}")


def cu_seqlens_values(*cus: Tensor) -> list[list[int]]:
    """The values of each cu_seqlens as Python ints, in one read (one device sync on a GPU for all of them).
    None while compiling, when they are not known yet, and for meta tensors, which have none."""
    if torch.compiler.is_compiling() or any(cu.is_meta for cu in cus):
        return None
    if len(cus) == 1:
        return [cus[0].tolist()]
    flat = torch.cat(cus).tolist()
    out, start = [], 0
    for cu in cus:
        out.append(flat[start:start + cu.shape[0]])
        start += cu.shape[0]
    return out


def check_offsets(offsets: list[int], name: str, total: int, total_name: str, max_seqlen: int | None = None,
                  max_name: str = "max_seqlen") -> int:
    """cu_seqlens' values: 0 first, non-decreasing, ending at `total` rows, no sequence longer than max_seqlen
    (when given). -> the longest sequence. The one wording of these checks; csrc/checks.h has the same."""
    if offsets[0] != 0:
        raise ValueError(f"{name} must start at 0, got {offsets[0]}")
    longest = 0
    for b in range(len(offsets) - 1):
        n = offsets[b + 1] - offsets[b]
        if n < 0:
            raise ValueError(f"{name} must be non-decreasing, got {name}[{b}] = {offsets[b]} > "
                             f"{name}[{b + 1}] = {offsets[b + 1]}")
        longest = max(longest, n)
    if offsets[-1] != total:
        raise ValueError(f"{name} must end at {total_name} {total}, got {offsets[-1]}")
    if max_seqlen is not None and longest > max_seqlen:
        raise ValueError(f"{max_name} = {max_seqlen} is smaller than a sequence of {longest} in {name}")
    return longest
