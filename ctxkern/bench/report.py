"""Benchmark results as a printed table, JSON, Markdown and a PNG plot."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Optional


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
ITEMS_COLUMN = "items/s"
PEER_NOTE = ("'vs <peer>' in the 'vs torch' column: an end-to-end case (no torch eager) divides the named peer's "
             "time by this row's instead; items/s: sentences (or other items) per second")


def _time_cell(r: dict) -> str:
    if "error" in r:
        return "WRONG: " + r["error"]
    return _fmt(r["median_ms"], ".4f") + (f" ({r['note']})" if "note" in r else "")


def _ratio_cell(value, scale: float, suffix: str) -> str:
    return "-" if value is None else f"{value * scale:.{2 if suffix == 'x' else 0}f}{suffix}"


def _speedup(r: dict) -> tuple[Optional[float], str]:
    """The row's speed-up and a label of what it is against: "" for torch eager, else " vs <peer>"."""
    if r["speedup_vs_torch"] is None and r.get("speedup_vs_peer") is not None:
        return r["speedup_vs_peer"], f" vs {r['peer']}"
    return r["speedup_vs_torch"], ""


def _speedup_cell(r: dict) -> str:
    value, against = _speedup(r)
    return _ratio_cell(value, 1, "x") + against


def _has_items(rows: list[dict]) -> bool:
    return any("items_per_s" in r for r in rows)


def columns(rows: list[dict]) -> tuple[str, ...]:
    """The table's columns: items/s only when some case counts items, so other ops' tables are unchanged."""
    return COLUMNS[:5] + ((ITEMS_COLUMN,) if _has_items(rows) else ()) + COLUMNS[5:]


def table_lines(rows: list[dict]) -> list[list[str]]:
    items = _has_items(rows)
    return [[r["op"], r["shape"], r["dtype"], r["backend"] + ("" if r["baseline"] else " *"), _time_cell(r)]
            + ([_fmt(r.get("items_per_s"), ".1f")] if items else [])
            + [_fmt(r["gbps"], ".1f"), _fmt(r["tflops"], ".3g"), _speedup_cell(r),
               _ratio_cell(r["peak_fraction"], 100, "%")] for r in rows]


def format_text(result: dict) -> str:
    lines, cols = table_lines(result["rows"]), columns(result["rows"])
    widths = [max(len(c), *(len(l[i]) for l in lines)) if lines else len(c) for i, c in enumerate(cols)]
    out = [f"device: {result['device']}   torch {result['torch']}   commit {result['commit']}   "
           f"peak: copy {result['peak']['copy_gbps']:.1f} GB/s, bf16 matmul {result['peak']['bf16_tflops']:.2f} TFLOP/s",
           f"allocator: {result['allocator']}",
           "  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    out += ["  ".join(v.ljust(w) for v, w in zip(l, widths)) for l in lines]
    out.append("(* = ctxkern; 'vs torch' = torch eager time / this time; 'of peak' = GB/s over the measured copy "
               "bandwidth, or TFLOP/s over the measured bf16 matmul rate)")
    if _has_items(result["rows"]):
        out.append(f"({PEER_NOTE})")
    return "\n".join(out)


def format_markdown(result: dict) -> str:
    out = [f"# ctxkern benchmark: {result['device']}", "",
           f"torch {result['torch']}, commit `{result['commit']}`, {result['date']}. Measured peaks in this run: "
           f"copy {result['peak']['copy_gbps']:.1f} GB/s, bf16 matmul {result['peak']['bf16_tflops']:.2f} TFLOP/s. "
           f"Allocator: {result['allocator']}.",
           "", "| " + " | ".join(columns(result["rows"])) + " |", "|" + "---|" * len(columns(result["rows"]))]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in l) + " |" for l in table_lines(result["rows"])]
    out += ["", "`*` marks ctxkern's kernels. 'vs torch' is torch eager's median time over this row's."]
    if _has_items(result["rows"]):
        out[-1] += f" {PEER_NOTE}."
    return "\n".join(out) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if _speedup(r)[0] is not None]
    labels = [f"{r['op']} {r['shape']} {r['dtype']} | {r['backend']}" for r in rows]
    peers = sorted({r["peer"] for r in rows if _speedup(r)[1]})
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.5))
    colors = ["#999999" if r["baseline"] else "#1f77b4" for r in rows]
    ax.barh(range(len(rows)), [_speedup(r)[0] for r in rows], color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel(f"speed-up over torch eager or, end to end, over {', '.join(peers)} (blue = ctxkern)" if peers
                  else "speed-up over torch eager (higher is better; blue = ctxkern)")
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
