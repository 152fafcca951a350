"""The `ctxkern` command: `embed` and `search` (sentence embeddings on the bundled model), `elmo`, `info` and
`bench`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _info(_args) -> int:
    import ctxkern
    from ctxkern import _dispatch

    print(f"ctxkern {ctxkern.__version__}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if torch.cuda.is_available():
        print(f"CUDA device: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        print("CUDA device: none")
    print("backends:")
    for name, status in ctxkern.backends().items():
        detail = f" ({_dispatch.CPU_KERNELS} build)" if name == "cpu" and status == "available" else ""
        print(f"  {name:<7} {status}{detail}")
    return 0


def _bench(args) -> int:
    from ctxkern import bench
    from ctxkern.bench.report import format_text, write

    if args.threads:
        torch.set_num_threads(args.threads)
    ops = [args.op] if args.op else list(bench.OPS)
    result = bench.run(ops, args.device, quick=args.quick, with_compile=not args.no_compile,
                       progress=lambda msg: print(f"  ... {msg}", file=sys.stderr, flush=True))
    print(format_text(result))
    for path in write(result, Path(args.out)):
        print(f"wrote {path}")
    return 1 if any("error" in row for row in result["rows"]) else 0


def _load_encoder(args, quiet: bool = False):
    from ctxkern import cli_elmo
    from ctxkern.models import SentenceEncoder

    if cli_elmo.is_elmo_model(args.model):
        return cli_elmo.load_encoder(args)

    encoder = SentenceEncoder.from_pretrained(args.model, device=args.device, backend=args.backend)
    name = "all-MiniLM-L6-v2 (bundled)" if args.model is None else str(args.model)
    if not quiet:
        print(f"model {name}, {encoder.dim}-dim, on {args.device}, backend {args.backend}")
    return encoder


def _embed(args) -> int:
    from ctxkern.cli_embed import print_similarity
    from ctxkern.search import cosine_similarity_matrix

    encoder = _load_encoder(args)
    vectors = encoder.word_vectors(args.sentences, args.word) if args.word else encoder.encode(args.sentences)
    print_similarity(cosine_similarity_matrix(vectors, vectors).cpu(), args.sentences, args.word)
    return 0


def _search(args) -> int:
    from ctxkern.cli_index import check_query
    from ctxkern.search import DEFAULT_CORPUS, read_corpus, top_k

    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    check_query(args.query)
    if args.index:
        from ctxkern.cli_index import search_index

        return search_index(args)
    if args.approximate:
        raise ValueError("--approximate needs --index: it searches an index's FAISS index")
    corpus = read_corpus(args.corpus) if args.corpus else list(DEFAULT_CORPUS)
    encoder = _load_encoder(args)
    query, documents = encoder.encode([args.query]), encoder.encode(corpus)
    print(f"query: {args.query}")
    for index, score in top_k(query[0], documents, args.top):
        print(f"{score:7.4f}  {corpus[index]}")
    return 0


# The ops `ctxkern bench --op` takes, listed here so that `--help` does not import the harness (and with it
# the models); tests/test_cli.py checks that it equals ctxkern.bench.OPS.
BENCH_OPS = ("layer_norm", "masked_mean_pool", "attention", "lstm_cell", "lstm", "bert", "clip", "elmo")
BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (torch's default) or more, got {value}")
    return value


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a sentence-transformers or BERT folder, or elmo:OPTIONS.json,WEIGHTS.hdf5 "
                                        "(default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--device", default=_default_device(),
                        help=f"the torch device to run the model on, e.g. cpu, cuda, cuda:1 (default here: "
                             f"{_default_device()})")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="which kernels the model runs: auto (the fastest available for the device), torch "
                             "(the pure-PyTorch reference), cpu, cuda or triton (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    from ctxkern import __version__
    from ctxkern.cli_index import add_index_parser, add_search_arguments

    parser = argparse.ArgumentParser(prog="ctxkern", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ctxkern {__version__}",
                        help="print ctxkern's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    embed = sub.add_parser("embed", help="the cosine-similarity matrix of sentences' embeddings")
    embed.add_argument("sentences", nargs="+", help="the sentences")
    embed.add_argument("--word", help="compare this word's contextual embedding in each sentence instead")
    _model_arguments(embed)
    embed.set_defaults(run=_embed)
    search = sub.add_parser("search", help="rank a corpus, or a saved index, by similarity to a query")
    search.add_argument("--query", required=True, help="the text to search for")
    search.add_argument("--corpus", help="a text file, one sentence per line, encoded for this query (default: a "
                                         "small built-in corpus); - reads stdin")
    add_search_arguments(search)
    search.add_argument("--top", type=int, default=5, help="how many results (default 5)")
    _model_arguments(search)
    search.set_defaults(run=_search)
    add_index_parser(sub, _model_arguments)
    from ctxkern import cli_clip, cli_elmo

    cli_clip.add_parser(sub, _default_device(), BACKENDS)
    cli_elmo.add_parser(sub, _default_device(), BACKENDS)
    sub.add_parser("info", help="versions, devices and which backends are available").set_defaults(run=_info)
    bench = sub.add_parser("bench", help="time every backend of an op against PyTorch and peers",
                           description="Checks every candidate against a float64 reference, times it, prints a "
                                       "table and writes it as JSON, Markdown and a PNG plot.")
    bench.add_argument("--op", choices=BENCH_OPS, help="one op (default: all)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default=_default_device(),
                       help=f"where to run: cpu or cuda (default here: {_default_device()})")
    bench.add_argument("--out", default="bench-out", help="folder for <date>-<device>[-<op>].json, .md and .png "
                                                          "(default: bench-out)")
    bench.add_argument("--threads", type=_threads, default=0, help="CPU threads (default 0: torch's)")
    bench.add_argument("--quick", action="store_true", help="small shapes and few rounds, for a smoke test")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, RuntimeError, TypeError, FileNotFoundError) as err:
        print(f"ctxkern: error: {err}", file=sys.stderr)
        return 2
