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


def _sig(value) -> str:
    """About three significant digits, never in scientific notation (0.0123, 4.56, 78.9, 1234)."""
    if value is None:
        return "-"
    for bound, spec in ((100, ".0f"), (10, ".1f"), (1, ".2f"), (0.01, ".3f")):
        if abs(value) >= bound:
            return format(value, spec)
    return format(value, ".2g")


def on_cpu(result: dict) -> bool:
    """Whether the run was on a CPU (results from before device_type existed: by the device's name)."""
    return result.get("device_type", "cpu" if result["device"].startswith("cpu") else "cuda") == "cpu"


# ------------------------------------------------------------------------------ the wide table (.md)

COLUMNS = ("op", "shape", "dtype", "backend", "median ms", "GB/s", "TFLOP/s", "vs torch", "of peak", "peak basis")
ITEMS_COLUMN = "items/s"
PEER_NOTE = ("'vs <peer>' in the 'vs torch' column: an end-to-end case (no torch eager) divides the named peer's "
             "time by this row's instead; items/s: sentences (or other items) per second")


def _time_cell(r: dict) -> str:
    if "error" in r:
        return "WRONG: " + r["error"]
    if "skipped" in r:
        return "skipped: " + r["skipped"]
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
    return _ratio_cell(value, 1, "x") + against + "".join(f"; {_ratio_cell(x, 1, 'x')} vs {name}" for name, x in
                                                          _other_peers(r))


def _other_peers(r: dict) -> list[tuple[str, float]]:
    """An end-to-end row's speed-ups over the peers other than the main one (name, ratio)."""
    return [(name, x) for name, x in r.get("speedup_vs_peers", {}).items() if name != r.get("peer")]


def _basis_cell(r: dict) -> str:
    if r.get("peak_basis") is None:
        return "-"
    if r.get("same_size_copy_gbps") is not None:
        return f"a {r['peak_basis']}, {r['same_size_copy_gbps']:.1f} GB/s"
    return r["peak_basis"]


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
               _ratio_cell(r["peak_fraction"], 100, "%"), _basis_cell(r)] for r in rows]


def _peaks_sentence(result: dict) -> str:
    peak, cpu = result["peak"], on_cpu(result)
    flops = []
    if peak.get("fp32_tflops"):
        flops.append(f"fp32 matmul {peak['fp32_tflops'] * 1e3:.1f} GFLOP/s" if cpu
                     else f"fp32 matmul {peak['fp32_tflops']:.1f} TFLOP/s")
    if peak.get("bf16_tflops"):
        flops.append(f"bf16 matmul {peak['bf16_tflops']:.1f} TFLOP/s")
    copy = f"copy {peak['copy_gbps']:.1f} GB/s"
    if peak.get("copy_bytes"):
        copy += f" ({peak['copy_bytes'] / 2**20:.0f} MiB moved a call"
        cache = peak.get("cache_bytes") if cpu else None
        copy += f", main memory: the cache is {cache / 2**20:.0f} MiB)" if cache else ")"
    return ", ".join(flops + [copy])


def _legend(cpu: bool) -> str:
    """What 'of peak' divides by, in full (the .md file's legend)."""
    if cpu:
        return ("'of peak': a row with a FLOP count (attention, the LSTM layer, BERT end to end: model FLOPs with "
                "tokenization in the time) over the fp32 matmul rate measured in this run, for fp32 rows; no bf16 "
                "or fp16 compute row has one (this run measures no bf16 matmul on a CPU, which emulates it); "
                "other rows' GB/s over a copy of the same bytes timed in the same interleaved rounds, its fastest "
                "round with torch's threaded copy_ or numpy's single-threaded one (CPU timings leave the caches "
                "warm, so a working set of a few MiB runs from L2 or L3, as the same-size copy does; against the "
                "main-memory copy such rows would exceed 100%). Peaks are the fastest rounds of their "
                "measurements, rows the medians.")
    return ("'of peak': a row with a FLOP count over the matmul rate measured in this run for its dtype (fp32 "
            "against fp32; bf16 and fp16 against bf16), other rows' GB/s over the large device copy (GPU timings "
            "flush the L2, so every case reads device memory).")


def format_markdown(result: dict) -> str:
    out = [f"# ctxkern benchmark: {result['device']}", "",
           f"torch {result['torch']}, commit `{result['commit']}`, {result['date']}. Measured peaks in this run: "
           f"{_peaks_sentence(result)}. Allocator: {result['allocator']}.",
           "", "| " + " | ".join(columns(result["rows"])) + " |", "|" + "---|" * len(columns(result["rows"]))]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in l) + " |" for l in table_lines(result["rows"])]
    out += ["", "`*` marks ctxkern's kernels. 'vs torch' is torch eager's median time over this row's. "
            + _legend(on_cpu(result))]
    if _has_items(result["rows"]):
        out[-1] += f" {PEER_NOTE}."
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------ the printed table

WIDTH = 120                     # a terminal's width the printed table fits
BACKEND_WIDTH = 36


def _clip(text: str, width: int = WIDTH) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _groups(rows: list[dict]) -> list[list[dict]]:
    """Rows by case (op, shape, dtype), in the order they ran."""
    groups: list[list[dict]] = []
    for r in rows:
        if groups and all(groups[-1][0][k] == r[k] for k in ("op", "shape", "dtype")):
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _case_header(group: list[dict], cpu: bool) -> list[str]:
    """The case's line: op, shape and dtype, then what its 'vs torch' and 'of peak' are against (on a line of
    their own when both do not fit)."""
    first = group[0]
    notes = []
    if first.get("peer") is not None:
        notes.append(f"vs torch: vs {first['peer']}")
    basis = next((r for r in group if r.get("peak_basis")), None)
    if basis is not None:
        notes.append("of peak: " + _basis_cell(basis))
    elif any(r["tflops"] is not None for r in group) and first["dtype"] != "float32" and cpu:
        notes.append(f"of peak: none ({first['dtype']} on a CPU)")
    title, note = f"{first['op']} {first['shape']} {first['dtype']}", f"({'; '.join(notes)})" if notes else ""
    if not note:
        return [_clip(title)]
    if len(title) + 2 + len(note) <= WIDTH:
        return [f"{title}  {note}"]
    return [_clip(title), _clip("    " + note)]


def text_columns(result: dict) -> tuple[str, ...]:
    flops = "GFLOP/s" if on_cpu(result) else "TFLOP/s"
    items = (ITEMS_COLUMN,) if _has_items(result["rows"]) else ()
    return ("ms",) + items + ("GB/s", flops, "vs torch", "of peak")


def _text_cells(r: dict, cpu: bool, items: bool) -> list[str]:
    if "error" in r:
        ms = "WRONG"
    elif "skipped" in r:
        ms = "skipped"
    else:
        ms = _sig(r["median_ms"]) + ("!" if "note" in r else "")
    value, _ = _speedup(r)
    flops = None if r["tflops"] is None else r["tflops"] * (1e3 if cpu else 1)
    return ([ms] + ([_sig(r.get("items_per_s"))] if items else [])
            + [_sig(r["gbps"]), _sig(flops), _ratio_cell(value, 1, "x"), _ratio_cell(r["peak_fraction"], 100, "%")])


def legend_line(result: dict) -> str:
    """One line: what the printed columns mean (the column header marks ctxkern's rows)."""
    flops = "GFLOP/s" if on_cpu(result) else "TFLOP/s"
    return (f"ms: median per call; GB/s, {flops}: counted bytes, flops; vs torch: eager's ms / this; "
            "of peak: vs (the case's peak)")


def format_text(result: dict) -> str:
    cpu, rows = on_cpu(result), result["rows"]
    items = _has_items(rows)
    cols = text_columns(result)
    widths = [9 if c == "ms" else 8 for c in cols]
    out = [_clip(f"ctxkern bench on {result['device']}: torch {result['torch']}, commit {result['commit']}, "
                 f"{result.get('date', '')}"),
           _clip(f"peaks: {_peaks_sentence(result)}"),
           _clip(f"allocator: {result['allocator']}"),
           legend_line(result),
           "  " + "backend (* = ctxkern)".ljust(BACKEND_WIDTH)
           + "".join(c.rjust(w + 1) for c, w in zip(cols, widths))]
    for group in _groups(rows):
        out += _case_header(group, cpu)
        for r in group:
            name = _clip(r["backend"] + ("" if r["baseline"] else " *"), BACKEND_WIDTH)
            out.append("  " + name.ljust(BACKEND_WIDTH)
                       + "".join(c.rjust(w + 1) for c, w in zip(_text_cells(r, cpu, items), widths)))
            if "error" in r:
                out.append(_clip(f"      WRONG: {r['error']}"))
            elif "skipped" in r:
                out.append(_clip(f"      skipped: {r['skipped']}"))
            elif "note" in r:
                out.append(_clip(f"      ! {r['note']}"))
            if _other_peers(r):
                out.append(_clip("      " + ", ".join(f"{_ratio_cell(x, 1, 'x')} vs {name}"
                                                      for name, x in _other_peers(r))))
    return "\n".join(out)


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
