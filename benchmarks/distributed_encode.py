"""The distributed path's overhead: the same corpus indexed by one process (`Index.build`, all of torch's
threads) and by Ray Data on this machine (ctxkern.search.distributed.encode_shards, W workers x T threads,
then Index.merge), side by side in one run. Ray's time is given with its start (ray.init, as a one-off user
pays it) and without (a cluster already running, as on a real one).

    python benchmarks/distributed_encode.py [--docs 4000] [--workers 2]

The corpus is benchmarks/search_index.py's: comment lines of the installed packages' sources.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_index import RESULTS, ROOT, comment_lines  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-docs", type=int, default=500)
    args = parser.parse_args()

    import ray
    import torch

    from ctxkern.models import SentenceEncoder
    from ctxkern.search import Index
    from ctxkern.search.distributed import encode_shards

    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    texts = comment_lines(args.docs)
    lines = list(range(1, len(texts) + 1))
    threads = torch.get_num_threads()
    work = Path(tempfile.mkdtemp(prefix="ctxkern-distributed-"))

    start = time.perf_counter()
    encoder = SentenceEncoder.from_pretrained()
    Index.build(texts, encoder, lines=lines, batch_size=64, show_progress_bar=False).save(work / "single")
    single = time.perf_counter() - start

    start = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    ray_start = time.perf_counter() - start
    try:
        start = time.perf_counter()
        shards = encode_shards(texts, lines, work / "shards", workers=args.workers, threads_per_worker=1,
                               shard_docs=args.shard_docs, batch_size=64)
        Index.merge([Index.load(s) for s in shards]).save(work / "merged")
        distributed = time.perf_counter() - start
    finally:
        ray.shutdown()

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit, "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
        "documents": len(texts), "single_process_threads": threads, "ray_workers": args.workers,
        "ray_threads_per_worker": 1, "shard_docs": args.shard_docs, "ray_version": ray.__version__,
        "single_process_seconds": round(single, 2), "ray_init_seconds": round(ray_start, 2),
        "ray_seconds_without_init": round(distributed, 2),
        "ratio_without_init": round(distributed / single, 2),
        "ratio_with_init": round((distributed + ray_start) / single, 2),
    }
    stem = f"{result['date']}-cpu-distributed_encode"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = "\n".join([
        f"# Distributed encoding overhead ({result['date']}, commit `{result['commit']}`, Ray {ray.__version__})", "",
        f"{len(texts)} documents (comment lines of the installed packages), bundled all-MiniLM-L6-v2, batch 64; "
        f"load average at the end {result['load_average_at_end']} (2 cores).", "",
        "| path | seconds | vs single process |", "|---|---|---|",
        f"| one process, {threads} torch threads (Index.build + save) | {result['single_process_seconds']} | 1.00x |",
        f"| Ray Data, {args.workers} workers x 1 thread, shards of {args.shard_docs} + merge + save, Ray running "
        f"| {result['ray_seconds_without_init']} | {result['ratio_without_init']}x |",
        f"| the same plus ray.init | {round(distributed + ray_start, 2)} | {result['ratio_with_init']}x |", ""])
    (RESULTS / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
