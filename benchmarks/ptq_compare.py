"""Compare PTQ methods end to end on an embedded model (the tables in docs/results/).

Every method is a set of GACConfig options on top of ``--set`` options; each (bits, method, seed) run calibrates a
fresh copy of the full-precision model with that seed and is evaluated on noise drawn from seed + ``--eval-seed-offset``
(default 1000, so no evaluation trajectory is one the calibration ran on), so every method sees the same calibration
trajectories and the same evaluation noise. Each run has a process of its own (peak RSS is its own) and
one torch thread; calibration time is measured as process CPU seconds (steady when other work shares the machine)
and as wall seconds. Runs are appended to a JSONL file (an interrupted sweep resumes where it stopped), then
summarised as a markdown table with mean ± std over seeds.

Metrics per run: FD in the model's feature space against held-out real images; PSNR and MSE of the samples against
the full-precision model's samples from the same noise (computed once per seed and kept beside the JSONL file);
class accuracy (class-conditional models); and the trajectory error: the quantized denoiser's noise-prediction MSE
against full precision along the full-precision trajectories (``evaluation.trajectory_error``, on the first
``--trajectory-samples`` of them), which no error compounds into and so varies far less between seeds.

Peers (``benchmarks/peers.py``): ``torchao``, ``quanto`` and ``bnb-nf4`` quantize the same full-precision model with
their own libraries at the ``--bits`` each supports (quanto's activation ranges come from its own calibration pass
over 64 sampled trajectories of ``--steps`` steps), and are scored like every method. "weight bits" is the mean bits
per Linear/Conv2d weight of the quantized model (a layer left in full precision counts 32).

    python benchmarks/ptq_compare.py --model digits --bits W8A8 --methods gac torchao quanto --seeds 0 1 2 \
        --jsonl docs/results/peers.jsonl --table docs/results/peers.md

``--equal-time gac`` adds, after the sweep, uniform reconstruction (``qdiffusion``) with as many iterations as fit in
the CPU time the named method took on average over the sweep's seeds (same bits and options).

    python benchmarks/ptq_compare.py --model digits --bits W4A4 --methods fp rtn qdiffusion ptq4dm gac fisher \\
        --seeds 0 1 2 --equal-time gac --jsonl docs/results/testbed.jsonl --table docs/results/testbed.md --workers 2
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import PEERS, build_peer, check_peer, mean_weight_bits  # noqa: E402  (benchmarks/peers.py)

METHODS: dict[str, dict] = {
    "rtn": {"reconstruction": "none"},
    "qdiffusion": {"reconstruction": "adaround", "weighting": "uniform", "calib_timestep_selection": "uniform"},
    "ptq4dm": {"reconstruction": "adaround", "weighting": "uniform", "calib_timestep_selection": "normal"},
    "fisher": {"reconstruction": "adaround", "weighting": "fisher", "calib_timestep_selection": "uniform"},
    "gac": {"reconstruction": "adaround", "weighting": "gradient_aligned", "calib_timestep_selection": "uniform"},
    # GACConfig.paper()'s options (tests/test_ptq_compare.py holds them equal)
    "gac-paper": {"reconstruction": "adaround", "calib_timestep_selection": "uniform", "weighting": "gradient_aligned",
                  "gac_weight_granularity": "sample", "gac_meta_steps": 20, "gac_meta_every": 0,
                  "gac_val_rounding": "soft", "gac_gm_weight": 1.0, "gac_gm_form": "cosine", "gac_groups": 5,
                  "gac_val_fraction": 0.05},
}
LABELS = {"fp": "full precision", "rtn": "round-to-nearest", "qdiffusion": "uniform (Q-Diffusion)",
          "ptq4dm": "PTQ4DM-style timesteps", "fisher": "Fisher per-timestep (fixed)", "gac": "GAC",
          "gac-paper": "GAC, paper formulation", "torchao": "torchao int8 dynamic (Linear only)",
          "quanto": "optimum-quanto", "quanto-special-fp": "optimum-quanto, first/last/embedding layers in FP32",
          "bnb-nf4": "bitsandbytes NF4 (Linear only)"}


def method_options(method: str) -> dict:
    """``name`` or ``name:option=value,option=value`` (e.g. ``qdiffusion:iters=800``)."""
    name, _, extra = method.partition(":")
    if name in PEERS:
        if extra:
            raise argparse.ArgumentTypeError(f"peer {name!r} takes no options")
        return {}
    if name not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {name!r}; choose from fp, {', '.join([*METHODS, *PEERS])}")
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

    from diffusers_gac import GACConfig, quantize_model, zoo
    from diffusers_gac.evaluation import evaluate_denoiser, sample_images, score_samples, trajectory_error
    from diffusers_gac.hub import _fp32_and_quantized_bytes
    from diffusers_gac.quant.convert import quant_layers
    from diffusers_gac.sampling import resolve_labels
    from safetensors.torch import load_file, save_file

    dlogging.set_verbosity_error()
    name = job["model"]
    fp = zoo.load_embedded_unet(name)
    scheduler = zoo.load_embedded_scheduler(name)
    features, real = zoo.load_feature_network(name), zoo.load_real_images(name, "test")
    seed, steps, n = job["seed"], job["steps"], job["num_samples"]
    eval_seed = seed + job["eval_seed_offset"]  # evaluation noise apart from the calibration's
    cache = Path(job["cache"]) / f"{name}-seed{eval_seed}-steps{steps}-n{n}.safetensors"
    if cache.is_file():  # the full-precision samples of this seed, shared by every method of the sweep
        reference = load_file(cache)["samples"]
    else:
        reference, _ = sample_images(fp, scheduler, n, num_inference_steps=steps, seed=eval_seed, show_progress=False)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        save_file({"samples": reference.contiguous()}, tmp)
        os.replace(tmp, cache)
    row = {k: job[k] for k in ("model", "bits", "method", "seed", "steps", "num_samples")}
    row["eval_seed"] = eval_seed
    if job["method"] in PEERS:
        def calibrate(m):  # the peer's own calibration: its model sampling 64 trajectories
            sample_images(m, scheduler, 64, num_inference_steps=steps, seed=seed + 10_000, show_progress=False)

        wall, cpu = time.time(), time.process_time()
        model, row["mean_weight_bits"] = build_peer(job["method"], job["bits"], fp, calibrate)
        row["calibration_seconds"] = round(time.time() - wall, 1)
        row["calibration_cpu_seconds"] = round(time.process_time() - cpu, 1)
    elif job["method"] != "fp":
        options = {**parse_bits(job["bits"]), **job["base"], **method_options(job["method"]), "seed": seed}
        model = copy.deepcopy(fp)
        wall, cpu = time.time(), time.process_time()
        report = quantize_model(model, GACConfig(**options), scheduler=scheduler, show_progress=False)
        row["calibration_seconds"] = round(time.time() - wall, 1)
        row["calibration_cpu_seconds"] = round(time.process_time() - cpu, 1)
        row["config"] = report.config
        row["mean_weight_bits"] = mean_weight_bits(fp, {n: m.w_bits for n, m in quant_layers(model).items()})
        row["unit_error_before"] = sum(u.loss_before for u in report.units)
        row["unit_error_after"] = sum(u.loss_after for u in report.units)
        row["checkpoint_bytes"] = _fp32_and_quantized_bytes(model)[1]
        row["lever_params"] = sum(t.numel() for layer in quant_layers(model).values() for k, t in layer.named_buffers()
                                  if k.split(".")[-1] in ("smooth", "lowrank_down", "lowrank_up", "clip"))
        row["levers"] = [u.levers for u in report.units if u.levers]
        gac = [u.weighting for u in report.units if "effective_sample_fraction" in u.weighting]
        if gac:
            row["effective_sample_fraction"] = float(np.mean([d["effective_sample_fraction"] for d in gac]))
            row["max_min_weight_ratio"] = float(np.mean([d["max_min_weight_ratio"] for d in gac]))
            row["min_logit_updates"] = min(d["logit_updates"]["min"] for d in gac)
    if job["method"] == "fp":  # its samples are the reference
        scores = score_samples(reference, resolve_labels(fp, n, None), classifier=features, real_images=real)
        row.update(fd=scores["fd"], accuracy=scores["accuracy"])
    else:
        result = evaluate_denoiser(model, scheduler, reference_images=reference, num_samples=n, seed=eval_seed,
                                   num_inference_steps=steps, classifier=features, real_images=real,
                                   show_progress=False)
        row.update(fd=result.fd, accuracy=result.accuracy, psnr=result.psnr, mse=result.mse)
        row["trajectory_mse"] = trajectory_error(model, fp, scheduler, job["trajectory_samples"],
                                                 num_inference_steps=steps, seed=eval_seed)["mse"]
    # each run has a process of its own (max_tasks_per_child=1), so this is the run's own peak
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def _cell(values, digits=2, scale=1.0):
    values = [v * scale for v in values if v is not None and v != float("inf")]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def group_key(r: dict) -> tuple:
    variant = " ".join(f"{k}={v}" for k, v in sorted(r.get("base", {}).items()) if k != "calib_num_inference_steps")
    return r["model"], r["steps"], variant, r["bits"], r["method"]


def write_table(rows: list[dict], path: Path, command: str) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(group_key(r), []).append(r)
    order = ["fp", *METHODS, *PEERS]
    lines = [
        (f"Measured {date.today().isoformat()} on {platform.machine()} ({os.cpu_count()} CPU cores), torch "
         f"{__import__('torch').__version__}, one torch thread and one process per run. Calibration time in CPU "
         "seconds (wall seconds vary with what else runs). Trajectory MSE: the noise-prediction error against full "
         "precision along the full-precision trajectories (x1e-3). Evaluation noise is drawn from seeds "
         f"{sorted({r['eval_seed'] for r in rows if 'eval_seed' in r}) or 'equal to the calibration seeds (older rows)'}"
         f"; calibration seeds {sorted({r['seed'] for r in rows})}. Checkpoint: the bytes of the frozen model's "
         "state as saved; lever params: the values the activation-side levers add (docs/levers.md). Command:"),
        "", "```", command, "```", "",
        "| model | setting | method | seeds | FD ↓ | PSNR vs FP (dB) ↑ | sample MSE (x1e-3) ↓ | trajectory MSE (x1e-3) ↓ "
        "| accuracy ↑ | weight bits | checkpoint (KiB) | lever params | calibration (CPU s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3] != "FP32",
                                                    kv[0][3], order.index(kv[0][4].split(":")[0]), kv[0][4]))
    for (model, steps, variant, bits, method), rs in ordered:
        name, _, extra = method.partition(":")
        label = LABELS[name] + (f" ({extra})" if extra else "")
        setting = f"{bits}, DDIM {steps}" + (f", {variant}" if variant else "")
        lines.append(
            f"| {model} | {setting} | {label} | {len(rs)} | {_cell([r['fd'] for r in rs])} | "
            f"{_cell([r.get('psnr') for r in rs])} | {_cell([r.get('mse') for r in rs], 3, 1e3)} | "
            f"{_cell([r.get('trajectory_mse') for r in rs], 3, 1e3)} | {_cell([r['accuracy'] for r in rs], 3)} | "
            f"{_cell([r.get('mean_weight_bits') for r in rs][:1], 1)} | "
            f"{_cell([r.get('checkpoint_bytes') for r in rs][:1], 0, 1 / 1024)} | "
            f"{_cell([r.get('lever_params') for r in rs][:1], 0)} | "
            f"{_cell([r.get('calibration_cpu_seconds') for r in rs], 0)} | {_cell([r['peak_rss_mb'] for r in rs], 0)} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run_jobs(jobs: list[dict], workers: int, jsonl: Path) -> None:
    print(f"{len(jobs)} runs to do", file=sys.stderr)
    with ProcessPoolExecutor(workers, max_tasks_per_child=1) as pool:
        for job, row in zip(jobs, pool.map(run_one, jobs)):
            row["base"] = job["base"]
            with jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: row.get(k) for k in ("model", "bits", "method", "seed", "fd", "psnr",
                                                      "trajectory_mse", "calibration_cpu_seconds")}), file=sys.stderr)


def equal_time_iters(rows: list[dict], method: str, base: dict, bits: str, model: str, steps: int) -> int:
    """Iterations of uniform reconstruction that take the CPU time ``method`` took (mean over the seeds run)."""
    def mean_cpu(m):
        values = [r["calibration_cpu_seconds"] for r in rows if r["method"] == m and r["bits"] == bits
                  and r["model"] == model and r["steps"] == steps and r.get("base") == base]
        if not values:
            raise SystemExit(f"--equal-time: no {m} runs for {model} {bits} to take the time from")
        return float(np.mean(values))

    return int(round(base.get("iters", 400) * mean_cpu(method) / mean_cpu("qdiffusion")))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits", help="embedded model (digits or photos)")
    p.add_argument("--bits", nargs="+", default=["W4A4"], type=str)
    p.add_argument("--methods", nargs="+", default=["fp", "rtn", "qdiffusion", "ptq4dm"],
                   help=f"fp, {', '.join(METHODS)}, or a peer: {', '.join(PEERS)}; a method may carry options: "
                        "qdiffusion:iters=800")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=25, help="DDIM steps of the evaluation (and of the calibration data)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--trajectory-samples", type=int, default=256, help="trajectories of the trajectory error")
    p.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE",
                   help="GACConfig options for every method, e.g. act_scheme=timestep special_bits=4")
    p.add_argument("--equal-time", default=None, metavar="METHOD",
                   help="afterwards, run qdiffusion with the iterations that fit in METHOD's CPU time")
    p.add_argument("--jsonl", type=Path, required=True, help="append one JSON line per run (resumes)")
    p.add_argument("--table", type=Path, help="write the markdown summary of the whole JSONL file here")
    p.add_argument("--table-command", default=None, metavar="COMMAND",
                   help="the command the table names as its source (default: this one), e.g. the sweep script")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--eval-seed-offset", type=int, default=1000,
                   help="evaluation noise comes from seed + this (0: the calibration seed, as before 2026-12)")
    a = p.parse_args(argv)
    if a.eval_seed_offset and set(a.seeds) & {s + a.eval_seed_offset for s in a.seeds}:
        p.error("--eval-seed-offset makes an evaluation seed equal to a calibration seed")
    for b in a.bits:
        parse_bits(b)
    for m in a.methods + ([a.equal_time] if a.equal_time else []):
        if m != "fp":
            try:
                method_options(m)
            except argparse.ArgumentTypeError as err:
                p.error(str(err))
        if m in PEERS:
            for b in a.bits:
                try:
                    check_peer(m, b)
                except ValueError as err:
                    p.error(f"--methods {m} --bits {b}: {err}")
    base = {k: parse_value(v) for k, _, v in (item.partition("=") for item in a.set)}
    base.setdefault("calib_num_inference_steps", a.steps)

    def job(method: str, bits: str, seed: int) -> dict:
        return {"model": a.model, "bits": bits, "method": method, "seed": seed, "steps": a.steps,
                "num_samples": a.num_samples, "base": base if method != "fp" else {}, "threads": a.threads,
                "trajectory_samples": a.trajectory_samples, "cache": str(a.jsonl) + ".reference",
                "eval_seed_offset": a.eval_seed_offset}

    def todo(methods: list[str], bits: list[str]) -> list[dict]:
        done = {(r["model"], r["bits"], r["method"], r["seed"], r["steps"], json.dumps(r.get("base", {}), sort_keys=True))
                for r in read_rows(a.jsonl)}
        jobs = [job(m, b, s) for m in methods for b in (["FP32"] if m == "fp" else bits) for s in a.seeds]
        return [j for j in jobs if (j["model"], j["bits"], j["method"], j["seed"], j["steps"],
                                    json.dumps(j["base"], sort_keys=True)) not in done]

    a.jsonl.parent.mkdir(parents=True, exist_ok=True)
    run_jobs(todo(a.methods, a.bits), a.workers, a.jsonl)
    if a.equal_time:
        for bits in a.bits:
            iters = equal_time_iters(read_rows(a.jsonl), a.equal_time, base, bits, a.model, a.steps)
            run_jobs(todo([f"qdiffusion:iters={iters}"], [bits]), a.workers, a.jsonl)
    if a.table:
        command = a.table_command or "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
        write_table(read_rows(a.jsonl), a.table, command)


if __name__ == "__main__":
    main()
