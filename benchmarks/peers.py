"""The quantization backends a user would pick instead of diffusers-gac, applied to a full-precision denoiser the way
their own documentation does, for ``ptq_compare.py`` (quality) and ``inference_speed.py`` (speed).

=========  ===========================  =================================================================
peer       settings                     what it quantizes
=========  ===========================  =================================================================
torchao    W8A8                         ``nn.Linear`` only (``Int8DynamicActivationInt8WeightConfig``:
                                        int8 weights per channel, int8 activations per token, dynamic)
quanto     W8A8, W4A8, W8A16, W4A16     ``nn.Linear`` and ``nn.Conv2d`` (optimum-quanto ``quantize``;
                                        activation ranges from its own ``Calibration`` pass, then frozen)
quanto-    as quanto                    as quanto, but the layers diffusers-gac keeps at 8 bits by default
special-fp                              (first, last, timestep/class embedding MLPs) stay in full precision
                                        (quanto's ``exclude``): quanto has no per-layer bit widths
bnb-nf4    W4A16                        ``nn.Linear`` only (bitsandbytes ``Linear4bit``, NF4 weights,
                                        float32 compute); weight-only
=========  ===========================  =================================================================

Convolutions hold most of a UNet's weights and time, so a peer that leaves them in full precision is not at the bits
its name says: ``weight_bits`` gives the mean bits per weight of what it produced (``mean_weight_bits``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

PEERS = {
    "torchao": ("W8A8",),
    "quanto": ("W8A8", "W4A8", "W8A16", "W4A16"),
    "quanto-special-fp": ("W8A8", "W4A8", "W8A16", "W4A16"),
    "bnb-nf4": ("W4A16",),
}


def check_peer(name: str, bits: str) -> None:
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    if bits.upper() not in PEERS[name]:
        raise ValueError(f"{name} runs {', '.join(PEERS[name])}, not {bits}")


def _linear_and_conv_weights(model: nn.Module) -> dict[str, int]:
    return {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def mean_weight_bits(fp: nn.Module, bits: dict[str, int]) -> float:
    """Mean bits per Linear/Conv2d weight of ``fp`` when the layers named in ``bits`` have that many bits and the
    others stay at 32."""
    counts = _linear_and_conv_weights(fp)
    return sum(c * bits.get(n, 32) for n, c in counts.items()) / sum(counts.values())


def build_peer(name: str, bits: str, fp: nn.Module, calibrate: Callable[[nn.Module], None] | None = None
               ) -> tuple[nn.Module, float]:
    """A quantized copy of ``fp`` and its mean bits per Linear/Conv2d weight. ``calibrate(model)`` runs the model
    on calibration inputs (needed by quanto with quantized activations)."""
    check_peer(name, bits)
    bits = bits.upper()
    w_bits = int(bits[1])
    model = copy.deepcopy(fp).eval()
    counts = _linear_and_conv_weights(model)
    if name == "torchao":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig())
        quantized = {n for n, m in fp.named_modules() if isinstance(m, nn.Linear)}
    elif name.startswith("quanto"):
        from optimum.quanto import Calibration, freeze, qint4, qint8, quantize

        from diffusers_gac.quant.convert import is_special_layer

        activations = qint8 if bits.endswith("A8") else None
        exclude = [n for n in counts if is_special_layer(n)] if name == "quanto-special-fp" else None
        quantize(model, weights=qint4 if w_bits == 4 else qint8, activations=activations, exclude=exclude)
        if activations is not None:
            if calibrate is None:
                raise ValueError("quanto with quantized activations needs calibration inputs (calibrate=...)")
            with Calibration(), torch.no_grad():
                calibrate(model)
        freeze(model)
        quantized = set(counts) - set(exclude or [])
    else:  # bnb-nf4
        quantized = _to_bnb_nf4(model)
    return model, mean_weight_bits(fp, dict.fromkeys(quantized, w_bits))


def _to_bnb_nf4(model: nn.Module) -> set[str]:
    import bitsandbytes as bnb

    names = set()
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=child.weight.dtype, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, child_name, layer.to(child.weight.device))
            names.add(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names
