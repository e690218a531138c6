"""The GPU speed goals, judged from the tables ``benchmarks/inference_speed.py --device cuda`` writes (the files of
``benchmarks/gpu_session.sh``): the verdicts are computed here, from goals written down before any run, not read off
the tables by hand.

The goals, on the SD-sized UNet with bf16 as the baseline:

1. W8A8 at least 1.3x faster per step than bf16 at latent 128, batch 2;
2. W4A4 at least as fast as bf16 there, with at most a third of bf16's weight memory resident;
3. ``auto`` W4A4 (the loading default) never slower than bf16 at any measured size (latents 64 and 128, batches 1, 2
   and 4).

A variant is compared only with the bf16 row of its own table (one run of one machine) and of its own mode: eager
(``bf16_*`` against ``bf16``), a replayed CUDA graph (``graph_bf16_*`` against ``graph_bf16``), ``torch.compile``
(``compiled_*``), channels-last (``cl_*``) and fused q/k/v projections (``fused_*``). Goal 1 is judged on
``int_w8a8``, goal 3 on ``auto_w4a4``, goal 2 on ``auto_w4a4`` with every other W4A4 execution of the library beside it
(integer kernels, float8 carriers, dense and float8 GEMM paths; the fake-quant reference and peers are not
candidates). Sizes of goal 3 that no table measured are named as such.

    python benchmarks/gpu_goals.py gpu_out/*.md --output docs/results/gpu_goals.md
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402  (benchmarks/report.py)

MODES = {"": "eager", "graph_": "CUDA graph", "compiled_": "torch.compile", "cl_": "channels-last",
         "fused_": "fused q/k/v"}
GOAL_SIZE = (128, 2)  # (latent, batch) of goals 1 and 2
W8A8_SPEEDUP, W4A4_SPEEDUP, W4A4_RESIDENT = 1.3, 1.0, 1 / 3
SIZES = [(latent, batch) for latent in (64, 128) for batch in (1, 2, 4)]  # goal 3's
W4A4_PATHS = ("int_w4a4", "int_w4a4_int8", "int_w4a4_fp8", "dense_w4a4", "scaled_w4a4", "scaled_w4a4_fp8",
              "auto_w4a4")


def read_rows(path: Path) -> list[dict]:
    """The rows of every ``inference_speed.py`` table in a markdown file: variant, latent, batch, median ms and
    weights resident (MiB), keyed by the table's own header; ``file`` names the table (``name #k`` for the k-th of a
    file that holds several runs)."""
    tables: list[list[dict]] = []
    header = None
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            header = None
        elif "variant" in cells and "latent" in cells:
            header = cells
            tables.append([])
        elif header is not None and not set(line) <= set("|- "):
            row = dict(zip(header, cells))
            try:
                tables[-1].append({"variant": row["variant"], "latent": int(row["latent"]),
                                   "batch": int(row["batch"]), "ms": float(row["ms / step (median)"]),
                                   "resident": float(row["weights resident MiB"])})
            except (KeyError, ValueError):
                continue  # a table of another kind
    tables = [t for t in tables if t]
    for k, table in enumerate(tables, 1):
        for row in table:
            row["file"] = path.name if len(tables) == 1 else f"{path.name} #{k}"
    return [row for table in tables for row in table]


def pairs(rows: list[dict], names: tuple[str, ...]) -> list[tuple[str, dict, dict]]:
    """(mode, bf16 row, candidate row) for every candidate named ``<mode prefix>bf16_<name>`` that has a bf16 row of
    its mode at its size in its own file."""
    base = {(r["file"], r["variant"], r["latent"], r["batch"]): r for r in rows}
    out = []
    for r in rows:
        for prefix, mode in MODES.items():
            if any(r["variant"] == f"{prefix}bf16_{name}" for name in names):
                b = base.get((r["file"], f"{prefix}bf16", r["latent"], r["batch"]))
                if b is not None:
                    out.append((mode, b, r))
    return out


def _row(mode: str, b: dict, r: dict, verdict: str, extra: str = "") -> str:
    return (f"| {r['file']} | {mode} | {r['latent']}, {r['batch']} | {b['ms']:.1f} | {r['variant']} | {r['ms']:.1f} | "
            f"{b['ms'] / r['ms']:.2f}x |{extra} {verdict} |")


def judge(rows: list[dict]) -> list[str]:
    lines = [f"## 1. W8A8 at least {W8A8_SPEEDUP}x faster per step than bf16 at latent {GOAL_SIZE[0]}, batch "
             f"{GOAL_SIZE[1]}", "",
             "| table | mode | latent, batch | bf16 ms | variant | ms | bf16 / variant | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    found = [p for p in pairs(rows, ("int_w8a8",)) if (p[2]["latent"], p[2]["batch"]) == GOAL_SIZE]
    lines += [_row(m, b, r, "met" if b["ms"] / r["ms"] >= W8A8_SPEEDUP else "missed") for m, b, r in found]
    if not found:
        lines.append("| - | - | - | - | not measured | - | - | - |")
    lines += ["", "## 2. W4A4 at least as fast as bf16 there, with at most a third of bf16's weights resident", "",
              "| table | mode | latent, batch | bf16 ms | variant | ms | bf16 / variant | resident / bf16's | verdict |",
              "|---|---|---|---|---|---|---|---|---|"]
    found = [p for p in pairs(rows, W4A4_PATHS) if (p[2]["latent"], p[2]["batch"]) == GOAL_SIZE]
    found.sort(key=lambda p: (p[2]["file"], "auto_w4a4" not in p[2]["variant"]))  # the loading default first
    for m, b, r in found:
        fast, small = b["ms"] / r["ms"] >= W4A4_SPEEDUP, r["resident"] <= W4A4_RESIDENT * b["resident"]
        verdict = "met" if fast and small else "missed (" + ", ".join(
            w for w, ok in (("speed", fast), ("memory", small)) if not ok) + ")"
        lines.append(_row(m, b, r, verdict, f" {r['resident'] / b['resident']:.1%} |"))
    if not found:
        lines.append("| - | - | - | - | not measured | - | - | - | - |")
    lines += ["", "## 3. `auto` never slower than bf16 at any measured size", "",
              "| table | mode | sizes measured (latent, batch) | slowest size | bf16 ms | auto ms | bf16 / auto there | "
              "verdict |", "|---|---|---|---|---|---|---|---|"]
    by_mode: dict[tuple[str, str], list] = {}
    for m, b, r in pairs(rows, ("auto_w4a4",)):
        by_mode.setdefault((r["file"], m), []).append((b, r))
    for (file, mode), found in by_mode.items():
        b, r = min(found, key=lambda p: p[0]["ms"] / p[1]["ms"])
        sizes = sorted({(r2["latent"], r2["batch"]) for _, r2 in found})
        lines.append(f"| {file} | {mode} | {', '.join(f'{s[0]}/{s[1]}' for s in sizes)} | {r['latent']}/{r['batch']} | "
                     f"{b['ms']:.1f} | {r['ms']:.1f} | {b['ms'] / r['ms']:.2f}x | "
                     f"{'met' if r['ms'] <= b['ms'] else 'missed'} where measured |")
    if not by_mode:
        lines.append("| - | - | none | - | - | - | - | not measured |")
    measured = {(r["latent"], r["batch"]) for _, _, r in pairs(rows, ("auto_w4a4",)) if r["variant"] == "bf16_auto_w4a4"}
    missing = [s for s in SIZES if s not in measured]
    lines += ["", "Sizes of goal 3 with no eager `auto` row beside its bf16 row: "
              + (", ".join(f"latent {s[0]} batch {s[1]}" for s in missing) if missing else "none") + "."]
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tables", nargs="+", type=Path, help="markdown files written by inference_speed.py")
    parser.add_argument("--output", help="also write the verdicts to this markdown file")
    args = parser.parse_args(argv)
    rows = [r for path in args.tables if path.exists() for r in read_rows(path)]
    lines = [f"Command: `{report.command()}`", "",
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {len(rows)} rows read from "
             f"{', '.join(p.name for p in args.tables if p.exists()) or 'no file'}.", ""] + judge(rows)
    report.emit("The GPU speed goals, judged from the tables", lines, args.output)
    return lines


if __name__ == "__main__":
    main()
