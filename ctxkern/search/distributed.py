"""Encoding a corpus too large for one process on Ray Data: `map_batches` runs one SentenceEncoder per worker
(an actor, loaded once), each batch of documents becomes an index shard saved by its worker, and the shards
merge into one index (`Index.merge`, or `ctxkern index merge SHARD... --out DIR`).

    python -m ctxkern.search.distributed CORPUS --out DIR [--workers 2] [--threads-per-worker 1] [--address auto]

On one machine this starts a local Ray instance; with --address it joins a running cluster, whose workers must
have ctxkern, the model folder and a shared filesystem for the shards. Ray is optional (ctxkern's
[distributed] extra): `pip install "ray[data]"`.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ctxkern.search.index import Index


def ray_module():
    try:
        import ray
        import ray.data  # noqa: F401  (Ray without its Data library cannot run map_batches)
    except ImportError as err:
        raise RuntimeError("the distributed path needs Ray Data: pip install \"ray[data]\" (ctxkern's "
                           "[distributed] extra)") from err
    return ray


class _ShardWriter:
    """A Ray Data worker: its own SentenceEncoder; each batch of documents -> one index shard on disk."""

    def __init__(self, model: Optional[str], shards_dir: str, threads: int, batch_size: int, device: str,
                 backend: str) -> None:
        import torch

        from ctxkern.models import SentenceEncoder

        torch.set_num_threads(threads)
        self.encoder = SentenceEncoder.from_pretrained(model, device=device, backend=backend)
        self.shards_dir, self.batch_size = Path(shards_dir), batch_size

    def __call__(self, batch: dict) -> dict:
        lines = np.asarray(batch["line"], dtype=np.int64)
        index = Index.build([str(t) for t in batch["text"]], self.encoder, lines=lines, batch_size=self.batch_size,
                            show_progress_bar=False)
        path = index.save(self.shards_dir / f"shard-{int(lines[0]):09d}-{uuid.uuid4().hex[:8]}")
        return {"shard": [str(path)], "documents": [len(index)]}


def encode_shards(texts: Sequence[str], lines: Sequence[int], shards_dir, *, model: Optional[str] = None,
                  workers: int = 2, threads_per_worker: int = 1, shard_docs: int = 1000, batch_size: int = 32,
                  device: str = "cpu", backend: str = "auto", address: Optional[str] = None) -> list[Path]:
    """Encode `texts` on `workers` Ray actors into index shards of at most `shard_docs` documents under
    `shards_dir` (which must be empty or absent). Uses the running Ray instance if there is one, else starts a
    local one (or joins `address`) and shuts it down after. -> the shard folders, in line order."""
    ray = ray_module()
    if len(texts) != len(lines) or not texts:
        raise ValueError(f"texts ({len(texts)}) and lines ({len(lines)}) must be as long as each other, and not empty")
    for name, value in (("workers", workers), ("threads_per_worker", threads_per_worker), ("shard_docs", shard_docs)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    shards_dir = Path(shards_dir).expanduser().resolve()
    if shards_dir.exists() and any(shards_dir.iterdir()):
        raise ValueError(f"shards folder {shards_dir} is not empty: shards of an earlier run would be merged twice")
    shards_dir.mkdir(parents=True, exist_ok=True)
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else workers * threads_per_worker,
                 include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        dataset = ray.data.from_items([{"text": t, "line": int(n)} for t, n in zip(texts, lines)],
                                      override_num_blocks=max(1, -(-len(texts) // shard_docs)))
        written = dataset.map_batches(
            _ShardWriter, batch_size=shard_docs, concurrency=workers, num_cpus=threads_per_worker,
            fn_constructor_kwargs=dict(model=model, shards_dir=str(shards_dir), threads=threads_per_worker,
                                       batch_size=batch_size, device=device, backend=backend)).take_all()
    finally:
        if started:
            ray.shutdown()
    shards = sorted(Path(row["shard"]) for row in written)
    if sum(int(row["documents"]) for row in written) != len(texts):
        raise RuntimeError(f"the shards under {shards_dir} hold {sum(int(r['documents']) for r in written)} "
                           f"documents, not {len(texts)}")
    return shards


def main(argv: Optional[list[str]] = None) -> int:
    from ctxkern.search.corpus import read_corpus_file

    parser = argparse.ArgumentParser(prog="python -m ctxkern.search.distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", help="a text or JSONL file, or - to read stdin (as `ctxkern index build`)")
    parser.add_argument("--out", required=True, help="the merged index folder")
    parser.add_argument("--shards", help="where the workers write their shards (default: OUT.shards, kept)")
    parser.add_argument("--jsonl-field", metavar="FIELD", help="index this string field of each JSONL line")
    parser.add_argument("--model", help="a sentence-transformers folder every worker can read (default: bundled)")
    parser.add_argument("--workers", type=int, default=2, help="encoder actors (default 2)")
    parser.add_argument("--threads-per-worker", type=int, default=1, help="torch threads per actor (default 1)")
    parser.add_argument("--shard-docs", type=int, default=1000, help="documents per shard (default 1000)")
    parser.add_argument("--address", help="a running Ray cluster to join (default: start a local one)")
    args = parser.parse_args(argv)
    try:
        corpus = read_corpus_file(args.corpus, jsonl_field=args.jsonl_field)
        start = time.perf_counter()
        shards = encode_shards(corpus.texts, corpus.lines, args.shards or f"{args.out}.shards", model=args.model,
                               workers=args.workers, threads_per_worker=args.threads_per_worker,
                               shard_docs=args.shard_docs, address=args.address)
        index = Index.merge([Index.load(s) for s in shards])
        index.skipped = corpus.skipped
        index.save(args.out)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"ctxkern.search.distributed: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(index)} documents from {len(shards)} shards by {args.workers} Ray workers, in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
