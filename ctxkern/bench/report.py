"""Benchmark results as a printed table, JSON, Markdown and a PNG plot."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path


def git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        # Results written by an earlier run of the suite do not make the measured code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = ("op", "shape", "dtype", "backend", "median ms", "GB/s", "TFLOP/s", "vs torch", "of peak")


def _time_cell(r: dict) -> str:
    if "error" in r:
        return "WRONG: " + r["error"]
    return _fmt(r["median_ms"], ".4f") + (f" ({r['note']})" if "note" in r else "")


def _ratio_cell(value, scale: float, suffix: str) -> str:
    return "-" if value is None else f"{value * scale:.{2 if suffix == 'x' else 0}f}{suffix}"


def table_lines(rows: list[dict]) -> list[list[str]]:
    return [[r["op"], r["shape"], r["dtype"], r["backend"] + ("" if r["baseline"] else " *"), _time_cell(r),
             _fmt(r["gbps"], ".1f"), _fmt(r["tflops"], ".3g"), _ratio_cell(r["speedup_vs_torch"], 1, "x"),
             _ratio_cell(r["peak_fraction"], 100, "%")] for r in rows]


def format_text(result: dict) -> str:
    lines = table_lines(result["rows"])
    widths = [max(len(c), *(len(l[i]) for l in lines)) if lines else len(c) for i, c in enumerate(COLUMNS)]
    out = [f"device: {result['device']}   torch {result['torch']}   commit {result['commit']}   "
           f"peak: copy {result['peak']['copy_gbps']:.1f} GB/s, bf16 matmul {result['peak']['bf16_tflops']:.2f} TFLOP/s",
           f"allocator: {result['allocator']}",
           "  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths))]
    out += ["  ".join(v.ljust(w) for v, w in zip(l, widths)) for l in lines]
    out.append("(* = ctxkern; 'vs torch' = torch eager time / this time; 'of peak' = GB/s over the measured copy "
               "bandwidth, or TFLOP/s over the measured bf16 matmul rate)")
    return "\n".join(out)


def format_markdown(result: dict) -> str:
    out = [f"# ctxkern benchmark: {result['device']}", "",
           f"torch {result['torch']}, commit `{result['commit']}`, {result['date']}. Measured peaks in this run: "
           f"copy {result['peak']['copy_gbps']:.1f} GB/s, bf16 matmul {result['peak']['bf16_tflops']:.2f} TFLOP/s. "
           f"Allocator: {result['allocator']}.",
           "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in l) + " |" for l in table_lines(result["rows"])]
    out += ["", "`*` marks ctxkern's kernels. 'vs torch' is torch eager's median time over this row's."]
    return "\n".join(out) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["speedup_vs_torch"] is not None]
    labels = [f"{r['op']} {r['shape']} {r['dtype']} | {r['backend']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.5))
    colors = ["#999999" if r["baseline"] else "#1f77b4" for r in rows]
    ax.barh(range(len(rows)), [r["speedup_vs_torch"] for r in rows], color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speed-up over torch eager (higher is better; blue = ctxkern)")
    ax.set_title(f"ctxkern on {result['device']} ({result['date']}, {result['commit']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    # A run of one op is named after it, so it does not replace a whole-suite run of the same day and device.
    ops = result.get("ops", [])
    suffix = f"-{ops[0]}" if len(ops) == 1 else ""
    stem = out_dir / f"{result['date']}-{result['device_slug']}{suffix}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    public = {k: v for k, v in result.items() if k != "device_slug"}
    paths[0].write_text(json.dumps(public, indent=2) + "\n")
    paths[1].write_text(format_markdown(result))
    plot(result, paths[2])
    return paths
