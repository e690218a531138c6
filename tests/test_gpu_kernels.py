"""The GPU integer kernels (``quant/gpukernels.py``, Triton) on CPU tensors through Triton's interpreter, against the
fake-quant reference, and the device choice, fallbacks and dtype handling of integer execution, all without a GPU.

Tolerance as in ``test_integer.py``: within ``1e-5`` of the reference output's scale in float32 (one wrong code shifts
an output by 1e-3 to 1e-2 of it). The same checks on a real GPU: ``python benchmarks/gpu_check.py``.
"""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from diffusers_gac import GACConfig
from diffusers_gac.quant import gpuexec, gpukernels, intexec, intkernels
from diffusers_gac.quant.convert import convert_model, freeze_model, set_execution
from diffusers_gac.quant.layers import QuantConv2d
from diffusers_gac.zoo import load_embedded_unet

pytest.importorskip("triton")  # without a GPU, conftest.py has chosen Triton's interpreter

from tiny_models import benchmark_module, digits_call  # noqa: E402
from test_integer import _frozen, one_thread  # noqa: E402, F401  (tests/test_integer.py: a frozen layer with observed
# ranges; one torch thread per test, autouse)

TOLERANCE = 1e-5
BITS = [(8, 8), (4, 8), (4, 4), (3, 6)]
CONVS = {
    "3x3 padded": dict(kernel_size=3, padding=1),
    "3x3 strided": dict(kernel_size=3, stride=2, padding=1),
    "1x1": dict(kernel_size=1),
    "2x3 stride (2, 1) dilated, no bias": dict(kernel_size=(2, 3), stride=(2, 1), dilation=(1, 2), bias=False),
}


def _gpu_kernels_run(layer, x, dtype=torch.float32):
    """The layer's output through the Triton kernels (integer layout, ``gpuexec.gpu_forward``), and the reference."""
    with torch.no_grad():
        reference = layer(x.to(dtype))
        intexec.to_integer(layer, layer._integer_storage or "packed")
        out = gpuexec.gpu_forward(layer, x.to(dtype))
        intexec.to_fake(layer)
    assert out is not None, "the GPU kernels declined the call"
    return reference, out


def _error(out, reference):
    return ((out.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


@pytest.mark.parametrize("w_bits,a_bits", BITS)
@pytest.mark.parametrize("scheme", ["dynamic", "static", "timestep"])
@pytest.mark.parametrize("geometry", CONVS)
def test_conv2d_matches_the_fake_quant_reference(geometry, scheme, w_bits, a_bits):
    torch.manual_seed(0)
    x = torch.randn(2, 12, 9, 11) + 0.5  # ranges not centred on zero: zero points matter
    layer = _frozen(nn.Conv2d(12, 8, **CONVS[geometry]), x, w_bits, a_bits, scheme)
    reference, out = _gpu_kernels_run(layer, x)
    assert out.shape == reference.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert _error(out, reference) <= TOLERANCE


@pytest.mark.parametrize("w_bits,a_bits", BITS)
@pytest.mark.parametrize("scheme", ["dynamic", "static", "timestep"])
def test_linear_matches_the_fake_quant_reference(scheme, w_bits, a_bits):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 33) * torch.linspace(0.1, 3, 33) + 0.3  # odd K: the last packed byte is half padding
    layer = _frozen(nn.Linear(33, 7), x, w_bits, a_bits, scheme)
    reference, out = _gpu_kernels_run(layer, x)
    assert out.shape == (2, 5, 7)
    assert _error(out, reference) <= TOLERANCE


@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (8, 8)])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_split_input_matches_the_fake_quant_reference(kernel_size, w_bits, a_bits):
    """A UNet skip join: two input parts, each with its own per-token ranges, odd widths (packed rows padded)."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(2, 5, 7, 6) * 3, torch.randn(2, 9, 7, 6) + 1], 1)
    layer = _frozen(nn.Conv2d(14, 6, kernel_size, padding=kernel_size // 2), x, w_bits, a_bits, "dynamic", split=5)
    reference, out = _gpu_kernels_run(layer, x)
    assert _error(out, reference) <= TOLERANCE


def test_int8_storage_and_strided_inputs():
    """Weights kept as int8 carriers (``int4_storage="int8"``), a channels-last input and a non-contiguous linear
    input give the reference's outputs too."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 8)
    layer = _frozen(nn.Conv2d(16, 8, 3, padding=1), x, 4, 4, "dynamic")
    layer._integer_storage = "int8"
    reference, out = _gpu_kernels_run(layer, x.to(memory_format=torch.channels_last))
    assert not layer._integer_storage == "packed"
    assert _error(out, reference) <= TOLERANCE
    xl = torch.randn(6, 40)[:, ::2]  # stride 2 along the features
    linear = _frozen(nn.Linear(20, 4), xl, 4, 4, "dynamic")
    reference, out = _gpu_kernels_run(linear, xl)
    assert _error(out, reference) <= TOLERANCE


OPS = {"integer": gpuexec.integer_layer, "dense": gpuexec.dense_layer, "scaled": gpuexec.scaled_layer}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("geometry", [*CONVS, "3x3 split input"])
def test_a_channels_last_input_gives_a_channels_last_output_on_every_gpu_path(geometry, dtype):
    """diffusers' ``unet.to(memory_format=torch.channels_last)``: on each GPU path (the integer kernels, the dense
    path, the float8 path) a channels-last input is read as it lies and gives a channels-last output, as ``F.conv2d``
    does (a channels-first one would have the layers after it change layouts), with the channels-first call's values
    bit for bit; and each path's custom op passes ``opcheck`` on it: its fake implementation gives the real output's
    strides (with other strides, inductor's compiled model fails its stride asserts at run time)."""
    split = 6 if geometry == "3x3 split input" else None
    torch.manual_seed(0)
    x = torch.randn(2, 16, 7, 9) + 0.3
    layer = _frozen(nn.Conv2d(16, 32, **CONVS.get(geometry, CONVS["3x3 padded"])), x, 4, 4, "dynamic", split=split)
    assert layer.set_execution("integer")
    first = x.to(dtype)
    last = first.to(memory_format=torch.channels_last)
    with torch.no_grad():
        calls, calls_last = gpuexec.path_calls(layer, first), gpuexec.path_calls(layer, last)
        assert set(calls) == set(calls_last)
        assert ("scaled" in calls) == (geometry == "1x1" and dtype == torch.bfloat16)
        for name in calls:
            out, out_last = gpuexec.PATHS[name](*calls[name]), gpuexec.PATHS[name](*calls_last[name])
            assert out.is_contiguous() and not out_last.is_contiguous(), name
            assert out_last.is_contiguous(memory_format=torch.channels_last), name
            assert torch.equal(out, out_last), name
            torch.library.opcheck(OPS[name], calls_last[name])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_give_the_float32_codes(dtype):
    """A half-precision input is quantized in float32 (the codes a float32 input of the same values gets), summed
    exactly, and returned in its own dtype: the only difference from float32 is rounding the output once."""
    torch.manual_seed(0)
    x = (torch.randn(2, 12, 9, 11) + 0.5).to(dtype)
    layer = _frozen(nn.Conv2d(12, 8, 3, padding=1), x.float(), 4, 4, "dynamic")
    with torch.no_grad():
        exact = layer(x.float())  # the reference on the same values, in float32
    _, out = _gpu_kernels_run(layer, x, dtype)
    assert out.dtype == dtype
    eps = torch.finfo(dtype).eps
    assert ((out.float() - exact).abs() <= eps * exact.abs() + 1e-6 * exact.abs().max()).all()


def test_quantize_kernel_reproduces_the_reference_codes():
    """Per-token codes from the Triton kernel equal ``intkernels.quantize_dynamic``'s (torch ops), exactly, on values
    placed on rounding ties and on all-zero tokens."""
    G = gpukernels
    torch.manual_seed(0)
    x = torch.randn(7, 37)
    x[2] = 0.0  # an all-zero token: the smallest scale, not a division by zero
    x[3, :] = torch.arange(37) - 15.0  # a token whose values fall on halves of its step
    for bits in (4, 8):
        ref = intkernels.quantize_dynamic(x, bits)
        got = G.quantize(x.t()[None], bits)
        assert torch.equal(got.q, ref.q)
        assert torch.equal(got.scale, ref.scale.view(-1))
        if bits == 8:
            assert torch.equal(got.zero, ref.zero.view(-1))


def test_grouped_convolution_takes_the_dense_path_on_the_gpu():
    """The integer kernels do not take grouped convolutions; the dense path does (the reference bit for bit)."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 6, 6)
    layer = _frozen(nn.Conv2d(8, 8, 3, padding=1, groups=2), x, 4, 4, "dynamic")
    with torch.no_grad():
        reference = layer(x)
        intexec.to_integer(layer)
        assert gpuexec.gpu_support(layer) == "grouped convolution" and gpuexec.dense_support(layer) is None
        assert torch.equal(gpuexec.gpu_forward(layer, x), reference)
        assert gpuexec.gpu_forward(layer, x.double()) is None  # a dtype the kernels do not take


@pytest.mark.parametrize("execution", ["integer", "auto"])
def test_layers_the_gpu_kernels_refuse_hold_the_packed_layout_on_a_gpu(monkeypatch, execution):
    """On a GPU (its device and kernels faked here), a layer no GPU path serves (a token wider than the quantize
    kernels hold) runs the reference from the packed codes (a few ops a call) rather than from the integer layout
    (which rebuilds the codes block by block at every call), and says so: ``set_execution`` counts it as fake. The
    CPU kernels keep serving it on the CPU."""
    torch.manual_seed(0)
    x, wide_x = torch.randn(2, 8, 6, 6), torch.randn(2, gpuexec.GPU_MAX_CHANNELS + 1)
    wide = _frozen(nn.Linear(gpuexec.GPU_MAX_CHANNELS + 1, 2), wide_x, 4, 4, "dynamic")  # more than a token holds
    plain = _frozen(nn.Conv2d(8, 8, 3, padding=1), x, 4, 4, "dynamic")
    model = nn.Sequential(wide, plain)
    with torch.no_grad():
        expected = wide(wide_x)
        monkeypatch.setattr(intexec, "integer_pays_off", lambda layer, device="cpu": True)
        assert set_execution(model, execution) == {"integer": ["0", "1"], "fake": []}  # the CPU: both
        monkeypatch.setattr(intexec, "layer_device", lambda layer: torch.device("cuda"))
        monkeypatch.setattr(intexec, "integer_kernels_available", lambda device: True)
        assert set_execution(model, execution) == {"integer": ["1"], "fake": ["0"]}
        assert wide.execution == "fake" and hasattr(wide, "packed_weight") and plain.execution == "integer"
        assert gpuexec.dense_support(wide) == f"more than {gpuexec.GPU_MAX_CHANNELS} input channels"
        assert torch.equal(wide(wide_x), expected)
        assert wide._integer_storage is not None  # still asked for: back on the CPU it runs integer again
        monkeypatch.undo()
        monkeypatch.setattr(intexec, "integer_pays_off", lambda layer, device="cpu": True)
        wide._apply(lambda t: t)
        assert wide.execution == "integer"


def test_integer_kernels_available_by_device(monkeypatch):
    """CUDA runs the integer kernels from compute capability 8.0 (int8 tensor cores) with Triton installed; other
    devices run the reference."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert intexec.integer_kernels_available("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert not intexec.integer_kernels_available("cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(gpuexec, "triton_available", lambda: False)
    assert not intexec.integer_kernels_available("cuda")
    assert not intexec.integer_kernels_available("meta")


class _OnSecondGpu:
    """Stands in for an input on ``cuda:1`` (this machine has no GPU): the paths look at nothing else first."""
    is_cuda = True
    device = torch.device("cuda", 1)


def test_gpu_paths_launch_on_the_input_device(monkeypatch):
    """Triton launches on the current CUDA device, not on its tensors': every GPU path makes the input's device
    current first where another one is (a UNet on ``cuda:1``, a text encoder on ``cuda:0``), and leaves it alone
    where it is current."""
    entered = []

    class Entered(Exception):
        pass

    def device(where):  # torch.cuda.device, stopping the call once it switched (nothing here can run on a GPU)
        entered.append(torch.device(where))
        raise Entered

    monkeypatch.setattr(torch.cuda, "device", device)
    for name, run in gpuexec.PATHS.items():
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        with pytest.raises(Entered):
            run(_OnSecondGpu(), None, None, None, None, None, None, [], [])
        assert entered[-1] == torch.device("cuda", 1), name
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
        count = len(entered)
        with pytest.raises(Exception) as failure:  # goes on to the kernels, which the stand-in cannot feed
            run(_OnSecondGpu(), None, None, None, None, None, None, [], [])
        assert not isinstance(failure.value, Entered) and len(entered) == count, name
    ran = []
    on_device = gpukernels.on_input_device(lambda x, *rest: ran.append((x, rest)) or "out")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: pytest.fail("a CPU tensor asked for the CUDA device"))
    cpu = torch.zeros(1)
    assert on_device(cpu, 2) == "out" and ran == [(cpu, (2,))] and len(entered) == 3


def test_auto_is_decided_for_the_device():
    """``"auto"`` keeps narrow layers on the reference on the CPU (the kernels do not gain there) and runs every
    layer on the integer kernels on a GPU."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 6, 6)
    narrow = _frozen(nn.Conv2d(8, 8, 3, padding=1), x, 4, 4, "dynamic")
    assert not intexec.integer_pays_off(narrow, "cpu") and intexec.integer_pays_off(narrow, "cuda")
    assert not narrow.set_execution("auto") and narrow.execution == "fake"
    assert narrow._integer_storage == "packed" and narrow._integer_auto  # asked for: decided again when moved
    wide = _frozen(nn.Conv2d(128, 8, 3, padding=1), torch.randn(1, 128, 4, 4), 4, 4, "dynamic")
    assert wide.set_execution("auto") and wide.execution == "integer"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_the_cpu_path_and_the_reference(dtype):
    """On the CPU a half-precision input runs the int8 kernels (quantized from float32) and returns its dtype; the
    fake-quant reference in half precision quantizes in float32 too, so both match the float32 computation on the
    same values within the dtype's rounding of the output."""
    torch.manual_seed(0)
    x = (torch.randn(2, 128, 6, 6) + 0.5).to(dtype)
    layer = _frozen(nn.Conv2d(128, 16, 3, padding=1), x.float(), 4, 4, "dynamic")
    with torch.no_grad():
        exact = layer(x.float())
        fake = layer(x)
        assert layer.set_execution("integer")
        integer = layer(x)
    scale = exact.abs().max()
    assert fake.dtype == integer.dtype == dtype
    assert _error(integer, exact) <= torch.finfo(dtype).eps
    # the reference rounds the dequantized inputs and weights to the dtype before a half-precision conv
    assert _error(fake, exact) <= 8 * torch.finfo(dtype).eps
    assert (fake.float() - exact).abs().max() <= 8 * torch.finfo(dtype).eps * scale


def test_a_model_cast_to_half_precision_keeps_float32_quantizer_state():
    """A frozen layer whose float tensors are half precision but whose quantizer state stays float32 (what a
    torch_dtype load gives) runs the reference in the input's dtype."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 5, 5)
    layer = _frozen(nn.Conv2d(8, 4, 3, padding=1), x, 4, 4, "dynamic")
    half = copy.deepcopy(layer)
    half.bias.data = half.bias.data.to(torch.bfloat16)
    assert isinstance(half, QuantConv2d) and half.weight_quantizer.scale.dtype == torch.float32
    with torch.no_grad():
        out = half(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert _error(out, layer(x)) <= 0.05


@pytest.mark.parametrize("kind", ["conv 3x3 split, static", "linear, dynamic"])
def test_the_gpu_path_is_a_custom_op_that_compiles_in_one_graph(kind):
    """Under ``torch.compile`` a GPU layer is one ``diffusers_gac::integer_layer`` op: its schema and fake
    implementation pass ``torch.library.opcheck``, a function calling it compiles with ``fullgraph=True``, and the
    compiled result equals the eager one."""
    integer_layer = gpuexec.integer_layer
    torch.manual_seed(0)
    if kind.startswith("conv"):
        x = torch.randn(2, 10, 6, 7)
        layer = _frozen(nn.Conv2d(10, 4, 3, stride=(1, 2), padding=1), x, 4, 4, "static", split=3)
    else:
        x = torch.randn(2, 3, 20)
        layer = _frozen(nn.Linear(20, 6), x, 8, 8, "dynamic")
    intexec.to_integer(layer)
    tensors, ints = gpuexec.gpu_layer_args(layer, x)
    torch.library.opcheck(integer_layer, (x, *tensors, ints))
    eager = gpuexec.gpu_forward(layer, x)
    assert eager.shape == gpuexec.gpu_output_shape(x.shape, ints)
    compiled = torch.compile(lambda t: integer_layer(t, *tensors, ints) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), eager * 2)


def test_the_gpu_plan_is_built_once_and_rebuilt_when_the_layer_changes():
    """An eager GPU call reads the layer's cached plan (views of its tensors and its integer description) instead of
    rebuilding it; loading other weights, or moving or casting the layer, drops the plan, so the next call sees the
    layer as it is now (a stale plan would still hold the old weights or the old bias); so does a call after the
    layer's tensors were replaced directly."""
    torch.manual_seed(0)
    x = torch.randn(2, 12, 7, 9) + 0.3
    layer = _frozen(nn.Conv2d(12, 8, 3, padding=1), x, 4, 4, "dynamic")
    other = _frozen(nn.Conv2d(12, 8, 3, padding=1), x, 4, 4, "dynamic")
    assert layer.set_execution("integer")
    with torch.no_grad():
        first = gpuexec.gpu_forward(layer, x)
        plan = gpuexec.gpu_plan(layer)
        assert gpuexec.gpu_plan(layer) is plan and torch.equal(gpuexec.gpu_forward(layer, x), first)

        layer.load_state_dict(other.state_dict())  # new codes and scales: the layout is rebuilt
        assert layer.execution == "integer" and gpuexec.gpu_plan(layer) is not plan
        assert _error(gpuexec.gpu_forward(layer, x), other(x)) <= TOLERANCE
        assert _error(gpuexec.gpu_forward(layer, x), first) > 0.1

        layer.double()  # a cast gives the bias new storage: change it there, and cast back
        layer.bias.mul_(-2)
        layer.float()
        assert layer.execution == "integer"
        expected = layer(x)  # the CPU kernels read the layer's tensors at every call
        assert _error(gpuexec.gpu_forward(layer, x), expected) <= TOLERANCE
        assert _error(expected, other(x)) > 0.01

        # tensors replaced behind the layer's back, as Accelerate's offloading hooks replace them at every call
        third = _frozen(nn.Conv2d(12, 8, 3, padding=1), x, 4, 4, "dynamic")
        assert third.set_execution("integer")
        for name in ("int_weight", "int_zero"):
            layer._buffers[name] = third._buffers[name]
        layer.weight_quantizer._buffers["scale"] = third.weight_quantizer.scale
        layer.weight_quantizer._buffers["zero_point"] = third.weight_quantizer.zero_point
        layer._parameters["bias"] = third.bias
        assert _error(gpuexec.gpu_forward(layer, x), third(x)) <= TOLERANCE


def test_a_whole_model_takes_the_gpu_path_eagerly_and_compiles_into_one_graph(monkeypatch):
    """The embedded digits UNet at W4A4 with every integer layer routed to the GPU kernels as on a GPU (CPU tensors,
    Triton's interpreter): eagerly (cached plans) it matches the CPU integer kernels; under ``torch.compile`` with
    ``fullgraph=True`` every layer is one custom op, so a graph break anywhere in the layers' code fails the compile,
    and the compiled model matches the eager one. Every integer layer runs the kernels once per forward. A
    convolution answers in its input's layout; moved to channels-last (``model.to(memory_format=torch.channels_last)``,
    diffusers' speed recipe) the model gives the same sample, every convolution answering in channels-last as a float
    one would, and moved back, the first sample bit for bit."""
    model = load_embedded_unet("digits")
    convert_model(model, GACConfig(w_bits=4, a_bits=4, weight_init="minmax"))
    freeze_model(model, "integer")
    integer_layers = sum(getattr(m, "execution", None) == "integer" for m in model.modules())
    assert integer_layers >= 20
    runs = []

    def gpu_run(x, *args):
        out = original(x, *args)
        if args[-1][0]:  # a convolution: input channels-last, output channels-first, output channels-last
            runs.append((intkernels.channels_last_input(x), out.is_contiguous(),
                         out.is_contiguous(memory_format=torch.channels_last)))
        else:
            runs.append(None)
        return out

    original = gpuexec.gpu_run
    monkeypatch.setattr(gpuexec, "gpu_run", gpu_run)
    call = digits_call()
    with torch.no_grad():
        cpu = model(**call).sample
        assert not runs
        monkeypatch.setattr(intexec, "forward",
                            lambda layer, x: gpuexec.gpu_forward(layer, x) if intexec._ready(layer, x) else None)
        eager = model(**call).sample
        assert len(runs) == integer_layers
        monkeypatch.setattr(intexec, "compiled_forward", intexec.compiled_gpu_forward)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(**call).sample
    assert len(runs) == 2 * integer_layers
    assert _error(eager, cpu) <= 1e-4  # float rounding only, carried through 4-bit layers
    assert _error(compiled, eager) <= TOLERANCE
    convs = [run for run in runs if run is not None]
    assert all(out_last if last else out_first for last, out_first, out_last in convs)  # the input's layout
    assert any(last for last, _, _ in convs)  # (broadcasting adds make some activations channels-last)
    runs.clear()
    model.to(memory_format=torch.channels_last)  # every convolution answers in channels-last, its input in any layout
    with torch.no_grad():
        last = model(**call).sample
    convs = [run for run in runs if run is not None]
    assert len(runs) == integer_layers and all(out_last for _, _, out_last in convs)
    assert sum(last for last, _, _ in convs) == len(convs) - 1  # but the first one's: the sample, channels-first
    assert _error(last, eager) <= 1e-4
    model.to(memory_format=torch.contiguous_format)
    runs.clear()
    with torch.no_grad():
        assert torch.equal(model(**call).sample, eager)


def test_layer_overhead_benchmark_runs_on_the_cpu(tmp_path, monkeypatch, capsys):
    """``benchmarks/layer_overhead.py --device cpu`` (the GPU path's host work with the launches stubbed) runs and
    writes its table, a row per layer, with Triton's binding of the call's two launches timed (times are the
    benchmark's to print, not a test's to judge), and the kernels are the real ones again afterwards."""
    bench = benchmark_module("layer_overhead")
    monkeypatch.setattr(bench, "LAYERS", {k: bench.LAYERS[k] for k in ("conv 3x3 320", "linear 320 -> 2560")})
    monkeypatch.setattr(gpukernels, "quantize_kernel", gpukernels.quantize_kernel)  # restored after the stubs
    monkeypatch.setattr(gpukernels, "igemm_kernel", gpukernels.igemm_kernel)
    monkeypatch.setattr(intexec, "forward", intexec.forward)
    out = tmp_path / "overhead.md"
    monkeypatch.setattr("sys.argv", ["layer_overhead.py", "--device", "cpu", "--calls", "200", "--rounds", "3",
                                     "--output", str(out)])
    bench.main()
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| conv") or
            line.startswith("| linear")]
    assert [r[0].strip() for r in rows] == ["conv 3x3 320", "linear 320 -> 2560"]
    for _, plan, rebuilt, float_layer, binding in rows:
        assert float(plan) > 0 and float(rebuilt) > 0 and float_layer.strip() == "-" and float(binding) > 0


def test_the_binding_stand_in_binds_each_launch_as_the_jit_would(monkeypatch):
    """``layer_overhead.binding`` replays what Triton's launcher does in Python for each recorded launch: every
    launch's arguments go through the JIT's binder (a wrong argument count would fail there), and its cache key is
    computed from their specialization."""
    bench = benchmark_module("layer_overhead")
    from triton.runtime import jit

    launches = []
    monkeypatch.setattr(gpukernels, "quantize_kernel", bench.NoLaunch(gpukernels.quantize_kernel, launches))
    monkeypatch.setattr(gpukernels, "igemm_kernel", bench.NoLaunch(gpukernels.igemm_kernel, launches))
    layer = bench.frozen_layer(torch.nn.Linear(64, 32))
    with torch.no_grad():
        gpuexec.gpu_forward(layer, torch.randn(1, 8, 64, dtype=torch.bfloat16))
    assert [k.fn.__name__ for k, _, _ in launches] == ["quantize_kernel", "igemm_kernel"]
    keys = []
    real = jit.compute_cache_key
    monkeypatch.setattr(jit, "compute_cache_key", lambda cache, spec, opts: keys.append(spec) or real(cache, spec, opts))
    bind = bench.binding(launches)
    assert bind is not None
    keys.clear()
    bind()
    assert len(keys) == 2
    launches[1] = (launches[1][0], launches[1][1][:-1], launches[1][2])  # an argument short: the binder refuses
    assert bench.binding(launches) is None


def test_the_channel_step_keeps_the_padding_of_the_last_step_small():
    """The implicit GEMM's channel loop runs in 128- or 64-byte steps; its last step is padded with zeros (work for
    nothing on the tensor cores). The step is 128 bytes unless that pads more than an eighth of the loop and 64
    pads less (SD's 320 channels: 64; packed 4-bit 320 channels, 160 bytes: 64; 640 and 1280 channels: 128)."""
    pad = gpukernels._padding
    assert [gpukernels._config(32768, 320, k)[2] for k in (320, 160, 640, 1280)] == [64, 64, 128, 128]
    for k in range(1, 3000):
        bm, bn, bk, warps, stages = gpukernels._config(32768, 320, k)
        other = 192 - bk
        assert pad(k, bk) * 8 <= k or pad(k, bk) <= pad(k, other), k
        assert (bk, stages) in ((128, 3), (64, 4))


def test_the_kernels_compile_for_hopper_to_vector_loads_and_stores(tmp_path):
    """``benchmarks/gpu_codegen.py`` compiles the kernels as Triton's JIT would for an H100/H200 (sm_90), without a
    GPU, in a process without the interpreter. An SD-sized 3x3 convolution's kernels move their bfloat16 data in
    16-byte vectors: the quantize kernel's input loads and the GEMM's output stores (a scalar ``b16`` access means
    the compiler could not prove the addresses aligned and contiguous), and the GEMM runs on int8 wgmma, or on float8
    wgmma where the 4-bit weights are resident as float8 carriers (``int4_storage="fp8"``); the dense path's kernels
    store whole vectors too. All of it for a channels-first input and for a channels-last one (whose output is
    channels-last: the GEMM's stores then run along the output channels)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = tmp_path / "codegen.md"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_codegen.py"
    result = subprocess.run([sys.executable, str(script), "--layers", "conv 3x3 320 @128", "--output", str(out)],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {}
    for line in out.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if cells and cells[0].startswith("conv 3x3 320 @128"):
            rows[(cells[0], cells[1], cells[2])] = cells
    bits_rows = ("W8A8", "W4A4", "W4A4 int8", "W4A4 fp8")
    kernels = {(b, k) for b in bits_rows for k in ("quantize_kernel", "igemm_kernel")}
    kernels |= {("W4A4 dense", "fake_quantize_kernel"), ("W4A4 dense", "dequantize_kernel")}
    layers = ("conv 3x3 320 @128", "conv 3x3 320 @128 channels-last")
    assert set(rows) == {(layer, *k) for layer in layers for k in kernels}
    for (_, bits, kernel), (_, _, _, stores, loads, _, tensor, _, _) in rows.items():
        if bits == "W4A4 dense":  # the dense path's kernels write whole vectors (the dequantized weight's rows too)
            assert "b16" not in stores and "v4.b32" in stores, (kernel, stores)
            assert kernel == "dequantize_kernel" or ("b16" not in loads and "v4.b32" in loads), (kernel, loads)
        elif kernel == "quantize_kernel":
            assert "b16" not in loads and "v4.b32" in loads, (bits, loads)
        else:
            assert "b16" not in stores and "v4.b32" in stores, (bits, stores)
            assert ("wgmma.f32.e4m3" if bits.endswith("fp8") else "wgmma.s32.s8") in tensor, (bits, tensor)


def test_the_gpu_session_script_fits_one_call_and_names_real_variants():
    """``benchmarks/gpu_session.sh`` runs only on a lent GPU, in one call of at most 10 minutes: its steps' limits
    leave room for the start, and every variant it asks ``inference_speed.py`` for exists (a typo would cost a GPU
    session's table)."""
    root = Path(__file__).resolve().parent.parent
    text = (root / "benchmarks" / "gpu_session.sh").read_text().replace("\\\n", " ")
    limits = [int(m) for m in re.findall(r"^\s*step (\d+) ", text, re.M)]
    assert len(limits) >= 6 and sum(limits) <= 590, limits
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import inference_speed
    finally:
        sys.path.remove(str(root / "benchmarks"))
    lists = re.findall(r"--variants ([\w ]+?) +--", text)
    assert len(lists) == sum(1 for line in text.splitlines() if "$speed" in line and "step" in line)
    names = {name for group in lists for name in group.split()}
    assert {"bf16_int_w4a4_fp8", "bf16_dense_w4a4", "graph_bf16_auto_w4a4", "compiled_bf16_int_w8a8"} <= names
    for name in names:
        inference_speed.variant_name(name)  # raises on an unknown variant
    with pytest.raises(Exception, match="unknown variant"):
        inference_speed.variant_name("bf16_int_w4a4_fp9")


def test_gpu_goals_are_judged_within_each_table_and_mode(tmp_path):
    """``benchmarks/gpu_goals.py`` reads ``inference_speed.py``'s tables (written here by its own ``table``) and
    judges the three goals: a variant only against the bf16 row of its own file and mode, the speed and memory halves
    of goal 2 apart, goal 3 at its slowest measured size, and the sizes goal 3 never measured named."""
    speed, goals = benchmark_module("inference_speed"), benchmark_module("gpu_goals")

    def row(variant, latent, batch, ms, resident):
        return {"model": "SD", "latent": latent, "batch": batch, "variant": variant, "median_ms": ms, "min_ms": ms,
                "max_ms": ms, "vs_fp32": 1.0, "resident_mib": resident, "step_peak_mib": None,
                "rel_l2_vs_fp32": 0.0, "rel_l2_vs_bf16": None, "build_s": 0.0, "load": "-"}

    (tmp_path / "cuda.md").write_text("# t\n\nCommand: x\n\n" + speed.table([
        row("fp32", 128, 2, 250.0, 3279.0), row("bf16", 128, 2, 40.0, 1639.0), row("bf16_int_w8a8", 128, 2, 30.0, 826.0),
        row("graph_bf16", 128, 2, 38.0, 1639.0), row("graph_bf16_int_w8a8", 128, 2, 32.0, 826.0),
        row("bf16_int_w4a4", 128, 2, 39.0, 414.0), row("bf16_auto_w4a4", 128, 2, 36.0, 414.0),
        row("bf16_fake_w4a4", 128, 2, 20.0, 414.0),  # the reference is no candidate, however fast
        row("bf16", 64, 1, 29.0, 1639.0), row("bf16_auto_w4a4", 64, 1, 31.0, 414.0),
        row("graph_bf16", 64, 1, 9.6, 1639.0), row("graph_bf16_auto_w4a4", 64, 1, 9.0, 414.0)])
        + "\n\nprose | with a bar\n")
    (tmp_path / "cuda_paths.md").write_text(speed.table([
        row("bf16", 128, 2, 44.0, 1639.0), row("bf16_int_w4a4_fp8", 128, 2, 30.0, 826.0)]))
    (tmp_path / "orphan.md").write_text(speed.table([row("bf16_int_w8a8", 128, 2, 1.0, 826.0)]))  # no bf16 row
    (tmp_path / "runs.md").write_text("\n\n".join(speed.table([row("bf16", 128, 2, bf16, 1639.0),
                                                             row("bf16_int_w8a8", 128, 2, w8a8, 826.0)])
                                                 for bf16, w8a8 in ((61.0, 45.0), (60.0, 50.0))))  # two runs
    lines = goals.main([str(tmp_path / n) for n in ("cuda.md", "cuda_paths.md", "orphan.md", "runs.md", "absent.md")]
                       + ["--output", str(tmp_path / "goals.md")])
    text = (tmp_path / "goals.md").read_text()
    assert "\n".join(lines) in text and "19 rows read from cuda.md, cuda_paths.md, orphan.md, runs.md." in text
    g1, g2, g3 = (text.split("## ")[i] for i in (1, 2, 3))
    assert "| cuda.md | eager | 128, 2 | 40.0 | bf16_int_w8a8 | 30.0 | 1.33x | met |" in g1
    assert "| cuda.md | CUDA graph | 128, 2 | 38.0 | graph_bf16_int_w8a8 | 32.0 | 1.19x | missed |" in g1
    assert "orphan.md" not in g1 and g1.count("| cuda") == 2
    assert "| runs.md #1 | eager | 128, 2 | 61.0 | bf16_int_w8a8 | 45.0 | 1.36x | met |" in g1
    assert "| runs.md #2 | eager | 128, 2 | 60.0 | bf16_int_w8a8 | 50.0 | 1.20x | missed |" in g1
    body = [line for line in g2.splitlines() if line.startswith("| cuda")]
    assert body[0].startswith("| cuda.md | eager | 128, 2 | 40.0 | bf16_auto_w4a4 | 36.0 | 1.11x | 25.3% | met")
    assert "| bf16_int_w4a4 | 39.0 | 1.03x | 25.3% | met |" in g2 and "fake" not in g2
    assert "| cuda_paths.md | eager | 128, 2 | 44.0 | bf16_int_w4a4_fp8 | 30.0 | 1.47x | 50.4% | missed (memory) |" in g2
    assert "| cuda.md | eager | 64/1, 128/2 | 64/1 | 29.0 | 31.0 | 0.94x | missed where measured |" in g3
    assert "| cuda.md | CUDA graph | 64/1 | 64/1 | 9.6 | 9.0 | 1.07x | met where measured |" in g3
    assert "no eager `auto` row beside its bf16 row: latent 64 batch 2, latent 64 batch 4, latent 128 batch 1, " \
           "latent 128 batch 4." in g3
