"""Writing a SentenceEncoder as a sentence-transformers folder: the BERT weights under Hugging Face's names (query,
key and value split again), the tokenizer, modules.json and the module configs, in the layout that releases
before 5.x wrote and every release reads."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

# What Hugging Face's AutoTokenizer (which sentence-transformers uses) reads besides tokenizer.json.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
# Our state_dict's module names -> Hugging Face's, per layer (qkv is split separately).
LAYER_NAMES = (("attention_out", "attention.output.dense"), ("attention_norm", "attention.output.LayerNorm"),
               ("intermediate", "intermediate.dense"), ("output", "output.dense"),
               ("output_norm", "output.LayerNorm"))


def hf_state_dict(bert) -> dict[str, torch.Tensor]:
    """The model's weights under transformers.BertModel's names, contiguous, on the CPU."""
    state = {k: v.detach().cpu() for k, v in bert.state_dict().items()}
    out = {k: v for k, v in state.items() if k.startswith(("embeddings.", "pooler."))}
    for n in range(bert.config.num_hidden_layers):
        ours, hf = f"layers.{n}.", f"encoder.layer.{n}."
        for kind in ("weight", "bias"):
            for proj, part in zip(("query", "key", "value"), state[f"{ours}qkv.{kind}"].chunk(3)):
                out[f"{hf}attention.self.{proj}.{kind}"] = part
            for mine, theirs in LAYER_NAMES:
                out[f"{hf}{theirs}.{kind}"] = state[f"{ours}{mine}.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


def save_sentence_folder(encoder, folder: Path) -> Path:
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save path {folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    bert = encoder.bert
    config = {"architectures": ["BertModel"], "model_type": "bert", **dataclasses.asdict(bert.config)}
    _write_json(folder / "config.json", config)
    save_file(hf_state_dict(bert), str(folder / "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer(encoder, folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if encoder.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    _write_json(folder / "modules.json", modules)
    (folder / "1_Pooling").mkdir(exist_ok=True)
    _write_json(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": encoder.dim, "pooling_mode_cls_token": encoder.pooling == "cls",
        "pooling_mode_mean_tokens": encoder.pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False})
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": encoder.max_seq_length,
                                                       "do_lower_case": False})
    _write_json(folder / "config_sentence_transformers.json", {
        "prompts": encoder.prompts, "default_prompt_name": encoder.default_prompt_name,
        "similarity_fn_name": encoder.similarity_fn_name})
    return folder


def _write_tokenizer(encoder, folder: Path) -> None:
    """tokenizer.json from the tokenizer in memory (truncation and padding off, as in a saved folder); the
    companion files from the folder it came from, which AutoTokenizer reads for the special tokens."""
    tokenizer = encoder.tokenizer
    truncation = tokenizer.truncation
    tokenizer.no_truncation()
    try:
        tokenizer.save(str(folder / "tokenizer.json"))
    finally:
        tokenizer.enable_truncation(truncation["max_length"])
    source = encoder.transformer_folder
    if source is not None and source.resolve() != folder.resolve():
        for name in TOKENIZER_FILES[1:]:
            if (source / name).is_file():
                shutil.copy(source / name, folder / name)


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
