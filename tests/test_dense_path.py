"""The dense path of ``"auto"`` layers on a GPU (``quant/gpudense.py``, ``gpuexec.dense_run``) and the per-shape
choice between it and the integer kernels (``gpuauto.choose_path``), on CPU tensors through Triton's interpreter.

The dense path is the fake-quant reference computed from the integer layout: in float32 its outputs are the
reference's bit for bit. In half precision they differ only where Triton's interpreter rounds float32 to bfloat16
toward zero (a GPU rounds to nearest, as PyTorch does; ``benchmarks/gpu_check.py`` checks there).
"""

import os

import pytest
import torch
from torch import nn

from diffusers_gac import GACConfig
from diffusers_gac.quant import gpuauto, gpudense, gpuexec, intexec
from diffusers_gac.quant.convert import convert_model, freeze_model, quant_layers, set_execution
from diffusers_gac.quant.layers import QuantConv2d, QuantLinear
from diffusers_gac.quant.quantizers import input_parts
from diffusers_gac.zoo import load_embedded_unet

pytest.importorskip("triton")  # without a GPU, conftest.py has chosen Triton's interpreter
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the GPU kernels on CPU tensors through Triton's interpreter")

from tiny_models import digits_call  # noqa: E402
from test_integer import _frozen, one_thread  # noqa: E402, F401  (a frozen layer with observed ranges; autouse)

LAYERS = {
    "conv 3x3 padded": (lambda: nn.Conv2d(12, 8, 3, padding=1), (2, 12, 9, 11), None),
    "conv 2x3 stride (2, 1) dilated, no bias": (
        lambda: nn.Conv2d(12, 8, (2, 3), stride=(2, 1), dilation=(1, 2), bias=False), (2, 12, 9, 11), None),
    "conv 1x1": (lambda: nn.Conv2d(12, 8, 1), (2, 12, 9, 11), None),
    "conv 3x3 split input": (lambda: nn.Conv2d(14, 6, 3, padding=1), (2, 14, 7, 6), 5),
    "linear, odd K": (lambda: nn.Linear(33, 7), (2, 5, 33), None),
    "conv 3x3 in 4 groups": (lambda: nn.Conv2d(12, 8, 3, padding=1, groups=4), (2, 12, 9, 11), None),
    "conv 3x3 depthwise, stride 2": (lambda: nn.Conv2d(12, 12, 3, stride=2, padding=1, groups=12), (2, 12, 9, 11),
                                     None),
}


def _layer(kind, w_bits=4, a_bits=4, scheme="dynamic", seed=0):
    make, shape, split = LAYERS[kind]
    torch.manual_seed(seed)
    x = (torch.randn(shape) + 0.4) * torch.linspace(0.2, 3, shape[-1])  # zero points and uneven tokens matter
    return _frozen(make(), x, w_bits, a_bits, scheme, split=split), x


def _dense(layer, x, storage="packed"):
    """The reference's output and the dense path's, from the integer layout ``storage``."""
    with torch.no_grad():
        reference = layer(x)
        assert layer.set_execution("integer", storage)
        plan = gpuexec.gpu_plan(layer)
        out = gpuexec.dense_run(x, *plan.tensors, gpuexec._ranges(plan, x), plan.ints)
        layer.set_execution("fake")
    return reference, out


@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (8, 8), (4, 8), (3, 6)])
@pytest.mark.parametrize("kind", LAYERS)
def test_dense_path_is_the_reference_bit_for_bit(kind, w_bits, a_bits):
    layer, x = _layer(kind, w_bits, a_bits)
    reference, out = _dense(layer, x)
    assert out.shape == reference.shape and out.dtype == torch.float32
    assert torch.equal(out, reference)


@pytest.mark.parametrize("scheme", ["static", "timestep"])
@pytest.mark.parametrize("kind", ["conv 3x3 split input", "linear, odd K"])
def test_dense_path_takes_static_and_per_timestep_ranges(kind, scheme):
    layer, x = _layer(kind, 4, 4, scheme)
    reference, out = _dense(layer, x)
    assert torch.equal(out, reference)


@pytest.mark.parametrize("storage", ["int8", "fp8"])
@pytest.mark.parametrize("w_bits", [4, 8])
def test_dense_path_reads_every_storage(storage, w_bits):
    """int8 and float8 carriers (``int4_storage``; 8-bit weights are int8 ``c - 128`` whatever it says)."""
    layer, x = _layer("conv 3x3 split input", w_bits, 4)
    reference, out = _dense(layer, x, storage)
    assert torch.equal(out, reference)


def test_dense_path_on_strided_inputs():
    layer, x = _layer("conv 3x3 padded")
    reference, out = _dense(layer, x.to(memory_format=torch.channels_last))
    assert torch.equal(out, reference)
    linear = _frozen(nn.Linear(20, 4), torch.randn(6, 40)[:, ::2], 4, 4, "dynamic")
    xl = torch.randn(6, 40)[:, ::2]  # stride 2 along the features
    reference, out = _dense(linear, xl)
    assert torch.equal(out, reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_path_in_half_precision(dtype):
    """float16: the reference bit for bit. bfloat16: within the interpreter's rounding toward zero of the
    dequantized input and weight (one unit in the last place each), where a GPU rounds to nearest like PyTorch."""
    layer, x = _layer("conv 3x3 padded")
    layer.bias.data = layer.bias.data.to(dtype)
    reference, out = _dense(layer, x.to(dtype))
    assert out.dtype == dtype
    if dtype == torch.float16:
        assert torch.equal(out, reference)
    else:
        bound = 4 * torch.finfo(dtype).eps * reference.float().abs().max()
        assert (out.float() - reference.float()).abs().max() <= bound
        assert not torch.equal(out, reference)  # the interpreter's rounding is seen: the comparison is not vacuous


def _lever_layer(kind, group_size=None, clip=None, a_bits=4, smoothing=False):
    """A frozen W4 layer with dynamic ranges per group of ``group_size`` channels and/or clipped by ``clip``."""
    make, shape, split = LAYERS[kind]
    torch.manual_seed(0)
    x = (torch.randn(shape) + 0.4) * torch.linspace(0.2, 3, shape[-1])
    module = make()
    cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
    layer = cls.from_module(module, w_bits=4, a_bits=a_bits, weight_init="minmax", act_scheme="dynamic", split=split,
                            group_size=group_size, clipping=clip is not None)
    layer.freeze()
    for q in input_parts(layer.input_quantizer):
        if clip is not None:
            q.clip.fill_(clip)
    return layer, x


@pytest.mark.parametrize("a_bits", [4, 8])
@pytest.mark.parametrize("kind", ["conv 3x3 padded", "conv 3x3 split input", "linear, odd K"])
def test_clipped_ranges_on_both_gpu_paths(kind, a_bits):
    """``act_clipping``: the quantize kernels shrink each token's range by the layer's ratio, as the quantizer does."""
    layer, x = _lever_layer(kind, clip=0.6, a_bits=a_bits)
    reference, dense = _dense(layer, x)
    assert torch.equal(dense, reference)
    with torch.no_grad():
        assert layer.set_execution("integer") and gpuexec.gpu_support(layer) is None
        integer = gpuexec.gpu_forward(layer, x)
        for q in input_parts(layer.input_quantizer):
            q.clip.fill_(1.0)
        unclipped = gpuexec.gpu_forward(layer, x)
    assert (integer - reference).abs().max() <= 1e-5 * reference.abs().max()
    assert (unclipped - reference).abs().max() > 1e-3 * reference.abs().max()  # the ratio is read, not assumed


@pytest.mark.parametrize("kind,group_size", [("conv 3x3 padded", 4), ("conv 3x3 split input", 3),
                                             ("conv 1x1", 6), ("linear, odd K", 11)])
def test_per_group_ranges_run_the_dense_path(kind, group_size):
    """``act_group_size``: the integer kernels do not take ranges per channel group, the dense path does (one
    launch per run of equal groups), whatever the layer's execution: the reference bit for bit."""
    layer, x = _lever_layer(kind, group_size=group_size, clip=0.8)
    reference, dense = _dense(layer, x)
    assert torch.equal(dense, reference)
    with torch.no_grad():
        assert layer.set_execution("integer")
        assert gpuexec.gpu_support(layer) == "activation ranges per channel group (act_group_size)"
        assert gpuexec.dense_support(layer) is None
        assert torch.equal(gpuexec.gpu_forward(layer, x), reference)


def test_a_compiled_layer_only_the_dense_path_serves_is_one_dense_layer_op(monkeypatch):
    """Under ``torch.compile`` a layer with per-group ranges is one ``diffusers_gac::dense_layer`` op (no graph
    break with ``fullgraph=True``), checked by ``opcheck`` and equal to the reference."""
    layer, x = _lever_layer("conv 3x3 split input", group_size=3, clip=0.8)
    with torch.no_grad():
        reference = layer(x)
        assert layer.set_execution("integer")
        tensors, ints = gpuexec.gpu_layer_args(layer, x)
        torch.library.opcheck(gpuexec.dense_layer, (x, *tensors, ints))
        compiled = torch.compile(lambda t: intexec.compiled_gpu_forward(layer, t), fullgraph=True,
                                 backend="aot_eager")(x)
    assert torch.equal(compiled, reference)
    plain, x = _layer("conv 3x3 padded")
    monkeypatch.setattr(intexec, "integer_pays_off", lambda layer, device="cpu": True)  # "auto" as on a GPU
    with torch.no_grad():
        reference = plain(x)
        assert plain.set_execution("auto", "int8") and gpuauto.pin_path(plain, "dense")
        compiled = torch.compile(lambda t: intexec.compiled_gpu_forward(plain, t), backend="aot_eager")(x)
    assert torch.equal(compiled, reference)  # pinned to the dense path: the reference bit for bit, compiled too


def test_runs_merge_equal_channel_groups_only():
    dynamic, clip = [None, None, None], torch.tensor(0.5)
    parts = [[0, 4, 4], [4, 8, 4], [8, 12, 4], [12, 14, 4], [14, 16, 4], [16, 20, 4], [20, 24, 8]]
    ranges = dynamic * 5 + [None, None, clip] + dynamic
    assert gpudense.runs(parts, ranges) == [(0, 3, 4, 4), (3, 2, 2, 4), (5, 1, 4, 4), (6, 1, 4, 8)]
    static = [torch.ones(2), torch.zeros(2), None]
    assert gpudense.runs([[0, 4, 4], [4, 8, 4]], static * 2) == [(0, 1, 4, 4), (1, 1, 4, 4)]


@pytest.fixture
def timings(monkeypatch):
    """``gpuauto.time_paths`` replaced by given seconds per path (``timings["seconds"]``), counting its calls; and
    ``"auto"`` holding every layer's integer layout, as on a GPU (on the CPU it depends on the layer's width)."""
    monkeypatch.setattr(intexec, "integer_pays_off", lambda layer, device="cpu": True)
    state = {"seconds": {"integer": 2.0, "dense": 1.0, "scaled": 3.0}, "calls": 0, "offered": []}

    def fake(runs, device, rounds=3, calls=3):
        assert {"integer", "dense"} <= set(runs) <= set(gpuexec.PATHS) and device.type == "cpu"
        state["calls"] += 1
        state["offered"].append(tuple(runs))
        return {name: state["seconds"][name] for name in runs}

    monkeypatch.setattr(gpuauto, "time_paths", fake)
    return state


def _runs(monkeypatch):
    """Which path each GPU call ran."""
    ran = []
    for name, run in dict(gpuexec.PATHS).items():
        monkeypatch.setitem(gpuexec.PATHS, name, lambda *args, _name=name, _run=run: ran.append(_name) or _run(*args))
    monkeypatch.setattr(gpuexec, "gpu_run", gpuexec.PATHS["integer"])  # what layers not on "auto" call
    return ran


def test_auto_runs_the_faster_path_per_input_shape_and_remembers_it(timings, monkeypatch):
    ran = _runs(monkeypatch)
    layer, x = _layer("conv 3x3 padded")
    with torch.no_grad():
        reference = layer(x)
        assert layer.set_execution("auto")
        plan = gpuexec.gpu_plan(layer)
        out = gpuexec.gpu_forward(layer, x)
        assert timings["calls"] == 1 and ran == ["dense"] and torch.equal(out, reference)
        gpuexec.gpu_forward(layer, x)
        assert timings["calls"] == 1 and ran == ["dense"] * 2  # remembered: not timed again
        timings["seconds"] = {"integer": 1.0, "dense": 2.0, "scaled": 0.5}  # a 3x3 convolution: no float8 path
        small = gpuexec.gpu_forward(layer, x[:1])  # a new shape: timed, and here the integer kernels win
        assert timings["calls"] == 2 and ran[-1] == "integer"
        assert (small - reference[:1]).abs().max() <= 1e-5 * reference.abs().max()
        assert gpuauto.chosen_paths(layer) == {"integer": 1, "dense": 1, "scaled": 0}
        assert gpuexec.gpu_plan(layer) is plan
        layer.bias.data = layer.bias.data.clone()  # tensors replaced (as offloading hooks do): a new plan, ...
        gpuexec.gpu_forward(layer, x)
        assert gpuexec.gpu_plan(layer) is not plan
        assert timings["calls"] == 2 and ran[-1] == "dense"  # ... the same choices
        assert layer.set_execution("auto", "int8")  # another weight storage: timed again
        gpuexec.gpu_forward(layer, x)
        assert timings["calls"] == 3 and ran[-1] == "integer"
        assert gpuauto.chosen_paths(layer) == {"integer": 2, "dense": 1, "scaled": 0}
        timings["seconds"] = {"integer": 2.0, "dense": 1.0, "scaled": 3.0}
        last = gpuexec.gpu_forward(layer, x.to(memory_format=torch.channels_last))  # another layout: timed again
        assert timings["calls"] == 4 and ran[-1] == "dense" and torch.equal(last, reference)
        assert last.is_contiguous(memory_format=torch.channels_last)
        assert gpuauto.chosen_paths(layer) == {"integer": 2, "dense": 2, "scaled": 0}
        layer.to(memory_format=torch.channels_last)  # its output asked in channels-last: timed again
        moved = gpuexec.gpu_forward(layer, x)
        assert timings["calls"] == 5 and torch.equal(moved, reference)
        assert moved.is_contiguous(memory_format=torch.channels_last)


def test_explicit_integer_execution_and_pinned_paths_are_never_timed(timings, monkeypatch):
    ran = _runs(monkeypatch)
    layer, x = _layer("linear, odd K")
    with torch.no_grad():
        assert layer.set_execution("integer")
        gpuexec.gpu_forward(layer, x)
        assert ran == ["integer"]
        assert layer.set_execution("auto")
        assert gpuauto.pin_path(layer, "integer") == 1
        gpuexec.gpu_forward(layer, x)
        gpuauto.pin_path(layer, "dense")
        gpuexec.gpu_forward(layer, x)
        assert ran == ["integer", "integer", "dense"] and timings["calls"] == 0
        gpuauto.pin_path(layer, None)
        gpuexec.gpu_forward(layer, x)
        assert timings["calls"] == 1 and ran[-1] == "dense"
    with pytest.raises(ValueError, match="path must be one of 'integer', 'dense'"):
        gpuauto.pin_path(layer, "fast")


def test_time_paths_warms_each_path_then_keeps_its_least_round(monkeypatch):
    """Each path's first call (compiles) is not counted; rounds alternate between paths; seconds are per call."""
    clock = [0.0]
    monkeypatch.setattr(gpuauto, "_clock", lambda: clock[0])
    costs = {"integer": [5.0, 3.0, 2.0, 4.0] + [2.0] * 8, "dense": [9.0, 1.0, 6.0, 1.5] + [1.0] * 8}
    order = []

    def run(name):
        order.append(name)
        clock[0] += costs[name].pop(0)

    seconds = gpuauto.time_paths({name: (lambda n=name: run(n)) for name in costs}, torch.device("cpu"), rounds=2,
                                 calls=2)
    assert order == ["integer", "dense"] + ["integer"] * 2 + ["dense"] * 2 + ["integer"] * 2 + ["dense"] * 2
    assert seconds == {"integer": min(3 + 2, 4 + 2) / 2, "dense": min(1 + 6, 1.5 + 1) / 2}


def test_a_path_that_fails_loses_the_choice_with_a_warning(monkeypatch, caplog):
    """The dense path failing on some GPU (a kernel that does not compile there, say) costs the layer that path,
    not the forward pass; if every path fails, the error is raised."""
    monkeypatch.setattr(gpuauto, "_clock", lambda: 0.0)

    def broken():
        raise RuntimeError("no such kernel")

    with caplog.at_level("WARNING", logger=gpuauto.__name__):
        seconds = gpuauto.time_paths({"integer": lambda: None, "dense": broken}, torch.device("cpu"))
    assert seconds == {"integer": 0.0, "dense": float("inf")}
    assert "the dense path failed on this input (RuntimeError: no such kernel)" in caplog.text
    with pytest.raises(RuntimeError, match="no such kernel"):
        gpuauto.time_paths({"integer": broken, "dense": broken}, torch.device("cpu"))


def test_a_whole_model_on_auto_matches_the_reference_on_the_dense_path(monkeypatch, timings):
    """The embedded digits UNet at W4A4 with ``"auto"``, every layer routed to the GPU path as on a GPU (CPU tensors,
    Triton's interpreter): pinned to the dense path it computes the reference's output bit for bit; timed, each
    layer takes the path its timing favours, and the output is the integer kernels' where they win."""
    model = load_embedded_unet("digits")
    convert_model(model, GACConfig(w_bits=4, a_bits=4, weight_init="minmax"))
    freeze_model(model, "fake")
    call = digits_call()
    with torch.no_grad():
        reference = model(**call).sample
        integer = set_execution(model, "auto")["integer"]
        assert len(integer) >= 20
        monkeypatch.setattr(intexec, "forward",
                            lambda layer, x: gpuexec.gpu_forward(layer, x) if intexec._ready(layer, x) else None)
        gpuauto.pin_path(model, "dense")
        assert torch.equal(model(**call).sample, reference)
        gpuauto.pin_path(model, None)
        timings["seconds"] = {"integer": 1.0, "dense": 2.0, "scaled": 3.0}
        out = model(**call).sample
    assert timings["calls"] == len(integer)  # one shape per layer in one forward
    assert gpuauto.chosen_paths(model) == {"integer": len(integer), "dense": 0, "scaled": 0}
    assert ((out - reference).norm() / reference.norm()).item() <= 1e-4
    assert all(m._integer_auto for m in quant_layers(model).values() if m.execution == "integer")
