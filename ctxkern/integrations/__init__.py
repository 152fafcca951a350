"""Put ctxkern's kernels inside existing Hugging Face transformers and sentence-transformers models, in place.

    from ctxkern import integrations
    model = integrations.patch(model, backend="auto")

transformers BERT models (BertModel, BertFor*, anything holding BertLayers): attention through the "ctxkern"
attention implementation (ops.attention with HF's padding mask as key_padding_mask), every torch.nn.LayerNorm
-> ctxkern.nn.LayerNorm on the same parameters, the residual add before each encoder LayerNorm fused into it.
sentence-transformers models whose first module wraps a BERT model: the same, plus mean-mode Pooling through
ops.masked_mean_pool. transformers CLIP models (CLIPModel, CLIPTextModel, CLIPVisionModel, ...): attention
through "ctxkern" (the text tower's causal attention with its padding too), LayerNorms through ctxkern, the add
before each layer's second LayerNorm fused into it. Neither library is imported until patch() needs it.
"""
from __future__ import annotations

import torch

from ctxkern import _dispatch

__all__ = ["patch"]


def _is_sentence_transformer(model: object) -> bool:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return False
    return isinstance(model, SentenceTransformer)


def _is_transformers_bert(model: object) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    from ctxkern.integrations._transformers import has_bert_layers

    return isinstance(model, PreTrainedModel) and has_bert_layers(model)


def _is_transformers_clip(model: object) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    from ctxkern.integrations._clip import has_clip_layers

    return isinstance(model, PreTrainedModel) and has_clip_layers(model)


def patch(model: torch.nn.Module, *, backend: str = "auto") -> torch.nn.Module:
    """Patches model in place and returns it; patching again (with any backend) is harmless.

    model: a transformers model with BERT or CLIP layers, or a sentence-transformers SentenceTransformer whose
    first module wraps a BERT model. Anything else raises TypeError. backend: "auto", "torch", "cpu", "cuda" or "triton".
    Outputs match the unpatched model's; what the kernels cannot compute exactly (causal or structured masks,
    attention dropout while training, other pooling modes) still runs as before.
    """
    backend = _dispatch.check_choice(backend)
    if _is_sentence_transformer(model):
        from ctxkern.integrations._sentence_transformers import patch_sentence_transformer

        patch_sentence_transformer(model, backend)
    elif _is_transformers_bert(model):
        from ctxkern.integrations._transformers import patch_bert

        patch_bert(model, backend)
    elif _is_transformers_clip(model):
        from ctxkern.integrations._clip import patch_clip

        patch_clip(model, backend)
    else:
        raise TypeError("model must be a transformers model with BERT or CLIP layers (e.g. BertModel, "
                        "CLIPModel) or a "
                        "sentence-transformers SentenceTransformer wrapping one, got "
                        f"{type(model).__module__}.{type(model).__qualname__}")
    return model
