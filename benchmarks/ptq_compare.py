"""Compare PTQ methods end to end on the embedded digits model (the tables in docs/results/).

Every method is a set of GACConfig options on top of ``--base`` options; each (bits, method, seed) run
calibrates a fresh copy of the full-precision model with that seed and samples with the same seed, so every
method sees the same calibration trajectories and the same evaluation noise. Runs are appended to a JSONL file
(an interrupted sweep resumes where it stopped), then summarised as a markdown table with mean ± std over seeds.

    python benchmarks/ptq_compare.py --bits W4A4 W4A8 --methods rtn qdiffusion ptq4dm --seeds 0 1 2 \
        --jsonl docs/results/ptq_baselines.jsonl --table docs/results/ptq_baselines.md --workers 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

METHODS: dict[str, dict] = {
    "rtn": {"reconstruction": "none"},
    "qdiffusion": {"reconstruction": "adaround", "weighting": "uniform", "calib_timestep_selection": "uniform"},
    "ptq4dm": {"reconstruction": "adaround", "weighting": "uniform", "calib_timestep_selection": "normal"},
    "gac": {"reconstruction": "adaround", "weighting": "gradient_aligned", "calib_timestep_selection": "uniform"},
}


def method_options(method: str) -> dict:
    """``name`` or ``name:option=value,option=value`` (e.g. ``qdiffusion:iters=800`` for an equal-time run)."""
    name, _, extra = method.partition(":")
    if name not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {name!r}; choose from fp, {', '.join(METHODS)}")
    options = dict(METHODS[name])
    for item in filter(None, extra.split(",")):
        key, _, value = item.partition("=")
        options[key] = parse_value(value)
    return options


def parse_value(text: str):
    """``800`` -> 800, ``null`` -> None, ``true`` -> True; anything that is not JSON stays a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_bits(text: str) -> dict:
    """``W4A4`` -> ``{"w_bits": 4, "a_bits": 4}``; ``W4A32``/``W4`` keep activations in full precision."""
    t = text.upper()
    if not t.startswith("W"):
        raise argparse.ArgumentTypeError(f"bits must look like W4A4 or W4A8, got {text!r}")
    w, _, a = t[1:].partition("A")
    try:
        a_bits = None if a in ("", "32", "16") else int(a)
        return {"w_bits": int(w), "a_bits": a_bits}
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must look like W4A4 or W4A8, got {text!r}") from None


def run_one(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    from diffusers.utils import logging as dlogging

    from diffusers_gac import GACConfig, quantize_model
    from diffusers_gac.evaluation import evaluate_denoiser, sample_images
    from diffusers_gac.zoo import load_embedded_scheduler, load_embedded_unet

    dlogging.set_verbosity_error()
    fp = load_embedded_unet()
    scheduler = load_embedded_scheduler()
    seed, steps, n = job["seed"], job["steps"], job["num_samples"]
    reference, _ = sample_images(fp, scheduler, n, num_inference_steps=steps, seed=seed, show_progress=False)
    row = {k: job[k] for k in ("bits", "method", "seed", "steps", "num_samples")}
    if job["method"] == "fp":
        model, report = fp, None
    else:
        options = {**parse_bits(job["bits"]), **job["base"], **method_options(job["method"]), "seed": seed}
        model = copy.deepcopy(fp)
        start = time.time()
        config = GACConfig(**options)
        report = quantize_model(model, config, scheduler=scheduler, show_progress=False)
        row["calibration_seconds"] = round(time.time() - start, 1)
        row["config"] = report.config
        row["unit_error_before"] = sum(u.loss_before for u in report.units)
        row["unit_error_after"] = sum(u.loss_after for u in report.units)
    result = evaluate_denoiser(model, scheduler, reference_images=reference, num_samples=n, num_inference_steps=steps,
                               seed=seed, show_progress=False)
    row.update(fd=result.fd, psnr=result.psnr, accuracy=result.accuracy)
    # each run has a process of its own (max_tasks_per_child=1), so this is the run's own peak
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    row["rss_per_run"] = True
    return row


def write_table(rows: list[dict], path: Path, command: str) -> None:
    import numpy as np

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        variant = " ".join(f"{k}={v}" for k, v in sorted(r.get("base", {}).items()) if k != "calib_num_inference_steps")
        groups.setdefault((r["bits"], r["method"], r["steps"], variant), []).append(r)

    def cell(values, digits=2):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"

    lines = [
        (f"Measured {date.today().isoformat()} on {platform.machine()} ({os.cpu_count()} CPU cores), "
        f"torch {__import__('torch').__version__}. Calibration times are indicative: one thread per benchmark "
        "process, and other processes (a second benchmark worker or other work) may have shared the 2 cores; peak "
        "RSS is shown only where every run had a process of its own. Command:"),
        "",
        "```",
        command,
        "```",
        "",
        "| bits | method | DDIM steps | seeds | FD ↓ | PSNR vs FP (dB) ↑ | class accuracy ↑ | calibration (s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = ["fp", *METHODS]
    for (bits, method, steps, variant), rs in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][3], order.index(kv[0][1].split(":")[0]), kv[0][1])):
        method = f"{method} ({variant})" if variant else method
        psnr = [r["psnr"] if r["psnr"] != float("inf") else None for r in rs]
        lines.append(
            f"| {bits if method != 'fp' else 'FP32'} | {method} | {steps} | {len(rs)} | {cell([r['fd'] for r in rs])} | "
            f"{cell(psnr)} | {cell([r['accuracy'] for r in rs], 3)} | {cell([r.get('calibration_seconds') for r in rs], 0)} | "
            f"{cell([r['peak_rss_mb'] for r in rs], 0) if all(r.get('rss_per_run') for r in rs) else '-'} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", nargs="+", default=["W4A4", "W4A8"], type=str)
    p.add_argument("--methods", nargs="+", default=["fp", "rtn", "qdiffusion", "ptq4dm"],
                   help=f"fp, {', '.join(METHODS)}; a method may carry options: qdiffusion:iters=800")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=25, help="DDIM steps of the evaluation (and of the calibration data)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE",
                   help="GACConfig options for every method, e.g. act_scheme=dynamic iters=800")
    p.add_argument("--jsonl", type=Path, required=True, help="append one JSON line per run (resumes)")
    p.add_argument("--table", type=Path, help="write the markdown summary here")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    a = p.parse_args(argv)
    for b in a.bits:
        parse_bits(b)
    for m in a.methods:
        if m != "fp":
            try:
                method_options(m)
            except argparse.ArgumentTypeError as err:
                p.error(str(err))
    base = {}
    for item in a.set:
        k, _, v = item.partition("=")
        base[k] = parse_value(v)
    base.setdefault("calib_num_inference_steps", a.steps)

    done = set()
    if a.jsonl.is_file():
        for line in a.jsonl.read_text().splitlines():
            r = json.loads(line)
            done.add((r["bits"], r["method"], r["seed"], r["steps"], json.dumps(r.get("base", {}), sort_keys=True)))
    jobs = []
    for method in a.methods:
        for bits in (["FP32"] if method == "fp" else a.bits):
            for seed in a.seeds:
                key = (bits, method, seed, a.steps, json.dumps(base if method != "fp" else {}, sort_keys=True))
                if key not in done:
                    jobs.append({"bits": bits, "method": method, "seed": seed, "steps": a.steps,
                                 "num_samples": a.num_samples, "base": base if method != "fp" else {},
                                 "threads": a.threads or max(1, (os.cpu_count() or 1) // a.workers)})
    a.jsonl.parent.mkdir(parents=True, exist_ok=True)
    print(f"{len(jobs)} runs to do", file=sys.stderr)
    with ProcessPoolExecutor(a.workers, max_tasks_per_child=1) as pool:
        for job, row in zip(jobs, pool.map(run_one, jobs)):
            row["base"] = job["base"]
            with a.jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("bits", "method", "seed", "fd", "psnr", "accuracy")}), file=sys.stderr)
    if a.table:
        rows = [json.loads(l) for l in a.jsonl.read_text().splitlines()]
        rows = [r for r in rows if r["steps"] == a.steps]
        write_table(rows, a.table, "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    main()
