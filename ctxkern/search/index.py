"""A persistent semantic-search index: embeddings, the texts with their line numbers and the identity of the model
that made them, in a folder; exact search by default (one matrix product and top-k), an approximate FAISS index
(any index_factory string, e.g. HNSW32) for large corpora.

The folder (FORMAT_VERSION 1):
    index.json          format, version, model identity, count, dim, metric, FAISS spec, every file's size
    embeddings.npy      (N, D) float32, unit rows for the cosine metric
    lines.npy           (N,) int64, each text's 1-based line number in the corpus
    texts.jsonl         {"line": n, "text": ...} per text; texts.offsets.npy (N + 1,) int64 its byte offsets,
                        so that a search reads only the texts it returns
    faiss.index         the FAISS index, when one was asked for
    query/              the query encoder (ONNX model, tokenizer, pooling) that lets `ctxkern search --index`
                        run without torch, when the index was saved with its encoder (query_encoder.py)

A folder is written whole into a temporary sibling and renamed into place, index.json last, so an interrupted
save leaves the previous index (or none), never a half-written one; loading checks every file's size against
index.json, so a truncated file is named rather than read.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

from ctxkern.search import query_encoder

# No `import torch` at the top: `ctxkern search --index` loads this module without torch (query_encoder.py).
# Exact search runs on torch where it is already imported (its top-k is 4x faster than numpy's argpartition on
# a batch of queries) and on numpy otherwise.

FORMAT, FORMAT_VERSION = "ctxkern-index", 1
METRICS = ("cosine", "dot")
FILES = ("embeddings.npy", "lines.npy", "texts.jsonl", "texts.offsets.npy")
FAISS_FILE = "faiss.index"
QUERY_CHUNK = 256           # queries per matrix product: 256 x 100k float32 scores is 100 MB
SAMPLE_BYTES = 1 << 20      # how much of a large model file the fingerprint reads, at each end


class IndexFormatError(ValueError):
    """An index folder that cannot be read: another format or version, a missing or truncated file."""


class Hit(NamedTuple):
    score: float
    line: int                   # 1-based line number in the corpus
    text: str
    id: int                     # row in the index


def faiss_module():
    try:
        import faiss
    except ImportError as err:
        raise RuntimeError("an approximate index needs FAISS: pip install faiss-cpu (ctxkern's [search] "
                           "extra)") from err
    return faiss


# ----------------------------------------------------------------------------- the model's identity

def model_identity(encoder, name: Optional[str] = None) -> dict:
    """What a search checks before it encodes queries for an index: the model's name, where it loads from and a
    fingerprint of its files (configs and tokenizer whole, large weight files by size and their first and last
    MiB) and pooling, or of its weights when it was not loaded from a folder."""
    from ctxkern.models import bundled_model_path

    folder = getattr(encoder, "source_folder", None)
    bundled = folder is not None and _bundled_folder(bundled_model_path) == folder.resolve()
    digest = hashlib.sha256(json.dumps([encoder.dim, encoder.pooling, encoder.normalize]).encode())
    if folder is not None:
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "README.md"):
            digest.update(f"{path.relative_to(folder)}:{path.stat().st_size}".encode())
            with open(path, "rb") as f:
                digest.update(f.read(SAMPLE_BYTES))
                if path.stat().st_size > 2 * SAMPLE_BYTES:
                    f.seek(-SAMPLE_BYTES, os.SEEK_END)
                    digest.update(f.read())
    else:
        import torch

        for key, tensor in encoder.state_dict().items():
            digest.update(key.encode() + tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    if name is None:
        name = "all-MiniLM-L6-v2 (bundled)" if bundled else str(folder) if folder is not None else "in memory"
    return {"name": name, "path": None if bundled or folder is None else str(folder.resolve()),
            "bundled": bundled, "dim": encoder.dim, "max_seq_length": encoder.max_seq_length,
            "fingerprint": digest.hexdigest()}


def _bundled_folder(bundled_model_path) -> Optional[Path]:
    try:
        return bundled_model_path().resolve()
    except RuntimeError:
        return None


# ----------------------------------------------------------------------------- the index

class Index:
    """Embeddings of texts, searchable by cosine (unit rows, inner product) or dot product.

    index = Index.build(texts, encoder)          # or Index(dim, model=model_identity(encoder)) then add()
    index.save("my-index"); index = Index.load("my-index")
    hits = index.search(["a query", "another"], k=10, encoder=encoder)   # [[Hit(score, line, text, id)]]
    """

    def __init__(self, dim: int, *, model: Optional[dict] = None, metric: str = "cosine",
                 faiss: Optional[str] = None, faiss_params: Optional[str] = None) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        self.dim, self.model, self.metric = dim, model, metric
        self.faiss_spec, self.faiss_params = faiss, faiss_params
        self.embeddings = np.empty((0, dim), dtype=np.float32)
        self.lines = np.empty(0, dtype=np.int64)
        self._texts: list[str] = []
        self._text_store: Optional[_TextStore] = None       # a loaded index reads its texts on demand
        self._faiss = self._new_faiss() if faiss else None
        self._corpus = None                                  # the embeddings as a torch tensor, for exact search
        self.skipped = 0                                     # empty corpus lines left out (reported, kept)
        self.query_folder: Optional[Path] = None             # a loaded index's query/ folder, when it has one
        self.query_encoder_note: Optional[str] = None        # why save(encoder=...) wrote no query encoder

    def __len__(self) -> int:
        return len(self.embeddings)

    # -- building

    @classmethod
    def build(cls, texts: Sequence[str], encoder, *, lines: Optional[Sequence[int]] = None,
              model_name: Optional[str] = None, batch_size: int = 32, show_progress_bar: Optional[bool] = None,
              metric: str = "cosine", faiss: Optional[str] = None, faiss_params: Optional[str] = None) -> "Index":
        """Encode `texts` once with `encoder` (a SentenceEncoder) and index them; lines default to 1..N."""
        index = cls(encoder.dim, model=model_identity(encoder, model_name), metric=metric, faiss=faiss,
                    faiss_params=faiss_params)
        index.add(texts, encoder=encoder, lines=lines, batch_size=batch_size, show_progress_bar=show_progress_bar)
        return index

    def add(self, texts: Sequence[str], embeddings=None, *, encoder=None, lines: Optional[Sequence[int]] = None,
            batch_size: int = 32, show_progress_bar: Optional[bool] = None) -> None:
        """Append texts with their embeddings (N, D), or with an encoder to make them. lines default to the
        numbers after the last one."""
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a sequence of strings")
        if (embeddings is None) == (encoder is None):
            raise ValueError("add needs either embeddings or an encoder, not both")
        if encoder is not None:
            if self.model is None and not len(self):    # an index made without a model takes its first encoder's
                self.model = model_identity(encoder)
            self.check_encoder(encoder)
            embeddings = encoder.encode(texts, batch_size=batch_size, show_progress_bar=show_progress_bar,
                                        convert_to_numpy=True)
        embeddings = self._rows(embeddings, "embeddings")
        if len(embeddings) != len(texts):
            raise ValueError(f"embeddings has {len(embeddings)} rows for {len(texts)} texts")
        start = int(self.lines[-1]) + 1 if len(self.lines) else 1
        lines = np.arange(start, start + len(texts)) if lines is None else np.asarray(lines, dtype=np.int64)
        if lines.shape != (len(texts),):
            raise ValueError(f"lines must hold one number per text ({len(texts)}), got shape {lines.shape}")
        self._materialize_texts()
        self._corpus = None
        self.embeddings = np.concatenate([self.embeddings, embeddings])
        self.lines = np.concatenate([self.lines, lines])
        self._texts.extend(texts)
        if self._faiss is not None:
            self._faiss_add(embeddings)

    @classmethod
    def merge(cls, indexes: Sequence["Index"], *, faiss: Optional[str] = None,
              faiss_params: Optional[str] = None) -> "Index":
        """One index of several shards made by the same model (the distributed path), ordered by line number."""
        if not indexes:
            raise ValueError("merge needs at least one index")
        first = indexes[0]
        for i, other in enumerate(indexes[1:], start=1):
            if (other.dim, other.metric) != (first.dim, first.metric):
                raise ValueError(f"shard {i} has dim {other.dim}, metric {other.metric}; shard 0 has {first.dim}, "
                                 f"{first.metric}")
            if _fingerprint(other.model) != _fingerprint(first.model):
                raise ValueError(f"shard {i} was made by model {_name(other.model)!r}, shard 0 by "
                                 f"{_name(first.model)!r}")
        lines = np.concatenate([ix.lines for ix in indexes])
        order = np.argsort(lines, kind="stable")
        texts = [t for ix in indexes for t in ix.texts]
        merged = cls(first.dim, model=first.model, metric=first.metric, faiss=faiss, faiss_params=faiss_params)
        merged.add([texts[i] for i in order], np.concatenate([ix.embeddings for ix in indexes])[order],
                   lines=lines[order])
        merged.skipped = sum(ix.skipped for ix in indexes)
        merged.query_folder = first.query_folder          # the shards' model is one: any shard's query encoder
        return merged

    # -- searching

    def search(self, queries, k: int = 10, *, encoder=None, batch_size: int = 128,
               exact: bool = False) -> list[list[Hit]]:
        """The k best texts for each query, best first: [[Hit(score, line, text, id)] per query]. queries: a
        string or a list of strings (encoded with `encoder`, which must be the index's model, batch_size at a
        time: queries are short, and 1000 of them encoded in 1.54 s in batches of 128 against 1.70 s in batches
        of 64 here) or embeddings (M, D). exact=True searches exactly even where there is a FAISS index."""
        if isinstance(queries, str):
            queries = [queries]
        if isinstance(queries, (list, tuple)) and all(isinstance(q, str) for q in queries):
            if encoder is None:
                raise ValueError("text queries need the encoder the index was built with (encoder=...)")
            self.check_encoder(encoder)
            queries = encoder.encode(list(queries), batch_size=batch_size, convert_to_numpy=True)
        scores, ids = self.search_embeddings(queries, k, exact=exact)
        return [[Hit(float(s), int(self.lines[i]), self.text(int(i)), int(i)) for s, i in zip(row_s, row_i) if i >= 0]
                for row_s, row_i in zip(scores, ids)]

    def search_embeddings(self, queries, k: int = 10, *, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(M, D) query embeddings -> scores (M, k') float32 and row ids (M, k') int64, best first;
        k' = min(k, len(self)). Exact unless the index has a FAISS index."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        queries = self._rows(queries, "queries")
        k = min(k, len(self))
        if k == 0 or len(queries) == 0:
            return np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
        if self._faiss is not None and not exact:
            return self._faiss.search(queries, k)
        torch = _torch_if_imported()
        scores, ids = [], []
        if torch is not None:
            if self._corpus is None:         # a loaded index maps embeddings.npy read-only: copied on first use
                self._corpus = torch.from_numpy(np.require(self.embeddings, requirements=["C", "W"]))
            # One scores buffer for every chunk: a fresh (256, 100k) tensor per chunk costs its page faults,
            # 0.55 s instead of 0.45 s for 1000 queries at 100k documents here.
            buffer = torch.empty(min(len(queries), QUERY_CHUNK), len(self))
        for start in range(0, len(queries), QUERY_CHUNK):
            chunk = queries[start:start + QUERY_CHUNK]
            if torch is None:
                best_scores, best_ids = _top_k_numpy(chunk @ self.embeddings.T, k)
            else:
                chunk_scores = torch.mm(torch.from_numpy(chunk), self._corpus.T, out=buffer[:len(chunk)])
                best = chunk_scores.topk(k, dim=1)                                # (chunk, N) -> (chunk, k)
                best_scores, best_ids = best.values.numpy(), best.indices.numpy()
            scores.append(best_scores)
            ids.append(best_ids)
        return np.concatenate(scores), np.concatenate(ids)

    def check_encoder(self, encoder) -> None:
        """Refuse, by name, an encoder other than the one the index was made with; match its max_seq_length."""
        if self.model is None:
            return
        theirs = model_identity(encoder)
        if theirs["fingerprint"] != self.model["fingerprint"]:
            where = "the bundled model" if self.model.get("bundled") else self.model.get("path") or "that model"
            raise ValueError(f"this index was built with model {self.model['name']!r}, not {theirs['name']!r} "
                             f"(different weights or configuration): search it with {where}, or rebuild it")
        if encoder.dim != self.dim:
            raise ValueError(f"the encoder's dimension {encoder.dim} is not the index's {self.dim}")
        if encoder.max_seq_length != self.model["max_seq_length"]:
            encoder.max_seq_length = self.model["max_seq_length"]

    # -- texts

    @property
    def texts(self) -> list[str]:
        self._materialize_texts()
        return self._texts

    def text(self, i: int) -> str:
        return self._text_store.get(i) if self._text_store is not None else self._texts[i]

    def _materialize_texts(self) -> None:
        if self._text_store is not None:
            self._texts, self._text_store = [self._text_store.get(i) for i in range(len(self))], None

    # -- saving and loading

    def save(self, path, *, encoder=None) -> Path:
        """Write the index to the folder `path`, replacing an index there; atomic (see the module's doc).
        With `encoder` (the index's SentenceEncoder), also its query encoder (query_encoder.py) where it can be
        exported (else query_encoder_note says why); without, a loaded index's query encoder is kept."""
        if encoder is not None:
            self.check_encoder(encoder)
        path = Path(path).expanduser()
        if path.exists() and not (path / "index.json").is_file() and (not path.is_dir() or any(path.iterdir())):
            raise ValueError(f"{path} exists and is not a ctxkern index: not replacing it")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
        try:
            self._write(tmp, encoder)
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                path.rename(old / "index")
                tmp.rename(path)
                shutil.rmtree(old)
            else:
                tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def _write(self, folder: Path, encoder) -> None:
        np.save(folder / "embeddings.npy", self.embeddings)
        np.save(folder / "lines.npy", self.lines)
        offsets = [0]
        with open(folder / "texts.jsonl", "wb") as f:
            for line, text in zip(self.lines.tolist(), self.texts):
                f.write(json.dumps({"line": line, "text": text}, ensure_ascii=False).encode() + b"\n")
                offsets.append(f.tell())
        np.save(folder / "texts.offsets.npy", np.asarray(offsets, dtype=np.int64))
        files = list(FILES)
        if self._faiss is not None:
            faiss_module().write_index(self._faiss, str(folder / FAISS_FILE))
            files.append(FAISS_FILE)
        if encoder is not None:
            self.query_encoder_note = query_encoder.write(folder, encoder)
        elif self.query_folder is not None:
            shutil.copytree(self.query_folder, folder / query_encoder.FOLDER)
        if (folder / query_encoder.FOLDER).is_dir():
            files += query_encoder.FILES
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "count": len(self), "dim": self.dim,
                "metric": self.metric, "model": self.model, "skipped_lines": self.skipped,
                "faiss": self.faiss_spec, "faiss_params": self.faiss_params,
                "files": {name: (folder / name).stat().st_size for name in files}}
        for name in files:
            _fsync(folder / name)
        (folder / "index.json.tmp").write_text(json.dumps(meta, indent=2) + "\n")
        _fsync(folder / "index.json.tmp")
        (folder / "index.json.tmp").rename(folder / "index.json")

    @classmethod
    def load(cls, path, *, load_faiss: bool = True) -> "Index":
        """An index folder written by save(); errors name the folder and the file that is wrong.
        load_faiss=False leaves a FAISS index on disk (searches are then exact): reading it costs more than one
        exact search of a query."""
        path = Path(path).expanduser()
        meta = _read_meta(path)
        index = cls(meta["dim"], model=meta["model"], metric=meta["metric"], faiss=None,
                    faiss_params=meta.get("faiss_params"))
        index.faiss_spec, index.skipped = meta.get("faiss"), meta.get("skipped_lines", 0)
        # Mapped, not read: a FAISS search never touches it, and an exact one reads it once.
        index.embeddings = _load_array(path, "embeddings.npy", np.float32, (meta["count"], meta["dim"]), mmap=True)
        index.lines = _load_array(path, "lines.npy", np.int64, (meta["count"],))
        offsets = _load_array(path, "texts.offsets.npy", np.int64, (meta["count"] + 1,))
        index._text_store = _TextStore(path / "texts.jsonl", offsets)
        if query_encoder.FILES[0] in meta["files"]:
            index.query_folder = path / query_encoder.FOLDER
        if index.faiss_spec and load_faiss:
            index._faiss = faiss_module().read_index(str(path / FAISS_FILE))
            index._apply_faiss_params()
            if index._faiss.ntotal != meta["count"]:
                raise IndexFormatError(f"index {path}: {FAISS_FILE} holds {index._faiss.ntotal} vectors, "
                                       f"index.json says {meta['count']}")
        return index

    # -- internals

    def _rows(self, x, name: str) -> np.ndarray:
        torch = _torch_if_imported()           # a tensor means torch is imported
        x = x.detach().cpu().numpy() if torch is not None and isinstance(x, torch.Tensor) else np.asarray(x)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim or not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{name} must be floating-point (N, {self.dim}), got {x.dtype} {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.metric == "cosine":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    def _new_faiss(self):
        faiss = faiss_module()
        try:
            index = faiss.index_factory(self.dim, self.faiss_spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as err:
            raise ValueError(f"faiss index {self.faiss_spec!r}: {str(err).strip().splitlines()[-1]}") from None
        self._faiss = index
        self._apply_faiss_params()
        return index

    def _apply_faiss_params(self) -> None:
        if self.faiss_params:
            try:
                faiss_module().ParameterSpace().set_index_parameters(self._faiss, self.faiss_params)
            except RuntimeError as err:
                raise ValueError(f"faiss parameters {self.faiss_params!r}: {str(err).strip().splitlines()[-1]}") \
                    from None

    def _faiss_add(self, embeddings: np.ndarray) -> None:
        if not self._faiss.is_trained:       # IVF and PQ indexes learn their centroids from the first batch
            self._faiss.train(embeddings)
        self._faiss.add(embeddings)


def _torch_if_imported():
    """torch where this process has imported it, else None (see the note on imports at the top)."""
    return sys.modules.get("torch")


def _top_k_numpy(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k largest scores and their columns, best first: (M, N) -> (M, k), (M, k) int64."""
    ids = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    best = np.take_along_axis(scores, ids, axis=1)
    order = np.argsort(-best, axis=1, kind="stable")
    return np.take_along_axis(best, order, axis=1), np.take_along_axis(ids, order, axis=1).astype(np.int64)


class _TextStore:
    """The texts of a loaded index, read from texts.jsonl by byte offset when asked for."""

    def __init__(self, path: Path, offsets: np.ndarray) -> None:
        self.path, self.offsets = path, offsets
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if offsets[-1] else b""

    def get(self, i: int) -> str:
        raw = self._map[int(self.offsets[i]):int(self.offsets[i + 1])]
        try:
            return json.loads(raw)["text"]
        except (ValueError, KeyError, TypeError) as err:
            raise IndexFormatError(f"{self.path}: text {i} is unreadable ({err})") from None


def _read_meta(path: Path) -> dict:
    if not path.is_dir():
        raise FileNotFoundError(f"index {path}: no such folder")
    meta_path = path / "index.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"index {path}: no index.json (not a ctxkern index, or its build never finished)")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise IndexFormatError(f"{meta_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise IndexFormatError(f"{meta_path}: not a ctxkern index (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise IndexFormatError(f"{meta_path}: index format version {meta.get('version')!r}, this ctxkern reads "
                               f"version {FORMAT_VERSION}; rebuild the index")
    for name, size in meta["files"].items():
        file = path / name
        if not file.is_file():
            raise IndexFormatError(f"index {path}: {name} is missing")
        if file.stat().st_size != size:
            raise IndexFormatError(f"index {path}: {name} is {file.stat().st_size} bytes, index.json says {size} "
                                   "(truncated or replaced); rebuild the index")
    return meta


def _load_array(path: Path, name: str, dtype, shape: tuple, mmap: bool = False) -> np.ndarray:
    try:
        array = np.load(path / name, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (OSError, ValueError) as err:
        raise IndexFormatError(f"index {path}: {name} is unreadable ({err})") from None
    if array.dtype != dtype or array.shape != shape:
        raise IndexFormatError(f"index {path}: {name} is {array.dtype} {array.shape}, expected {np.dtype(dtype)} "
                               f"{shape}")
    return array


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fingerprint(model: Optional[dict]) -> Optional[str]:
    return model.get("fingerprint") if model else None


def _name(model: Optional[dict]) -> str:
    return model.get("name", "?") if model else "unknown"
