"""The persistent index at 100,000 documents: build time, `ctxkern search --index` end to end as a user types it
(process start included), a batch of 1,000 queries through the Python API, and the approximate (FAISS HNSW)
index's recall@10 against exact search.

The corpus is real English text: the distinct comment lines of at least six words in the installed Python
packages' sources (site-packages, files in sorted order), so it is the same on every machine with the same
packages. The queries are other such lines, not in the corpus.

    python benchmarks/search_index.py --work /tmp/ctxkern-search-bench [--docs 100000] [--random-embeddings]

--random-embeddings indexes the same texts with random unit vectors instead of encoding them (for a machine too
slow to encode the corpus); the query-speed figures hold for either, recall does not (random vectors are harder
for an approximate index than real embeddings), and the results say which was used.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
N_QUERIES = 1000
BATCH = 128                 # queries per encoder batch (Index.search's default)
CLI_QUERIES = ("How do I read a file line by line?", "the gradient of the loss", "parse a date from a string",
               "retry the request when the connection fails", "the shape of the output tensor")


def comment_lines(limit: int) -> list[str]:
    """Distinct comment lines of six words or more from the installed packages' sources, in sorted-file order."""
    site = Path(np.__file__).resolve().parents[1]
    seen, out = set(), []
    for path in sorted(site.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("#"):
                line = line.lstrip("#").strip()
                if len(line.split()) >= 6 and line not in seen:
                    seen.add(line)
                    out.append(line)
        if len(out) >= limit:
            return out[:limit]
    raise SystemExit(f"only {len(out)} comment lines found in {site}, {limit} needed")


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return elapsed, proc.stdout


def build(work: Path, docs: int, random_embeddings: bool, commit: str) -> tuple[Path, list[str], dict]:
    texts = comment_lines(docs + N_QUERIES)
    corpus, queries = texts[:docs], texts[docs:]
    index_dir = work / f"index-{docs}{'-random' if random_embeddings else ''}"
    if (index_dir / "build.json").is_file():                               # built by an earlier run
        return index_dir, queries, json.loads((index_dir / "build.json").read_text())
    (work / "corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    if random_embeddings:
        from ctxkern.models import SentenceEncoder
        from ctxkern.search import Index, model_identity

        start = time.perf_counter()
        encoder = SentenceEncoder.from_pretrained()     # the model the queries go through, and its query encoder
        vectors = np.random.default_rng(0).standard_normal((docs, 384)).astype(np.float32)
        index = Index(384, model=model_identity(encoder), faiss="HNSW32", faiss_params="efSearch=128")
        index.add(corpus, vectors)
        index.save(index_dir, encoder=encoder)
        seconds = time.perf_counter() - start
    else:
        seconds, _ = timed([sys.executable, "-m", "ctxkern", "index", "build", str(work / "corpus.txt"),
                            "--out", str(index_dir), "--approximate", "--batch-size", "64"])
    built = {"seconds": seconds, "commit": commit, "load_average": [round(x, 1) for x in os.getloadavg()]}
    (index_dir / "build.json").write_text(json.dumps(built))
    return index_dir, queries, built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="a folder for the corpus and the index (reused if there)")
    parser.add_argument("--docs", type=int, default=100_000, help="documents in the index (default 100000)")
    parser.add_argument("--random-embeddings", action="store_true", help="index random vectors, not encodings")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()                       # the code measured, read before it runs
    index_dir, queries, built = build(work, args.docs, args.random_embeddings, commit)
    build_seconds = built["seconds"]
    print(f"index {index_dir}: built in {build_seconds:.1f} s", flush=True)

    # Process start and imports alone, then `ctxkern search --index` as typed (median of the queries): the
    # console script, which searches an index with a stored query encoder without torch, and `python -m ctxkern`,
    # which imports ctxkern (and torch) first.
    python_start = statistics.median(timed([sys.executable, "-c", "pass"])[0] for _ in range(3))
    torch_import = statistics.median(timed([sys.executable, "-c", "import torch"])[0] for _ in range(3))
    ctxkern_import = statistics.median(timed([sys.executable, "-c", "import ctxkern"])[0] for _ in range(3))
    console_script = str(Path(sys.executable).parent / "ctxkern")
    search = ["search", "--index", str(index_dir), "--top", "10", "--query"]
    cli = [timed([console_script, *search, q])[0] for q in CLI_QUERIES]
    cli_torch = [timed([sys.executable, "-m", "ctxkern", *search, q])[0] for q in CLI_QUERIES]
    print(f"ctxkern search --index: median {statistics.median(cli):.2f} s; python -m ctxkern search --index: "
          f"{statistics.median(cli_torch):.2f} s (python {python_start:.2f} s, import torch {torch_import:.2f} s, "
          f"import ctxkern {ctxkern_import:.2f} s)", flush=True)

    import torch

    from ctxkern.models import SentenceEncoder
    from ctxkern.search import Index

    start = time.perf_counter()
    index = Index.load(index_dir)
    load_seconds = time.perf_counter() - start
    encoder = SentenceEncoder.from_pretrained()
    index.search(queries[:8], k=10, encoder=encoder)                       # warm-up
    start = time.perf_counter()
    query_vectors = encoder.encode(queries, batch_size=BATCH, convert_to_numpy=True)
    encode_seconds = time.perf_counter() - start
    timings = {}
    for name in ("exact", "faiss"):
        index.search_embeddings(query_vectors[:8], 10, exact=name == "exact")
        start = time.perf_counter()
        _, ids = index.search_embeddings(query_vectors, 10, exact=name == "exact")
        timings[name] = (time.perf_counter() - start, ids)
    start = time.perf_counter()
    hits = index.search(queries, k=10, encoder=encoder, batch_size=BATCH, exact=True)
    end_to_end = time.perf_counter() - start
    start = time.perf_counter()
    hits_faiss = index.search(queries, k=10, encoder=encoder, batch_size=BATCH)   # the default: FAISS's index
    end_to_end_faiss = time.perf_counter() - start
    assert len(hits_faiss) == N_QUERIES
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(timings["faiss"][1], timings["exact"][1])]))
    assert len(hits) == N_QUERIES

    result = {
        "date": time.strftime("%Y-%m-%d"), "commit": commit,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "documents": len(index), "embeddings": "random unit vectors" if args.random_embeddings else
        "all-MiniLM-L6-v2 (bundled), encoded by ctxkern index build", "faiss": f"{index.faiss_spec} ({index.faiss_params})",
        "build_seconds": round(build_seconds, 1), "build_commit": built.get("commit"),
        "build_load_average": built.get("load_average"), "load_average_at_end": [round(x, 1) for x in os.getloadavg()], "index_load_seconds": round(load_seconds, 3),
        "cli_search_seconds": [round(t, 3) for t in cli], "cli_search_median_seconds": round(statistics.median(cli), 3),
        "cli_search_with_torch_seconds": [round(t, 3) for t in cli_torch],
        "cli_search_with_torch_median_seconds": round(statistics.median(cli_torch), 3),
        "query_encoder_stored": (index_dir / "query").is_dir(),
        "python_start_seconds": round(python_start, 3), "import_torch_seconds": round(torch_import, 3),
        "import_ctxkern_seconds": round(ctxkern_import, 3),
        "batch_queries": N_QUERIES, "batch_encode_seconds": round(encode_seconds, 3),
        "batch_exact_search_seconds": round(timings["exact"][0], 4),
        "batch_faiss_search_seconds": round(timings["faiss"][0], 4),
        "batch_text_queries_per_second": round(N_QUERIES / end_to_end, 1),
        "batch_text_queries_per_second_faiss": round(N_QUERIES / end_to_end_faiss, 1),
        "batch_exact_queries_per_second_embeddings": round(N_QUERIES / timings["exact"][0], 1),
        "batch_faiss_queries_per_second_embeddings": round(N_QUERIES / timings["faiss"][0], 1),
        "faiss_recall_at_10": round(recall, 4),
    }
    stem = f"{result['date']}-cpu-search_index{'-random' if args.random_embeddings else ''}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    return "\n".join([
        f"# Search index at {r['documents']:,} documents ({r['date']}, commit `{r['commit']}`)", "",
        f"{r['machine']} (load average at the end {r['load_average_at_end']}); embeddings: "
        f"{r['embeddings']}; approximate index: FAISS {r['faiss']}.", "",
        "| measure | value |", "|---|---|",
        f"| `ctxkern index build --approximate` (encode + save; at `{r['build_commit']}`, load average "
        f"{r['build_load_average']}) | {r['build_seconds']} s |",
        f"| `ctxkern search --index DIR --query ... --top 10`, end to end, median of {len(r['cli_search_seconds'])} "
        f"(the console script; the index {'stores' if r['query_encoder_stored'] else 'does not store'} its query "
        f"encoder, so the search runs {'without' if r['query_encoder_stored'] else 'with'} torch) | "
        f"{r['cli_search_median_seconds']} s |",
        f"| the same through `python -m ctxkern`, which imports torch first | "
        f"{r['cli_search_with_torch_median_seconds']} s |",
        f"| of which: Python start / `import torch` / `import ctxkern` (separate processes) | "
        f"{r['python_start_seconds']} / {r['import_torch_seconds']} / {r['import_ctxkern_seconds']} s |",
        f"| Index.load | {r['index_load_seconds']} s |",
        f"| {r['batch_queries']} text queries through `Index.search` (encode in batches of {BATCH} + exact search) | "
        f"{r['batch_text_queries_per_second']} queries/s |",
        f"| the same with the index's FAISS index (Index.search's default where there is one) | "
        f"{r['batch_text_queries_per_second_faiss']} queries/s |",
        f"| of which encoding the {r['batch_queries']} queries | {r['batch_encode_seconds']} s |",
        f"| {r['batch_queries']} query embeddings, exact search | {r['batch_exact_search_seconds']} s "
        f"({r['batch_exact_queries_per_second_embeddings']} queries/s) |",
        f"| {r['batch_queries']} query embeddings, FAISS search | {r['batch_faiss_search_seconds']} s "
        f"({r['batch_faiss_queries_per_second_embeddings']} queries/s) |",
        f"| FAISS recall@10 against exact search | {r['faiss_recall_at_10']} |", ""])


if __name__ == "__main__":
    main()
