"""What the transformer models of the zoo (BERT, CLIP) share: self-attention through one fused QKV projection on
ctxkern's attention over a padded (B, S, H) or a packed (T, H) layout, the MLP, packing the real tokens of a
padded batch and unpacking them, the checkpoint helpers (config from JSON, fused QKV) and the input checks.
Each model keeps its own block composition (post-LN BERT, pre-LN CLIP), embeddings, pooling and name table.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ctxkern import ops
from ctxkern.models._checkpoint import CheckpointError
from ctxkern.models._linear import ACTIVATIONS, QUICK_GELU_ALPHA, Linear, row_bucket
from ctxkern.ops._checks import check_cu_seqlens, check_max_seqlen, check_offsets, cu_seqlens_values

# attend(q, k, v) -> context: the attention over whichever layout the hidden states are in.
Attend = Callable[[Tensor, Tensor, Tensor], Tensor]
MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- building for a checkpoint

_INIT_FILLS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
               "kaiming_normal_", "xavier_uniform_", "xavier_normal_")
_init_lock = threading.Lock()


@contextlib.contextmanager
def meta_skeleton():
    """Modules built inside are on the meta device and skip torch.nn.init's fills: a checkpoint's tensors replace
    every parameter next (load_state_dict(assign=True)), and a random fill of a meta tensor imports torch._dynamo
    and friends, seconds of a cold start (`ctxkern search` answers one query per process). The fills are switched
    off in torch.nn.init, which every torch.nn module's reset_parameters calls, for the duration only, under a
    lock (as transformers' no_init_weights does; a model built in another thread at that moment would skip them
    too, so builds are serialized)."""
    with _init_lock, torch.device("meta"):
        saved = {name: getattr(torch.nn.init, name) for name in _INIT_FILLS}
        try:
            for name in _INIT_FILLS:
                setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
            yield
        finally:
            for name, fill in saved.items():
                setattr(torch.nn.init, name, fill)


# ----------------------------------------------------------------------------- sublayers

class SelfAttention(torch.nn.Module):
    """One fused QKV projection (rows: query, key, value), the attention, the output projection."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = Linear(hidden, 3 * hidden)
        self.out = Linear(hidden, hidden)

    def forward(self, x: Tensor, attend: Attend) -> Tensor:
        return self.out(fused_qkv_attention(self.qkv, x, self.heads, attend))


class Mlp(torch.nn.Module):
    """fc1 with its activation, then fc2."""

    def __init__(self, hidden: int, intermediate: int, activation: Optional[str]) -> None:
        super().__init__()
        self.fc1 = Linear(hidden, intermediate, activation=activation)
        self.fc2 = Linear(intermediate, hidden)

    def forward(self, x: Tensor) -> Tensor:
        if self.fc1.activation == "quick_gelu" and self.fc1.onednn_serves(x):
            # fc1 as oneDNN's swish of a-scaled parameters gives a * QuickGELU(z); fc2's weight takes the 1/a
            # (models/_linear.py), which saves a pass over the widest activation.
            h = Linear.onednn(x, *self.fc1.scaled_parameters(QUICK_GELU_ALPHA, QUICK_GELU_ALPHA), "swish")
            return Linear.onednn(h, *self.fc2.scaled_parameters(1 / QUICK_GELU_ALPHA, 1.0),
                                 *ACTIVATIONS[self.fc2.activation][1:])
        return self.fc2(self.fc1(x))


def fused_qkv_attention(qkv: Linear, x: Tensor, heads: int, attend: Attend) -> Tensor:
    """attend(q, k, v) of x's fused projection, heads merged: (..., H) -> (..., H). q, k, v are strided views
    of the one projection (no copy), in flash-attn's (..., heads, head_dim) layout."""
    q, k, v = qkv(x).unflatten(-1, (3, heads, -1)).unbind(-3)              # (..., heads, head_dim) each
    return attend(q, k, v).flatten(-2)                                     # (..., H)


def padded_attention(mask: Optional[Tensor], backend: str, *, causal: bool = False) -> Attend:
    """Attention over (B, S, heads, head_dim) with a (B, S) key-padding mask (or None)."""
    def attend(q, k, v):
        return ops.attention(q, k, v, key_padding_mask=mask, causal=causal, backend=backend)
    return attend


def packed_attention(cu_seqlens: Tensor, max_seqlen: int, backend: str, *, causal: bool = False) -> Attend:
    """Attention over packed (T, heads, head_dim) sequences, each its own rows of cu_seqlens."""
    def attend(q, k, v):
        return ops.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=causal,
                                    backend=backend)
    return attend


# ----------------------------------------------------------------------------- packing

class Packing(NamedTuple):
    index: Tensor           # (T,) positions of the real tokens in the flattened (B * S) batch
    cu_seqlens: Tensor      # int32 (B + 1,)
    max_seqlen: int


def pack(mask: Tensor) -> Packing:
    """The real tokens of a padded batch, mask (B, S) bool, True = token."""
    index = mask.flatten().nonzero().squeeze(1)                                     # (T,)
    lengths = mask.sum(1, dtype=torch.int32)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return Packing(index, cu_seqlens, int(lengths.max()) if len(lengths) else 0)


def unpack(packed: Tensor, index: Tensor, batch: int, seq: int) -> Tensor:
    """Packed states (T, H) back at their positions of a (B, S, H) batch, zeros at the padding."""
    hidden = packed.new_zeros(batch * seq, packed.shape[-1]).index_copy(0, index, packed)
    return hidden.view(batch, seq, -1)                                              # (B, S, H)


def pad_rows_for_onednn(hidden: Tensor, cu_seqlens: Tensor, linear: Linear) -> tuple[Tensor, Tensor]:
    """Packed (T, H) states padded to row_bucket(T) rows when oneDNN serves the linear layers (which pad to that
    count themselves: padding once saves each of them the copy). The zero rows become one-token sequences of
    their own, so no real token attends to them; the caller drops rows T: at the end."""
    total = len(hidden)
    if not linear.onednn_serves(hidden) or row_bucket(total) == total:
        return hidden, cu_seqlens
    extra = row_bucket(total) - total
    tail = cu_seqlens[-1] + torch.arange(1, extra + 1, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    return F.pad(hidden, (0, 0, 0, extra)), torch.cat([cu_seqlens, tail])          # (bucket, H)


# ----------------------------------------------------------------------------- checkpoints

def config_from_dict(cls, raw: Mapping, path: Path):
    """The dataclass cls from a JSON object; keys cls does not have are ignored; a bad value -> CheckpointError
    naming path."""
    fields = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in raw.items() if k in fields})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from err


def fused_qkv(tensors: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    """The fused QKV projection's weight or bias from a checkpoint's separate query, key and value tensors."""
    return torch.cat([tensors[name] for name in names])


# ----------------------------------------------------------------------------- checks

def check_device(device) -> Optional[torch.device]:
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but torch sees no CUDA device")
    return device


def check_dtype(dtype) -> torch.dtype:
    dtype = dtype if dtype is not None else torch.float32
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16 (ctxkern's kernels), got {dtype}")
    return dtype


def check_ids(ids: Tensor, name: str, size: int) -> None:
    """Integer ids within the embedding table (an index out of range would fail deep inside torch.embedding)."""
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {ids.dtype}")
    # A meta tensor (shape inference, torch.device("meta") models) has no values to check.
    if ids.numel() and ids.device.type != "meta" and not (0 <= int(ids.min()) and int(ids.max()) < size):
        raise ValueError(f"{name} must lie in [0, {size}), got values from {int(ids.min())} to {int(ids.max())}")


def check_packed(cu_seqlens: Tensor, input_ids: Tensor, max_seqlen, max_positions: int) -> int:
    """ops' checks of cu_seqlens and max_seqlen (one wording), plus the position table's bound. -> max_seqlen."""
    check_cu_seqlens(cu_seqlens, "cu_seqlens", input_ids, "input_ids")
    max_seqlen = check_max_seqlen(max_seqlen, "max_seqlen")
    values = cu_seqlens_values(cu_seqlens)
    if values is not None:
        longest = check_offsets(values[0], "cu_seqlens", len(input_ids), "input_ids' length", max_seqlen)
        if longest > max_positions:
            raise ValueError(f"cu_seqlens holds a sequence of {longest} tokens, more than max_position_embeddings "
                             f"{max_positions}")
    return max_seqlen
