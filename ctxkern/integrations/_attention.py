"""The "ctxkern" attention implementation for transformers' attention registry.

transformers builds each model's attention mask through the mask function registered under the model's
`config._attn_implementation`, then calls the attention function registered under the same name. Both are
registered here: the mask function hands the attention function HF's (B, Sk) padding mask as it is, which is
exactly ops.attention's key_padding_mask, instead of expanding it to (B, 1, Sq, Sk). A module marked
`ctxkern_causal_kernel` (CLIP's text attention, marked by the CLIP patch) also runs causal attention on the kernel:
its causal mask (SDPA's 4-D bool mask, or None) is checked to be exactly causal-and-key-padding and passed as
causal=True with that padding. Anything ops.attention cannot compute exactly (another causal or structured mask,
attention dropout while training, grouped key/value heads, an unsupported dtype or head dim) goes to
transformers' SDPA function with an SDPA mask, so the patched model never gives a different result, only
sometimes not a faster one.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ctxkern import _dispatch, ops
from ctxkern.ops._checks import FLOAT_DTYPES
from ctxkern.ops.attention import supports_head_dim

ATTN_IMPLEMENTATION = "ctxkern"


def ctxkern_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function=None, attention_mask: Optional[Tensor] = None, **kwargs) -> Optional[Tensor]:
    """Plain bidirectional attention (BERT's encoder): the (B, Sk) bool padding mask, or None for no padding.
    Any other pattern: SDPA's 4-D bool mask, which ctxkern_attention passes on to SDPA."""
    from transformers.masking_utils import bidirectional_mask_function, sdpa_mask

    if mask_function is bidirectional_mask_function and (attention_mask is None
                                                          or attention_mask.shape[-1] == kv_length):
        return attention_mask
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)


def _attend(mask: Tensor) -> Optional[Tensor]:
    """A bool (True = attend) or additive float (0 = attend, the dtype's most negative value = masked) mask as
    bool; None for an additive mask with other biases."""
    if mask.dtype == torch.bool:
        return mask
    attend = mask == 0
    masked = mask <= torch.finfo(mask.dtype).min / 2
    return attend if bool((attend | masked).all()) else None


def _causal_padding_rows(mask: Tensor) -> Optional[Tensor]:
    """A 4-D mask (B or 1, 1, Sq, Sk) that is exactly causal (query i sees keys j <= i + Sk - Sq) and key
    padding, as that (B, Sk) padding; None for anything else (e.g. rows SDPA's mask had to unmask)."""
    attend = _attend(mask)
    if attend is None or attend.shape[1] != 1:
        return None
    sq, sk = attend.shape[-2:]
    padding = attend[:, 0, -1, :]                                     # the last query sees every unpadded key
    causal = torch.ones(sq, sk, dtype=torch.bool, device=mask.device).tril(sk - sq)
    return padding if torch.equal(attend[:, 0], padding[:, None, :] & causal) else None


def _padding_rows(mask: Tensor) -> Optional[Tensor]:
    """A 4-D mask (B or 1, H or 1, Sq or 1, Sk), bool (True = attend) or additive float (0 = attend, the
    dtype's most negative value = masked), as the (B, Sk) bool key-padding mask it amounts to; None when it is
    more than key padding (rows that differ, or additive biases other than 0 and -inf)."""
    attend = _attend(mask)
    if attend is None:
        return None
    first_row = attend[:, :1, :1, :]
    if not bool((attend == first_row).all()):
        return None
    return first_row[:, 0, 0, :]


def _kernel_takes(query: Tensor, key: Tensor, value: Tensor, backend: str) -> bool:
    """Whether ops.attention computes these heads exactly as given (same head count for q and k/v, etc.)."""
    if query.dtype not in FLOAT_DTYPES or key.shape != value.shape or key.shape[1] != query.shape[1]:
        return False
    d = query.shape[-1]
    if d != key.shape[-1]:
        return False
    return supports_head_dim(d, _dispatch.resolve(backend, query.device))


def _sdpa_fallback(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.dim() == 2:
        attention_mask = attention_mask[:, None, None, :]  # (B, 1, 1, Sk): SDPA broadcasts over heads and queries
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _eager_fallback(module, query, key, value, attention_mask, causal: bool, dropout: float, scaling, **kwargs):
    """output_attentions=True: the probabilities are an output, and the kernels never form them; transformers'
    eager attention does, given its additive mask (0 = attend, the dtype's most negative value = masked)."""
    from transformers.models.bert.modeling_bert import eager_attention_forward

    if attention_mask is None and causal:
        sq, sk = query.shape[-2], key.shape[-2]
        attention_mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(sk - sq)
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            attention_mask = attention_mask[:, None, None, :]                 # (B, 1, 1, Sk)
        if not attention_mask.is_floating_point():
            attention_mask = torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(
                attention_mask == 0, torch.finfo(query.dtype).min)
    return eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                   **kwargs)


def ctxkern_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature: query (B, H, Sq, D), key and value (B, H, Sk, D); returns
    (output (B, Sq, H, D), None) as SDPA's function does (no attention probabilities are formed), or, when the
    call asks for output_attentions, eager attention's (output, probabilities (B, H, Sq, Sk))."""
    backend = getattr(module, "ctxkern_backend", "auto")
    # SDPA's rule: a module that does not say otherwise is causal.
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if kwargs.get("output_attentions"):
        return _eager_fallback(module, query, key, value, attention_mask, causal, dropout, scaling, **kwargs)
    causal_kernel = causal and getattr(module, "ctxkern_causal_kernel", False)
    key_padding_mask = attention_mask
    if attention_mask is not None and attention_mask.dim() == 4 and not causal:
        key_padding_mask = _padding_rows(attention_mask)
    elif attention_mask is not None and attention_mask.dim() == 4 and causal_kernel:
        key_padding_mask = _causal_padding_rows(attention_mask)
    if ((causal and not causal_kernel) or dropout != 0.0 or not _kernel_takes(query, key, value, backend)
            or (attention_mask is not None and (key_padding_mask is None or key_padding_mask.dim() != 2))):
        return _sdpa_fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                              is_causal=is_causal, **kwargs)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.expand(query.shape[0], key.shape[2])  # a (1, Sk) mask serves every row
    # (B, H, S, D) -> (B, S, H, D): transposed views, read in place by the kernel.
    out = ops.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                        key_padding_mask=key_padding_mask, causal=causal, scale=scaling, backend=backend)
    return out, None


def register() -> None:
    """Registers "ctxkern" with transformers' attention and mask registries (registering again is harmless)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, ctxkern_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ctxkern_mask)
