"""Checkpoint size and in-memory footprint of quantized embedded models against full precision.

The layout of a saved checkpoint (which tensors, their shapes and dtypes) depends only on the bit widths and the
converted layers, not on how the rounding was learned, so the models here are calibrated with round-to-nearest on
a small calibration set. Writes a markdown table:

    python benchmarks/checkpoint_size.py --output docs/results/checkpoint_size.md
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from diffusers.utils import logging as dlogging
from safetensors import safe_open

from diffusers_gac import GACConfig, quantize_model
from diffusers_gac.zoo import (
    embedded_model_path,
    load_embedded_scheduler,
    load_embedded_unet,
)

SETTINGS = {"W4A4": dict(w_bits=4, a_bits=4), "W4A8": dict(w_bits=4, a_bits=8), "W8A8": dict(w_bits=8, a_bits=8),
            "W4A4, all layers 4-bit": dict(w_bits=4, a_bits=4, special_bits=4)}
FAST = dict(reconstruction="none", calib_num_timesteps=5, calib_samples_per_timestep=8)


def breakdown(folder: Path) -> dict[str, int]:
    """Bytes per kind of tensor in the saved safetensors files, and the files' headers (names, dtypes, shapes)."""
    kinds: dict[str, int] = defaultdict(int)
    for file in folder.glob("*.safetensors"):
        data = 0
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                kind = ("packed weight codes" if key.endswith("packed_weight") else
                        "quantizer scales and zero points" if ".weight_quantizer." in key or "_quantizer." in key else
                        "unconverted tensors (biases, norms, embeddings)")
                kinds[kind] += t.numel() * t.element_size()
                data += t.numel() * t.element_size()
        kinds["safetensors header (tensor names, dtypes, shapes, digest)"] += file.stat().st_size - data
    return dict(kinds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=None, help="markdown file to write (default: print only)")
    args = parser.parse_args()
    dlogging.set_verbosity_error()
    torch.manual_seed(0)
    fp_file = embedded_model_path() / "unet" / "diffusion_pytorch_model.safetensors"
    fp_bytes = fp_file.stat().st_size
    fp_footprint = load_embedded_unet().get_memory_footprint()
    rows = [f"| full precision (FP32) | {fp_bytes / 1e6:.2f} MB | 100% | {fp_footprint / 1e6:.2f} MB | 100% | - |"]
    details = []
    for name, bits in SETTINGS.items():
        unet = load_embedded_unet()
        quantize_model(unet, GACConfig(**bits, **FAST), scheduler=load_embedded_scheduler(), show_progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            unet.save_pretrained(tmp)
            size = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
            parts = breakdown(Path(tmp))
        footprint = unet.get_memory_footprint()
        rows.append(f"| {name} | {size / 1e6:.2f} MB | {size / fp_bytes:.1%} | {footprint / 1e6:.2f} MB | "
                    f"{footprint / fp_footprint:.1%} | {len(unet.config.quantization_config.layout.layers)} |")
        details.append(f"- {name}: " + ", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in sorted(parts.items())))
    text = "\n".join([
        "# Checkpoint size and memory footprint (embedded digits model)", "",
        "`save_pretrained` output (safetensors files) and `get_memory_footprint()` of the loaded model. By default the",
        "first layer, the last layer and the timestep embedding stay at 8 bits (`special_bits=8`). Zero points are",
        "saved as uint8 and dynamic activation quantizers save nothing (both exact). Freezing rounds the quantized",
        "layers' weight scales, static input scales and biases to float16 values, which the checkpoint stores as",
        "float16, so a loaded model computes exactly what the calibrated one did; norms and the other unconverted",
        "tensors stay float32. What the rounding costs in quality: [float16_rounding.md](float16_rounding.md).", "",
        "Command: `python benchmarks/checkpoint_size.py --output docs/results/checkpoint_size.md`", "",
        "| model | checkpoint | vs FP32 | in memory | vs FP32 | converted layers |", "|---|---|---|---|---|---|",
        *rows, "", "What the quantized checkpoints hold:", "", *details, "",
    ])
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
