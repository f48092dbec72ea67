#!/usr/bin/env python3
"""Writes BENCHMARKS.md and an SVG chart from the benches' JSON records.

    python3 scripts/bench_report.py RECORDS.jsonl --md BENCHMARKS.md \
        --svg docs/benchmarks.svg [--command "bash scripts/bench-report.sh"] [--commit HASH]
        [--svg-link docs/benchmarks.svg]

RECORDS.jsonl holds what the benches append to `$LORA_KERNELS_BENCH_JSON` (the schema is
documented at `Recorder` in benches/common/mod.rs): one "run" record per bench process
(device, the copy bandwidth and the cuBLAS matrix throughput measured in that process)
and one "row" record per measured op and shape. Every row is compared with the run
record of its own process: the most recent "run" of the same bench before it.

Conventions in the outputs:
- speedup = baseline µs / ours µs: above 1 means ours is faster;
- % copy BW = (bytes / ours µs) / the copy bandwidth of the same process, where bytes
  are the fewest the op must move (inputs read once, outputs written once) and the copy
  counts read + write bytes;
- % matrix = (flops / ours µs) / the cuBLAS bf16 4096³ throughput of the same process.

Standard library only. The output depends only on the records and the arguments (the
date is the earliest run's time, not the time this script runs), so re-running it on
the same records gives the same files. Exits with status 2, writing nothing, when the
records hold no row (for instance when every bench skipped for lack of a GPU).
"""

import argparse
import datetime
import json
import math
import os
import sys
from xml.sax.saxutils import escape

# Benches in report order; any other bench follows, sorted by name.
BENCH_ORDER = ["lora", "qlora", "dora", "nf4", "neftune"]
# One colour per bench (in report order), readable on white.
PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#e15759", "#76b7b2", "#9c755f"]


def fail(msg):
    print(f"bench_report.py: {msg}", file=sys.stderr)
    sys.exit(2)


def load(path):
    """Returns (runs, rows): the run records and the row records, each row with the key
    "_run" naming the run record of its process (or None)."""
    runs, rows, last_run = [], [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                fail(f"{path}:{n}: not JSON ({e})")
            kind = rec.get("record")
            if kind == "run":
                runs.append(rec)
                last_run[rec["bench"]] = rec
            elif kind == "row":
                for key in ("bench", "kernel", "shape", "ours_us"):
                    if key not in rec:
                        fail(f"{path}:{n}: row record without {key!r}")
                rec["_run"] = last_run.get(rec["bench"])
                rows.append(rec)
            else:
                fail(f"{path}:{n}: unknown record kind {kind!r}")
    return runs, rows


def bench_order(names):
    known = [b for b in BENCH_ORDER if b in names]
    return known + sorted(n for n in names if n not in BENCH_ORDER)


def speedup(row):
    """baseline µs / ours µs, or None without a usable baseline."""
    b, o = row.get("baseline_us"), row.get("ours_us")
    if b is None or o is None or not (o > 0 and b > 0):
        return None
    return b / o


def num(v, digits):
    return "—" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def us(v):
    if v is None:
        return "—"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def md_text(s):
    """Text for a markdown table cell."""
    s = str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return s.replace("|", "\\|").replace("\n", " ")


def devices(runs):
    seen = []
    for r in runs:
        d = r.get("device", "?").removeprefix("device: ")
        if d not in seen:
            seen.append(d)
    return seen


def run_date(runs):
    times = [r["unix_time"] for r in runs if r.get("unix_time")]
    if not times:
        return "unknown date"
    fmt = "%Y-%m-%d %H:%M UTC"
    first, last = (
        datetime.datetime.fromtimestamp(t, tz=datetime.timezone.utc).strftime(fmt)
        for t in (min(times), max(times))
    )
    # Merged records from several runs: the span of their runs.
    return first if first == last else f"{first} to {last}"


def derived(row):
    """(GB/s, % copy BW, TFLOP/s, % matrix) of our time, each None when unknown."""
    run, t = row["_run"] or {}, row["ours_us"]
    gbs = pct_copy = tflops = pct_matrix = None
    if row.get("bytes") and t > 0:
        gbs = row["bytes"] / t * 1e-3
        if run.get("copy_gbs"):
            pct_copy = 100.0 * gbs / run["copy_gbs"]
    if row.get("flops") and t > 0:
        tflops = row["flops"] / t * 1e-6
        if run.get("matrix_tflops"):
            pct_matrix = 100.0 * tflops / run["matrix_tflops"]
    return gbs, pct_copy, tflops, pct_matrix


def write_md(path, svg_link, runs, rows, command, commit):
    benches = bench_order({r["bench"] for r in rows})
    devs = devices(runs)
    out = ["# Benchmarks", ""]
    out.append(f"Device: **{md_text(', '.join(devs) or 'unknown')}**  ")
    line = f"Measured {run_date(runs)}"
    if commit:
        line += f" at commit `{md_text(commit)}`"
    out.append(line + f"; produced by `{md_text(command)}`.")
    out += [
        "",
        "Every figure is the median µs of CUDA-event-timed batches; ours and its baseline "
        "are measured in the same process, inputs rotated past L2 (see `benches/`).",
        "",
        "- **speedup = baseline µs / ours µs: above 1 means ours is faster**, below 1 slower.",
        "- **% copy BW**: (bytes / our time) against the device-to-device copy bandwidth "
        "measured in the same process (both count read + write bytes). The bytes are the "
        "fewest the op must move: each input read once, each output written once.",
        "- **% matrix**: (flops / our time) against the cuBLAS bf16 4096³ GEMM throughput "
        "measured in the same process (2 flops per multiply-add).",
        "",
        "## Reference figures (measured in each bench's process)",
        "",
        "| bench | device | copy GB/s (256 MiB, read + write) | cuBLAS bf16 4096³ TFLOP/s | samples per median |",
        "|---|---|---:|---:|---:|",
    ]
    order = bench_order({r["bench"] for r in runs})
    for r in sorted(runs, key=lambda r: order.index(r["bench"])):
        out.append(
            f"| {md_text(r['bench'])} | {md_text(r.get('device', '?').removeprefix('device: '))} "
            f"| {num(r.get('copy_gbs'), 0)} | {num(r.get('matrix_tflops'), 1)} "
            f"| {r.get('samples', '?')}{' (quick)' if r.get('quick') else ''} |"
        )
    out += ["", f"![speedup of each kernel over its baseline]({svg_link})", ""]
    for bench in benches:
        out += [
            f"## {md_text(bench)}",
            "",
            "| kernel | shape | dtype | ours µs | baseline | baseline µs "
            "| speedup (>1: ours faster) | GB/s | % copy BW | TFLOP/s | % matrix |",
            "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in (r for r in rows if r["bench"] == bench):
            gbs, pct_copy, tflops, pct_matrix = derived(row)
            s = speedup(row)
            out.append(
                "| "
                + " | ".join(
                    [
                        md_text(row["kernel"]),
                        md_text(row["shape"]),
                        md_text(row.get("dtype", "")),
                        us(row["ours_us"]),
                        md_text(row.get("baseline") or "—"),
                        us(row.get("baseline_us")),
                        "—" if s is None else f"{s:.3f}",
                        num(gbs, 0),
                        "—" if pct_copy is None else f"{pct_copy:.1f}%",
                        num(tflops, 1),
                        "—" if pct_matrix is None else f"{pct_matrix:.1f}%",
                    ]
                )
                + " |"
            )
        out.append("")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out))


def bar_label(r):
    """A bar's label: kernel, shape and baseline."""
    return f"{r['kernel']}  {r['shape']}  vs {r.get('baseline')}"


def write_svg(path, runs, rows):
    """A horizontal bar chart of the speedups, log scale, bars from 1 (the baseline)."""
    benches = bench_order({r["bench"] for r in rows})
    colour = {b: PALETTE[i % len(PALETTE)] for i, b in enumerate(benches)}
    bars = [(r, speedup(r)) for r in rows if speedup(r) is not None]
    lo = min([s for _, s in bars] + [0.5])
    hi = max([s for _, s in bars] + [2.0])
    lo2, hi2 = math.floor(math.log2(lo)), math.ceil(math.log2(hi))

    # The label column fits the longest label (about 6.3 px per character at 11 px).
    longest = max((len(bar_label(r)) for r, _ in bars), default=0)
    plot_w = 470
    label_w = max(610, int(16 + 6.3 * longest))
    width = label_w + plot_w + 100
    bar_h, gap, group_h = 14, 4, 26
    top = 96
    x0 = label_w

    def x(s):
        return x0 + (math.log2(s) - lo2) / (hi2 - lo2) * plot_w

    # Rows: group headings, then bars.
    layout, y = [], top
    for b in benches:
        group = [(r, s) for r, s in bars if r["bench"] == b]
        if not group:
            continue
        layout.append(("head", b, y))
        y += group_h
        for r, s in group:
            layout.append(("bar", (r, s), y))
            y += bar_h + gap
        y += 6
    bottom = y
    height = bottom + 46

    dev = ", ".join(devices(runs)) or "unknown device"
    e = []
    e.append(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="11">'
    )
    e.append(f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>')
    e.append(
        f'<text x="12" y="24" font-size="16" font-weight="bold">'
        f"{escape('lora-kernels: speedup over each baseline — ' + dev)}</text>"
    )
    subtitle = (
        "speedup = baseline µs / ours µs (log scale): right of 1 = ours faster, "
        f"left = slower; measured {run_date(runs)}"
    )
    e.append(f'<text x="12" y="44" fill="#444">{escape(subtitle)}</text>')
    # Legend.
    lx = 12
    for b in benches:
        e.append(f'<rect x="{lx}" y="58" width="12" height="12" fill="{colour[b]}"/>')
        e.append(f'<text x="{lx + 16}" y="68">{escape(b)}</text>')
        lx += 24 + 7 * len(b) + 16
    # Grid and axis: one line per power of two, the baseline (1) darker.
    for p in range(lo2, hi2 + 1):
        gx = x(2.0**p)
        base = p == 0
        e.append(
            f'<line x1="{gx:.1f}" y1="{top - 8}" x2="{gx:.1f}" y2="{bottom}" '
            f'stroke="{"#222" if base else "#ddd"}" stroke-width="{1.5 if base else 1}"/>'
        )
        tick = f"{2.0**p:g}"
        e.append(f'<text x="{gx:.1f}" y="{bottom + 16}" text-anchor="middle">{tick}</text>')
    e.append(
        f'<text x="{x(1.0):.1f}" y="{bottom + 32}" text-anchor="middle" fill="#222">'
        f"1 = baseline</text>"
    )
    for kind, item, yy in layout:
        if kind == "head":
            e.append(
                f'<text x="12" y="{yy + 17}" font-size="13" font-weight="bold" '
                f'fill="{colour[item]}">{escape(item)}</text>'
            )
            continue
        r, s = item
        label = bar_label(r)
        tip = (
            f"{r['bench']}: {r['kernel']}, {r['shape']}, {r.get('dtype', '')}: ours "
            f"{r['ours_us']:.2f} µs, {r.get('baseline')} {r['baseline_us']:.2f} µs, "
            f"speedup {s:.3f}"
        )
        xa, xb = sorted((x(1.0), x(s)))
        e.append(
            f'<text x="{label_w - 8}" y="{yy + bar_h - 3}" text-anchor="end">{escape(label)}</text>'
        )
        e.append(
            f'<rect x="{xa:.1f}" y="{yy}" width="{max(xb - xa, 1.0):.1f}" height="{bar_h}" '
            f'fill="{colour[r["bench"]]}"><title>{escape(tip)}</title></rect>'
        )
        e.append(
            f'<text x="{x0 + plot_w + 8}" y="{yy + bar_h - 3}">{s:.2f}×</text>'
        )
    e.append("</svg>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(e) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("records", help="the JSON lines the benches wrote")
    ap.add_argument("--md", required=True, help="the markdown report to write")
    ap.add_argument("--svg", required=True, help="the SVG chart to write")
    ap.add_argument(
        "--command", default="bash scripts/bench-report.sh", help="the command to name"
    )
    ap.add_argument("--commit", default="", help="the commit the benches were built from")
    ap.add_argument(
        "--svg-link",
        help="the chart's path as the markdown links it (default: --svg relative to --md)",
    )
    a = ap.parse_args()
    runs, rows = load(a.records)
    if not rows:
        fail(
            f"no row records in {a.records}: did the benches run on a GPU? "
            "(without one they print 'SKIPPED' and record nothing); no report written"
        )
    svg_link = a.svg_link or os.path.relpath(
        os.path.abspath(a.svg), os.path.dirname(os.path.abspath(a.md))
    ).replace(os.sep, "/")
    for p in (a.md, a.svg):
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    write_svg(a.svg, runs, rows)
    write_md(a.md, svg_link, runs, rows, a.command, a.commit)
    print(f"wrote {a.md} and {a.svg}: {len(rows)} rows from {len(runs)} bench runs")


if __name__ == "__main__":
    main()
