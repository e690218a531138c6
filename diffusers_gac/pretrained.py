"""Calibrate a pretrained checkpoint end to end: load it, calibrate it (on one process or many), write it, upload it.

This is what ``examples/calibrate_ldm.py`` runs. A source is a Hub id or a local pipeline folder (any diffusers
pipeline whose denoiser is a ``unet`` or ``transformer``: latent diffusion, DiT, Stable Diffusion and alike), or the
name of an embedded model (``digits``), which has no pipeline: its denoiser and scheduler are written as
``<output>/unet`` and ``<output>/scheduler``.
"""

from __future__ import annotations

import inspect
import os
import shutil
from pathlib import Path

from diffusers import DiffusionPipeline
from diffusers.utils import logging

from . import zoo
from .api import quantize_model, quantize_pipeline
from .config import GACConfig
from .hub import push_to_hub as upload
from .saving import replace_folder_atomically, save_pretrained, write_checkpoint

logger = logging.get_logger(__name__)


def load_prompts(file: str | os.PathLike | None = None, dataset: str | None = None, column: str = "text",
                 split: str = "train", limit: int | None = None) -> list[str] | None:
    """Calibration prompts from a text file (one per line) or a ``datasets`` dataset column (a Hub id, or a folder
    written by ``save_to_disk``); None when neither is given."""
    if file is not None and dataset is not None:
        raise ValueError("give calibration prompts as a file or as a dataset, not both")
    prompts = None
    if file is not None:
        prompts = [line.strip() for line in Path(file).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"the prompts file {file} holds no prompt")
    elif dataset is not None:
        from datasets import load_dataset, load_from_disk  # optional at import time: only this path needs it

        folder = Path(dataset)
        saved = folder.is_dir() and any((folder / f).is_file() for f in ("state.json", "dataset_dict.json"))
        data = load_from_disk(str(folder)) if saved else load_dataset(dataset, split=split)
        if hasattr(data, "keys") and not hasattr(data, "column_names"):  # a DatasetDict
            if split not in data:
                raise ValueError(f"dataset {dataset} has no split {split!r}; it has {sorted(data)}")
            data = data[split]
        if column not in data.column_names:
            raise ValueError(f"dataset {dataset} has no column {column!r}; it has {data.column_names}")
        prompts = [str(p) for p in data[column] if str(p).strip()]
    return prompts[:limit] if prompts is not None and limit else prompts


def calibrate_pretrained(source: str, config: GACConfig, output: str | os.PathLike, *, prompts: list[str] | None = None,
                         class_labels: list[int] | None = None, guidance_scale: float | None = None,
                         batch_size: int | None = None, accelerator=None, resume: bool = False,
                         push_to_hub: str | None = None, show_progress: bool = True) -> Path:
    """Load ``source``, calibrate its denoiser with ``config`` and write the result to ``output`` (atomically, by
    the main process); returns ``output``.

    ``accelerator`` (several processes): data-parallel calibration, every process running this function. The
    calibration data and every finished unit are kept in ``<output>.checkpoint`` while the run goes on;
    ``resume=True`` continues from there after an interruption (without it an existing checkpoint is an error, so
    two runs never mix), and the folder is removed once the output is written. ``push_to_hub``: a repository to
    upload the calibrated model or pipeline to, with its model card.
    """
    output = Path(output)
    checkpoint = output.with_name(output.name + ".checkpoint")
    main = accelerator is None or accelerator.is_main_process
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output} already exists and is not empty; choose a new output folder")
    if checkpoint.exists() and not resume:
        raise FileExistsError(f"{checkpoint} holds an interrupted calibration: resume it (--resume) or delete it")
    device = accelerator.device if accelerator is not None else None
    common = dict(accelerator=accelerator, checkpoint_dir=checkpoint, show_progress=show_progress)
    if source in zoo.EMBEDDED_MODELS:
        if prompts:
            raise ValueError(f"the embedded model {source!r} takes no prompts")
        unet, scheduler = zoo.load_model(source, device=device)
        quantize_model(unet, config, scheduler=scheduler, class_labels=class_labels, **common)
        obj = unet

        def write(folder: Path) -> None:
            write_checkpoint(unet, folder / "unet")
            scheduler.save_pretrained(folder / "scheduler")
    else:
        pipe = DiffusionPipeline.from_pretrained(source)
        if device is not None:
            pipe.to(device)
        call_kwargs = {}
        if guidance_scale is not None:
            if "guidance_scale" not in inspect.signature(pipe.__call__).parameters:
                raise ValueError(f"{type(pipe).__name__} takes no guidance_scale")
            call_kwargs["guidance_scale"] = guidance_scale
        quantize_pipeline(pipe, config, prompts=prompts, class_labels=class_labels, batch_size=batch_size,
                          **common, **call_kwargs)
        obj = pipe
    if main:
        if source in zoo.EMBEDDED_MODELS:
            replace_folder_atomically(output, write)
        else:
            save_pretrained(obj, output)
        logger.info(f"wrote {output}")
        if push_to_hub:
            upload(obj, push_to_hub)
            logger.info(f"uploaded to {push_to_hub}")
    if accelerator is not None:
        accelerator.wait_for_everyone()  # nobody removes the checkpoint before the output is written
    if main:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return output
