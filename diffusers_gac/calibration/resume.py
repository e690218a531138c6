"""Resuming an interrupted calibration: the calibration data and every finished unit, kept in a folder.

    <folder>/progress.json               what the run is (its fingerprint) and the reports of the finished units
    <folder>/units/0000.safetensors      the quantizer state of unit 0 (rounding variables, ranges, step sizes)
    <folder>/data-<rank>-of-<world>.safetensors   each process's calibration data, recorded once

Every file is written to a temporary name and renamed into place, the unit's tensors before ``progress.json`` lists
the unit, so a run killed at any moment leaves a folder that resumes: the units it lists are restored exactly and
the rest are reconstructed as an uninterrupted run would (every unit draws from a seed of its own). Only the main
process writes; with several processes, each reads the same folder.
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


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
        return json.loads(path.read_text()) if path.is_file() else None

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
            state = load_file(str(self.folder / "units" / f"{index:04d}.safetensors"))
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
