"""The float8 path of ``"auto"`` layers on a GPU (``gpuexec.scaled_run``, ``gpudense.scaled_gemm``): bfloat16 linear
layers and 1x1 convolutions of at most 4 bits as one ``torch._scaled_mm`` on float8 carriers, on CPU tensors through
Triton's interpreter (its quantize kernel) and PyTorch's CPU ``_scaled_mm``.

The float8 path sums the same codes as the integer kernels, exactly, and applies the same float32 scales, so its
bfloat16 outputs are the CPU integer kernels' up to the order of two float32 multiplications (one unit in the last
place of bfloat16, rarely). On a GPU, ``benchmarks/gpu_check.py`` checks it against the reference and times it.
"""

import os

import pytest
import torch
from torch import nn

from diffusers_gac.quant import gpuauto, gpudense, gpuexec, intexec
from diffusers_gac.quant.layers import QuantLinear

pytest.importorskip("triton")  # without a GPU, conftest.py has chosen Triton's interpreter
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the GPU kernels on CPU tensors through Triton's interpreter")

from test_integer import _frozen, one_thread  # noqa: E402, F401  (a frozen layer with observed ranges; autouse)

LAYERS = {
    "linear": (lambda: nn.Linear(64, 48), (2, 9, 64)),
    "linear, tokens in rows, no bias": (lambda: nn.Linear(32, 16, bias=False), (7, 32)),
    "conv 1x1": (lambda: nn.Conv2d(32, 48, 1), (2, 32, 5, 7)),
}


def _layer(kind, w_bits=4, a_bits=4, scheme="dynamic", seed=0):
    make, shape = LAYERS[kind]
    torch.manual_seed(seed)
    x = (torch.randn(shape) + 0.4) * torch.linspace(0.2, 3, shape[-1])  # zero points and uneven tokens matter
    layer = _frozen(make(), x, w_bits, a_bits, scheme)
    if layer.bias is not None:
        layer.bias.data = layer.bias.data.bfloat16()  # what a bfloat16 load gives (quantizer state in float32)
    return layer, x.bfloat16()


def _outputs(layer, x, storage="packed"):
    """The fake-quant reference's output, the CPU integer kernels' and the float8 path's, on ``x``."""
    with torch.no_grad():
        reference = layer(x)
        assert layer.set_execution("integer", storage)
        integer = intexec._forward_cpu(layer, x)
        calls = gpuexec.path_calls(layer, x)
        assert set(calls) == {"integer", "dense", "scaled"}
        out = gpuexec.scaled_run(*calls["scaled"])
        layer.set_execution("fake")
    return reference, integer, out


def _close_to_integer(out, integer):
    """Within one unit in bfloat16's last place of the integer kernels' output, and equal to it nearly everywhere."""
    ulp = torch.finfo(torch.bfloat16).eps * integer.float().abs().clamp_min(1e-3)
    assert ((out.float() - integer.float()).abs() <= ulp).all()
    assert (out == integer).float().mean() >= 0.99


@pytest.mark.parametrize("storage", ["packed", "int8", "fp8"])
@pytest.mark.parametrize("kind", LAYERS)
def test_float8_path_sums_the_integer_kernels_codes(kind, storage):
    """From every weight storage (the float8 one read as it is, packed and int8 carriers written to float8 per call):
    the CPU integer kernels' output, and the reference's within bfloat16's rounding of the input and weight."""
    layer, x = _layer(kind)
    reference, integer, out = _outputs(layer, x, storage)
    assert out.shape == reference.shape and out.dtype == torch.bfloat16 and out.is_contiguous()
    _close_to_integer(out, integer)
    assert (out.float() - reference.float()).abs().max() <= 2**-6 * reference.float().abs().max()


@pytest.mark.parametrize("scheme", ["static", "timestep"])
@pytest.mark.parametrize("kind", ["linear", "conv 1x1"])
def test_float8_path_takes_static_and_per_timestep_ranges(kind, scheme):
    layer, x = _layer(kind, scheme=scheme)
    _, integer, out = _outputs(layer, x)
    _close_to_integer(out, integer)


def test_float8_path_clips_ranges_as_the_quantizer_does():
    torch.manual_seed(0)
    x = torch.randn(3, 11, 64).bfloat16()
    layer = QuantLinear.from_module(nn.Linear(64, 32), w_bits=4, a_bits=4, weight_init="minmax",
                                    act_scheme="dynamic", clipping=True)
    layer.freeze()
    layer.input_quantizer.clip.fill_(0.6)
    layer.bias.data = layer.bias.data.bfloat16()
    _, integer, out = _outputs(layer, x)
    _close_to_integer(out, integer)
    layer.input_quantizer.clip.fill_(1.0)
    _, unclipped, _ = _outputs(layer, x)
    assert (unclipped.float() - integer.float()).abs().max() > 1e-2 * integer.float().abs().max()  # the ratio is read


def test_the_weight_carriers_written_for_the_float8_gemm_are_exact():
    """``dequantize(..., scale=False)`` writes ``c - z`` of packed codes into float8 exactly."""
    torch.manual_seed(0)
    codes, zero = torch.randint(0, 16, (48, 40)), torch.randint(0, 16, (48, 1))
    packed = torch.cat([codes[:, :20] | (codes[:, 20:] << 4)], 1).to(torch.uint8).reshape(-1)
    out = torch.empty(48, 40, dtype=torch.float8_e4m3fn)
    gpudense.dequantize(packed, True, zero.to(torch.int8).view(-1), torch.rand(48), None, out, 0, 40, 1, scale=False)
    assert torch.equal(out.float(), (codes - zero).float())


@pytest.mark.parametrize("make,shape,bits,reason", [
    (lambda: nn.Conv2d(32, 48, 3, padding=1), (2, 32, 5, 5), (4, 4), "not a linear layer or an unpadded 1x1"),
    (lambda: nn.Conv2d(32, 48, 1, stride=2), (2, 32, 5, 5), (4, 4), "not a linear layer or an unpadded 1x1"),
    (lambda: nn.Linear(64, 48), (2, 64), (4, 8), "more than 4 bits"),
    (lambda: nn.Linear(64, 48), (2, 64), (8, 4), "more than 4 bits"),
    (lambda: nn.Linear(40, 48), (2, 40), (4, 4), "not a multiple of 16"),
    (lambda: nn.Linear(64, 24), (2, 64), (4, 4), "not a multiple of 16"),
])
def test_what_the_float8_path_does_not_serve(make, shape, bits, reason):
    """Layers it does not serve say why and are not offered to ``"auto"``; neither are float32 or float16 calls
    (row-wise scaled float8 GEMMs write bfloat16)."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    layer = _frozen(make(), x, *bits, "dynamic")
    assert layer.set_execution("integer")
    assert reason in gpuexec.scaled_support(layer)
    assert "scaled" not in gpuexec.path_calls(layer, x.bfloat16())
    supported, x = _layer("linear")
    assert supported.set_execution("integer") and gpuexec.scaled_support(supported) is None
    for dtype in (torch.float32, torch.float16):
        assert set(gpuexec.path_calls(supported, x.to(dtype))) == {"integer", "dense"}


def test_split_inputs_and_ranges_per_channel_group_are_not_served():
    torch.manual_seed(0)
    split = _frozen(nn.Conv2d(32, 16, 1), torch.randn(2, 32, 4, 4), 4, 4, "dynamic", split=16)
    assert split.set_execution("integer") and gpuexec.scaled_support(split) == "a split input"
    grouped = QuantLinear.from_module(nn.Linear(64, 32), w_bits=4, a_bits=4, weight_init="minmax",
                                      act_scheme="dynamic", group_size=16)
    grouped.freeze()
    assert grouped.set_execution("integer")
    assert gpuexec.scaled_support(grouped) == "activation ranges per channel group (act_group_size)"


def test_no_float8_path_without_row_wise_scaled_gemms(monkeypatch):
    layer, x = _layer("linear")
    assert layer.set_execution("integer")
    monkeypatch.setattr(gpudense, "scaled_gemms", lambda device: False)
    gpuexec.drop_gpu_plan(layer)
    assert gpuexec.scaled_support(layer) == "no row-wise scaled float8 GEMMs on this device"
    assert "scaled" not in gpuexec.path_calls(layer, x)


def test_auto_takes_the_float8_path_where_it_is_fastest_and_pinning_it_elsewhere_falls_back(monkeypatch):
    monkeypatch.setattr(intexec, "integer_pays_off", lambda layer, device="cpu": True)  # "auto" as on a GPU
    offered = []

    def fake(runs, device, rounds=3, calls=3):
        offered.append(tuple(runs))
        return {"integer": 2.0, "dense": 3.0, "scaled": 1.0}

    monkeypatch.setattr(gpuauto, "time_paths", fake)
    layer, x = _layer("conv 1x1")
    with torch.no_grad():
        _, integer, _ = _outputs(layer, x)
        assert layer.set_execution("auto")
        out = gpuexec.gpu_forward(layer, x)
    assert offered == [("integer", "dense", "scaled")]
    assert gpuauto.chosen_paths(layer) == {"integer": 0, "dense": 0, "scaled": 1}
    _close_to_integer(out, integer)
    conv = _frozen(nn.Conv2d(32, 48, 3, padding=1), x.float(), 4, 4, "dynamic")
    with torch.no_grad():
        assert conv.set_execution("auto") and gpuauto.pin_path(conv, "scaled")
        pinned = gpuexec.gpu_forward(conv, x.float())
        assert conv.set_execution("integer")
        assert torch.equal(pinned, gpuexec.gpu_forward(conv, x.float()))  # the integer kernels
    assert len(offered) == 1  # pinned: not timed


def test_a_compiled_layer_pinned_to_the_float8_path_is_one_scaled_layer_op(monkeypatch):
    """Under ``torch.compile`` an ``"auto"`` layer pinned to the float8 path is one ``diffusers_gac::scaled_layer``
    op (``opcheck``; no graph break with ``fullgraph=True``), with the eager path's output."""
    monkeypatch.setattr(intexec, "integer_pays_off", lambda layer, device="cpu": True)
    layer, x = _layer("conv 1x1")
    with torch.no_grad():
        assert layer.set_execution("auto") and gpuauto.pin_path(layer, "scaled")
        eager = gpuexec.gpu_forward(layer, x)
        assert gpuexec.compiled_op(layer, x) is gpuexec.scaled_layer
        assert gpuexec.compiled_op(layer, x.float()) is gpuexec.integer_layer  # float32: not served
        tensors, ints = gpuexec.gpu_layer_args(layer, x)
        torch.library.opcheck(gpuexec.scaled_layer, (x, *tensors, ints))
        compiled = torch.compile(lambda t: intexec.compiled_gpu_forward(layer, t), fullgraph=True,
                                 backend="aot_eager")(x)
    assert torch.equal(compiled, eager)


def test_a_compiled_layer_takes_the_path_eager_calls_chose_for_its_input(monkeypatch):
    """Nothing is timed while tracing: a compiled ``"auto"`` layer takes the path its eager calls chose for an input
    of the same shape and dtype (one eager step before compiling), and the integer kernels for one never seen."""
    monkeypatch.setattr(intexec, "integer_pays_off", lambda layer, device="cpu": True)
    monkeypatch.setattr(gpuauto, "time_paths", lambda runs, device, rounds=3, calls=3: {
        "integer": 2.0, "dense": 3.0, "scaled": 1.0})
    layer, x = _layer("linear")
    compiled = torch.compile(lambda t: intexec.compiled_gpu_forward(layer, t), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert layer.set_execution("auto")
        assert gpuexec.compiled_op(layer, x) is gpuexec.integer_layer  # not timed yet
        eager = gpuexec.gpu_forward(layer, x)  # times, and chooses the float8 path
        assert gpuexec.compiled_op(layer, x) is gpuexec.scaled_layer
        assert gpuexec.compiled_op(layer, x[:1]) is gpuexec.integer_layer  # another shape, never timed
        assert torch.equal(compiled(x), eager)
        gpuauto.pin_path(layer, "dense")
        assert gpuexec.compiled_op(layer, x) is gpuexec.dense_layer  # a pin overrides the choice


def test_a_device_whose_scaled_gemm_fails_is_not_offered_the_float8_path(monkeypatch):
    """``gpudense.scaled_gemms`` runs one small row-wise float8 GEMM per device and remembers whether it ran: a GPU or
    build without that kernel loses the path once, instead of warning on every layer's first call; ``torch.compile``
    traces only the lookup."""
    monkeypatch.setattr(gpudense, "FLOAT8_GEMMS", {})
    traced = torch.compile(lambda t: t + 1 if gpudense.scaled_gemms("cpu") else t - 1, fullgraph=True,
                           backend="aot_eager")
    assert torch.equal(traced(torch.zeros(2)), -torch.ones(2))  # nothing is tried while tracing ...
    assert gpudense.FLOAT8_GEMMS == {}  # ... nor remembered
    assert gpudense.scaled_gemms("cpu") and gpudense.FLOAT8_GEMMS == {torch.device("cpu"): True}

    def missing(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(torch, "_scaled_mm", missing)
    assert gpudense.scaled_gemms("cpu")  # remembered: not tried again
    monkeypatch.setattr(gpudense, "FLOAT8_GEMMS", {})
    assert not gpudense.scaled_gemms("cpu")
    layer, _ = _layer("linear")
    assert layer.set_execution("integer")
    assert gpuexec.scaled_support(layer) == "no row-wise scaled float8 GEMMs on this device"
