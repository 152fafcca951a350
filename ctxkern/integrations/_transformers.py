"""Patching a transformers BERT model in place: attention, LayerNorm and the residual add before it."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from ctxkern import nn
from ctxkern.integrations import _attention


def has_bert_layers(model: torch.nn.Module) -> bool:
    from transformers.models.bert.modeling_bert import BertLayer

    return any(isinstance(m, BertLayer) for m in model.modules())


def use_ctxkern_attention(model: torch.nn.Module, backend: str, attention_classes: tuple = ()) -> None:
    """Every transformers model in `model` on the "ctxkern" attention; each module of attention_classes (default:
    BERT's) carries the backend."""
    from transformers import PreTrainedModel
    from transformers.models.bert.modeling_bert import BertCrossAttention, BertSelfAttention

    attention_classes = attention_classes or (BertSelfAttention, BertCrossAttention)
    _attention.register()
    # The model itself or, for a module that wraps one (sentence-transformers' Transformer), the models inside;
    # set_attn_implementation reaches a model's own submodels.
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.set_attn_implementation(_attention.ATTN_IMPLEMENTATION)
    # The registry's function is global; each attention module carries the backend it should use.
    for module in model.modules():
        if isinstance(module, attention_classes):
            module.ctxkern_backend = backend


def _as_ctxkern_layer_norm(ln: torch.nn.LayerNorm, backend: str) -> nn.LayerNorm:
    """A ctxkern LayerNorm holding ln's own parameters (the same tensors: no copy, same device and dtype)."""
    new = nn.LayerNorm(ln.normalized_shape, ln.eps, ln.elementwise_affine, ln.bias is not None, device="meta",
                       backend=backend)
    new.weight, new.bias = ln.weight, ln.bias
    return new.train(ln.training)


def swap_layer_norms(model: torch.nn.Module, backend: str) -> None:
    """Every torch.nn.LayerNorm (exactly that class: a subclass may compute something else) -> nn.LayerNorm;
    a ctxkern one already there gets the requested backend."""
    replacements: dict[int, nn.LayerNorm] = {}  # a module shared by several parents is replaced once
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                child.backend = backend
            elif type(child) is torch.nn.LayerNorm:
                if id(child) not in replacements:
                    replacements[id(child)] = _as_ctxkern_layer_norm(child, backend)
                setattr(parent, name, replacements[id(child)])


def _residual_layer_norm_forward(module, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
    """BertSelfOutput / BertOutput: LayerNorm(dropout(dense(h)) + input_tensor), the add done in the kernel."""
    return module.LayerNorm(module.dropout(module.dense(hidden_states)), residual=input_tensor)


def _fuse_residual_adds(model: torch.nn.Module) -> None:
    from transformers.models.bert.modeling_bert import BertOutput, BertSelfOutput

    for module in model.modules():
        # Exact classes only: a subclass may have changed forward.
        if type(module) in (BertSelfOutput, BertOutput) and isinstance(module.LayerNorm, nn.LayerNorm):
            # A partial rather than a bound method, so the patched module still pickles.
            module.forward = functools.partial(_residual_layer_norm_forward, module)


def patch_bert(model: torch.nn.Module, backend: str) -> None:
    use_ctxkern_attention(model, backend)
    swap_layer_norms(model, backend)
    _fuse_residual_adds(model)
