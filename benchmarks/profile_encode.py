"""Where SentenceEncoder.encode's time goes on the CPU: torch.profiler over the bench's two sentence sets (the mix
of lengths and the long documentation paragraphs), the operators' self times grouped into matrix products,
attention, LayerNorm, GELU, pooling, embeddings, tokenization, packing and copies, and the rest (Python,
dispatch), as fractions of encode's wall time; the matrix products' rate against this machine's fp32 matmul
peak measured in the same process (ctxkern/bench/peaks.py, torch's a @ b, and the same product through
oneDNN, which the models' linear layers use).

    PYTHONPATH=$PWD python benchmarks/profile_encode.py [--threads 2] [--rounds 3] [--json out.json]

The profiled run follows one unprofiled warm-up call; the shares are over `--rounds` profiled calls. The
profiler adds a few microseconds per operator, so "other" is a little larger than without it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctxkern.bench import bert as bench_bert  # noqa: E402
from ctxkern.bench.peaks import CPU_MATMUL_N, _cpu_timer, matmul_tflops  # noqa: E402
from ctxkern.bench.sentences import doc_paragraphs, realistic_sentences  # noqa: E402
from ctxkern.models import SentenceEncoder  # noqa: E402

# Operator name (its start) -> category. Matched in order; operators in none of them count as "copies".
CATEGORIES = (
    ("matrix products", ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::bmm", "aten::linear")),
    ("attention", ("ctxkern::attention",)),
    ("LayerNorm", ("ctxkern::layer_norm",)),
    ("GELU", ("aten::gelu",)),
    ("pooling", ("ctxkern::masked_mean_pool",)),
    ("embeddings", ("aten::embedding", "aten::index_select")),
)
TOKENIZE, PACK, ENCODE = "tokenize", "pack", "encode"
WRAPPERS = ("aten::", "ctxkern::", "mkldnn::")


def _category(name: str) -> str:
    for category, prefixes in CATEGORIES:
        if name.startswith(prefixes):
            return category
    return "copies, padding, indexing"


def _instrument(encoder: SentenceEncoder) -> None:
    """record_function ranges around tokenization and the packing of each batch's ids (this object only)."""
    for name, label in (("tokenize", TOKENIZE), ("_pack", PACK)):
        method = getattr(encoder, name)

        def timed(*args, _method=method, _label=label):
            with record_function(_label):
                return _method(*args)

        setattr(encoder, name, timed)


def _range_of(event) -> str | None:
    """The instrumented range (tokenize or pack) an operator ran inside, if any."""
    while event is not None:
        if event.name in (TOKENIZE, PACK):
            return event.name
        event = event.cpu_parent
    return None


def _top_operators(prof, rounds: int, n: int) -> list[tuple[str, float]]:
    """The n operators of most self time outside the tokenize and pack ranges, (name, ms per call)."""
    ms: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.name.startswith(WRAPPERS) and _range_of(e.cpu_parent) is None:
            ms[e.name] += e.self_cpu_time_total / 1e3 / rounds
    return sorted(ms.items(), key=lambda kv: -kv[1])[:n]


def _shares(prof, rounds: int) -> tuple[float, dict[str, float]]:
    """(encode's wall ms per call, {category: ms per call}). An operator's self time (a parallel operator's
    wall time on the calling thread, its threads' work included) goes to its category, unless it ran inside
    the tokenize or pack range, whose whole time is its own category; the rest of encode's wall time is
    "other" (Python, dispatch, the profiler's own cost)."""
    ms: dict[str, float] = defaultdict(float)
    total = 0.0
    for e in prof.events():
        if e.name == ENCODE:
            total += e.cpu_time_total
        elif e.name == TOKENIZE:
            ms["tokenization"] += e.cpu_time_total
        elif e.name == PACK:
            ms["packing (ids to tensors)"] += e.cpu_time_total
        elif e.name.startswith(WRAPPERS) and _range_of(e.cpu_parent) is None:
            ms[_category(e.name)] += e.self_cpu_time_total
    ms["other (Python, dispatch)"] = total - sum(ms.values())
    return total / 1e3 / rounds, {k: v / 1e3 / rounds for k, v in ms.items()}


def _onednn_tflops(n: int, timer) -> float:
    a, w = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / timer(lambda: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=bench_bert.BATCH_SIZE)
    parser.add_argument("--top", type=int, default=8, help="also list this many operators of most self time")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder = SentenceEncoder.from_pretrained(None)
    _instrument(encoder)
    timer = _cpu_timer(5)
    peak = {"torch a @ b": matmul_tflops(CPU_MATMUL_N, torch.float32, "cpu", timer),
            "oneDNN": _onednn_tflops(CPU_MATMUL_N, timer)}
    print(f"fp32 matmul {CPU_MATMUL_N}^3 peak, {args.threads} threads: "
          + ", ".join(f"{k} {v * 1e3:.0f} GFLOP/s" for k, v in peak.items()))
    report = {"threads": args.threads, "peak_tflops": peak, "sets": {}}
    config = encoder.bert.config
    for name, sentences in (("mix", realistic_sentences(256)), ("docs", doc_paragraphs(bench_bert.DOC_PARAGRAPHS))):
        encoder.encode(sentences, batch_size=args.batch_size)                       # warm-up
        lengths = [len(ids) for ids in encoder.tokenizer.encode_batch(sentences)]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.rounds):
                with record_function(ENCODE):
                    encoder.encode(sentences, batch_size=args.batch_size)
        total, ms = _shares(prof, args.rounds)
        start = time.perf_counter()
        encoder.encode(sentences, batch_size=args.batch_size)
        unprofiled = (time.perf_counter() - start) * 1e3
        # The linear layers' useful flops (real tokens only): encoder_flops without its attention term.
        linear_flops = bench_bert.encoder_flops(lengths, config.hidden_size, config.intermediate_size,
                                                config.num_hidden_layers) \
            - config.num_hidden_layers * 4.0 * config.hidden_size * sum(n * n for n in lengths)
        rate = linear_flops / ms["matrix products"] / 1e9 if ms.get("matrix products") else None
        print(f"\n{name}: N={len(sentences)} tokens={sum(lengths)}; encode {total:.0f} ms profiled, "
              f"{unprofiled:.0f} ms unprofiled")
        for category, value in sorted(ms.items(), key=lambda kv: -kv[1]):
            print(f"  {category:<26} {value:8.1f} ms  {value / total:6.1%}")
        if rate is not None:
            print(f"  matrix products: {rate * 1e3:.0f} GFLOP/s = "
                  + ", ".join(f"{rate / v:.0%} of {k}" for k, v in peak.items()))
        top = _top_operators(prof, args.rounds, args.top)
        print("  operators of most self time: " + ", ".join(f"{name} {value / total:.1%}" for name, value in top))
        report["sets"][name] = {"sentences": len(sentences), "tokens": sum(lengths), "encode_ms": total,
                                "unprofiled_ms": unprofiled, "ms": ms, "matmul_tflops": rate,
                                "top_operators_ms": dict(top)}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
