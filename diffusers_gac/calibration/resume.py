"""Resuming an interrupted calibration: the calibration data and every finished unit, kept in a folder.

    <folder>/run.json                    what the run is (model, options, processes, given data), written first
    <folder>/progress.json               the run's fingerprint and the reports of the finished units
    <folder>/units/0000.safetensors      the quantizer state of unit 0 (rounding variables, ranges, step sizes)
    <folder>/data-<rank>-of-<world>.safetensors   each process's calibration data, recorded once

Every file is written to a temporary name and renamed into place, the unit's tensors before ``progress.json`` lists
the unit, so a run killed at any moment leaves a folder that resumes: the units it lists are restored exactly and
the rest are reconstructed as an uninterrupted run would (every unit draws from a seed of its own). ``run.json`` is
written before any calibration data, so a run killed at any moment is resumed only by the same run
(:func:`claim_folder`); a file that cannot be read is an error naming it. Only the main process writes; with several
processes, each reads the same folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..quant.convert import set_quant_state
from .problem import UnitReport
from .units import Unit

PROGRESS = "progress.json"
RUN = "run.json"


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path} is damaged (not readable JSON: {err}); the interrupted calibration cannot be "
                         "resumed from it: delete its folder and start again") from None


def run_fingerprint(denoiser: nn.Module, options: dict[str, Any], processes: int, data=None) -> dict[str, Any]:
    """What identifies a calibration run: the model (its class and config, less the bookkeeping keys such as
    ``_name_or_path``), the options (seed and number of
    trajectories among them), the number of processes and, for data the caller gave, its size and shapes."""
    config = getattr(denoiser, "config", None)
    architecture = {k: v for k, v in dict(config).items() if not k.startswith("_")} if config is not None else None
    fingerprint = {"model": type(denoiser).__name__, "model_config": architecture,
                   "options": options, "processes": processes}
    if data is not None:
        fingerprint["data"] = {"samples": len(data), "shapes": {k: list(v.shape) for k, v in data.inputs.items()}}
    return json.loads(json.dumps(fingerprint, default=str))


def claim_folder(folder: Path, fingerprint: dict[str, Any], *, is_main: bool = True) -> None:
    """Record the run in ``folder`` before anything else is written there, or check that the run it records is this
    one: another run's folder (another seed, model, data) is refused, naming what differs."""
    path = folder / RUN
    if path.is_file():
        recorded = _read_json(path)
        differ = sorted(k for k in {*recorded, *fingerprint} if recorded.get(k) != fingerprint.get(k))
        if "options" in differ:
            theirs, ours = recorded.get("options") or {}, fingerprint["options"]
            differ += [f"options.{k}" for k in sorted({*theirs, *ours}) if theirs.get(k) != ours.get(k)]
        if differ:
            raise ValueError(f"{folder} holds the progress of another calibration run ({', '.join(differ[:8])} "
                             "differ); resume it with the command that started it, or delete the folder")
        return
    leftovers = [p.name for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []
    if leftovers:
        raise ValueError(f"{folder} holds {', '.join(sorted(leftovers)[:4])} but no {RUN}: it was written by an "
                         "older diffusers-gac or another tool, and cannot be checked against this run; delete it")
    if is_main:
        _write_atomically(path, lambda p: p.write_text(json.dumps(fingerprint, indent=1)))


LEVER_TENSORS = ("smooth", "lowrank_down", "lowrank_up", "lowrank_down_scale", "lowrank_up_scale")


def unit_state(unit: Unit) -> dict[str, torch.Tensor]:
    """The calibrated quantizer state of a unit: every tensor of its quantizers (rounding variables included), and
    of layers with smoothing or a low-rank branch, those and the weight they changed (``quant/levers.py``)."""
    leaves = {(f"{n[len(unit.name) + 1:]}." if n != unit.name else "") for n, l in unit.layers.items()
              if any(getattr(l, t, None) is not None for t in LEVER_TENSORS)}
    changed = {p + t for p in leaves for t in ("weight", *LEVER_TENSORS)}
    return {k: v.detach().contiguous().cpu() for k, v in unit.module.state_dict().items()
            if "quantizer" in k or k in changed}


class UnitCheckpoint:
    """Finished units of one calibration, written to ``folder`` as they finish (see the module docstring).

    ``fingerprint`` identifies the run (options, data sizes, units): a folder holding another run's units refuses
    to resume it.
    """

    def __init__(self, folder: str | os.PathLike, fingerprint: dict[str, Any], *, is_main: bool = True):
        self.folder, self.fingerprint, self.is_main = Path(folder), fingerprint, is_main

    def _progress(self) -> dict[str, Any] | None:
        path = self.folder / PROGRESS
        return _read_json(path) if path.is_file() else None

    def restore(self, units: list[Unit], model: nn.Module) -> list[UnitReport]:
        """Load the finished units into ``model`` (their layers end as a finished unit's do) and return their
        reports; nothing when the folder holds no progress yet. Called before the first unit is reconstructed."""
        self.full_fingerprint = json.loads(json.dumps(dict(self.fingerprint, units=[u.name for u in units])))
        progress = self._progress()
        if progress is None:
            return []
        if progress["fingerprint"] != self.full_fingerprint:
            raise ValueError(
                f"{self.folder} holds the progress of another calibration (different options, data or model); "
                "remove it, or resume with the command that started it"
            )
        reports = []
        for index, entry in enumerate(progress["units"]):
            unit = units[index]
            path = self.folder / "units" / f"{index:04d}.safetensors"
            try:
                state = load_file(str(path))
            except Exception as err:  # safetensors reports a damaged file as its own error type
                raise ValueError(f"{path} is damaged ({err}); the interrupted calibration cannot be resumed from it: "
                                 "delete its folder and start again") from None
            for name, layer in unit.layers.items():
                key = (f"{name[len(unit.name) + 1:]}." if name != unit.name else "") + "weight_quantizer.alpha"
                if key in state:
                    q = layer.weight_quantizer
                    q.alpha = nn.Parameter(state.pop(key).to(layer.weight.device), requires_grad=False)
                    q.rounding = "hard"
            missing = set(state) - set(unit.module.state_dict())
            if missing:
                raise ValueError(f"{self.folder}: unit {unit.name} has no tensors named {sorted(missing)}")
            unit.module.load_state_dict(state, strict=False)
            set_quant_state(unit.module, weights=True, acts=True)
            reports.append(UnitReport(**entry))
        return reports

    def save(self, index: int, unit: Unit, report: UnitReport) -> None:
        """Record unit ``index`` as finished (main process only)."""
        if not self.is_main:
            return
        (self.folder / "units").mkdir(parents=True, exist_ok=True)
        state = unit_state(unit)
        _write_atomically(self.folder / "units" / f"{index:04d}.safetensors", lambda p: save_file(state, str(p)))
        progress = self._progress() or {"fingerprint": self.full_fingerprint, "units": []}
        if len(progress["units"]) != index:
            raise RuntimeError(f"{self.folder}: unit {index} finished but {len(progress['units'])} are recorded")
        progress["units"].append(json.loads(json.dumps(asdict(report), default=str)))
        _write_atomically(self.folder / PROGRESS, lambda p: p.write_text(json.dumps(progress, indent=1)))
