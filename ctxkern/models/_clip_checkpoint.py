"""Reading CLIP checkpoint folders into models.Clip: Hugging Face's (CLIPModel.save_pretrained) and open_clip's
(open_clip_config.json with model_cfg and preprocess_cfg; open_clip's state dict names: fused in_proj_weight,
(width, embed) projection matrices, positional_embedding parameters). Every tensor's name and shape is checked;
errors name the file and the tensor.

A name table maps each of our parameters to the checkpoint's tensor(s): a name (same shape), a list of three
(query, key and value concatenated into our fused QKV) or a transposed name; the checkpoint's expected shapes
are derived from our model's, built from the config on the meta device.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from torch import Tensor

from ctxkern.models._checkpoint import CheckpointError, check_tensors, read_json, read_weights
from ctxkern.models._clip_inputs import ClipPreprocessor, ClipTokenizer
from ctxkern.models._transformer import check_device, check_dtype, config_from_dict, fused_qkv, meta_skeleton
from ctxkern.models.clip import ClipConfig, ClipTextConfig, ClipVisionConfig

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class Transposed(str):
    """A checkpoint tensor stored as the transpose of our parameter (open_clip's x @ proj matrices)."""


Spec = Union[str, Transposed, list]     # the checkpoint's name, transposed name, or [query, key, value] names


# ----------------------------------------------------------------------------- configs

def hf_config(path: Path) -> ClipConfig:
    return hf_config_from_dict(read_json(path), path)


def hf_config_from_dict(raw: dict, path) -> ClipConfig:
    """A CLIPConfig's dict (config.json, or CLIPConfig.to_dict()); path names it in errors."""
    if raw.get("model_type") != "clip":
        raise CheckpointError(f"{path}: model_type is {raw.get('model_type')!r}, not 'clip' (a CLIPModel "
                              "checkpoint is expected)")
    text, vision = raw.get("text_config") or {}, raw.get("vision_config") or {}
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise CheckpointError(f"{path}: text_config and vision_config must be JSON objects")
    # transformers' rule: eos_token_id 2 is the placeholder of configs from before its fix, whose pooled token
    # is the largest id; any other id pools the first EOS.
    pooling = "argmax" if text.get("eos_token_id", ClipTextConfig.eos_token_id) == 2 else "first_eos"
    text_config = config_from_dict(ClipTextConfig, {**text, "pooling": pooling}, path)
    vision_config = config_from_dict(ClipVisionConfig, vision, path)
    return config_from_dict(ClipConfig, {**raw, "text": text_config, "vision": vision_config}, path)


# open_clip_config.json options this model does not implement, with the value it does.
_OPEN_CLIP_VISION_FIXED = {"timm_model_name": None, "ls_init_value": None, "attentional_pool": False,
                           "no_ln_pre": False, "final_ln_after_pool": False, "pool_type": "tok",
                           "pos_embed_type": "learnable", "global_average_pool": False, "act_kwargs": None,
                           "norm_kwargs": None, "input_patchnorm": False}
_OPEN_CLIP_TEXT_FIXED = {"hf_model_name": None, "ls_init_value": None, "pool_type": "argmax", "proj_bias": False,
                         "embed_cls": False, "no_causal_mask": False, "act_kwargs": None, "norm_kwargs": None,
                         "proj_type": "linear", "final_ln_after_pool": False}


def _reject_unsupported(cfg: dict, fixed: dict, path: Path, where: str) -> None:
    for key, value in fixed.items():
        if cfg.get(key, value) not in (value, {} if value is None else value):
            raise CheckpointError(f"{path}: {where}.{key} = {cfg[key]!r} is not supported (only {value!r})")


def open_clip_config(path: Path) -> tuple[ClipConfig, dict]:
    """(the model's config, preprocess_cfg) from open_clip_config.json, with open_clip's defaults."""
    raw = read_json(path)
    cfg = raw.get("model_cfg")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: no model_cfg object")
    if cfg.get("custom_text") or "text_cfg" not in cfg or "vision_cfg" not in cfg or "embed_dim" not in cfg:
        raise CheckpointError(f"{path}: model_cfg must hold embed_dim, vision_cfg and text_cfg of a standard CLIP "
                              "(custom or Hugging Face text towers are not supported)")
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    _reject_unsupported(v, _OPEN_CLIP_VISION_FIXED, path, "model_cfg.vision_cfg")
    _reject_unsupported(t, _OPEN_CLIP_TEXT_FIXED, path, "model_cfg.text_cfg")
    if not isinstance(v.get("layers", 12), int):
        raise CheckpointError(f"{path}: model_cfg.vision_cfg.layers {v['layers']!r} is a ResNet tower, which is not "
                              "supported (only a ViT)")
    act = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
    try:
        width, t_width = v.get("width", 768), t.get("width", 512)
        vision = ClipVisionConfig(hidden_size=width, intermediate_size=int(width * v.get("mlp_ratio", 4.0)),
                                  num_hidden_layers=v.get("layers", 12),
                                  num_attention_heads=width // v.get("head_width", 64),
                                  image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 16),
                                  hidden_act=act)
        text = ClipTextConfig(vocab_size=t.get("vocab_size", 49408), hidden_size=t_width,
                              intermediate_size=int(t_width * t.get("mlp_ratio", 4.0)),
                              num_hidden_layers=t.get("layers", 12), num_attention_heads=t.get("heads", 8),
                              max_position_embeddings=t.get("context_length", 77), hidden_act=act,
                              pooling="argmax")
        config = ClipConfig(text=text, vision=vision, projection_dim=cfg["embed_dim"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from err
    preprocess = raw.get("preprocess_cfg") or {}
    if not isinstance(preprocess, dict):
        raise CheckpointError(f"{path}: preprocess_cfg must be a JSON object")
    return config, preprocess


# ----------------------------------------------------------------------------- name tables

def _block_table(ours: str, theirs: str, open_clip: bool) -> dict[str, Spec]:
    if open_clip:
        names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "attention.out": "attn.out_proj",
                 "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
        table = {f"{ours}attention.qkv.weight": f"{theirs}attn.in_proj_weight",
                 f"{ours}attention.qkv.bias": f"{theirs}attn.in_proj_bias"}
    else:
        names = {"layer_norm1": "layer_norm1", "layer_norm2": "layer_norm2", "attention.out": "self_attn.out_proj",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        table = {f"{ours}attention.qkv.{kind}": [f"{theirs}self_attn.{p}_proj.{kind}" for p in "qkv"]
                 for kind in ("weight", "bias")}
    for mine, their in names.items():
        for kind in ("weight", "bias"):
            table[f"{ours}{mine}.{kind}"] = f"{theirs}{their}.{kind}"
    return table


def hf_table(config: ClipConfig) -> dict[str, Spec]:
    table: dict[str, Spec] = {
        "text.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "text.position_embedding.weight": "text_model.embeddings.position_embedding.weight",
        "vision.class_embedding": "vision_model.embeddings.class_embedding",
        "vision.patch_embedding.weight": "vision_model.embeddings.patch_embedding.weight",
        "vision.position_embedding.weight": "vision_model.embeddings.position_embedding.weight",
        "text_projection.weight": "text_projection.weight", "visual_projection.weight": "visual_projection.weight",
        "logit_scale": "logit_scale"}
    for mine, their in (("text.final_layer_norm", "text_model.final_layer_norm"),
                        ("vision.pre_layernorm", "vision_model.pre_layrnorm"),
                        ("vision.post_layernorm", "vision_model.post_layernorm")):
        table |= {f"{mine}.weight": f"{their}.weight", f"{mine}.bias": f"{their}.bias"}
    for tower, their, n in (("text", "text_model", config.text.num_hidden_layers),
                            ("vision", "vision_model", config.vision.num_hidden_layers)):
        for i in range(n):
            table |= _block_table(f"{tower}.layers.{i}.", f"{their}.encoder.layers.{i}.", open_clip=False)
    return table


def open_clip_table(config: ClipConfig) -> dict[str, Spec]:
    table: dict[str, Spec] = {
        "text.token_embedding.weight": "token_embedding.weight",
        "text.position_embedding.weight": "positional_embedding",
        "vision.class_embedding": "visual.class_embedding", "vision.patch_embedding.weight": "visual.conv1.weight",
        "vision.position_embedding.weight": "visual.positional_embedding",
        "text_projection.weight": Transposed("text_projection"), "visual_projection.weight": Transposed("visual.proj"),
        "logit_scale": "logit_scale"}
    for mine, their in (("text.final_layer_norm", "ln_final"), ("vision.pre_layernorm", "visual.ln_pre"),
                        ("vision.post_layernorm", "visual.ln_post")):
        table |= {f"{mine}.weight": f"{their}.weight", f"{mine}.bias": f"{their}.bias"}
    for tower, their, n in (("text", "transformer", config.text.num_hidden_layers),
                            ("vision", "visual.transformer", config.vision.num_hidden_layers)):
        for i in range(n):
            table |= _block_table(f"{tower}.layers.{i}.", f"{their}.resblocks.{i}.", open_clip=True)
    return table


def _expected_shapes(table: dict[str, Spec], ours: dict[str, tuple]) -> dict[str, tuple]:
    shapes = {}
    for mine, spec in table.items():
        shape = ours[mine]
        if isinstance(spec, list):
            shapes |= {name: (shape[0] // len(spec), *shape[1:]) for name in spec}
        elif isinstance(spec, Transposed):
            shapes[str(spec)] = tuple(reversed(shape))
        else:
            shapes[spec] = shape
    return shapes


def _state(table: dict[str, Spec], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    def value(spec: Spec) -> Tensor:
        if isinstance(spec, list):
            return fused_qkv(tensors, spec)
        if isinstance(spec, Transposed):
            return tensors[str(spec)].T.contiguous()
        return tensors[spec]

    return {mine: value(spec) for mine, spec in table.items()}


def _ignorable(name: str) -> bool:
    # Buffers some checkpoints saved: position ids (older transformers), the causal mask (OpenAI's ports).
    return name.endswith("position_ids") or name == "attn_mask"


# ----------------------------------------------------------------------------- loading

def from_tensors(cls, config: ClipConfig, table: dict[str, Spec], tensors: dict[str, Tensor],
                 source: dict[str, Path], config_name: str, backend: str):
    """The model of config holding the checkpoint's tensors (no copy where the layouts agree), every name and
    shape checked; source: the file of each tensor, for the errors."""
    with meta_skeleton():
        model = cls(config, backend=backend)
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    check_tensors(_expected_shapes(table, ours), tensors, source, ignore=_ignorable, config_name=config_name)
    model.load_state_dict(_state(table, tensors), assign=True)
    return model


def from_hf_model(cls, hf_model, *, backend: str = "auto"):
    """A Clip holding a transformers CLIPModel's weights (in memory, on its device and dtype)."""
    config = hf_config_from_dict(hf_model.config.to_dict(), "the CLIPModel's config")
    tensors = dict(hf_model.state_dict())
    source = {name: Path("the CLIPModel's state_dict") for name in tensors}
    return from_tensors(cls, config, hf_table(config), tensors, source, "its config", backend).eval()


def load(cls, path: Path, *, device=None, dtype=None, backend: str = "auto"):
    device, dtype = check_device(device), check_dtype(dtype)
    folder = path.expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (a Hugging Face or open_clip CLIP folder is expected)")
    is_open_clip = (folder / OPEN_CLIP_CONFIG).is_file() and not (folder / "config.json").is_file()
    if is_open_clip:
        config, preprocess_cfg = open_clip_config(folder / OPEN_CLIP_CONFIG)
        table, config_name = open_clip_table(config), OPEN_CLIP_CONFIG
        tensors, source = read_weights(folder, OPEN_CLIP_WEIGHTS)
    elif (folder / "config.json").is_file():
        config = hf_config(folder / "config.json")
        table, config_name = hf_table(config), "config.json"
        tensors, source = read_weights(folder)
    else:
        raise CheckpointError(f"{folder}: neither config.json (a Hugging Face CLIP folder) nor {OPEN_CLIP_CONFIG} "
                              "(an open_clip folder)")
    model = from_tensors(cls, config, table, tensors, source, config_name, backend)
    context = config.text.max_position_embeddings
    has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "merges.txt"))
    model.tokenizer = (ClipTokenizer.from_folder(folder, context=context, open_clip=is_open_clip)
                       if has_tokenizer else None)
    image_size = config.vision.image_size
    model.preprocessor = (ClipPreprocessor.from_open_clip(preprocess_cfg, folder / OPEN_CLIP_CONFIG, image_size)
                          if is_open_clip else ClipPreprocessor.from_hf(folder / "preprocessor_config.json",
                                                                        image_size))
    return model.to(device=device, dtype=dtype).eval()
