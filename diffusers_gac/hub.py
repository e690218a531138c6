"""Sharing calibrated models: a generated model card, and ``push_to_hub`` for quantized models and pipelines.

``push_to_hub(model_or_pipeline, repo_id)`` writes the pre-calibrated checkpoint (diffusers' own
``save_pretrained``), each calibrated component's report and learned-weights plot, and a model card
(``README.md``: base model, bits, calibration settings, measured quality, the plot) into one temporary folder, and
uploads it as one commit. ``from_pretrained(repo_id)`` then downloads and loads it without recalibrating
(``import diffusers_gac`` first, to register the backend). diffusers' own ``push_to_hub`` of a calibrated model or
pipeline uploads a loadable checkpoint too, with diffusers' generic card.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from diffusers.utils import logging
from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder
from torch import nn

from .config import FORMAT_OPTIONS, GACConfig
from .quant.convert import quant_layers
from .quantizer import REPORT_NAME
from .saving import PLOT_NAME, calibration_report, gac_config, quantized_components, write_checkpoint

logger = logging.get_logger(__name__)

def _fp32_and_quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """Bytes of the model in FP32, and of its state as saved (packed codes, scales, unconverted weights)."""
    quantized = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    fp32 = 0
    layers = {n: m for n, m in quant_layers(model).items() if not m.derived}  # fused projections: not saved
    state_names = set()
    for name, layer in layers.items():
        fp32 += layer.dequantized_weight().numel() * 4
        state_names.update(f"{name}.{k}" for k, _ in layer.named_buffers())
        state_names.update(f"{name}.{k}" for k, _ in layer.named_parameters() if k != "bias")
    fp32 += sum(t.numel() * 4 for k, t in model.state_dict().items() if k not in state_names)
    return fp32, quantized


def _fmt(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _quality_table(evaluation: dict[str, Any] | None) -> str:
    if not evaluation or "quantized" not in evaluation:
        return ("No quality numbers were given for this upload. Measure them against the full-precision model with "
                "`diffusers_gac.evaluation.evaluate_denoiser` (or `diffusers-gac evaluate`) and pass them as "
                "`push_to_hub(..., evaluation=...)`.")
    q, fp = evaluation["quantized"], evaluation.get("full_precision") or {}
    rows = ["| metric | full precision | quantized |", "|---|---|---|"]
    names = {"fd": "FD (lower is better)", "psnr": "PSNR vs full precision, dB", "accuracy": "class accuracy"}
    for key, label in names.items():
        if q.get(key) is None and fp.get(key) is None:
            continue
        digits = 3 if key == "accuracy" else 2
        rows.append(f"| {label} | {_fmt(fp.get(key), fp.get(f'{key}_std'), digits)} | "
                    f"{_fmt(q.get(key), q.get(f'{key}_std'), digits)} |")
    protocol = (f"{q.get('num_samples')} samples, {q.get('num_inference_steps')} sampler steps, seeds "
                f"{q.get('seeds')}; the same noise for both models.")
    return "\n".join(rows) + "\n\n" + protocol


def _settings_table(config: GACConfig) -> str:
    """The format options and the calibration options that shaped the result, one row each."""
    options = {k: getattr(config, k) for k in FORMAT_OPTIONS} | config.calibration_options()
    return "\n".join(["| option | value |", "|---|---|"] + [f"| `{k}` | `{v!r}` |" for k, v in options.items()])


def model_card(obj, *, repo_id: str, evaluation: dict[str, Any] | None = None, base_model: str | None = None,
               plots: dict[str, str] | None = None) -> ModelCard:
    """The card of a calibrated model or pipeline: what it is, how to load it, how it was calibrated, how good it is.

    ``evaluation`` is ``{"full_precision": summary, "quantized": summary}`` as ``evaluation.summarize`` returns
    them (the ``evaluation`` of a ``diffusers-gac calibrate`` report); ``plots`` maps a component to the path of its
    learned-weights plot in the repository.
    """
    parts = quantized_components(obj)
    if not parts:
        raise ValueError("nothing in this object was quantized by diffusers-gac (no quantization_config with "
                         "quant_method 'gac'); calibrate it first")
    first = next(iter(parts.values()))
    config = gac_config(first)
    bits = f"W{config.w_bits}A{config.a_bits or 16}"
    base_model = base_model or first.config.get("_name_or_path") or None
    is_hub_id = bool(base_model) and not os.path.exists(base_model) and base_model.count("/") == 1
    data = ModelCardData(library_name="diffusers", tags=["diffusers-gac", "quantized", bits.lower(), "post-training-quantization"],
                         base_model=base_model if is_hub_id else None)
    is_pipeline = not isinstance(obj, nn.Module)
    cls = "DiffusionPipeline" if is_pipeline else type(obj).__name__
    acts = f"activations at {config.a_bits} bits" if config.a_bits else "activations in full precision"
    weighting = {"gradient_aligned": "gradient-aligned (learned) sample weights",
                 "fisher": "fixed Fisher per-timestep sample weights"}.get(config.weighting, "uniform sample weights")
    method = ("round-to-nearest weights and calibrated activation ranges" if config.reconstruction == "none"
              else f"block reconstruction with {weighting}")
    lines = [
        f"# {repo_id.split('/')[-1]}: {bits} quantized with diffusers-gac", "",
        (f"A post-training quantized {'pipeline' if is_pipeline else type(obj).__name__}: weights at {config.w_bits} bits, "
         f"{acts}, calibrated with {method} by diffusers-gac (post-training quantization for diffusers with "
         "gradient-aligned calibration)."),
        f"Base model: `{base_model}`." if base_model else "Base model: not recorded.", "",
        "## Use", "", "```python",
        "import diffusers_gac  # registers the \"gac\" quantization backend with diffusers",
        f"from diffusers import {cls}", "",
        f'model = {cls}.from_pretrained("{repo_id}")  # loads the calibrated checkpoint, no recalibration', "```", "",
        "## Quantization", "",
    ]
    for name, model in parts.items():
        fp32, packed = _fp32_and_quantized_bytes(model)
        layers = gac_config(model).layout.layers
        lines += [(f"- `{name or type(model).__name__}`: {len(layers)} layers converted; {packed / 2**20:.2f} MiB of "
                   f"weights and quantizer state against {fp32 / 2**20:.2f} MiB in FP32 ({packed / max(fp32, 1):.0%}).")]
    lines += ["", "Calibration settings:", "", _settings_table(config), "", "## Quality", "", _quality_table(evaluation), ""]
    if plots:
        lines += ["## What calibration learned", "",
                  "Per unit: the gradient conflict between timestep groups and the learned weight mass per timestep.", ""]
        lines += [f"![{name or 'calibration'}]({file})" for name, file in plots.items()]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def stale_patterns(folder: Path) -> list[str]:
    """What an earlier push to the repository may hold that this upload (``folder``) replaces or drops: for each
    model written (a folder with a config.json), its weights, shards and shard index, its report and its plot. Other
    files (another component, the user's own) are left alone."""
    patterns = []
    for config in sorted(folder.rglob("config.json")):
        where = config.parent.relative_to(folder).as_posix()
        prefix = "" if where == "." else f"{where}/"
        patterns += [f"{prefix}{stem}{sep}*" for stem in ("diffusion_pytorch_model", "model", "pytorch_model")
                     for sep in (".", "-")]
        patterns += [prefix + REPORT_NAME, prefix + PLOT_NAME]
    return patterns


def write_hub_folder(obj, folder: str | Path, *, repo_id: str, evaluation: dict[str, Any] | None = None,
                     base_model: str | None = None, **save_kwargs) -> Path:
    """Everything ``push_to_hub`` uploads, written into ``folder``: the checkpoint, reports, plots and README.md.
    Without ``evaluation``, the quality numbers come from a calibration report that carries them."""
    folder = Path(folder)
    plots = write_checkpoint(obj, folder, **save_kwargs)
    if evaluation is None:
        reports = [calibration_report(m) or {} for m in quantized_components(obj).values()]
        evaluation = next((r["evaluation"] for r in reports if r.get("evaluation")), None)
    model_card(obj, repo_id=repo_id, evaluation=evaluation, base_model=base_model, plots=plots).save(folder / "README.md")
    return folder


def push_to_hub(obj, repo_id: str, *, evaluation: dict[str, Any] | None = None, base_model: str | None = None,
                commit_message: str | None = None, private: bool | None = None, token: str | None = None,
                create_pr: bool = False, **save_kwargs):
    """Upload a calibrated model or pipeline with its generated model card, in one commit; returns the commit
    info. ``save_kwargs`` go to ``save_pretrained`` (e.g. ``max_shard_size``)."""
    if not quantized_components(obj):
        raise ValueError("push_to_hub: nothing in this object was quantized by diffusers-gac; calibrate it first "
                         "(or use its own push_to_hub for a full-precision upload)")
    repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        write_hub_folder(obj, tmp, repo_id=repo_id, evaluation=evaluation, base_model=base_model, **save_kwargs)
        # what an earlier push left that this model does not have (old shards, a report or plot) goes in the same commit
        return upload_folder(repo_id=repo_id, folder_path=tmp, token=token, create_pr=create_pr,
                             delete_patterns=stale_patterns(Path(tmp)),
                             commit_message=commit_message or "Upload diffusers-gac quantized model")
