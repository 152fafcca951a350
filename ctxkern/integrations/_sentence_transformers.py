"""Patching a sentence-transformers model in place: its BERT model, and mean pooling through ops.masked_mean_pool.

A Normalize after the Pooling is left as it is rather than folded into the pooling kernel (normalize=True):
it costs one pass over the (B, D) embeddings, next to nothing beside the encoder, while removing or emptying it
would change the module list that SentenceTransformer.save() writes to modules.json.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from ctxkern import ops
from ctxkern.integrations._transformers import has_bert_layers, patch_bert


def _kernel_pools(pooling, features: dict[str, Any]) -> bool:
    """Whether the features are plain mean pooling over the attention mask: not another mode, no prompt tokens
    to leave out, no token weights, a mask that matches the tokens (else Pooling's own forward does the rest)."""
    if pooling.pooling_mode != "mean" or "token_weights_sum" in features:
        return False
    if not pooling.include_prompt and "prompt_length" in features:
        return False
    if "cu_seq_lens_q" in features:
        return True
    mask = features.get("attention_mask")
    return mask is not None and mask.shape == features["token_embeddings"].shape[:-1]


def _mean_pooling_forward(pooling, backend: str, features: dict[str, Any], **kwargs) -> dict[str, Any]:
    if not _kernel_pools(pooling, features):
        return type(pooling).forward(pooling, features, **kwargs)
    tokens = features["token_embeddings"]
    if "cu_seq_lens_q" in features:
        # Padding-free (flash-attention) batches: every sequence packed into one row, (1, total, D).
        embedding = ops.masked_mean_pool_varlen(tokens.squeeze(0), features["cu_seq_lens_q"], backend=backend)
    else:
        embedding = ops.masked_mean_pool(tokens, features["attention_mask"], backend=backend)
    features["sentence_embedding"] = embedding
    return features


def _patch_mean_pooling(model: torch.nn.Module, backend: str) -> None:
    from sentence_transformers.sentence_transformer.modules import Pooling

    for module in model.modules():
        if type(module) is Pooling and module.pooling_mode == "mean":
            # A partial rather than a bound method, so the patched module still pickles; the class is unchanged,
            # so save() writes the same modules.json as before.
            module.forward = functools.partial(_mean_pooling_forward, module, backend)


def patch_sentence_transformer(model, backend: str) -> None:
    first = model[0] if len(model) else None
    if first is None or not has_bert_layers(first):
        raise TypeError("model must be a SentenceTransformer whose first module wraps a transformers BERT model; "
                        f"its first module is {type(first).__name__}")
    patch_bert(first, backend)
    _patch_mean_pooling(model, backend)
