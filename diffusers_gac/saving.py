"""Saving calibrated models and pipelines: atomically, with their calibration reports.

diffusers' own ``model.save_pretrained`` / ``pipeline.save_pretrained`` write a calibrated model like any other
quantized one (the "gac" quantizer declares itself serialisable), straight into the target folder.
:func:`save_pretrained` wraps them: it writes everything into a temporary sibling folder, adds each calibrated
component's report (``gac_calibration.json``) and learned-weights plot (``gac_calibration.png``) beside its
``config.json``, and swaps the folder in at the end, so a save that fails or is interrupted leaves the previous
folder (or none), never a partial checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from .calibration.plots import plot_calibration
from .config import GACConfig
from .quantizer import REPORT_NAME

PLOT_NAME = "gac_calibration.png"


def gac_config(model: nn.Module) -> GACConfig | None:
    """The GACConfig a calibrated model carries in its config, or None."""
    config = getattr(model, "config", None)
    qc = config.get("quantization_config") if hasattr(config, "get") else None
    if isinstance(qc, dict) and qc.get("quant_method") == "gac":
        qc = GACConfig.from_dict(qc)
    return qc if isinstance(qc, GACConfig) else None


def calibration_report(model: nn.Module) -> dict[str, Any] | None:
    """The report of the calibration that produced ``model`` (None if unknown, e.g. after a download by repo id
    of a checkpoint pushed without one)."""
    return getattr(getattr(model, "hf_quantizer", None), "calibration_report", None)


def quantized_components(obj) -> dict[str, nn.Module]:
    """``{"": model}`` for a calibrated model, ``{component name: model}`` for a pipeline's calibrated parts."""
    if isinstance(obj, nn.Module):
        return {"": obj} if gac_config(obj) is not None else {}
    components = getattr(obj, "components", {}) or {}
    return {name: m for name, m in components.items() if isinstance(m, nn.Module) and gac_config(m) is not None}


def write_checkpoint(obj, folder: str | Path, **save_kwargs) -> dict[str, str]:
    """Write a model or pipeline with diffusers' own ``save_pretrained`` into ``folder``, plus each calibrated
    component's report and plot; returns ``{component: plot path relative to folder}`` for the plots written."""
    folder = Path(folder)
    obj.save_pretrained(folder, **save_kwargs)
    plots = {}
    for name, model in quantized_components(obj).items():
        report = calibration_report(model)
        if not report:
            continue
        where = folder / name if name else folder
        (where / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
        if any(u.get("weighting") for u in report.get("units") or []):
            plot_calibration(report["units"], where / PLOT_NAME)
            plots[name] = str((where / PLOT_NAME).relative_to(folder))
    return plots


def save_pretrained(obj, save_directory: str | os.PathLike, **save_kwargs) -> None:
    """Save a calibrated model or a pipeline atomically, with calibration reports (see the module docstring).
    ``save_kwargs`` go to diffusers' ``save_pretrained`` (``max_shard_size``, ``safe_serialization``, ...). Files the
    folder already held are kept, as diffusers keeps them."""
    target = Path(save_directory)
    if target.is_file():
        raise ValueError(f"save_pretrained: {target} is a file, not a folder")
    replace_folder_atomically(target, lambda tmp: write_checkpoint(obj, tmp, **save_kwargs), keep_existing=True)


def replace_folder_atomically(target: Path, write, *, keep_existing: bool = False) -> None:
    """Run ``write(tmp)`` into a temporary sibling folder, then swap it in for ``target``: a write that fails or is
    interrupted leaves the previous ``target`` (or none), never a partial folder. With ``keep_existing`` the files
    ``target`` already holds are copied in first, so ``write`` adds to them."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    backup = target.with_name(f".{target.name}.previous-{tmp.name.rsplit('-', 1)[-1]}")
    try:
        if keep_existing and target.is_dir():
            shutil.copytree(target, tmp, dirs_exist_ok=True)
        write(tmp)
        if target.exists():
            os.replace(target, backup)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if backup.exists() and not target.exists():
            os.replace(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
