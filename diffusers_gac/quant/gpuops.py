"""The GPU integer path of one layer as a PyTorch custom op, so that ``torch.compile`` keeps it inside its graph
(no graph break per layer; with ``mode="reduce-overhead"`` the whole step can replay as one CUDA graph).

The op takes the layer's tensors and a flat list of integers describing it (``intexec.gpu_layer_args``) and runs
the Triton kernels (``gpukernels``); its fake implementation gives the output's shape and dtype for tracing. Eager
calls skip the op and run the same function directly. This module has no ``from __future__ import annotations``:
the op's schema is read from the annotations.
"""

from typing import List, Optional

import torch


@torch.library.custom_op("diffusers_gac::integer_layer", mutates_args=())
def integer_layer(x: torch.Tensor, weight: torch.Tensor, w_zero: Optional[torch.Tensor], w_scale: torch.Tensor,
                  bias: Optional[torch.Tensor], colsum: Optional[torch.Tensor], zw: Optional[torch.Tensor],
                  ranges: List[Optional[torch.Tensor]], spec: List[int]) -> torch.Tensor:
    from .intexec import gpu_run

    return gpu_run(x, weight, w_zero, w_scale, bias, colsum, zw, ranges, spec)


@integer_layer.register_fake
def _(x, weight, w_zero, w_scale, bias, colsum, zw, ranges, spec):
    from .intexec import gpu_output_shape

    return x.new_empty(gpu_output_shape(x.shape, spec))
