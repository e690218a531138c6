"""Quantized Conv2d and Linear: the original weight and bias, a weight quantizer and an input quantizer.

State of a converted layer named ``L`` (what a checkpoint holds):

    L.weight                         original shape, full precision until frozen, then the dequantized 4-bit grid
    L.bias                           unchanged
    L.weight_quantizer.scale         (out_channels, 1, ...)      per output channel
    L.weight_quantizer.zero_point    (out_channels, 1, ...)
    L.input_quantizer.scale          (groups,)                    absent when activations stay full precision
    L.input_quantizer.zero_point     (groups,)
    L.input_quantizer.split          ()                           only for split inputs (UNet skip joins)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import ActQuantizer, ActScheme, SplitActQuantizer, WeightInit, WeightQuantizer


class QuantLayerMixin:
    """What the reconstruction loop needs from any quantized layer."""

    weight: nn.Parameter
    weight_quantizer: WeightQuantizer
    input_quantizer: ActQuantizer | SplitActQuantizer | None
    quantize_weight: bool
    frozen: bool

    def _init_quant(
        self,
        w_bits: int,
        a_bits: int | None,
        weight_init: WeightInit,
        act_scheme: ActScheme,
        act_groups: int,
        channel_dim: int,
        split: int | None,
    ) -> None:
        self.w_bits, self.a_bits = w_bits, a_bits
        self.weight_quantizer = WeightQuantizer(self.weight.shape, w_bits, weight_init)
        self.weight_quantizer.init_range(self.weight)
        if a_bits is None:
            self.input_quantizer = None
        elif split is not None:
            self.input_quantizer = SplitActQuantizer(split, a_bits, act_scheme, act_groups, channel_dim)
        else:
            self.input_quantizer = ActQuantizer(a_bits, act_scheme, act_groups, channel_dim)
        self.quantize_weight = True
        self.frozen = False  # True once the weight holds its hardened, dequantized values

    def quantized_weight(self) -> torch.Tensor:
        if self.frozen or not self.quantize_weight:
            return self.weight
        return self.weight_quantizer(self.weight)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    @torch.no_grad()
    def freeze(self) -> None:
        """Bake the (learned or nearest) rounding into ``weight``; the layer then only dequantizes."""
        if not self.frozen:
            self.weight.data.copy_(self.weight_quantizer.harden(self.weight))
            self.frozen = True


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    @classmethod
    def from_module(cls, module: nn.Conv2d, *, w_bits: int, a_bits: int | None, weight_init: WeightInit = "mse",
                    act_scheme: ActScheme = "static", act_groups: int = 1, split: int | None = None) -> "QuantConv2d":
        layer = cls(
            module.in_channels, module.out_channels, module.kernel_size, stride=module.stride, padding=module.padding,
            dilation=module.dilation, groups=module.groups, bias=module.bias is not None, padding_mode=module.padding_mode,
            device="meta",
        )
        layer.weight = module.weight
        layer.bias = module.bias
        layer._init_quant(w_bits, a_bits, weight_init, act_scheme, act_groups, channel_dim=1, split=split)
        return layer.to(module.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)


class QuantLinear(QuantLayerMixin, nn.Linear):
    @classmethod
    def from_module(cls, module: nn.Linear, *, w_bits: int, a_bits: int | None, weight_init: WeightInit = "mse",
                    act_scheme: ActScheme = "static", act_groups: int = 1, split: int | None = None) -> "QuantLinear":
        if split is not None:
            raise ValueError("split input quantizers are only defined for convolutions")
        layer = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        layer.weight = module.weight
        layer.bias = module.bias
        layer._init_quant(w_bits, a_bits, weight_init, act_scheme, act_groups, channel_dim=-1, split=None)
        return layer.to(module.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


QUANT_LAYERS = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
