"""Small random CLIP folders for the CLIP tests: a Hugging Face folder (CLIPModel.save_pretrained, a CLIPTokenizer
on a small byte-level BPE vocabulary, CLIPImageProcessor's config) and the same weights as an open_clip folder,
laid out with open_clip's module names (its ResidualAttentionBlock: ln_1, attn.in_proj_weight / in_proj_bias,
attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj; its VisionTransformer: conv1, class_embedding, positional_embedding,
ln_pre, ln_post, proj; the text tower at the top level: token_embedding, positional_embedding, transformer,
ln_final, text_projection), with its projections stored as (width, embed_dim) matrices used as x @ proj."""
import json
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

WORDS = ["a", "photo", "of", "the", "cat", "dog", "bird", "car", "small", "large", "drawing", "red", "blue"]
IMAGE_SIZE, PATCH = 30, 10


def bpe_vocab():
    """OpenAI's vocabulary layout in miniature: the 256 byte symbols, each with the end-of-word mark, the
    merges' results, then <|startoftext|> and <|endoftext|> as the two largest ids (so EOS is the argmax)."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = []
    for word in WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:                         # merge left to right: "p h", "ph o", ...
            merge = (symbols[0], symbols[1])
            if merge not in merges:
                merges.append(merge)
                tokens.append(symbols[0] + symbols[1])
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def hf_config(hidden_act="quick_gelu", eos_rule="first_eos"):
    vocab, _ = bpe_vocab()
    eos = vocab["<|endoftext|>"] if eos_rule == "first_eos" else 2
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act=hidden_act,
                         eos_token_id=eos, bos_token_id=vocab["<|startoftext|>"], pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act=hidden_act),
        projection_dim=24)


def randomize_clip(model):
    """Weights large enough that every piece shows in the output (LayerNorm weights around 1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm_weight = ("norm" in name or "layrnorm" in name) and name.endswith("weight")
            p.copy_(1 + 0.2 * torch.randn_like(p) if norm_weight else 0.2 * torch.randn_like(p))
        model.logit_scale.fill_(2.0)
    return model


def save_hf_clip(folder: Path, hidden_act="quick_gelu", eos_rule="first_eos"):
    """A Hugging Face CLIP folder; returns the CLIPModel holding its weights."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = randomize_clip(transformers.CLIPModel(hf_config(hidden_act, eos_rule)).eval())
    model.save_pretrained(folder)
    vocab, merges = bpe_vocab()
    transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                          crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return model


def open_clip_state(model) -> dict:
    """The HF CLIPModel's weights under open_clip's names and layouts."""
    hf = model.state_dict()
    out = {"token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": hf["text_model.final_layer_norm.weight"],
           "ln_final.bias": hf["text_model.final_layer_norm.bias"],
           "text_projection": hf["text_projection.weight"].T,
           "logit_scale": hf["logit_scale"],
           "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
           "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
           "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
           "visual.ln_pre.weight": hf["vision_model.pre_layrnorm.weight"],
           "visual.ln_pre.bias": hf["vision_model.pre_layrnorm.bias"],
           "visual.ln_post.weight": hf["vision_model.post_layernorm.weight"],
           "visual.ln_post.bias": hf["vision_model.post_layernorm.bias"],
           "visual.proj": hf["visual_projection.weight"].T}
    for theirs, ours, n in (("text_model", "transformer", model.config.text_config.num_hidden_layers),
                            ("vision_model", "visual.transformer", model.config.vision_config.num_hidden_layers)):
        for i in range(n):
            h, o = f"{theirs}.encoder.layers.{i}.", f"{ours}.resblocks.{i}."
            for kind in ("weight", "bias"):
                # nn.MultiheadAttention's in_proj: query, key, value rows stacked.
                out[f"{o}attn.in_proj_{kind}"] = torch.cat([hf[f"{h}self_attn.{p}_proj.{kind}"] for p in "qkv"])
                out[f"{o}attn.out_proj.{kind}"] = hf[f"{h}self_attn.out_proj.{kind}"]
                out[f"{o}ln_1.{kind}"] = hf[f"{h}layer_norm1.{kind}"]
                out[f"{o}ln_2.{kind}"] = hf[f"{h}layer_norm2.{kind}"]
                out[f"{o}mlp.c_fc.{kind}"] = hf[f"{h}mlp.fc1.{kind}"]
                out[f"{o}mlp.c_proj.{kind}"] = hf[f"{h}mlp.fc2.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


def open_clip_model_cfg(model) -> dict:
    t, v = model.config.text_config, model.config.vision_config
    if t.hidden_act not in ("quick_gelu", "gelu"):
        raise ValueError(f"open_clip has no {t.hidden_act}")
    return {"embed_dim": model.config.projection_dim, "quick_gelu": t.hidden_act == "quick_gelu",
            "vision_cfg": {"image_size": v.image_size, "layers": v.num_hidden_layers, "width": v.hidden_size,
                           "head_width": v.hidden_size // v.num_attention_heads, "patch_size": v.patch_size,
                           "mlp_ratio": v.intermediate_size / v.hidden_size},
            "text_cfg": {"context_length": t.max_position_embeddings, "vocab_size": t.vocab_size,
                         "width": t.hidden_size, "heads": t.num_attention_heads, "layers": t.num_hidden_layers,
                         "mlp_ratio": t.intermediate_size / t.hidden_size}}


def save_open_clip(folder: Path, model, hf_folder: Path, weights="safetensors") -> None:
    """model's weights as an open_clip hub folder, with the tokenizer of hf_folder."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": open_clip_model_cfg(model),
              "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                 "std": [0.26862954, 0.26130258, 0.27577711],
                                 "interpolation": "bicubic", "resize_mode": "shortest"}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    state = open_clip_state(model)
    if weights == "safetensors":
        save_file(state, folder / "open_clip_model.safetensors")
    else:
        torch.save(state, folder / "open_clip_pytorch_model.bin")
    shutil.copy(hf_folder / "tokenizer.json", folder / "tokenizer.json")
