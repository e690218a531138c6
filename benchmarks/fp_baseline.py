"""The full-precision reference numbers: the metric floor and the embedded model at several DDIM step counts.

    python benchmarks/fp_baseline.py --num-samples 1000 --seeds 0 1 2 --steps 25 100

writes ``docs/results/full_precision.md`` (with the command, date and machine) and ``full_precision.json`` beside
it. The floor scores the real held-out test digits against the real training digits; the model rows are
mean ± sample std over seeds. PSNR is left out: it compares a model with the full-precision one, here itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import diffusers
import torch

from diffusers_gac import zoo
from diffusers_gac.cli.common import default_device, positive_int
from diffusers_gac.evaluation import evaluate_denoiser, format_mean_std, metric_floor, summarize


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": device,
    }
    if torch.device(device).type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return info


def run(args: argparse.Namespace) -> dict:
    device = args.device or default_device()
    unet, scheduler = zoo.load_model(args.model, device=device)
    classifier = zoo.load_feature_network(args.model)
    folder = "features" if args.model == "photos" else "classifier"
    classifier_config = json.loads((zoo.embedded_model_path(args.model) / folder / "config.json").read_text())
    real_images = zoo.load_real_images(args.model, "test")
    floor = metric_floor(classifier, model=args.model)
    rows = []
    for steps in args.steps:
        runs = [
            evaluate_denoiser(
                unet,
                scheduler,
                num_samples=args.num_samples,
                num_inference_steps=steps,
                seed=seed,
                batch_size=args.batch_size,
                classifier=classifier,
                real_images=real_images,
            )
            for seed in args.seeds
        ]
        seconds = sum(r.sampling_seconds for r in runs) / len(runs)
        rows.append({**summarize(runs), "sampling_seconds": seconds, "runs": [r.to_dict() for r in runs]})
    return {
        "model": args.model,
        "scheduler": type(scheduler).__name__,
        "floor": floor.to_dict(),
        "classifier": {"held_out_accuracy": floor.accuracy, "recorded_test_accuracy": classifier_config.get("test_accuracy")},
        "full_precision": rows,
    }


def to_markdown(result: dict) -> str:
    floor, m = result["floor"], result["machine"]
    device = m.get("device_name", m["device"])
    lines = [
        "# Full-precision baseline",
        "",
        f"Produced by `{result['command']}` on {result['date']} "
        f"({m['processor']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, device {device}; "
        f"torch {m['torch']}, diffusers {m['diffusers']}) in {result['elapsed_s']:.0f} s.",
        "",
        "FD: Frechet distance of the model's feature network (the digits classifier, or the photo-source "
        "classifier) against the held-out real test images (lower is better). Accuracy: the classifier's agreement "
        "with the requested class (class-conditional models only; higher is better).",
        "",
        "## Metric floor (real images)",
        "",
        "| compared | FD | accuracy |",
        "| --- | --- | --- |",
        f"| real test ({floor['num_test']}) vs real train ({floor['num_train']}) | {floor['fd']:.2f} | "
        f"{floor['accuracy']:.4f} |",
        "",
        f"Classifier held-out accuracy: {result['classifier']['held_out_accuracy']:.4f} "
        f"(recorded at training: {result['classifier']['recorded_test_accuracy']}).",
        "",
        f"## Embedded `{result['model']}` model, full precision ({result['scheduler']}, eta 0)",
        "",
        "| steps | samples per seed | seeds | FD | accuracy | sampling s per seed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["full_precision"]:
        lines.append(
            f"| {row['num_inference_steps']} | {row['num_samples']} | {' '.join(map(str, row['seeds']))} | "
            f"{format_mean_std(row['fd'], row['fd_std'])} | "
            f"{format_mean_std(row['accuracy'], row['accuracy_std'], digits=4)} | {row['sampling_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=zoo.DEFAULT_MODEL, choices=sorted(zoo.EMBEDDED_MODELS),
                        help="embedded model (default: digits)")
    parser.add_argument("--num-samples", type=positive_int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=positive_int, nargs="+", default=[25, 100])
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--device", default=None, help="torch device (default: cuda, then mps, then cpu)")
    parser.add_argument("--output", type=Path, default=Path("docs/results/full_precision.md"))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    start = time.perf_counter()
    result = run(args)
    result = {
        "command": shlex.join(["python", "benchmarks/fp_baseline.py", *argv]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(args.device or default_device()),
        "elapsed_s": round(time.perf_counter() - start, 1),
        **result,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(to_markdown(result))
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output} and {args.output.with_suffix('.json')}")


if __name__ == "__main__":
    main()
