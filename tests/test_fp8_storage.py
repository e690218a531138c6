"""4-bit weights resident as float8 carriers (``int4_storage="fp8"``): exact on every path, and on the GPU kernels
(Triton's interpreter here) multiplied as float8 where the inputs have at most 4 bits too.

Float8 e4m3 holds every integer up to 16, so the carriers ``c - z`` of 4-bit codes (|c - z| <= 15) are exact; the
GPU kernels sum their products in float32 (exact below 2**24), so outputs are bit-identical to the packed layout's.
That the tensor cores' partial sums are exact on a real GPU is ``benchmarks/gpu_check.py``'s to check.
"""

import copy
import os

import pytest
import torch
from torch import nn

from diffusers_gac.quant import gpuexec, gpukernels, intexec

pytest.importorskip("triton")  # without a GPU, conftest.py has chosen Triton's interpreter
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the GPU kernels on CPU tensors through Triton's interpreter")

from test_integer import _frozen, one_thread  # noqa: E402, F401  (a frozen layer with observed ranges; autouse)

FP8 = torch.float8_e4m3fn
LAYERS = {
    "conv 3x3": (lambda: nn.Conv2d(12, 8, 3, padding=1), (2, 12, 9, 11), None),
    "conv 3x3 split": (lambda: nn.Conv2d(14, 6, 3, padding=1), (2, 14, 7, 6), 5),
    "linear, odd K": (lambda: nn.Linear(33, 7), (2, 5, 33), None),
}


@pytest.fixture
def carriers(monkeypatch):
    """The dtype of the activation carriers each ``gpukernels.quantize`` call wrote."""
    seen = []
    quantize = gpukernels.quantize

    def spy(*args, **kwargs):
        tokens = quantize(*args, **kwargs)
        seen.append(tokens.q.dtype)
        return tokens

    monkeypatch.setattr(gpukernels, "quantize", spy)
    return seen


@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (3, 3), (4, 8), (8, 8)])
@pytest.mark.parametrize("kind", LAYERS)
def test_float8_storage_gives_the_packed_outputs_exactly(kind, w_bits, a_bits, carriers):
    make, shape, split = LAYERS[kind]
    torch.manual_seed(0)
    x = torch.randn(shape) + 0.4
    layer = _frozen(make(), x, w_bits, a_bits, "dynamic", split=split)
    with torch.no_grad():
        assert layer.set_execution("integer", "packed")
        packed = [gpuexec.gpu_forward(layer, x), gpuexec.gpu_forward(layer, x.bfloat16()), layer(x)]
        state = layer.state_dict()
        assert layer.set_execution("integer", "fp8")
        carriers.clear()
        fp8 = [gpuexec.gpu_forward(layer, x), gpuexec.gpu_forward(layer, x.bfloat16()), layer(x)]  # GPU x2, CPU
    assert layer.int_weight.dtype == (FP8 if w_bits <= 4 else torch.int8)  # wider weights stay int8 carriers
    assert carriers == [FP8 if max(w_bits, a_bits) <= 4 else torch.int8] * (2 * (1 + (split is not None)))
    for a, b in zip(fp8, packed):
        assert a.dtype == b.dtype and torch.equal(a, b)
    saved = layer.state_dict()  # checkpoints hold the packed codes whatever the storage
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in state)
    intexec.to_fake(layer)
    assert torch.equal(layer.packed_weight, state["packed_weight"])


def test_float8_storage_follows_a_cast_of_the_model():
    """``model.to(torch.bfloat16)`` casts every floating tensor, float8 carriers included; the layer notices its
    layout is no longer one it holds and rebuilds it, exactly."""
    torch.manual_seed(0)
    x = torch.randn(2, 12, 9, 11)
    layer = _frozen(nn.Conv2d(12, 8, 3, padding=1), x, 4, 4, "dynamic")
    layer.set_execution("integer", "fp8")
    weight = layer.int_weight.clone()
    cast = copy.deepcopy(layer).to(torch.bfloat16)
    assert cast.int_weight.dtype == FP8 and torch.equal(cast.int_weight.view(torch.uint8), weight.view(torch.uint8))
    assert intexec.layout_storage(cast) == "fp8"


def test_float8_needs_float8_tensor_cores(monkeypatch):
    """Float8 carriers run on CUDA GPUs of compute capability 8.9 and later (Ada, Hopper); older ones convert the
    float8 weights to int8 in the kernel. CPU tensors take the GPU kernels only under the interpreter."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not gpuexec.fp8_tensor_cores("cuda")
    for capability in ((8, 9), (9, 0), (10, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert gpuexec.fp8_tensor_cores("cuda:0")
    assert gpuexec.fp8_tensor_cores("cpu") and not gpuexec.fp8_tensor_cores("meta")
    with pytest.raises(ValueError, match="at most 4 bits"):
        gpukernels.quantize(torch.randn(1, 4, 3), 8, fp8=True)


def test_float8_storage_is_int8_where_no_tensor_cores_multiply_float8(monkeypatch):
    """On the CPU (its own kernels are int8 GEMMs; float8 there only under Triton's interpreter) ``"fp8"`` holds int8
    carriers, the same bytes without a conversion per call; moved to a device with float8 tensor cores, float8."""
    torch.manual_seed(0)
    x = torch.randn(2, 12, 9, 11)
    layer = _frozen(nn.Conv2d(12, 8, 3, padding=1), x, 4, 4, "dynamic")
    with torch.no_grad():
        assert layer.set_execution("integer", "packed")
        reference = layer(x)
        monkeypatch.delenv("TRITON_INTERPRET")
        assert layer.set_execution("integer", "fp8") and layer.int_weight.dtype == torch.int8
        assert torch.equal(layer(x), reference)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        layer.float()  # a move or cast decides the layout again for where the layer is
    assert layer.int_weight.dtype == FP8 and intexec.layout_storage(layer) == "fp8"


def test_int4_storage_names_the_choices():
    layer = _frozen(nn.Linear(8, 4), torch.randn(3, 8), 4, 4, "dynamic")
    with pytest.raises(ValueError, match="int4_storage.*fp8"):
        layer.set_execution("integer", "float8")
