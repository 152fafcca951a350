"""The query encoder an index folder carries, so that `ctxkern search --index` answers without importing torch.

`import torch` alone takes 1.4-2 s on the 2-core development machine, more than the whole search should (the
target is 0.5 s from process start). So `ctxkern index build` also writes, into the index's `query/` folder,
the model's encoder exported to ONNX (Hugging Face's BertModel on the same weights, by
ctxkern.bench.onnx_runtime.export_onnx, cached), the tokenizer as the index's SentenceEncoder configured it
(truncation at its max_seq_length included) and the pooling that turns token states into the sentence
embedding. `ctxkern search --index` then runs the query through ONNX Runtime, with numpy for the pooling and
the search: no torch. The corpus embeddings are still ctxkern's own; a query's embedding from this encoder
matches SentenceEncoder.encode's to about 1e-6 (tests/test_query_encoder.py), so rankings agree except
between texts whose scores tie to that precision.

Only what the numpy side can reproduce exactly is exported: a BERT folder with mean or CLS pooling and no
prompts. For anything else (a model not loaded from a folder, a folder with prompts, onnx / onnxruntime /
transformers missing) `write` writes nothing and says why, and a search loads the model through torch as before.

This module imports neither torch nor ctxkern's operators: `_ctxkern_cli` loads it without ctxkern's
__init__.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

FOLDER = "query"
FILES = (f"{FOLDER}/model.onnx", f"{FOLDER}/model.onnx.data", f"{FOLDER}/tokenizer.json", f"{FOLDER}/config.json")
NEEDS = ("onnxruntime", "onnx", "transformers")     # to export (the last two) and to run (the first)
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def unavailable_reason(encoder) -> Optional[str]:
    """None when `encoder` (a SentenceEncoder) can be exported as a query encoder here, else why not."""
    if getattr(encoder, "transformer_folder", None) is None or not hasattr(encoder, "tokenizer"):
        return "the model was not loaded from a sentence-transformers or BERT folder"
    if encoder.pooling not in ("mean", "cls"):
        return f"pooling {encoder.pooling!r} is not exported"
    if encoder.prompts or encoder.default_prompt_name:
        return "the model defines prompts, which the exported encoder does not apply"
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install -r requirements.txt installs them)"
    return None


def write(folder: Path, encoder) -> Optional[str]:
    """Write the query encoder of `encoder` into folder/query/; None when written, else why it was not."""
    reason = unavailable_reason(encoder)
    if reason is not None:
        return reason
    import onnx

    from ctxkern.bench.onnx_runtime import export_onnx

    target = Path(folder) / FOLDER
    target.mkdir()
    # The weights as external data: ONNX Runtime then maps them rather than parsing them out of one 90 MB
    # protobuf, and a session starts in 0.08 s instead of 0.19 s (the bundled model, one thread, here).
    onnx.save_model(onnx.load(export_onnx(encoder.transformer_folder)), target / "model.onnx",
                    save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data")
    (target / "tokenizer.json").write_text(encoder.tokenizer.to_str(), encoding="utf-8")
    config = {"dim": encoder.dim, "pooling": encoder.pooling, "normalize": encoder.normalize,
              "max_seq_length": encoder.max_seq_length, "inputs": list(INPUT_NAMES)}
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (target / "model.onnx.data").chmod((target / "config.json").stat().st_mode)   # onnx writes it 0600
    return None


@contextlib.contextmanager
def _named(path: Path):
    """Turns any error while reading `path` into an IndexFormatError that names the file (tokenizers and ONNX
    Runtime raise their own exception types, with messages that do not)."""
    try:
        yield
    except Exception as err:
        from ctxkern.search.index import IndexFormatError

        raise IndexFormatError(f"{path}: unreadable query encoder file ({str(err).strip()[:200]}); rebuild the "
                               "index, or search with --backend to use the model through torch") from None


class QueryEncoder:
    """Texts -> (N, D) float32 sentence embeddings, through ONNX Runtime (module docstring)."""

    def __init__(self, folder: Path, threads: int = 1) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        folder = Path(folder)
        with _named(folder / "config.json"):
            self.config = json.loads((folder / "config.json").read_text())
            self.max_seq_length = int(self.config["max_seq_length"])
            if self.config["pooling"] not in ("mean", "cls") or int(self.config["dim"]) < 1:
                raise ValueError(f"pooling {self.config['pooling']!r}, dim {self.config['dim']!r}")
        with _named(folder / "tokenizer.json"):
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads   # one query is a few tokens: more threads cost more than they save
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        with _named(folder / "model.onnx"):
            self.session = ort.InferenceSession(str(folder / "model.onnx"), options,
                                                providers=["CPUExecutionProvider"])

    def token_count(self, text: str) -> int:
        return len(self.tokenizer.encode(text).ids)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), self.config["dim"]), dtype=np.float32)
        for i, text in enumerate(texts):        # one at a time: no padding, so the pooling is over real tokens
            ids = np.asarray([self.tokenizer.encode(text).ids], dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
            states = self.session.run(None, feeds)[0][0]                         # (S, D)
            vector = states.mean(axis=0) if self.config["pooling"] == "mean" else states[0]
            if self.config["normalize"]:
                vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
            out[i] = vector
        return out
