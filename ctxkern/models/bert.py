"""BERT in pure PyTorch on ctxkern's kernels: every LayerNorm, attention and pooling is a ctxkern op, so one
`backend=` picks the kernels of the whole model.

A padded batch can run padding-free: the real tokens are packed into one (T, H) sequence, attention runs per
sentence through `attention_varlen`, and the matrix products see no padding at all. That is the default
whenever a batch holds padding; its outputs equal the padded path's on every real token (padding positions of
last_hidden_state are zeros there, where Hugging Face's hold meaningless states).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ctxkern import _dispatch, nn
from ctxkern.models._checkpoint import CheckpointError, check_tensors, checkpoint_folder, read_json, read_weights
from ctxkern.models._linear import ACTIVATIONS, Linear
from ctxkern.models._transformer import (Attend, check_device, check_dtype, check_ids, check_packed,
                                         config_from_dict, fused_qkv, fused_qkv_attention, meta_skeleton, pack,
                                         packed_attention, pad_rows_for_onednn, padded_attention, unpack)


# ----------------------------------------------------------------------------- config

@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS or self.hidden_act is None:
            raise ValueError(f"hidden_act must be one of {', '.join(filter(None, ACTIVATIONS))}, "
                             f"got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path: Path) -> "BertConfig":
        """Hugging Face's config.json of a BERT model; keys this model does not use are ignored."""
        raw = read_json(path)
        if raw.get("model_type", "bert") != "bert":
            raise CheckpointError(f"{path}: model_type is {raw['model_type']!r}, not 'bert'")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(f"{path}: position_embedding_type {raw['position_embedding_type']!r} is not "
                                  "supported (only 'absolute')")
        return config_from_dict(cls, raw, path)

    @classmethod
    def preset(cls, name: str) -> "BertConfig":
        """The configuration of a known model by its Hugging Face name (PRESETS), e.g. to build a Bert to load
        weights into, or on the meta device to size one."""
        if name not in PRESETS:
            raise ValueError(f"unknown BERT preset {name!r}; known: {', '.join(PRESETS)}")
        return PRESETS[name]


PRESETS = {
    "bert-base-uncased": BertConfig(),
    "all-MiniLM-L6-v2": BertConfig(hidden_size=384, num_hidden_layers=6, intermediate_size=1536),
}


# ----------------------------------------------------------------------------- modules

class BertEmbeddings(torch.nn.Module):
    def __init__(self, config: BertConfig, backend: str) -> None:
        super().__init__()
        self.word_embeddings = torch.nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.position_embeddings = torch.nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = torch.nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, config.layer_norm_eps, backend=backend)
        self.dropout = torch.nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor, position_ids: Tensor) -> Tensor:
        # Any shape of ids (B, S) or packed (T,); the sum of the three is LayerNorm's fused residual add.
        others = self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(self.word_embeddings(input_ids), residual=others))


class BertLayer(torch.nn.Module):
    """Self-attention with one fused QKV projection, then the MLP; both sublayers end in a residual LayerNorm.

    `attend(q, k, v)` is the attention over whichever layout the hidden states are in: padded (B, S, H) with a
    key-padding mask, or packed (T, H) with cu_seqlens.
    """

    def __init__(self, config: BertConfig, backend: str) -> None:
        super().__init__()
        h = config.hidden_size
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.qkv = Linear(h, 3 * h)                            # rows: query, key, value (Hugging Face's three)
        self.attention_out = Linear(h, h)
        self.attention_norm = nn.LayerNorm(h, config.layer_norm_eps, backend=backend)
        self.intermediate = Linear(h, config.intermediate_size, activation=config.hidden_act)
        self.output = Linear(config.intermediate_size, h)
        self.output_norm = nn.LayerNorm(h, config.layer_norm_eps, backend=backend)
        self.dropout = torch.nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, attend: Attend) -> Tensor:
        context = fused_qkv_attention(self.qkv, x, self.heads, attend)   # (..., H)
        x = self.attention_norm(self.dropout(self.attention_out(context)), residual=x)
        return self.output_norm(self.dropout(self.output(self.intermediate(x))), residual=x)


class BertPooler(torch.nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)

    def forward(self, first_token: Tensor) -> Tensor:
        return torch.tanh(self.dense(first_token))


@dataclass
class BertOutput:
    last_hidden_state: Tensor              # (B, S, H)
    pooler_output: Optional[Tensor]        # (B, H); None for a checkpoint saved without a pooler


# ----------------------------------------------------------------------------- the model

class Bert(torch.nn.Module):
    """BERT's encoder. padding_free: None packs batches that hold padding (the faster path), True always,
    False never."""

    def __init__(self, config: BertConfig, *, backend: str = "auto", pooler: bool = True,
                 padding_free: Optional[bool] = None) -> None:
        super().__init__()
        self.config = config
        self.backend = _dispatch.check_choice(backend)
        self.padding_free = padding_free
        self.embeddings = BertEmbeddings(config, self.backend)
        self.layers = torch.nn.ModuleList(BertLayer(config, self.backend) for _ in range(config.num_hidden_layers))
        self.pooler = BertPooler(config) if pooler else None

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None) -> BertOutput:
        """input_ids (B, S); attention_mask (B, S), nonzero = token (Hugging Face's); token_type_ids (B, S)."""
        input_ids, mask, token_type_ids = self._check_inputs(input_ids, attention_mask, token_type_ids)
        b, s = input_ids.shape
        position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        if self._packs(mask):
            hidden = self._forward_unpadded(input_ids, mask, token_type_ids, position_ids)
        else:
            hidden = self.embeddings(input_ids, token_type_ids, position_ids)       # (B, S, H)
            attend = padded_attention(mask, self.backend)
            for layer in self.layers:
                hidden = layer(hidden, attend)
        pooled = self.pooler(hidden[:, 0]) if self.pooler is not None and s > 0 else None
        return BertOutput(hidden, pooled)

    def forward_packed(self, input_ids: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                       token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None) -> Tensor:
        """Packed sentences without padding: input_ids (T,); sentence b is rows cu_seqlens[b]:cu_seqlens[b+1]
        (int32, flash-attn's convention); position_ids (T,) default to each token's place in its sentence.
        -> last hidden states (T, H)."""
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be 1-D (T,) packed tokens, got shape {tuple(input_ids.shape)}")
        max_seqlen = check_packed(cu_seqlens, input_ids, max_seqlen, self.config.max_position_embeddings)
        self._check_ids(input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if position_ids is None:
            starts = cu_seqlens[:-1].long().repeat_interleave(cu_seqlens.diff().long(), output_size=len(input_ids))
            position_ids = torch.arange(len(input_ids), device=input_ids.device) - starts
        return self._run_packed(input_ids, cu_seqlens.to(torch.int32), max_seqlen, token_type_ids, position_ids)

    def _run_packed(self, input_ids, cu_seqlens, max_seqlen, token_type_ids, position_ids) -> Tensor:
        hidden = self.embeddings(input_ids, token_type_ids, position_ids)           # (T, H)
        total = len(hidden)
        if self.layers:
            hidden, cu_seqlens = pad_rows_for_onednn(hidden, cu_seqlens, self.layers[0].qkv)
        attend = packed_attention(cu_seqlens, max_seqlen, self.backend)
        for layer in self.layers:
            hidden = layer(hidden, attend)
        return hidden[:total]

    # -- helpers

    def _check_inputs(self, input_ids, attention_mask, token_type_ids):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, S), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {input_ids.shape[1]} positions, more than max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        self._check_ids(input_ids, token_type_ids=token_type_ids)
        mask = None if attention_mask is None else attention_mask != 0
        return input_ids, mask, torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids

    def _check_ids(self, input_ids: Tensor, **companions: Optional[Tensor]) -> None:
        """input_ids within the vocabulary; token_type_ids / position_ids of its shape and within their tables."""
        sizes = {"input_ids": self.config.vocab_size, "token_type_ids": self.config.type_vocab_size,
                 "position_ids": self.config.max_position_embeddings}
        check_ids(input_ids, "input_ids", sizes["input_ids"])
        for name, ids in companions.items():
            if ids is None:
                continue
            if ids.shape != input_ids.shape:
                raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(ids.shape)}")
            check_ids(ids, name, sizes[name])

    def _packs(self, mask: Optional[Tensor]) -> bool:
        if mask is None or self.padding_free is False or mask.numel() == 0:
            return False
        if mask.device.type == "meta":                # packing needs the mask's values: the padded path serves
            return False
        return bool(self.padding_free) or not bool(mask.all())

    def _forward_unpadded(self, input_ids, mask, token_type_ids, position_ids) -> Tensor:
        b, s = input_ids.shape
        index, cu_seqlens, max_seqlen = pack(mask)
        packed = self._run_packed(input_ids.flatten()[index], cu_seqlens, max_seqlen,
                                  token_type_ids.flatten()[index], position_ids.flatten()[index])
        return unpack(packed, index, b, s)                                            # (B, S, H)

    # -- loading

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=None, backend: str = "auto",
                        padding_free: Optional[bool] = None) -> "Bert":
        """A Hugging Face BERT folder: config.json and model.safetensors or pytorch_model.bin (possibly sharded;
        .bin is read with weights_only=True). Every tensor's name and shape is checked against config.json."""
        device = check_device(device)
        folder = checkpoint_folder(path)
        config = BertConfig.from_json(folder / "config.json")
        tensors, source = read_weights(folder)
        tensors, source = _strip_model_prefix(tensors, source)
        expected = hf_tensor_shapes(config, pooler=True)
        has_pooler = any(name.startswith("pooler.") for name in tensors)
        if not has_pooler:
            expected = {n: s for n, s in expected.items() if not n.startswith("pooler.")}
        check_tensors(expected, tensors, source, ignore=_ignorable)
        with meta_skeleton():
            model = cls(config, backend=backend, pooler=has_pooler, padding_free=padding_free)
        state = _from_hf_names(tensors, config, has_pooler)
        model.load_state_dict(state, assign=True)
        return model.to(device=device, dtype=check_dtype(dtype)).eval()


# ----------------------------------------------------------------------------- checkpoint names

def hf_tensor_shapes(config: BertConfig, *, pooler: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor of Hugging Face's BertModel and its shape."""
    h, i = config.hidden_size, config.intermediate_size
    shapes = {"embeddings.word_embeddings.weight": (config.vocab_size, h),
              "embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
              "embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
              "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,)}
    for n in range(config.num_hidden_layers):
        p = f"encoder.layer.{n}."
        for proj in ("query", "key", "value"):
            shapes[f"{p}attention.self.{proj}.weight"], shapes[f"{p}attention.self.{proj}.bias"] = (h, h), (h,)
        shapes |= {f"{p}attention.output.dense.weight": (h, h), f"{p}attention.output.dense.bias": (h,),
                   f"{p}attention.output.LayerNorm.weight": (h,), f"{p}attention.output.LayerNorm.bias": (h,),
                   f"{p}intermediate.dense.weight": (i, h), f"{p}intermediate.dense.bias": (i,),
                   f"{p}output.dense.weight": (h, i), f"{p}output.dense.bias": (h,),
                   f"{p}output.LayerNorm.weight": (h,), f"{p}output.LayerNorm.bias": (h,)}
    if pooler:
        shapes |= {"pooler.dense.weight": (h, h), "pooler.dense.bias": (h,)}
    return shapes


def _ignorable(name: str) -> bool:
    # A buffer older checkpoints saved, and task heads of BertFor* models (whose encoder sits under "bert.").
    return name == "embeddings.position_ids" or name.startswith("__head__.")


def _strip_model_prefix(tensors: dict, source: dict) -> tuple[dict, dict]:
    """BertFor* checkpoints keep the encoder under "bert." and heads beside it; older ones name LayerNorm's
    parameters gamma and beta."""
    def rename(name: str) -> str:
        if any(k.startswith("bert.") for k in tensors):
            name = name.removeprefix("bert.") if name.startswith("bert.") else f"__head__.{name}"
        return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")

    return {rename(k): v for k, v in tensors.items()}, {rename(k): v for k, v in source.items()}


def _from_hf_names(tensors: dict, config: BertConfig, pooler: bool) -> dict[str, Tensor]:
    """Hugging Face's tensor names -> this model's state_dict (query, key and value concatenated)."""
    state = {f"embeddings.{k}": tensors[f"embeddings.{k}"] for k in (
        "word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
        "LayerNorm.weight", "LayerNorm.bias")}
    for n in range(config.num_hidden_layers):
        hf, ours = f"encoder.layer.{n}.", f"layers.{n}."
        for kind in ("weight", "bias"):
            state[f"{ours}qkv.{kind}"] = fused_qkv(tensors, [f"{hf}attention.self.{p}.{kind}"
                                                             for p in ("query", "key", "value")])
            for theirs, mine in (("attention.output.dense", "attention_out"),
                                 ("attention.output.LayerNorm", "attention_norm"),
                                 ("intermediate.dense", "intermediate"), ("output.dense", "output"),
                                 ("output.LayerNorm", "output_norm")):
                state[f"{ours}{mine}.{kind}"] = tensors[f"{hf}{theirs}.{kind}"]
    if pooler:
        state |= {"pooler.dense.weight": tensors["pooler.dense.weight"],
                  "pooler.dense.bias": tensors["pooler.dense.bias"]}
    return state
