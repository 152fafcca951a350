"""The `ctxkern` command: `ctxkern info` and `ctxkern bench`."""
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctxkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and which backends are available").set_defaults(run=_info)
    bench = sub.add_parser("bench", help="time every backend of an op against PyTorch and peers")
    bench.add_argument("--op", help="one op (default: all)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--out", default="bench-out", help="folder for <date>-<device>[-<op>].json, .md and .png")
    bench.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    bench.add_argument("--quick", action="store_true", help="small shapes, for a smoke test")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, RuntimeError) as err:
        print(f"ctxkern: error: {err}", file=sys.stderr)
        return 2
