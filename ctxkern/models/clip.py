"""CLIP in pure PyTorch on ctxkern's kernels: a text tower (causal pre-LN blocks, EOS pooling) and a vision tower
(a ViT: patch convolution, class token, pre-LN blocks), projected into one embedding space. Every attention and
LayerNorm is a ctxkern op, so one `backend=` picks the kernels of the whole model; each pre-LN residual add is
fused into the LayerNorm after it (ops.layer_norm's prenorm=True returns the sum the residual stream carries).

Only the pooled row of each tower is an output, and the work is cut to what reaches it:
- text: causal attention never lets a token after the pooled (EOS) one reach it, so each prompt runs packed up
  to its pooled token (attention_varlen, causal): no padding, no tokens past EOS;
- both towers: the last block computes its queries, MLP and final LayerNorm for the pooled row alone (its keys
  and values still come from every token).

Checkpoints: a Hugging Face folder (CLIPModel.save_pretrained) or an open_clip folder (open_clip_config.json and
open_clip's state dict names); models/_clip_checkpoint.py reads both. Tokenizing and image preprocessing:
models/_clip_inputs.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ctxkern import _dispatch, nn, ops
from ctxkern.models._linear import ACTIVATIONS, Linear
from ctxkern.models._prompt_tree import prompt_tree
from ctxkern.models._transformer import (Attend, Mlp, SelfAttention, check_ids, pad_rows_for_onednn,
                                         padded_attention)

# The templates of CLIP's zero-shot evaluation most often used on their own (a subset of OpenAI's 80 ImageNet
# prompts); the embeddings of a label's prompts are averaged.
DEFAULT_TEMPLATES = ("a photo of a {}.", "a bad photo of a {}.", "a photo of the large {}.",
                     "a photo of the small {}.", "a cropped photo of a {}.", "a close-up photo of a {}.",
                     "a bright photo of a {}.", "a good photo of a {}.", "a rendering of a {}.",
                     "a drawing of a {}.", "art of the {}.", "a sculpture of a {}.")


# ----------------------------------------------------------------------------- config

def _check_tower(name: str, hidden: int, heads: int, act: str) -> None:
    if act not in ACTIVATIONS or act is None:
        raise ValueError(f"{name} hidden_act must be one of {', '.join(filter(None, ACTIVATIONS))}, got {act!r}")
    if heads <= 0 or hidden % heads:
        raise ValueError(f"{name} hidden_size {hidden} must be a multiple of num_attention_heads {heads}")


@dataclass(frozen=True)
class ClipTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    # The pooled token: "argmax" (the largest id, the EOS of OpenAI's vocabulary; open_clip, and Hugging Face
    # configs whose eos_token_id is the old placeholder 2) or "first_eos" (the first eos_token_id).
    pooling: str = "first_eos"

    def __post_init__(self) -> None:
        _check_tower("text", self.hidden_size, self.num_attention_heads, self.hidden_act)
        if self.pooling not in ("argmax", "first_eos"):
            raise ValueError(f"pooling must be 'argmax' or 'first_eos', got {self.pooling!r}")


@dataclass(frozen=True)
class ClipVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _check_tower("vision", self.hidden_size, self.num_attention_heads, self.hidden_act)
        if not (isinstance(self.image_size, int) and isinstance(self.patch_size, int)
                and 0 < self.patch_size <= self.image_size):
            raise ValueError(f"image_size {self.image_size!r} and patch_size {self.patch_size!r} must be integers, "
                             "0 < patch_size <= image_size")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class ClipConfig:
    text: ClipTextConfig = field(default_factory=ClipTextConfig)
    vision: ClipVisionConfig = field(default_factory=ClipVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592


# OpenAI's ViT-B/32 and ViT-B/16 (openai/clip-vit-base-patch32 / -patch16): the benchmark's sizes.
PRESETS = {"ViT-B/32": ClipConfig(), "ViT-B/16": ClipConfig(vision=ClipVisionConfig(patch_size=16))}


# ----------------------------------------------------------------------------- modules

class ClipBlock(torch.nn.Module):
    """Pre-LN: x + attn(LN1(x)), then + mlp(LN2(.)). The stream is carried as (residual, delta), the sum not yet
    formed, so that each add happens inside the LayerNorm that follows it (one pass instead of two)."""

    def __init__(self, hidden: int, heads: int, intermediate: int, act: str, eps: float, backend: str) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden, eps, backend=backend)
        self.attention = SelfAttention(hidden, heads)
        self.layer_norm2 = nn.LayerNorm(hidden, eps, backend=backend)
        self.mlp = Mlp(hidden, intermediate, act)

    def forward(self, residual: Tensor, delta: Optional[Tensor], attend: Attend) -> tuple[Tensor, Tensor]:
        y, residual = add_norm(self.layer_norm1, residual, delta)
        y, residual = add_norm(self.layer_norm2, residual, self.attention(y, attend))
        return residual, self.mlp(y)

    def forward_rows(self, residual: Tensor, delta: Optional[Tensor], pick: Callable[[Tensor], Tensor],
                     attend: Attend) -> tuple[Tensor, Tensor]:
        """The block's output at the rows pick() selects only: keys and values from every row, queries, the MLP
        and the residual from the picked ones."""
        y, residual = add_norm(self.layer_norm1, residual, delta)
        q, k, v = self.attention.qkv(y).unflatten(-1, (3, self.attention.heads, -1)).unbind(-3)
        context = attend(pick(q), k, v).flatten(-2)                           # (picked..., H)
        y, residual = add_norm(self.layer_norm2, pick(residual), self.attention.out(context))
        return residual, self.mlp(y)


def add_norm(norm: nn.LayerNorm, residual: Tensor, delta: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(norm(residual + delta), residual + delta), fused; delta None: (norm(residual), residual)."""
    if delta is None:
        return norm(residual), residual
    return ops.layer_norm(delta, norm.weight, norm.bias, norm.eps, residual=residual, prenorm=True,
                          backend=norm.backend)


class ClipTextTower(torch.nn.Module):
    def __init__(self, config: ClipTextConfig, backend: str) -> None:
        super().__init__()
        c = config
        self.config, self.backend = c, backend
        self.token_embedding = torch.nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = torch.nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.layers = torch.nn.ModuleList(
            ClipBlock(c.hidden_size, c.num_attention_heads, c.intermediate_size, c.hidden_act, c.layer_norm_eps,
                      backend) for _ in range(c.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, c.layer_norm_eps, backend=backend)

    def pooled_positions(self, input_ids: Tensor) -> Tensor:
        """(B,) the pooled token of each row, by transformers' rule (int32 comparison and argmax, whose ties go
        to the first position: the first EOS, or the first of the largest ids)."""
        ids = input_ids.to(torch.int32)
        if self.config.pooling == "argmax":
            return ids.argmax(-1)
        return (ids == self.config.eos_token_id).int().argmax(-1)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """input_ids (B, S), attention_mask (B, S) or None -> the final-LayerNormed pooled states (B, W)."""
        b = input_ids.shape[0]
        if b == 0 or input_ids.shape[1] == 0:
            return self.token_embedding.weight.new_zeros(b, self.config.hidden_size)
        pooled = self.pooled_positions(input_ids)                                      # (B,)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        upto_pooled = positions <= pooled[:, None]                                     # (B, S)
        if attention_mask is None or bool((attention_mask != 0)[upto_pooled].all()):
            return self._packed(input_ids, upto_pooled)
        return self._padded(input_ids, attention_mask != 0, pooled)

    def _packed(self, input_ids: Tensor, upto_pooled: Tensor) -> Tensor:
        """Each row's tokens up to its pooled one, a prefix the rows share computed once (models/_prompt_tree.py):
        exact, as causal attention lets neither a later token nor another prompt reach the pooled one."""
        tree = prompt_tree(input_ids, upto_pooled.sum(1))
        residual, delta = self.position_embedding(tree.positions), self.token_embedding(tree.tokens)  # (N, W)
        total = len(residual)
        if len(self.layers) > 1:
            # The padded rows (oneDNN's row count) attend to themselves alone; the last block reads rows :N.
            residual, _ = pad_rows_for_onednn(residual, tree.cu_seqlens_q, self.layers[0].attention.qkv)
            delta = F.pad(delta, (0, 0, 0, len(residual) - total))
            attend = tree.with_rows(len(residual)).attend_segments(self.backend)
            for layer in self.layers[:-1]:
                residual, delta = layer(residual, delta, attend)
            residual, delta = residual[:total], delta[:total]
        if self.layers:
            residual, delta = self.layers[-1].forward_rows(residual, delta, lambda t: t[tree.pooled],
                                                           tree.attend_pooled(self.backend))
        else:
            residual, delta = residual[tree.pooled], delta[tree.pooled]
        return ops.layer_norm(delta, self.final_layer_norm.weight, self.final_layer_norm.bias,
                              self.final_layer_norm.eps, residual=residual, backend=self.backend)

    def _padded(self, input_ids: Tensor, mask: Tensor, pooled: Tensor) -> Tensor:
        """A mask with padding before a pooled token (left padding): causal attention with the key-padding mask,
        trimmed to the last pooled token."""
        s = int(pooled.max()) + 1
        input_ids, mask = input_ids[:, :s], mask[:, :s]                                 # (B, s)
        positions = torch.arange(s, device=input_ids.device)
        residual, delta = self.position_embedding(positions).expand(len(input_ids), s, -1), \
            self.token_embedding(input_ids)                                            # (B, s, W)
        attend = padded_attention(mask, self.backend, causal=True)
        for layer in self.layers[:-1]:
            residual, delta = layer(residual, delta, attend)
        rows = torch.arange(len(input_ids), device=input_ids.device)

        def pick(t):                                                                   # (B, s, ...) -> (B, 1, ...)
            return t[rows, pooled].unsqueeze(1)

        last_mask = mask & (positions <= pooled[:, None])                              # the pooled query's keys
        if self.layers:
            residual, delta = self.layers[-1].forward_rows(residual, delta, pick,
                                                           padded_attention(last_mask, self.backend))
        else:
            residual, delta = pick(residual), pick(delta)
        return ops.layer_norm(delta[:, 0], self.final_layer_norm.weight, self.final_layer_norm.bias,
                              self.final_layer_norm.eps, residual=residual[:, 0], backend=self.backend)


class ClipVisionTower(torch.nn.Module):
    def __init__(self, config: ClipVisionConfig, backend: str) -> None:
        super().__init__()
        c = config
        self.config, self.backend = c, backend
        self.patch_embedding = torch.nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size,
                                               bias=False)
        self.class_embedding = torch.nn.Parameter(torch.randn(c.hidden_size) * c.hidden_size ** -0.5)  # HF's init
        self.position_embedding = torch.nn.Embedding(c.num_positions, c.hidden_size)
        self.pre_layernorm = nn.LayerNorm(c.hidden_size, c.layer_norm_eps, backend=backend)
        self.layers = torch.nn.ModuleList(
            ClipBlock(c.hidden_size, c.num_attention_heads, c.intermediate_size, c.hidden_act, c.layer_norm_eps,
                      backend) for _ in range(c.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(c.hidden_size, c.layer_norm_eps, backend=backend)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values (B, C, image_size, image_size) -> the post-LayerNormed class-token states (B, W)."""
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, W, g, g)
        patches = patches.flatten(2).transpose(1, 2)                                        # (B, g*g, W)
        cls = self.class_embedding.expand(len(patches), 1, -1)                               # (B, 1, W)
        x = self.pre_layernorm(torch.cat([cls, patches], 1), residual=self.position_embedding.weight.expand(
            len(patches), -1, -1))                                                           # (B, S, W)
        residual, delta = x, None
        attend = padded_attention(None, self.backend)
        for layer in self.layers[:-1]:
            residual, delta = layer(residual, delta, attend)
        if self.layers:
            residual, delta = self.layers[-1].forward_rows(residual, delta, lambda t: t[:, :1], attend)
            residual, delta = residual[:, 0], delta[:, 0]                                    # (B, W)
            return ops.layer_norm(delta, self.post_layernorm.weight, self.post_layernorm.bias,
                                  self.post_layernorm.eps, residual=residual, backend=self.backend)
        return self.post_layernorm(residual[:, 0])


@dataclass
class ClipOutput:
    logits_per_image: Tensor       # (N_images, N_texts), scaled cosine similarities
    logits_per_text: Tensor        # (N_texts, N_images)
    text_embeds: Tensor            # (N_texts, E), L2-normalized
    image_embeds: Tensor           # (N_images, E), L2-normalized


# ----------------------------------------------------------------------------- the model

class Clip(torch.nn.Module):
    """CLIP's two towers, their projections and logit_scale. tokenizer and preprocessor come with
    from_pretrained (they are what the folder ships); tokenize(), preprocess() and the encode helpers need them."""

    def __init__(self, config: ClipConfig, *, backend: str = "auto", tokenizer=None, preprocessor=None) -> None:
        super().__init__()
        self.config = config
        self.backend = _dispatch.check_choice(backend)
        self.text = ClipTextTower(config.text, self.backend)
        self.vision = ClipVisionTower(config.vision, self.backend)
        self.text_projection = Linear(config.text.hidden_size, config.projection_dim, bias=False)
        self.visual_projection = Linear(config.vision.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.tokenizer, self.preprocessor = tokenizer, preprocessor

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    # -- features

    def get_text_features(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """input_ids (B, S), padded with an attention_mask (Hugging Face) or 77 ids padded with 0 and no mask
        (open_clip) -> projected, unnormalized (B, E), as transformers' CLIPModel.get_text_features."""
        self._check_text(input_ids, attention_mask)
        return self.text_projection(self.text(input_ids, attention_mask))

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        """pixel_values (B, C, image_size, image_size) -> projected, unnormalized (B, E)."""
        c = self.config.vision
        expected = (c.num_channels, c.image_size, c.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must be (B, {', '.join(map(str, expected))}) for this model, got "
                             f"shape {tuple(pixel_values.shape)} (clip.preprocess(images) makes them)")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be floating point, got {pixel_values.dtype}")
        return self.visual_projection(self.vision(pixel_values))

    def forward(self, input_ids: Tensor, pixel_values: Tensor, attention_mask: Optional[Tensor] = None
                ) -> ClipOutput:
        text = F.normalize(self.get_text_features(input_ids, attention_mask), dim=-1)
        image = F.normalize(self.get_image_features(pixel_values), dim=-1)
        logits_per_text = self.logit_scale.exp() * text @ image.T                     # (N_texts, N_images)
        return ClipOutput(logits_per_text.T, logits_per_text, text, image)

    def _check_text(self, input_ids: Tensor, attention_mask: Optional[Tensor]) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, S), got shape {tuple(input_ids.shape)}")
        limit = self.config.text.max_position_embeddings
        if input_ids.shape[1] > limit:
            raise ValueError(f"input_ids has {input_ids.shape[1]} positions, more than the text tower's context "
                             f"{limit} (clip.tokenize truncates to it)")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        check_ids(input_ids, "input_ids", self.config.text.vocab_size)

    # -- text and images in

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """The folder's tokenizer, truncated to the context (77): Hugging Face folders pad to the longest text
        (with an attention_mask), open_clip folders to 77 ids with 0 (its convention; the mask is all ones where
        the ids are real, given for symmetry)."""
        return self._inputs("tokenizer").tokenize(texts, device=self.device)

    def preprocess(self, images) -> Tensor:
        """PIL images or paths -> pixel_values (N, C, H, W) float32 on the model's device."""
        return self._inputs("preprocessor").preprocess(images).to(self.device)

    def _inputs(self, what: str):
        value = getattr(self, what)
        if value is None:
            raise RuntimeError(f"this Clip has no {what}: build it with Clip.from_pretrained(folder), whose "
                               "tokenizer files and preprocessing config it reads")
        return value

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        """L2-normalized text embeddings, float32 (N, E)."""
        texts = _check_list(texts, "texts", str)
        batch_size = _check_batch_size(batch_size)
        out = [F.normalize(self.get_text_features(**self.tokenize(texts[i:i + batch_size])).float(), dim=-1)
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.config.projection_dim, device=self.device)

    @torch.inference_mode()
    def encode_image(self, images, batch_size: int = 64) -> Tensor:
        """L2-normalized image embeddings, float32 (N, E); images: PIL images or paths."""
        images = _check_list(images, "images", None)
        batch_size = _check_batch_size(batch_size)
        dtype = self.logit_scale.dtype
        out = [F.normalize(self.get_image_features(self.preprocess(images[i:i + batch_size]).to(dtype)).float(),
                           dim=-1) for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.config.projection_dim, device=self.device)

    @torch.inference_mode()
    def zero_shot(self, images, labels: Sequence[str], templates: Optional[Sequence[str]] = None,
                  batch_size: int = 64) -> Tensor:
        """Zero-shot classification: probabilities (N_images, N_labels), softmax over the labels of the scaled
        similarity of each image to each label's mean prompt embedding (templates: format strings with one {},
        default DEFAULT_TEMPLATES)."""
        labels = _check_list(labels, "labels", str)
        if not labels:
            raise ValueError("labels must name at least one class")
        templates = DEFAULT_TEMPLATES if templates is None else _check_list(templates, "templates", str)
        if not templates or any("{}" not in t for t in templates):
            raise ValueError("templates must be format strings with one {} for the label, e.g. 'a photo of a {}.'")
        prompts = [t.format(label) for label in labels for t in templates]
        text = self.encode_text(prompts).view(len(labels), len(templates), -1).mean(1)   # (N_labels, E)
        text = F.normalize(text, dim=-1)
        image = self.encode_image(images, batch_size)
        return (self.logit_scale.exp().float() * image @ text.T).softmax(-1)

    # -- loading

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=None, backend: str = "auto") -> "Clip":
        """A Hugging Face CLIP folder (config.json, model.safetensors or pytorch_model.bin, tokenizer files,
        preprocessor_config.json) or an open_clip folder (open_clip_config.json, open_clip_model.safetensors or
        open_clip_pytorch_model.bin). Every tensor's name and shape is checked against the config."""
        from ctxkern.models._clip_checkpoint import load

        return load(cls, Path(path), device=device, dtype=dtype, backend=backend)


def _check_list(items, name: str, kind) -> list:
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        items = [items] if kind is None and not isinstance(items, bytes) else items
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise ValueError(f"{name} must be a list, got {type(items).__name__}")
    if kind is not None and not all(isinstance(x, kind) for x in items):
        raise ValueError(f"{name} must be a list of {kind.__name__}")
    return list(items)


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size
