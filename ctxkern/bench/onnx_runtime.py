"""ONNX Runtime as a peer of sentence embeddings: the model's Hugging Face BertModel exported with
torch.onnx.export at run time and run by onnxruntime's CPUExecutionProvider.

This mirrors sentence-transformers' backend="onnx" (optimum's ORTModelForFeatureExtraction): a plain export of
the Transformer module (the graph's output is last_hidden_state), an InferenceSession with ONNX Runtime's
default graph optimizations (ORT_ENABLE_ALL: its LayerNorm, SkipLayerNorm, BiasGelu and MatMul fusions), and
the folder's own Pooling and Normalize applied to the graph's output. Two settings are chosen for speed: the
intra-op threads equal torch's (ONNX Runtime would otherwise take every core), and the export traces
BertModel's eager attention rather than SDPA: ONNX Runtime ran that graph 1.13x faster on the documentation
paragraphs here (CPU time of both graphs, interleaved), whose attention is then plain MatMul and Softmax
nodes. No offline optimizer (onnxruntime.transformers'
optimize_model, sentence-transformers' export_optimized_onnx_model) is applied: that is a separate step a user
takes by hand.

The export is cached: <cache root>/onnx/<folder name>-<key>/model.onnx, where the root is $CTXKERN_CACHE, else
$XDG_CACHE_HOME/ctxkern, else ~/.cache/ctxkern, and the key hashes the weights and config.json with the torch
and transformers versions (a changed model or exporter gets a new file). Written under a temporary name, then
renamed, so a reader never sees a partial file.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

# What the peer needs besides torch: the runtime, and onnx (torch.onnx.export writes its protobuf with it).
NEEDS = ("onnxruntime", "onnx")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 17
_HASH_CHUNK = 1 << 24


def unavailable_reason() -> Optional[str]:
    """None when the peer can run here, else why not (the packages that are missing)."""
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return f"{' and '.join(missing)} not installed (pip install -r requirements.txt installs the pinned versions)"


def cache_root() -> Path:
    if os.environ.get("CTXKERN_CACHE"):
        return Path(os.environ["CTXKERN_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "ctxkern"


def _weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin to export to ONNX")


def _export_key(folder: Path) -> str:
    import transformers

    digest = hashlib.sha256(f"torch {torch.__version__} transformers {transformers.__version__} "
                            f"opset {OPSET}".encode())
    for path in (folder / "config.json", _weights_file(folder)):
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:16]


class _LastHiddenState(torch.nn.Module):
    """BertModel with the graph's one output, last_hidden_state (B, S, H)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


def export_onnx(folder, cache: Optional[Path] = None) -> Path:
    """The ONNX file of the BERT folder's encoder (batch and sequence axes dynamic), exported on first use and
    then read from the cache (module docstring). -> its path."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (a Hugging Face BERT folder is expected)")
    target = Path(cache or cache_root()) / "onnx" / f"{folder.name}-{_export_key(folder)}" / "model.onnx"
    if target.is_file():
        return target
    from transformers import BertModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    ids = torch.ones(2, 8, dtype=torch.long)                                 # (B, S) example inputs
    axes = {0: "batch", 1: "sequence"}
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"model.{os.getpid()}.partial.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")           # the tracer's notes on BertModel's Python-side shape checks
        torch.onnx.export(_LastHiddenState(model), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(partial),
                          input_names=list(INPUT_NAMES), output_names=["last_hidden_state"], opset_version=OPSET,
                          dynamic_axes={name: axes for name in (*INPUT_NAMES, "last_hidden_state")}, dynamo=False)
    os.replace(partial, target)
    return target


def session(path: Path, threads: Optional[int] = None):
    """An InferenceSession on the CPUExecutionProvider, all graph optimizations on, `threads` intra-op threads
    (default: torch's), one inter-op thread (the graph is one chain)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3                # no warnings on stderr in the benchmark's output
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def forward(sess) -> Callable[[dict], Tensor]:
    """A tokenizer's batch (input_ids, attention_mask, token_type_ids tensors, (B, S)) -> last_hidden_state
    (B, S, H) float32, as the session computes it."""
    def run(inputs: dict) -> Tensor:
        feeds = {name: inputs[name].numpy() if name in inputs else torch.zeros_like(inputs["input_ids"]).numpy()
                 for name in INPUT_NAMES}
        return torch.from_numpy(sess.run(None, feeds)[0])
    return run
