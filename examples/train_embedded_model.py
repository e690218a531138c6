"""Regenerate the embedded digits model (and its metrics classifier) from scratch.

    python examples/train_embedded_model.py --output diffusers_gac/zoo/digits

writes ``unet/`` and ``scheduler/`` (a standard diffusers layout), ``classifier/`` and ``training_log.jsonl``.
On 2 CPU cores this takes about 15 minutes with the defaults.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers.utils import logging as dlogging

from diffusers_gac.zoo.training import (
    ClassifierTrainingArgs,
    DiffusionTrainingArgs,
    save_training_args,
    train_digits_classifier,
    train_digits_unet,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder to write the model into")
    p.add_argument("--steps", type=int, default=DiffusionTrainingArgs.steps)
    p.add_argument("--batch-size", type=int, default=DiffusionTrainingArgs.batch_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-unet", action="store_true", help="only retrain the classifier")
    a = p.parse_args()
    dlogging.set_verbosity_info()

    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    unet_args = DiffusionTrainingArgs(steps=a.steps, batch_size=a.batch_size, seed=a.seed)
    clf_args = ClassifierTrainingArgs(seed=a.seed)
    start = time.time()
    clf, acc = train_digits_classifier(clf_args, device=a.device)
    clf.save_pretrained(out / "classifier", test_accuracy=round(acc, 4))
    print(json.dumps({"classifier_test_accuracy": acc, "elapsed_s": round(time.time() - start, 1)}))
    if not a.skip_unet:
        log_path = out / "training_log.jsonl"
        log_path.unlink(missing_ok=True)
        unet, scheduler, _ = train_digits_unet(unet_args, device=a.device, log_path=log_path)
        unet.to("cpu").save_pretrained(out / "unet")
        scheduler.save_pretrained(out / "scheduler")
        save_training_args(out / "training_args.json", unet_args, clf_args)
    print(json.dumps({"total_elapsed_s": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
