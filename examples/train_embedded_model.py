"""Regenerate an embedded model (and the network its metrics use) from scratch.

    python examples/train_embedded_model.py --model digits --output diffusers_gac/zoo/digits
    python examples/train_embedded_model.py --model photos --output diffusers_gac/zoo/photos

``digits`` writes ``unet/``, ``scheduler/``, ``classifier/``, ``training_log.jsonl`` and ``training_args.json``
(about 15 minutes on 2 CPU cores); ``photos`` writes ``unet/``, ``scheduler/``, ``features/``,
``training_log.jsonl`` and ``training_args.json`` (about 20 minutes of CPU time; it needs scikit-image, the
``photos`` extra). ``docs/embedded-model.md`` records the runs that produced the shipped files.
"""

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import diffusers
import torch
from diffusers.utils import logging as dlogging

from diffusers_gac.zoo.photos_data import describe
from diffusers_gac.zoo.photos_features import FeatureTrainingArgs, train_feature_network
from diffusers_gac.zoo.photos_training import PhotosTrainingArgs, photos_unet_config, train_photos_unet
from diffusers_gac.zoo.training import (
    ClassifierTrainingArgs,
    DiffusionTrainingArgs,
    save_training_args,
    train_digits_classifier,
    train_digits_unet,
)


def train_digits(out: Path, a: argparse.Namespace) -> None:
    unet_args = DiffusionTrainingArgs(steps=a.steps or DiffusionTrainingArgs.steps, seed=a.seed)
    clf_args = ClassifierTrainingArgs(seed=a.seed)
    start = time.time()
    clf, acc = train_digits_classifier(clf_args, device=a.device)
    clf.save_pretrained(out / "classifier", test_accuracy=round(acc, 4))
    print(json.dumps({"classifier_test_accuracy": acc, "elapsed_s": round(time.time() - start, 1)}))
    log_path = out / "training_log.jsonl"
    log_path.unlink(missing_ok=True)
    unet, scheduler, _ = train_digits_unet(unet_args, device=a.device, log_path=log_path)
    unet.to("cpu").save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    save_training_args(out / "training_args.json", unet_args, clf_args)


def train_photos(out: Path, a: argparse.Namespace) -> None:
    unet_args = PhotosTrainingArgs(steps=a.steps or PhotosTrainingArgs.steps, seed=a.seed)
    feature_args = FeatureTrainingArgs(seed=a.seed)
    record: dict = {}
    features, summary = train_feature_network(feature_args, device=a.device)
    features.cpu().save_pretrained(out / "features", **{k: v for k, v in summary.items() if k != "args"})
    record[type(feature_args).__name__] = asdict(feature_args)
    record["feature_network"] = {k: v for k, v in summary.items() if k not in ("args", "wall_s", "cpu_s")}
    timing = {"features_wall_s": summary["wall_s"], "features_cpu_s": summary["cpu_s"]}
    log_path = out / "training_log.jsonl"
    log_path.unlink(missing_ok=True)
    wall, cpu = time.perf_counter(), time.process_time()
    unet, scheduler, _ = train_photos_unet(unet_args, device=a.device, log_path=log_path)
    timing.update(unet_wall_s=round(time.perf_counter() - wall, 1), unet_cpu_s=round(time.process_time() - cpu, 1),
                  unet_torch_threads=torch.get_num_threads())
    unet.cpu().save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    record.update({type(unet_args).__name__: asdict(unet_args), "unet_config": photos_unet_config(),
                   "num_parameters": sum(p.numel() for p in unet.parameters()), "data": describe(), "timing": timing,
                   "environment": {"device": str(a.device), "torch": torch.__version__,
                                   "diffusers": diffusers.__version__, "python": platform.python_version(),
                                   "machine": platform.machine()}})
    (out / "training_args.json").write_text(json.dumps(record, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["digits", "photos"], default="digits")
    p.add_argument("--output", required=True, help="folder to write the model into")
    p.add_argument("--steps", type=int, default=None, help="UNet training steps (default: the model's recipe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    dlogging.set_verbosity_info()
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    (train_photos if a.model == "photos" else train_digits)(out, a)
    print(json.dumps({"total_elapsed_s": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
