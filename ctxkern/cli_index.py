"""`ctxkern index build|merge|info` and `ctxkern search --index`: a persistent index (ctxkern.search.Index)."""
from __future__ import annotations

import sys
import time

APPROXIMATE_DEFAULT = "HNSW32"
APPROXIMATE_PARAMS_DEFAULT = "efSearch=128"


def add_index_parser(sub, model_arguments) -> None:
    index = sub.add_parser("index", help="build, merge or describe a persistent search index",
                           description="A folder holding a corpus's embeddings, its texts with their line numbers "
                                       "and the model that made them; `ctxkern search --index DIR` searches it "
                                       "without encoding the corpus again.")
    actions = index.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="encode a corpus once and save it as an index",
                               description="One document per line (empty lines are skipped and counted), or one "
                                           "field of each line of a JSONL file. The index is written to a "
                                           "temporary folder and renamed into place: an interrupted build leaves "
                                           "the previous index, or none.")
    build.add_argument("corpus", help="a text or JSONL file, or - to read stdin")
    build.add_argument("--out", required=True, help="the index folder to write (replaced if it holds an index)")
    build.add_argument("--jsonl-field", metavar="FIELD",
                       help="read the corpus as JSONL and index this string field of each line")
    build.add_argument("--batch-size", type=int, default=32,
                       help="sentences per encoder batch (default 32)")
    _faiss_arguments(build)
    build.add_argument("--no-query-encoder", action="store_true",
                       help="do not store the ONNX query encoder that lets `ctxkern search --index` run without "
                            "torch (about 90 MB for the bundled model; searches then load the model through torch)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    model_arguments(build)
    build.set_defaults(run=_build)
    merge = actions.add_parser("merge", help="merge index shards made by the same model (the distributed path)")
    merge.add_argument("shards", nargs="+", help="index folders, e.g. the shards of ctxkern.search.distributed")
    merge.add_argument("--out", required=True, help="the merged index folder to write")
    _faiss_arguments(merge)
    merge.set_defaults(run=_merge)
    info = actions.add_parser("info", help="what an index holds: documents, model, format, FAISS index")
    info.add_argument("index", help="an index folder")
    info.set_defaults(run=_info)


def add_search_arguments(search) -> None:
    search.add_argument("--index", metavar="DIR", help="search this index folder (made by `ctxkern index build`) "
                                                       "instead of encoding a corpus for each query")
    search.add_argument("--approximate", action="store_true",
                        help="with --index: search the index's FAISS index, where it has one (default: exact "
                             "search, faster for one query than loading FAISS's index up to millions of texts)")


def _faiss_arguments(parser) -> None:
    parser.add_argument("--approximate", action="store_true",
                        help=f"also build an approximate FAISS index (default {APPROXIMATE_DEFAULT}, "
                             f"{APPROXIMATE_PARAMS_DEFAULT}) for large corpora; needs faiss-cpu")
    parser.add_argument("--faiss", metavar="SPEC", help="the FAISS index_factory string, e.g. HNSW32 or "
                                                         "IVF1024,Flat (implies --approximate)")
    parser.add_argument("--faiss-params", metavar="PARAMS",
                        help="FAISS search parameters, e.g. efSearch=128 or nprobe=32")


def _faiss_choice(args) -> tuple:
    if args.faiss or args.approximate:
        spec = args.faiss or APPROXIMATE_DEFAULT
        params = args.faiss_params or (APPROXIMATE_PARAMS_DEFAULT if spec == APPROXIMATE_DEFAULT else None)
        return spec, params
    if args.faiss_params:
        raise ValueError("--faiss-params needs --approximate or --faiss")
    return None, None


def _build(args) -> int:
    from ctxkern.cli import _load_encoder
    from ctxkern.search import Index, read_corpus_file

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    spec, params = _faiss_choice(args)
    corpus = read_corpus_file(args.corpus, jsonl_field=args.jsonl_field)
    print(f"corpus {corpus.name}: {len(corpus.texts)} documents, {corpus.skipped} empty lines skipped")
    _refuse_elmo(args.model)
    encoder = _load_encoder(args)
    start = time.perf_counter()
    index = Index.build(corpus.texts, encoder, lines=corpus.lines, batch_size=args.batch_size,
                        show_progress_bar=not args.no_progress, faiss=spec, faiss_params=params)
    index.skipped = corpus.skipped
    path = index.save(args.out, encoder=None if args.no_query_encoder else encoder)
    stored = "" if args.no_query_encoder or index.query_encoder_note else ", the query encoder"
    print(f"wrote {path}: {len(index)} documents, {index.dim}-dim, "
          f"{'exact search and FAISS ' + spec if spec else 'exact search'}{stored}, in "
          f"{time.perf_counter() - start:.1f} s")
    if index.query_encoder_note:
        print(f"note: no query encoder stored ({index.query_encoder_note}); searches load the model through torch",
              file=sys.stderr)
    return 0


def _merge(args) -> int:
    from ctxkern.search import Index

    spec, params = _faiss_choice(args)
    index = Index.merge([Index.load(shard) for shard in args.shards], faiss=spec, faiss_params=params)
    path = index.save(args.out)
    print(f"wrote {path}: {len(index)} documents from {len(args.shards)} shards")
    return 0


def _info(args) -> int:
    from ctxkern.search import Index

    index = Index.load(args.index)
    model = index.model or {}
    print(f"index {args.index}: {len(index)} documents, {index.dim}-dim, metric {index.metric}, "
          f"{index.skipped} empty corpus lines skipped")
    print(f"model: {model.get('name', 'unknown')} (fingerprint {model.get('fingerprint', '?')[:12]}, "
          f"max_seq_length {model.get('max_seq_length', '?')})")
    print(f"search: exact" + (f", approximate FAISS {index.faiss_spec} ({index.faiss_params or 'defaults'})"
                              if index.faiss_spec else ""))
    print("query encoder: " + ("stored (ONNX): `ctxkern search --index` runs without torch"
                               if index.query_folder else "none: searches load the model through torch"))
    return 0


def search_index(args) -> int:
    """`ctxkern search --index DIR --query Q`: the index's own model unless --model names another (refused if it
    is not the index's)."""
    import torch

    from ctxkern.cli import _load_encoder
    from ctxkern.search import Index

    # One query is a few tokens: splitting its matrix products over threads costs more than it saves, and on a
    # busy machine far more (measured here: 9 ms on one thread, 240 ms on two while other work ran).
    torch.set_num_threads(1)
    if args.corpus:
        raise ValueError("--corpus and --index are alternatives: an index already holds its corpus")
    index = Index.load(args.index, load_faiss=args.approximate)
    if args.model is None and index.model and not index.model.get("bundled"):
        args.model = index.model.get("path")
    _refuse_elmo(args.model)
    encoder = _load_encoder(args, quiet=True)
    index.check_encoder(encoder)
    if len(encoder.tokenize([args.query])[0]) >= encoder.max_seq_length:
        print(f"note: the query reaches the model's limit of {encoder.max_seq_length} tokens; a longer one is "
              "truncated to it", file=sys.stderr)
    _print_hits(args, index, index.search(args.query, k=args.top, encoder=encoder)[0])
    return 0


def _refuse_elmo(model) -> None:
    from ctxkern import cli_elmo

    if cli_elmo.is_elmo_model(model):
        raise ValueError(f"--model {model}: an index holds sentence embeddings of a sentence-transformers or BERT "
                         "model; an ELMo model embeds words (`ctxkern embed --word`, `ctxkern search --corpus`)")


def check_query(query: str) -> None:
    """A --query that is not UTF-8 (the shell passed bytes Python could not decode) is named, not tokenized."""
    try:
        query.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"--query is not UTF-8 text (byte {err.object[err.start].encode('utf-8', 'surrogateescape')!r} "
                         f"at character {err.start})") from None


def _print_hits(args, index, hits) -> None:
    model = (index.model or {}).get("name", "unknown")
    print(f"query: {args.query}   ({len(index)} documents in {args.index}, model {model})")
    for hit in hits:
        print(f"{hit.score:7.4f}  line {hit.line}: {hit.text}")


def light_search_arguments(argv: list[str]):
    """The parsed `search` arguments when `argv` (after the command name) asks for what search_index_light
    serves: --index with the index's own model on the CPU, no --corpus; else None."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--query", required=True)
    parser.add_argument("--top", type=int, default=5)
    add_search_arguments(parser)
    try:
        args, rest = parser.parse_known_args(argv)
    except SystemExit:                   # a malformed line: the full parser reports it, with its usage
        return None
    return args if args.index and not rest else None


def search_index_light(args) -> int:
    """`ctxkern search --index DIR --query Q` through the index's stored query encoder, without torch (see
    ctxkern/search/query_encoder.py); `_ctxkern_cli` calls it only where the folder has one."""
    from ctxkern.search import query_encoder
    from ctxkern.search.index import Index

    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    check_query(args.query)
    index = Index.load(args.index, load_faiss=args.approximate)
    encoder = query_encoder.QueryEncoder(index.query_folder)
    if encoder.token_count(args.query) >= encoder.max_seq_length:
        print(f"note: the query reaches the model's limit of {encoder.max_seq_length} tokens; a longer one is "
              "truncated to it", file=sys.stderr)
    _print_hits(args, index, index.search(encoder.encode([args.query]), k=args.top, exact=not args.approximate)[0])
    return 0

