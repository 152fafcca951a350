"""Patching a transformers CLIP model (CLIPModel, CLIPTextModel, CLIPVisionModel, anything holding CLIP encoder
layers) in place: attention through the "ctxkern" implementation (the text tower's causal attention with its
padding included), every LayerNorm through ctxkern, and in each encoder layer the residual add before
layer_norm2 fused into it (ops.layer_norm's prenorm=True returns the sum the layer goes on with). The add after
the MLP feeds the next layer's layer_norm1 across the module boundary, so it stays a plain add."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from ctxkern import nn, ops
from ctxkern.integrations._transformers import swap_layer_norms, use_ctxkern_attention


def has_clip_layers(model: torch.nn.Module) -> bool:
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    return any(isinstance(m, CLIPEncoderLayer) for m in model.modules())


def _clip_layer_forward(layer, hidden_states: Tensor, attention_mask, **kwargs) -> Tensor:
    """CLIPEncoderLayer.forward with the add before layer_norm2 inside the LayerNorm."""
    norm = layer.layer_norm2
    attended, _ = layer.self_attn(hidden_states=layer.layer_norm1(hidden_states), attention_mask=attention_mask,
                                  **kwargs)
    if norm.weight is not None and norm.weight.dtype != attended.dtype:         # mixed precision: as before
        hidden_states = hidden_states + attended
        return hidden_states + layer.mlp(norm(hidden_states))
    y, hidden_states = ops.layer_norm(attended, norm.weight, norm.bias, norm.eps, residual=hidden_states,
                                      prenorm=True, backend=norm.backend)
    return hidden_states + layer.mlp(y)


def patch_clip(model: torch.nn.Module, backend: str) -> None:
    from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoderLayer, CLIPTextModel

    use_ctxkern_attention(model, backend, (CLIPAttention,))
    # The text tower's attention is causal: the kernel computes it, with its padding, exactly.
    for text in (m for m in model.modules() if isinstance(m, CLIPTextModel)):
        for module in text.modules():
            if isinstance(module, CLIPAttention):
                module.ctxkern_causal_kernel = True
    swap_layer_norms(model, backend)
    for module in model.modules():
        # Exact class only: a subclass may have changed forward. A partial, so the model still pickles.
        if type(module) is CLIPEncoderLayer and isinstance(module.layer_norm2, nn.LayerNorm):
            module.forward = functools.partial(_clip_layer_forward, module)
