"""Calibration data: the denoiser's call inputs, recorded while the full-precision model runs a sampler.

``CalibrationRecorder`` is a context manager around ordinary sampling (any scheduler, any pipeline): it hooks the
denoiser, counts its calls (one per sampler step), and keeps the inputs of the selected steps, moved to CPU at
once so the trajectory never accumulates on the accelerator. Under classifier-free guidance the denoiser sees
both halves of the batch in one call; both are kept.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import TIMESTEP_SELECTIONS

STATIC_KEY = "static_json"  # safetensors metadata: the non-tensor keywords, as JSON


def select_steps(
    num_inference_steps: int, selection: str, num_timesteps: int, samples_per_timestep: int, seed: int = 0
) -> dict[int, int]:
    """How many samples to keep at each sampler step index: ``{step_index: count}``.

    * ``uniform``: ``num_timesteps`` evenly spaced steps (Q-Diffusion), ``samples_per_timestep`` each;
    * ``normal``: ``num_timesteps * samples_per_timestep`` samples whose step index is drawn from a normal
      distribution centred at 60% of the trajectory (the late middle, where PTQ4DM centres its timesteps) with a
      standard deviation of 20% of it;
    * ``all``: every step, ``samples_per_timestep`` each.
    """
    if selection not in TIMESTEP_SELECTIONS:
        raise ValueError(f"calib_timestep_selection must be one of {TIMESTEP_SELECTIONS}, got {selection!r}")
    n = num_inference_steps
    if selection == "all":
        return {k: samples_per_timestep for k in range(n)}
    if selection == "uniform":
        if num_timesteps > n:
            raise ValueError(f"calib_num_timesteps ({num_timesteps}) exceeds the {n} sampler steps")
        steps = np.unique(np.round(np.linspace(0, n - 1, num_timesteps)).astype(int))
        return {int(k): samples_per_timestep for k in steps}
    rng = np.random.default_rng(seed)
    draws = np.clip(np.round(rng.normal(0.6 * (n - 1), 0.2 * n, num_timesteps * samples_per_timestep)), 0, n - 1)
    steps, counts = np.unique(draws.astype(int), return_counts=True)
    # a trajectory contributes at most once per step, so no step can take more than samples_per_timestep * 4
    return {int(k): int(min(c, 4 * samples_per_timestep)) for k, c in zip(steps, counts)}


@dataclass
class CalibrationData:
    """Recorded denoiser inputs, one row per sample; tensors live on CPU.

    ``inputs`` maps a keyword of the denoiser's forward (``sample``, ``timestep``, ``class_labels``,
    ``encoder_hidden_states``, ...; nested dicts such as ``added_cond_kwargs`` as dotted keys) to a tensor whose
    first dimension is the sample index; ``static`` holds
    non-tensor keywords shared by every call. ``step_index`` is the sampler step each row came from.
    """

    inputs: dict[str, torch.Tensor]
    step_index: torch.Tensor
    static: dict[str, Any]

    def __len__(self) -> int:
        return len(self.step_index)

    @property
    def timesteps(self) -> torch.Tensor:
        return self.inputs["timestep"].reshape(len(self)).float()

    def batch(self, indices: torch.Tensor | list[int], device=None, dtype=None) -> dict[str, Any]:
        """The denoiser keywords for the given sample indices, moved to ``device`` (floats cast to ``dtype``)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        out = dict(self.static)
        for k, v in self.inputs.items():
            t = v[idx]
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[k] = t.to(device) if device is not None else t
        return unflatten_call(out)

    def save(self, path: str | Path) -> None:
        """One safetensors file: the tensors, and the non-tensor keywords as JSON in its metadata (never pickle).
        Tuples are stored as lists."""
        tensors = {f"inputs.{k}": v.contiguous() for k, v in self.inputs.items()}
        tensors["step_index"] = self.step_index.contiguous()
        try:
            static = json.dumps(self.static, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"CalibrationData.static must hold JSON values (numbers, strings, booleans, lists, dicts) "
                             f"to be saved, got {self.static!r}: {err}") from None
        save_file(tensors, str(path), metadata={STATIC_KEY: static})

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationData":
        """Read a file written by :meth:`save`. Only safetensors and JSON are read: a ``.static.pt`` sidecar of an
        older release (a pickle, which can run code when loaded) is refused, never opened."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise FileNotFoundError(f"no calibration data file at {path}") from None
        except Exception as err:  # safetensors reports a damaged header as its own error type
            raise ValueError(f"{path} is not a calibration data file (safetensors): {err}") from None
        sidecar = Path(str(path) + ".static.pt")
        if STATIC_KEY not in metadata and sidecar.exists():
            raise ValueError(
                f"{path} keeps its non-tensor inputs in {sidecar.name}, a pickle written by an older diffusers-gac; "
                "pickles can run code when loaded, so it is not read. Record the calibration data again and save it "
                "with this release (one safetensors file)")
        try:
            static = json.loads(metadata.get(STATIC_KEY, "{}"))
        except ValueError:
            static = None
        if not isinstance(static, dict):
            raise ValueError(f"{path}: the {STATIC_KEY!r} metadata is not a JSON object")
        if "step_index" not in tensors or "inputs.timestep" not in tensors:
            raise ValueError(f"{path} is not a calibration data file: it lacks 'step_index' or 'inputs.timestep'")
        inputs = {k[len("inputs."):]: v for k, v in tensors.items() if k.startswith("inputs.")}
        rows = {k: v.shape[0] if v.dim() else None for k, v in inputs.items()}
        wrong = {k: n for k, n in rows.items() if n != len(tensors["step_index"])}
        if wrong:
            raise ValueError(f"{path}: every input must have one row per sample ({len(tensors['step_index'])}), but "
                             f"{wrong} differ")
        return cls(inputs=inputs, step_index=tensors["step_index"], static=static)


def _call_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Name the positional arguments of a denoiser call by its forward signature."""
    params = [p for p in inspect.signature(module.forward).parameters if p != "self"]
    named = dict(zip(params, args))
    named.update(kwargs)
    named.pop("return_dict", None)
    return named


def _sample_input(named: dict[str, Any]) -> torch.Tensor:
    """The noisy sample of a denoiser call (``sample`` for UNets, ``hidden_states`` for transformers)."""
    return named["sample"] if "sample" in named else named.get("hidden_states")


class CalibrationRecorder:
    """Record the inputs of ``denoiser`` at the selected sampler steps.

    ``keep`` maps a sampler step index to the number of trajectories to keep at that step (the first ones);
    ``num_inference_steps`` tells the recorder where one batch of trajectories ends, so a sampler that runs the
    trajectories in several batches is recorded right. With ``keep=None`` every call is kept whole. Use as a
    context manager around any sampling loop.
    """

    def __init__(self, denoiser: nn.Module, keep: dict[int, int] | None = None, num_inference_steps: int | None = None):
        if keep is not None and num_inference_steps is None:
            raise ValueError("num_inference_steps is required to know which sampler step a call belongs to")
        self.denoiser, self.keep, self.num_inference_steps = denoiser, keep, num_inference_steps
        self.calls = 0
        self._offset = 0  # trajectories of the batches already finished
        self._rows: list[dict[str, torch.Tensor]] = []
        self._steps: list[torch.Tensor] = []
        self._static: dict[str, Any] = {}
        self._copies: int | None = None

    def __enter__(self) -> "CalibrationRecorder":
        self._handle = self.denoiser.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> bool:
        self._handle.remove()
        return False

    def _hook(self, module, args, kwargs):
        named = _call_kwargs(module, args, kwargs)
        batch = _sample_input(named).shape[0]
        step = self.calls if self.num_inference_steps is None else self.calls % self.num_inference_steps
        self.calls += 1
        copies = _guidance_copies(named, batch)
        per_copy = batch // copies
        offset = self._offset
        if self.num_inference_steps is not None and step == self.num_inference_steps - 1:
            self._offset += per_copy
        if self.keep is None:
            local = torch.arange(per_copy)
        else:
            count = self.keep.get(step, 0)
            local = torch.arange(max(0, min(per_copy, count - offset)))
        if not len(local):
            return
        rows = torch.cat([local + c * per_copy for c in range(copies)])
        kept: dict[str, torch.Tensor] = {}
        for k, v in named.items():
            if torch.is_tensor(v):
                kept[k] = _per_sample(v, batch)[rows].to("cpu", copy=True)
            elif isinstance(v, dict):  # e.g. added_cond_kwargs of SDXL
                for kk, vv in v.items():
                    if torch.is_tensor(vv):
                        kept[f"{k}.{kk}"] = _per_sample(vv, batch)[rows].to("cpu", copy=True)
            elif v is not None:
                self._static[k] = v
        self._rows.append(kept)
        self._steps.append(torch.full((len(rows),), step, dtype=torch.long))

    @property
    def data(self) -> CalibrationData:
        if not self._rows:
            raise RuntimeError("nothing was recorded: run the sampler inside the recorder's `with` block")
        keys = self._rows[0].keys()
        inputs = {k: torch.cat([r[k] for r in self._rows]) for k in keys}
        return CalibrationData(inputs=inputs, step_index=torch.cat(self._steps), static=dict(self._static))


def _per_sample(v: torch.Tensor, batch: int) -> torch.Tensor:
    """A tensor with one row per sample; a shared value (such as a scalar timestep) is repeated."""
    v = v.detach()
    if v.dim() == 0:
        return v.reshape(1).expand(batch)
    if v.shape[0] != batch:
        return v[:1].expand(batch, *v.shape[1:])
    return v


def _guidance_copies(named: dict[str, Any], batch: int) -> int:
    """Classifier-free guidance runs [unconditional, conditional] in one call: 2 copies of the trajectories.

    Recognised when the batch holds the same latents twice."""
    sample = named.get("sample", named.get("hidden_states"))
    if batch % 2 == 0 and torch.equal(sample[: batch // 2], sample[batch // 2 :]):
        return 2
    return 1


def unflatten_call(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Turn dotted keys back into nested dicts for the denoiser call."""
    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        if "." in k:
            outer, inner = k.split(".", 1)
            out.setdefault(outer, {})[inner] = v
        else:
            out[k] = v
    return out
