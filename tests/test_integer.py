"""Integer execution (``execution="integer"``): int8 GEMMs through ``torch._int_mm`` on the CPU, weights resident
in their integer layout, against the fake-quant reference.

Tolerance, layer by layer: the integer output matches the fake-quant output within ``1e-5 * max|fake output|``
(the only difference is float rounding in the rescale: measured ~4e-7). One wrong integer code anywhere shifts an
output by at least one weight step times one activation step, which is 1e-3 to 1e-2 of the output's range at these
bit widths, so the tolerance catches any error in the codes, zero points or scales.
"""

import copy
import json
import re
import sys

import pytest
import torch
from diffusers import UNet2DModel
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import benchmark_module, digits_call, digits_out
from torch import nn

import diffusers_gac
from diffusers_gac import GACConfig
from diffusers_gac.quant import convert, intexec, intkernels
from diffusers_gac.quant.convert import (
    freeze_model,
    quant_layers,
    quantization_disabled,
    set_execution,
)
from diffusers_gac.quant.layers import QuantConv2d, QuantLinear
from diffusers_gac.quant.quantizers import SplitActQuantizer, TimestepContext
from diffusers_gac.zoo import embedded_model_path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TOLERANCE = 1e-5  # relative to the largest output of the fake-quant reference
BITS = [(8, 8), (4, 8), (4, 4), (8, 4), (3, 6)]
SCHEMES = ["static", "timestep", "dynamic"]
CONVS = {
    "3x3 padded": dict(kernel_size=3, padding=1),
    "3x3 strided": dict(kernel_size=3, stride=2, padding=1),
    "3x3 grouped dilated": dict(kernel_size=3, padding=2, dilation=2, groups=4),
    "1x1": dict(kernel_size=1),
    "2x3 stride (2, 1) unpadded, no bias": dict(kernel_size=(2, 3), stride=(2, 1), bias=False),
}


def _input_quantizers(layer):
    q = layer.input_quantizer
    return [q.first, q.second] if isinstance(q, SplitActQuantizer) else [q]


def _frozen(module, x, w_bits, a_bits, scheme, split=None):
    """A frozen quantized layer with activation ranges observed on ``x`` (two timestep groups for ``timestep``)."""
    cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
    layer = cls.from_module(module, w_bits=w_bits, a_bits=a_bits, weight_init="minmax", act_scheme=scheme,
                            act_groups=2, split=split)
    if scheme == "timestep":
        context = TimestepContext(2)
        context.set_timesteps(torch.tensor([900, 10, 10][: x.shape[0]]))
        for q in _input_quantizers(layer):
            q.context = context
    for q in _input_quantizers(layer):
        q.start_observing()
    layer(x)
    for q in _input_quantizers(layer):
        q.finish_observing()
    layer.freeze()
    return layer


@pytest.fixture
def int_mm_calls(monkeypatch):
    """Counts the int8 GEMMs run, to prove the integer path was taken (not a silent fallback)."""
    calls = []
    original = torch._int_mm

    def counted(a, b, **kwargs):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return original(a, b, **kwargs)

    monkeypatch.setattr(torch, "_int_mm", counted)
    return calls


def _compare(layer, x, int_mm_calls):
    with torch.no_grad():
        reference = layer(x)
        assert layer.set_execution("integer") and layer.execution == "integer"
        assert not int_mm_calls
        result = layer(x)
    assert int_mm_calls, "the integer layer ran no int8 GEMM"
    assert result.shape == reference.shape and result.dtype == torch.float32
    error = (result - reference).abs().max() / reference.abs().max()
    assert error <= TOLERANCE
    return reference, result


@pytest.mark.parametrize("w_bits,a_bits", BITS)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("geometry", CONVS)
def test_conv2d_matches_the_fake_quant_reference(geometry, scheme, w_bits, a_bits, int_mm_calls):
    torch.manual_seed(0)
    x = torch.randn(2, 12, 9, 11) + 0.5  # ranges not centred on zero: zero points matter
    layer = _frozen(nn.Conv2d(12, 8, **CONVS[geometry]), x, w_bits, a_bits, scheme)
    _compare(layer, x, int_mm_calls)


@pytest.mark.parametrize("w_bits,a_bits", BITS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_linear_matches_the_fake_quant_reference(scheme, w_bits, a_bits, int_mm_calls):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 33) * torch.linspace(0.1, 3, 33) + 0.3
    layer = _frozen(nn.Linear(33, 7), x, w_bits, a_bits, scheme)
    _compare(layer, x, int_mm_calls)


@pytest.mark.parametrize("w_bits,a_bits", BITS)
def test_linear_in_row_blocks_is_exact(w_bits, a_bits, int_mm_calls, monkeypatch):
    """Many tokens: the dynamic scheme runs the linear layer in blocks of rows, with the same result."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 33) * torch.linspace(0.1, 3, 33) + 0.3
    layer = _frozen(nn.Linear(33, 7), x, w_bits, a_bits, "dynamic")
    reference, whole = _compare(layer, x, int_mm_calls)
    assert len(int_mm_calls) == 1
    monkeypatch.setattr(intkernels, "BLOCK_ELEMENTS", 4 * (33 + 7))
    monkeypatch.setattr(intkernels, "BLOCK_MIN_ROWS", 1)
    with torch.no_grad():
        blocks = layer(x)
    assert len(int_mm_calls) == 1 + 3  # rows 4 + 4 + 2
    assert torch.equal(blocks, whole)


def test_a_linear_layer_given_no_tokens_answers_with_no_tokens():
    torch.manual_seed(0)
    layer = _frozen(nn.Linear(33, 7), torch.randn(2, 5, 33), 4, 4, "dynamic")
    assert layer.set_execution("integer")
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            out = layer(torch.randn(2, 0, 33, dtype=dtype))
            assert out.shape == (2, 0, 7) and out.dtype == dtype


@pytest.mark.parametrize("module,shape", [(nn.Linear(33, 7), (2, 5, 33)),
                                          (nn.Conv2d(12, 8, 3, padding=1), (2, 12, 5, 6))])
def test_row_blocks_share_one_buffer_for_the_gemm_sums(module, shape, monkeypatch):
    """Every int8 GEMM of a call writes its sums into the same buffer (a fresh one per block or tap is page-faulted in
    again wherever the allocator gave the last one back), and the results stay those of one block."""
    torch.manual_seed(0)
    x = torch.randn(shape).to(torch.bfloat16)
    layer = _frozen(module, x.float(), 4, 4, "dynamic")
    assert layer.set_execution("integer")
    with torch.no_grad():
        whole = layer(x)
        outs, original = [], torch._int_mm
        monkeypatch.setattr(torch, "_int_mm", lambda a, b, out=None: outs.append(out) or original(a, b, out=out))
        monkeypatch.setattr(intkernels, "BLOCK_ELEMENTS", 160)  # 4 rows of the linear layer, 8 of the conv
        monkeypatch.setattr(intkernels, "BLOCK_MIN_ROWS", 1)
        blocks = layer(x)
    assert len(outs) > 2 and all(o is not None for o in outs)
    assert len({o.untyped_storage().data_ptr() for o in outs}) == 1
    if isinstance(module, nn.Linear):  # tokens quantized alone: the same bits
        assert torch.equal(blocks, whole)
    else:  # as test_conv2d_in_column_blocks_matches: one bfloat16 rounding
        assert (blocks - whole).abs().max() <= 1e-2 * whole.abs().max()


@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 4)])
@pytest.mark.parametrize("geometry", ["3x3 padded", "3x3 strided", "3x3 grouped dilated", "1x1"])
def test_conv2d_in_column_blocks_matches(geometry, w_bits, a_bits, int_mm_calls, monkeypatch):
    """Many output positions: the convolution runs its columns in blocks (7 here), with the same result."""
    torch.manual_seed(0)
    x = torch.randn(2, 12, 9, 11) + 0.5
    layer = _frozen(nn.Conv2d(12, 8, **CONVS[geometry]), x, w_bits, a_bits, "dynamic")
    reference, whole = _compare(layer, x, int_mm_calls)
    calls = len(int_mm_calls)
    monkeypatch.setattr(intkernels, "BLOCK_ELEMENTS", 7 * (12 + 8))
    monkeypatch.setattr(intkernels, "BLOCK_MIN_ROWS", 1)
    with torch.no_grad():
        blocks = layer(x)
    assert len(int_mm_calls) - calls > 5 * calls  # the blocks ran
    assert (blocks - whole).abs().max() <= 1e-6 * whole.abs().max()
    assert (blocks - reference).abs().max() <= TOLERANCE * reference.abs().max()


@pytest.mark.parametrize("w_bits,a_bits", BITS)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("kernel", [1, 3])
def test_split_skip_input_matches_the_fake_quant_reference(kernel, scheme, w_bits, a_bits, int_mm_calls):
    torch.manual_seed(0)
    up, skip = torch.randn(2, 6, 7, 7) * 4, torch.rand(2, 5, 7, 7) * 0.2  # very different ranges per part
    x = torch.cat([up, skip], 1)
    layer = _frozen(nn.Conv2d(11, 8, kernel, padding=kernel // 2), x, w_bits, a_bits, scheme, split=6)
    _compare(layer, x, int_mm_calls)


@pytest.mark.parametrize("w_bits,a_bits", BITS)
@pytest.mark.parametrize("shape", ["one input channel", "depthwise", "one input feature"])
def test_single_channel_dot_products_match(shape, w_bits, a_bits):
    """K = 1 GEMMs (a first conv on a grey image, a depthwise conv, a linear of one feature), where torch's CPU
    ``_int_mm`` returns garbage: the kernels take an exact outer product instead."""
    torch.manual_seed(0)
    module, x = {
        "one input channel": (nn.Conv2d(1, 16, 3, padding=1), torch.randn(2, 1, 6, 6)),
        "depthwise": (nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.randn(2, 8, 6, 6)),
        "one input feature": (nn.Linear(1, 16), torch.randn(5, 1)),
    }[shape]
    layer = _frozen(module, x, w_bits, a_bits, "dynamic")
    with torch.no_grad():
        reference = layer(x)
        layer.set_execution("integer")
        error = (layer(x) - reference).abs().max() / reference.abs().max()
    assert layer.execution == "integer" and error <= TOLERANCE


@pytest.mark.parametrize("kernel", [3, 1])
def test_strided_convolutions_with_one_output_row_hand_the_gemm_unit_stride_operands(kernel, monkeypatch):
    """A stride-2 convolution whose output is a single row reads each tap as a view with every other column; torch's
    CPU ``_int_mm`` is several hundred times slower on an operand without a dimension of stride 1, so the kernels
    copy it first. Every GEMM gets row- or column-major operands, and the result still matches the reference."""
    strides = []
    original = torch._int_mm

    def recorded(a, b, **kwargs):
        strides.append((a.stride(), b.stride()))
        return original(a, b, **kwargs)

    monkeypatch.setattr(torch, "_int_mm", recorded)
    torch.manual_seed(0)
    x = torch.randn(1, 16, 2, 7)  # output (1, 4): one row
    layer = _frozen(nn.Conv2d(16, 8, kernel, stride=2, padding=kernel // 2), x, 4, 4, "dynamic")
    with torch.no_grad():
        reference = layer(x)
        assert layer.set_execution("integer")
        result = layer(x)
    assert strides and all(1 in sa and 1 in sb for sa, sb in strides), strides
    assert (result - reference).abs().max() / reference.abs().max() <= TOLERANCE


def test_a_wrong_code_is_caught_by_the_tolerance(int_mm_calls):
    """The tolerance can fail: the integer layer with one weight code changed by one step is out of it."""
    torch.manual_seed(0)
    x = torch.randn(2, 12, 9, 11)
    layer = _frozen(nn.Conv2d(12, 8, 3, padding=1), x, 4, 4, "dynamic")
    with torch.no_grad():
        reference = layer(x)
        codes = layer.packed_weight
        codes[0, 0] ^= 1  # low nibble of the first byte: the first code, +-1
        layer.set_execution("integer")
        error = (layer(x) - reference).abs().max() / reference.abs().max()
    assert error > 100 * TOLERANCE


@pytest.mark.parametrize("w_bits,storage,bytes_per_weight", [(4, "packed", 0.5), (4, "int8", 1), (8, "packed", 1),
                                                             (6, "packed", 1)])
def test_integer_weights_stay_resident_in_integer_form(w_bits, storage, bytes_per_weight):
    torch.manual_seed(0)
    x = torch.randn(1, 16, 6, 6)
    layer = _frozen(nn.Conv2d(16, 32, 3, padding=1), x, w_bits, 8, "dynamic")
    layer.set_execution("integer", storage)
    weights = 32 * 16 * 9
    assert layer.int_weight.dtype in (torch.int8, torch.uint8)
    assert layer.int_weight.numel() == weights * bytes_per_weight
    assert not hasattr(layer, "weight") and "packed_weight" not in dict(layer.named_buffers())
    floats = sum(t.numel() for t in layer.state_dict(keep_vars=True).values() if t.is_floating_point())
    floats += sum(t.numel() for n, t in layer.named_buffers() if n.startswith("int_") and t.is_floating_point())
    assert floats < weights / 8  # per-channel scales, bias, correction sums: no float copy of the weight


@pytest.mark.parametrize("w_bits", [4, 8, 5])
def test_state_dict_and_reference_layout_do_not_depend_on_the_execution(w_bits):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 5)
    layer = _frozen(nn.Conv2d(6, 10, 3, padding=1, groups=2), x, w_bits, 8, "static")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for storage in ("packed", "int8", "packed"):
        layer.set_execution("integer", storage)
        saved = layer.state_dict()
        assert saved.keys() == before.keys() and all(torch.equal(saved[k], before[k]) for k in before)
    layer.set_execution("fake")
    assert layer.execution == "fake" and torch.equal(layer.packed_weight, before["packed_weight"])


def test_loading_a_state_dict_into_an_integer_layer_keeps_it_integer(int_mm_calls):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 5)
    source = _frozen(nn.Conv2d(6, 10, 3, padding=1), x, 4, 4, "static")
    target = _frozen(nn.Conv2d(6, 10, 3, padding=1), x * 3, 4, 4, "static")  # other weights and ranges
    target.set_execution("integer")
    target.load_state_dict(source.state_dict())
    assert target.execution == "integer"
    with torch.no_grad():
        expected = source(x)
        got = target(x)
    assert int_mm_calls and (got - expected).abs().max() <= TOLERANCE * expected.abs().max()


def test_other_dtypes_and_disabled_quantizers_run_the_reference(int_mm_calls):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 5)
    fake = _frozen(nn.Conv2d(6, 10, 3, padding=1), x, 4, 8, "dynamic")
    integer = copy.deepcopy(fake)
    integer.set_execution("integer")
    with torch.no_grad():
        xd = x.double()
        assert torch.equal(integer.double()(xd), fake.double()(xd))
        assert not int_mm_calls  # float64 input: no int8 kernel, the reference in float64
        integer.float(), fake.float()
        for layer in (fake, integer):
            layer.input_quantizer.enabled = False
        assert torch.equal(integer(x), fake(x))
        assert not int_mm_calls
    for layer in (fake, integer):
        layer.input_quantizer.enabled = True
    xg = x.clone().requires_grad_()  # int8 GEMMs have no gradient: a call that needs one runs the reference
    integer(xg).square().sum().backward()
    grad = xg.grad.clone()
    xg.grad = None
    fake(xg).square().sum().backward()
    assert not int_mm_calls and torch.equal(grad, xg.grad)


@pytest.mark.parametrize("case", ["weight-only", "padding='same'", "reflect padding"])
def test_layers_the_kernels_do_not_serve_stay_fake(case):
    torch.manual_seed(0)
    if case == "weight-only":
        layer = QuantLinear.from_module(nn.Linear(8, 4), w_bits=4, a_bits=None, weight_init="minmax")
        layer.freeze()
        x = torch.randn(3, 8)
    else:
        module = nn.Conv2d(4, 4, 3, padding="same") if case == "padding='same'" else \
            nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        x = torch.randn(1, 4, 5, 5)
        layer = _frozen(module, x, 4, 4, "dynamic")
    with torch.no_grad():
        expected = layer(x)
        assert layer.set_execution("integer") is False and layer.execution == "fake"
        assert intexec.integer_support(layer) is not None and torch.equal(layer(x), expected)


def test_bad_option_values_fail_clearly(tiny_unet):
    with pytest.raises(ValueError, match=r"execution must be one of 'auto', 'integer', 'fake', got 'int8'"):
        GACConfig(execution="int8")
    convert.convert_model(tiny_unet, GACConfig(w_bits=4, a_bits=4, weight_init="minmax"))
    with pytest.raises(ValueError, match="not frozen"):
        set_execution(tiny_unet, "integer")
    freeze_model(tiny_unet)
    with pytest.raises(ValueError, match=r"execution must be one of 'auto', 'integer', 'fake', got 'fast'"):
        set_execution(tiny_unet, "fast")
    with pytest.raises(ValueError, match=r"int4_storage must be one of 'packed', 'int8', 'fp8', got 'nibbles'"):
        set_execution(tiny_unet, "integer", int4_storage="nibbles")


def test_auto_picks_integer_for_wide_layers_on_a_cpu_with_the_kernels_and_fake_elsewhere(monkeypatch):
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "wide_conv": _frozen(nn.Conv2d(128, 8, 3, padding=1), torch.randn(1, 128, 4, 4), 4, 4, "dynamic"),
        "narrow_conv": _frozen(nn.Conv2d(64, 8, 3, padding=1), torch.randn(1, 64, 4, 4), 4, 4, "dynamic"),
        "wide_pointwise": _frozen(nn.Conv2d(64, 8, 1), torch.randn(1, 64, 4, 4), 4, 4, "dynamic"),
        "grouped": _frozen(nn.Conv2d(256, 8, 1, groups=8), torch.randn(1, 256, 4, 4), 4, 4, "dynamic"),
        "wide_linear": _frozen(nn.Linear(64, 8), torch.randn(3, 64), 8, 8, "dynamic"),
        "narrow_linear": _frozen(nn.Linear(63, 8), torch.randn(3, 63), 8, 8, "dynamic"),
    })
    chosen = set_execution(model, "auto")
    if intexec.integer_kernels_available("cpu"):
        assert chosen == {"integer": ["wide_conv", "wide_pointwise", "wide_linear"],
                          "fake": ["narrow_conv", "grouped", "narrow_linear"]}
    assert set_execution(model, "integer")["fake"] == []  # "integer" runs every layer it can on the kernels
    monkeypatch.setattr(intexec, "integer_kernels_available", lambda device: False)
    assert set_execution(model, "auto")["integer"] == []
    assert all(m.execution == "fake" for m in model.values())


def test_integer_execution_follows_the_device(int_mm_calls, monkeypatch):
    """Moved to a device without the kernels (simulated: every ``.to``/``.float`` is an ``_apply``), a layer runs the
    reference from the checkpoint layout; moved back, the kernels again."""
    torch.manual_seed(0)
    x = torch.randn(2, 128, 5, 5)
    model = nn.Sequential(_frozen(nn.Conv2d(128, 8, 3, padding=1), x, 4, 4, "dynamic"))
    layer = model[0]
    with torch.no_grad():
        reference = model(x)
        assert set_execution(model, "auto")["integer"] == ["0"]
        integer = model(x)
        kernels = {"on": False}
        monkeypatch.setattr(intexec, "integer_kernels_available", lambda device: kernels["on"])
        model.to("cpu")
        assert layer.execution == "fake" and "int_weight" not in dict(layer.named_buffers())
        calls = len(int_mm_calls)
        assert torch.equal(model(x), reference) and len(int_mm_calls) == calls
        kernels["on"] = True
        model.float()
        assert layer.execution == "integer" and torch.equal(model(x), integer) and len(int_mm_calls) > calls
        kernels["on"] = False
        assert set_execution(model, "integer") == {"integer": [], "fake": ["0"]}  # asked for, waits for the kernels
        kernels["on"] = True
        model.to("cpu")
        assert layer.execution == "integer"
        set_execution(model, "fake")
        model.to("cpu")
        assert layer.execution == "fake"  # fake asked for: stays fake wherever it goes


# -- the embedded digits model, calibrated while it loads -----------------------------------------------------------

FAST = dict(w_bits=4, a_bits=4, reconstruction="none", calib_num_inference_steps=5, calib_num_timesteps=2,
            calib_samples_per_timestep=4, batch_size=8)


@pytest.fixture(scope="module")
def fake_model():
    model = UNet2DModel.from_pretrained(embedded_model_path(), subfolder="unet",
                                        quantization_config=GACConfig(execution="fake", **FAST))
    assert all(m.execution == "fake" for m in quant_layers(model).values())
    return model


@pytest.fixture(scope="module")
def integer_model(fake_model):
    model = copy.deepcopy(fake_model)
    chosen = set_execution(model, "integer")
    assert chosen["fake"] == [] and len(chosen["integer"]) == len(quant_layers(model))  # special layers at 8 bits
    return model


def test_embedded_model_integer_matches_fake_quant(fake_model, integer_model):
    """Whole model: per-layer differences of float rounding can move an activation across a rounding boundary in a
    later layer, so the model-level tolerance is wider than a layer's: relative L2 within 1e-4 (measured ~2e-7, no
    flip), while quantization itself moves the output by ~5e-2 (relative L2 to full precision)."""
    fp = UNet2DModel.from_pretrained(embedded_model_path(), subfolder="unet")
    for seed in (0, 1):
        reference, result, full = digits_out(fake_model, seed), digits_out(integer_model, seed), digits_out(fp, seed)
        relative = ((result - reference).norm() / reference.norm()).item()
        assert relative < 1e-4
        assert ((reference - full).norm() / full.norm()).item() > 100 * relative


def test_embedded_model_round_trip(fake_model, integer_model, tmp_path):
    integer_model.save_pretrained(tmp_path / "integer")
    fake_model.save_pretrained(tmp_path / "fake")
    weights = "diffusion_pytorch_model.safetensors"
    saved_int, saved_fake = load_file(tmp_path / "integer" / weights), load_file(tmp_path / "fake" / weights)
    assert saved_int.keys() == saved_fake.keys() and all(torch.equal(saved_int[k], saved_fake[k]) for k in saved_int)
    config = json.loads((tmp_path / "integer" / "config.json").read_text())["quantization_config"]
    assert "execution" not in config  # a load-time choice, not part of the checkpoint

    loaded = UNet2DModel.from_pretrained(tmp_path / "integer")  # "auto": integer for the wide layers on this CPU
    auto = copy.deepcopy(fake_model)
    chosen = set_execution(auto, "auto")
    assert [n for n, m in quant_layers(loaded).items() if m.execution == "integer"] == chosen["integer"]
    if intexec.integer_kernels_available("cpu"):
        assert chosen["integer"] and chosen["fake"]  # 128-channel convs and 64-wide linears gain, 32-channel ones not
    assert torch.equal(digits_out(loaded), digits_out(auto))
    loaded = UNet2DModel.from_pretrained(tmp_path / "integer", quantization_config=GACConfig(execution="fake"))
    assert all(m.execution == "fake" for m in quant_layers(loaded).values())
    assert torch.equal(digits_out(loaded), digits_out(fake_model))
    loaded = UNet2DModel.from_pretrained(tmp_path / "fake", quantization_config=GACConfig(execution="integer"))
    assert all(m.execution == "integer" for m in quant_layers(loaded).values())
    assert torch.equal(digits_out(loaded), digits_out(integer_model))


def test_a_channels_last_model_computes_saves_and_loads_as_it_was(integer_model, tmp_path):
    """diffusers' speed recipe on the calibrated model: moved to channels-last it gives the same samples up to float
    rounding, in channels-last, and its checkpoint is the channels-first model's (layouts are not saved; a load is
    channels-first, as diffusers loads a float model)."""
    model = copy.deepcopy(integer_model).to(memory_format=torch.channels_last)
    out = digits_out(model)
    assert out.is_contiguous(memory_format=torch.channels_last)
    first = digits_out(integer_model)
    assert ((out - first).norm() / first.norm()).item() < 1e-4  # float layers (group norms) sum in another order
    model.save_pretrained(tmp_path / "last")
    integer_model.save_pretrained(tmp_path / "first")
    weights = "diffusion_pytorch_model.safetensors"
    saved_last, saved_first = load_file(tmp_path / "last" / weights), load_file(tmp_path / "first" / weights)
    assert saved_last.keys() == saved_first.keys()
    assert all(torch.equal(saved_last[k], saved_first[k]) for k in saved_first)
    with safe_open(tmp_path / "last" / weights, "pt") as last, safe_open(tmp_path / "first" / weights, "pt") as first:
        assert last.metadata() == first.metadata()  # the same digest (the header's key order may differ)
    loaded = UNet2DModel.from_pretrained(tmp_path / "last", quantization_config=GACConfig(execution="integer"))
    assert not any(m._channels_last for m in quant_layers(loaded).values())
    assert torch.equal(digits_out(loaded), digits_out(integer_model))


def test_loaded_model_switches_execution_and_back(integer_model):
    model = copy.deepcopy(integer_model)
    expected = digits_out(model)
    diffusers_gac.set_execution(model, "fake")
    diffusers_gac.set_execution(model, "integer")
    assert torch.equal(digits_out(model), expected)


def test_with_input_quantizers_off_the_integer_model_runs_the_reference(integer_model):
    """``quantization_disabled`` on a frozen model turns the input quantizers off: the integer layers then run the
    reference with float inputs, exactly like the fake-quant model."""
    model = copy.deepcopy(integer_model)
    reference = copy.deepcopy(model)
    set_execution(reference, "fake")
    with quantization_disabled(model), quantization_disabled(reference):
        assert torch.equal(digits_out(model), digits_out(reference))


def test_torch_compile_runs_the_integer_kernels_and_matches_eager(integer_model, int_mm_calls):
    """Under ``torch.compile`` the integer layers still run the int8 kernels (outside the graph: a break per layer)
    and everything around them is compiled; the result matches eager."""
    model = copy.deepcopy(integer_model)
    with torch.no_grad():
        eager = digits_out(model)
        int_mm_calls.clear()
        explained = torch._dynamo.explain(model)(**digits_call(0))
        compiled = torch.compile(model, backend="eager")
        result = compiled(**digits_call(0)).sample
    assert int_mm_calls, "the compiled model ran no int8 GEMM"
    assert explained.graph_count > 1 and explained.graph_break_count >= 1
    assert ((result - eager).norm() / eager.norm()).item() < 1e-4
    assert all(m.execution == "integer" for m in quant_layers(model).values())


def test_torch_compile_traces_the_fake_quant_reference_in_one_graph(fake_model):
    """Where the reference runs (execution "fake", or any model on a GPU) the whole model is one graph."""
    model = copy.deepcopy(fake_model)
    with torch.no_grad():
        eager = digits_out(model)
        result = torch.compile(model, backend="eager", fullgraph=True)(**digits_call(0)).sample  # a break would raise
    assert ((result - eager).norm() / eager.norm()).item() < 1e-5


def test_torch_compile_with_inductor_matches_eager():
    """The backend declares itself compileable: a small model of frozen W4A4 layers compiled with the default backend
    gives what it gives in eager mode, in both executions."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 6, 6)
    conv = _frozen(nn.Conv2d(16, 16, 3, padding=1), x, 4, 4, "dynamic")
    linear = _frozen(nn.Linear(6, 8), torch.randn(2, 16, 6, 6), 4, 4, "dynamic")
    model = nn.Sequential(conv, linear).eval()
    for execution in ("integer", "fake"):
        set_execution(model, execution)
        torch._dynamo.reset()
        with torch.no_grad():
            eager = model(x)
            result = torch.compile(model)(x)
        assert torch.allclose(result, eager, rtol=0, atol=1e-4 * eager.abs().max().item()), execution
    assert diffusers_gac.GACQuantizer(GACConfig()).is_compileable


# -- benchmarks/inference_speed.py, at a size that runs in seconds --------------------------------------------------

def _benchmark_module():
    return benchmark_module("inference_speed")


def test_peers_refuse_settings_they_do_not_run_and_count_their_bits():
    """benchmarks/peers.py: a setting a peer does not run is refused by name; bitsandbytes (the bnb extra) NF4
    quantizes the Linear layers only, so its mean bits per weight count the convolutions at 32."""
    pytest.importorskip("bitsandbytes")
    peers = _benchmark_module().build_peer.__globals__
    with pytest.raises(ValueError, match="quanto runs W8A8, W4A8, W8A16, W4A16, not W4A4"):
        peers["check_peer"]("quanto", "W4A4")
    with pytest.raises(ValueError, match="unknown peer 'gptq'"):
        peers["check_peer"]("gptq", "W4A4")
    model = UNet2DModel.from_pretrained(embedded_model_path(), subfolder="unet")
    quantized, mean_bits = peers["build_peer"]("bnb-nf4", "W4A16", model)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    conv = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    assert mean_bits == pytest.approx((4 * linear + 32 * conv) / (linear + conv))
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    reference, result = digits_out(model), digits_out(quantized)
    assert 0 < ((result - reference).norm() / reference.norm()).item() < 0.2


TINY_SD = ["--sd-channels", "32", "32", "64", "64", "--cross-attention-dim", "32", "--latents", "8", "--rounds", "1",
           "--threads", "1"]


def test_inference_speed_json(capsys):
    _benchmark_module().main(["--json", *TINY_SD])
    result = json.loads(capsys.readouterr().out)
    for key in ("fp32_ms", "int_w8a8_ms", "int_w4a8_ms", "int_w4a4_ms", "fake_w4a4_ms"):
        assert result[key] > 0
    assert result["latent"] == 8 and result["ratios"]["fp32"] == 1.0 and result["command"].endswith("--threads 1")


def test_inference_speed_table(capsys):
    variants = ["int_w4a4", "int_w4a4_levers", "int_w4a4_levers8"]
    _benchmark_module().main(["--models", "embedded", "--variants", *variants, *TINY_SD])
    out = capsys.readouterr().out
    assert "Command: `python benchmarks/inference_speed.py --models embedded --variants int_w4a4" in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| embedded digits")]
    assert [row[3] for row in rows] == ["fp32", *variants]  # FP32 is always timed, first
    resident, saved = ({row[3]: float(row[i]) for row in rows} for i in (8, 9))
    assert resident["int_w4a4"] < resident["fp32"] / 5  # packed 4-bit weights resident, no float copy
    assert saved["int_w4a4"] < saved["fp32"] / 5
    # the branch costs bytes; int8 factor codes fewer than float16 ones
    assert saved["int_w4a4"] < saved["int_w4a4_levers8"] < saved["int_w4a4_levers"]


def test_inference_speed_profile_names_its_date_and_the_integer_gemm(tmp_path, monkeypatch):
    """The profile's header says when, on which torch and with which allocator settings it ran (they move the
    integer kernels' times)."""
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")  # read, not applied: set after startup
    out = tmp_path / "profile.md"
    _benchmark_module().main(["--variants", "int_w4a4", "--profile", "int_w4a4", "--profile-rows", "30",
                              "--profile-output", str(out), *TINY_SD])
    lines = out.read_text().splitlines()
    assert lines[0] == "# Where a step's time goes" and lines[2].startswith("Command: `python benchmarks/inference_speed")
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC; .*torch \d", lines[4])
    assert "malloc: GLIBC_TUNABLES=glibc.malloc.trim_threshold=1" in lines[4]
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert benchmark_module("report").malloc_line() == "malloc: glibc defaults"
    assert any("latent 8, int_w4a4" in line for line in lines) and any("aten::_int_mm" in line for line in lines)


def test_inference_speed_compiled_variants_are_the_prefix_on_a_base_variant():
    """``compiled_fp32`` and ``compiled_w4a4`` (an alias of ``compiled_auto_w4a4``) build ``torch.compile`` of the
    float model and of the ``"auto"`` W4A4 one (compiling waits for the first call)."""
    bench = _benchmark_module()
    fp32 = bench.sd_unet((32, 32, 64, 64), 32)
    call = bench.model_inputs(fp32, 8, 1)
    assert bench.split_variant("compiled_fp32") == (["compiled_"], "fp32")
    assert bench.split_variant("compiled_w4a4") == (["compiled_"], "auto_w4a4")
    compiled = bench.build_variant(fp32, "compiled_fp32", call)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is fp32
    quantized = bench.build_variant(fp32, "compiled_w4a4", call)._orig_mod
    assert quantized is not fp32 and {m._integer_auto for m in quantized.modules() if hasattr(m, "_integer_auto")} == {
        True}


def test_inference_speed_fused_variants_fuse_the_projections_of_a_copy():
    """``fused_*`` variants call diffusers' ``fuse_qkv_projections()``: on a copy for ``fused_fp32`` (FP32 is the
    reference), through diffusers_gac for quantized projections; the outputs are the unfused variant's."""
    bench = _benchmark_module()
    fp32 = bench.sd_unet((32, 32, 64, 64), 32)
    call = bench.model_inputs(fp32, 8, 1)
    assert bench.split_variant("fused_bf16_int_w4a4") == (["fused_", "bf16_"], "int_w4a4")
    fused = bench.build_variant(fp32, "fused_fp32", call)
    assert fused is not fp32 and hasattr(fused.mid_block.attentions[0].transformer_blocks[0].attn1, "to_qkv")
    assert not hasattr(fp32.mid_block.attentions[0].transformer_blocks[0].attn1, "to_qkv")
    quantized = bench.build_variant(fp32, "fused_int_w4a4", call)
    assert type(quantized.mid_block.attentions[0].transformer_blocks[0].attn1.to_qkv).__name__ == "FusedQuantLinear"
    with torch.no_grad():
        assert torch.equal(quantized(**call).sample, bench.build_variant(fp32, "int_w4a4", call)(**call).sample)


def test_inference_speed_channels_last_variants_run_channels_last(int_mm_calls):
    """``cl_*`` variants are diffusers' ``unet.to(memory_format=torch.channels_last)`` with a channels-last sample (on
    a copy for ``cl_fp32``): the integer layers take and give channels-last tensors, and the output is the
    channels-first variant's up to the float layers' summation order (a group norm reduces in another order)."""
    bench = _benchmark_module()
    fp32 = bench.sd_unet((32, 32, 64, 64), 32)
    call = bench.model_inputs(fp32, 8, 1)
    assert bench.split_variant("cl_bf16_int_w4a4") == (["cl_", "bf16_"], "int_w4a4")
    assert bench.variant_channels_last("cl_bf16") and not bench.variant_channels_last("bf16")
    copied = bench.build_variant(fp32, "cl_fp32", call)
    assert copied is not fp32 and copied.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fp32.conv_in.weight.is_contiguous()
    model = bench.build_variant(fp32, "cl_int_w4a4", call)
    layouts = []
    conv = model.down_blocks[0].resnets[0].conv1
    conv.register_forward_hook(lambda m, args, out: layouts.append(
        (args[0].is_contiguous(memory_format=torch.channels_last), out.is_contiguous(memory_format=torch.channels_last))))
    result = bench.forward_fn(model, call, channels_last=True)()
    assert layouts == [(True, True)] and int_mm_calls
    first = bench.forward_fn(bench.build_variant(fp32, "int_w4a4", call), call)()
    assert (result - first).abs().max() <= 1e-5 * first.abs().max()


def test_inference_speed_static_variants_observe_their_ranges(capsys):
    """Static and per-timestep-group variants get their ranges from the timed input: a range left at its initial
    value would clip every activation and the output would be far from full precision's."""
    variants = ["int_w4a4", "int_w4a4_static", "int_w4a4_timestep"]
    _benchmark_module().main(["--models", "embedded", "--variants", *variants, *TINY_SD])
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| model")).split(" | ")
    column = header.index("rel. L2 vs FP32")
    error = {row[3]: float(row[column]) for row in (line.split(" | ") for line in lines
                                                    if line.startswith("| embedded digits"))}
    assert error["int_w4a4_static"] < 2 * error["int_w4a4"] and error["int_w4a4_timestep"] < 2 * error["int_w4a4"]


def test_format_options_passed_when_loading_a_checkpoint_are_ignored_with_a_warning(fake_model, tmp_path,
                                                                                  monkeypatch):
    from diffusers_gac import quantizer

    fake_model.save_pretrained(tmp_path)
    warnings = []
    monkeypatch.setattr(quantizer.logger, "warning", warnings.append)
    loaded = UNet2DModel.from_pretrained(tmp_path, quantization_config=GACConfig(w_bits=8, execution="fake"))
    assert loaded.config.quantization_config.w_bits == 4 and torch.equal(digits_out(loaded), digits_out(fake_model))
    assert len(warnings) == 1 and "w_bits" in warnings[0] and "execution" in warnings[0]
    warnings.clear()
    UNet2DModel.from_pretrained(tmp_path, quantization_config=GACConfig(w_bits=4, a_bits=4, execution="integer"))
    assert warnings == []  # options equal to the checkpoint's, or left at their defaults, say nothing


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (8, 8)])
@pytest.mark.parametrize("case", ["conv 3x3, batch 2", "conv 3x3 stride 2, batch 1", "conv 1x1 split",
                                  "linear", "linear in row blocks", "linear static", "linear per-group ranges"])
def test_half_precision_inputs_give_exactly_the_float32_copys_result(case, w_bits, a_bits, dtype, monkeypatch):
    """The CPU kernels quantize a half-precision input from an exact float32 copy (made inside the quantization, a
    block of rows at a time for a linear layer) and write the output in its dtype, rounding the float32 result once:
    bit for bit what running them on ``x.float()`` and casting the output gives, without a float32 output."""
    torch.manual_seed(0)
    module, shape, scheme, split, groups = {
        "conv 3x3, batch 2": (nn.Conv2d(24, 16, 3, padding=1), (2, 24, 9, 7), "dynamic", None, 1),
        "conv 3x3 stride 2, batch 1": (nn.Conv2d(24, 16, 3, stride=2, padding=1), (1, 24, 9, 7), "dynamic", None, 1),
        "conv 1x1 split": (nn.Conv2d(24, 16, 1), (2, 24, 5, 6), "dynamic", 10, 1),
        "linear": (nn.Linear(40, 24), (3, 7, 40), "dynamic", None, 1),
        "linear in row blocks": (nn.Linear(40, 24), (2, 300, 40), "dynamic", None, 1),
        "linear static": (nn.Linear(40, 24), (3, 7, 40), "static", None, 1),
        "linear per-group ranges": (nn.Linear(40, 24), (3, 7, 40), "dynamic", None, 2),
    }[case]
    monkeypatch.setattr(intkernels, "BLOCK_ELEMENTS", 1024)  # row blocks of 256 (BLOCK_MIN_ROWS) at 40 + 24 channels
    x = (torch.randn(shape) + 0.3).to(dtype)
    layer = _frozen(module, x.float(), w_bits, a_bits, scheme, split=split)
    if groups > 1:
        layer.input_quantizer.group_size = 20
    assert layer.set_execution("integer")
    assert len(layer._int_spec.parts) == (2 if split or groups > 1 else 1)
    with torch.no_grad():
        copied = intexec._forward_cpu(layer, x.float()).to(dtype)
        direct = layer(x)
    assert direct.dtype == dtype and torch.equal(direct, copied)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (8, 8)])
@pytest.mark.parametrize("geometry", ["3x3 padded", "3x3 strided", "3x3 grouped dilated", "1x1",
                                      "2x3 stride (2, 1) unpadded, no bias"])
def test_channels_last_inputs_give_channels_last_outputs_with_the_same_values(geometry, w_bits, a_bits, dtype,
                                                                               int_mm_calls, monkeypatch):
    """A channels-last input (diffusers' speed recipe: ``unet.to(memory_format=torch.channels_last)``) is read as it
    is and its output is channels-last, as ``F.conv2d`` gives; the values are bit for bit the channels-first ones,
    also when the rows run in several blocks."""
    torch.manual_seed(0)
    x = torch.randn(2, 12, 9, 11) + 0.5
    layer = _frozen(nn.Conv2d(12, 8, **CONVS[geometry]), x, w_bits, a_bits, "dynamic")
    x = x.to(dtype)
    with torch.no_grad():
        reference = layer(x.contiguous(memory_format=torch.channels_last))
        assert layer.set_execution("integer")
        first = layer(x)
        last = layer(x.contiguous(memory_format=torch.channels_last))
        monkeypatch.setattr(intkernels, "BLOCK_ELEMENTS", 7 * (12 + 8))
        monkeypatch.setattr(intkernels, "BLOCK_MIN_ROWS", 1)
        last_blocks = layer(x.contiguous(memory_format=torch.channels_last))
    assert int_mm_calls
    assert reference.is_contiguous(memory_format=torch.channels_last)  # the reference's own layout
    assert first.is_contiguous() and last.is_contiguous(memory_format=torch.channels_last) and not last.is_contiguous()
    assert last.dtype == first.dtype == dtype
    assert torch.equal(last, first)
    assert (last_blocks - last).abs().max() <= 1e-6 * last.abs().max()
    error = (last.float() - reference.float()).abs().max() / reference.float().abs().max()
    assert error <= (TOLERANCE if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("execution", ["fake", "integer"])
def test_a_convolution_moved_to_channels_last_answers_in_channels_last(execution):
    """``unet.to(memory_format=torch.channels_last)`` makes a float convolution answer in channels-last whatever its
    input's layout (its weight is converted, and ``F.conv2d`` follows it). A frozen layer holds no 4-D weight, and
    answers in channels-last all the same: the same values (bit for bit on the integer kernels), through moves, casts
    and a deepcopy, with the same state dict, until it is moved back to ``torch.contiguous_format``. A layer converted
    from a channels-last convolution starts channels-last."""
    cl = torch.channels_last
    torch.manual_seed(0)
    x = torch.randn(2, 12, 9, 11) + 0.5
    layer = _frozen(nn.Conv2d(12, 8, 3, padding=1), x, 4, 4, "dynamic")
    assert layer.set_execution(execution) == (execution == "integer")
    with torch.no_grad():
        first, state = layer(x), layer.state_dict()
        assert layer.to(memory_format=cl) is layer
        last = layer(x)
        assert first.is_contiguous() and last.is_contiguous(memory_format=cl) and not last.is_contiguous()
        if execution == "integer":
            assert torch.equal(last, first)
        else:  # another convolution algorithm: float rounding
            assert (last - first).abs().max() <= 1e-5 * first.abs().max()
        layer.double().float().to("cpu")
        assert layer(x).is_contiguous(memory_format=cl) and copy.deepcopy(layer)(x).is_contiguous(memory_format=cl)
        assert layer.execution == execution
        moved = layer.state_dict()
        assert moved.keys() == state.keys() and all(torch.equal(moved[k], state[k]) for k in state)
        layer.to(memory_format=torch.contiguous_format)
        assert layer(x).is_contiguous()
    float_conv = nn.Conv2d(12, 8, 3).to(memory_format=cl)
    assert QuantConv2d.from_module(float_conv, w_bits=4, a_bits=4)._channels_last
    assert not QuantConv2d.from_module(nn.Conv2d(12, 8, 3), w_bits=4, a_bits=4)._channels_last


@pytest.mark.parametrize("kernel", [3, 1])
def test_convolution_gemms_are_tokens_major(kernel, int_mm_calls):
    """Each int8 GEMM of a convolution has the positions as its rows and the weight as its second operand: oneDNN
    runs a short odd column count (a deep layer's few positions) up to 1.8x slower than the same count of rows."""
    torch.manual_seed(0)
    x = torch.randn(1, 32, 4, 4)
    layer = _frozen(nn.Conv2d(32, 48, kernel, padding=kernel // 2), x, 4, 4, "dynamic")
    _compare(layer, x, int_mm_calls)
    rows = (4 - 1) * (4 + 2) + 4 if kernel == 3 else 16  # the padded rows between image rows ride along
    assert int_mm_calls == [((rows, 32), (32, 48))] * kernel ** 2


def test_tokens_major_transposes_channels_first_maps_and_leaves_the_rest(monkeypatch):
    q = torch.randint(-8, 8, (3, 5, 4, 6), dtype=torch.int8)
    m = q.permute(0, 2, 3, 1)
    assert intkernels._tokens_major(m) is m  # 24 positions: below the threshold, a view
    monkeypatch.setattr(intkernels, "TRANSPOSE_MIN_POSITIONS", 24)
    monkeypatch.setattr(torch, "get_num_threads", lambda: intkernels.TRANSPOSE_MAX_THREADS)
    laid = intkernels._tokens_major(m)
    assert laid.is_contiguous() and torch.equal(laid, m)
    monkeypatch.setattr(torch, "get_num_threads", lambda: intkernels.TRANSPOSE_MAX_THREADS + 1)
    assert intkernels._tokens_major(m) is m  # more threads: the parallel copy
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    rows = q.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)  # channels-last: already rows
    assert intkernels._tokens_major(rows) is rows
    sliced = q[:, :, ::2].permute(0, 2, 3, 1)  # not a whole channels-first tensor: left to the caller's copy
    assert intkernels._tokens_major(sliced) is sliced


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("geometry", ["3x3 padded", "3x3 strided", "3x3 grouped dilated", "1x1"])
def test_convolutions_give_the_same_outputs_with_inputs_laid_out_by_transposes(geometry, batch, monkeypatch):
    """Large channels-first images are laid out tokens-major by a 2-D transpose per sample, bit for bit the result
    of reading them through the permuted view (a single 1x1 image keeps the view, which ``_int_mm`` reads as is)."""
    torch.manual_seed(0)
    x = torch.randn(batch, 12, 9, 11) + 0.5
    layer = _frozen(nn.Conv2d(12, 8, **CONVS[geometry]), x, 4, 4, "dynamic")
    layer.set_execution("integer")
    with torch.no_grad():
        viewed = layer(x)
    laid, original = [], intkernels._tokens_major

    def counted(m):
        out = original(m)
        laid.append(out is not m)
        return out

    monkeypatch.setattr(intkernels, "TRANSPOSE_MIN_POSITIONS", 1)
    monkeypatch.setattr(intkernels, "TRANSPOSE_MAX_THREADS", torch.get_num_threads())
    monkeypatch.setattr(intkernels, "_tokens_major", counted)
    with torch.no_grad():
        transposed = layer(x)
    assert laid == ([] if geometry == "1x1" and batch == 1 else [True])
    assert torch.equal(transposed, viewed)


@pytest.mark.parametrize("w_bits", [4, 8])
def test_weights_are_unpacked_once_per_call_however_many_row_blocks(w_bits, monkeypatch):
    """The rows of a large input run in blocks; each weight block is read (unpacked from 4 bits) once per call."""
    torch.manual_seed(0)
    x = torch.randn(2, 12, 9, 11)
    layer = _frozen(nn.Conv2d(12, 8, 3, padding=1), x, w_bits, 4, "dynamic")
    assert layer.set_execution("integer")
    reads = []
    block = intexec._block
    monkeypatch.setattr(intexec, "_block", lambda *args: reads.append(args[1]) or block(*args))
    monkeypatch.setattr(intkernels, "BLOCK_ELEMENTS", 7 * (12 + 8))
    monkeypatch.setattr(intkernels, "BLOCK_MIN_ROWS", 1)
    with torch.no_grad():
        layer(x)
    assert sorted(reads) == list(range(9))


def test_cpu_conv_gemm_benchmark_writes_its_three_tables(tmp_path, monkeypatch):
    """benchmarks/cpu_conv_gemm.py (shrunk): a row per position count, per GEMM shape and per layer, the GEMM rows
    timing the int8 GEMM of that shape, and the W4A4 layers on the integer kernels (not a silent fallback to the
    reference)."""
    bench = benchmark_module("cpu_conv_gemm")
    monkeypatch.setattr(bench, "POSITIONS", [16, 22])
    monkeypatch.setattr(bench, "GEMMS", [(77, 96, 40)])
    monkeypatch.setattr(bench, "LAYERS", [(128, 64, 4)])
    monkeypatch.setattr(sys, "argv", ["cpu_conv_gemm.py", "--rounds", "1", "--output", str(tmp_path / "out.md")])
    calls = []
    original = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b, **kw: calls.append(a.shape) or original(a, b, **kw))
    bench.main()
    text = (tmp_path / "out.md").read_text()
    assert "| 16 |" in text and "| 22 |" in text and "| 77 x 96 -> 40 |" in text and "| 128 -> 64, 4x4 |" in text
    assert (77, 96) in calls  # the GEMM row
    assert (22, 128) in calls  # the layer's taps: tokens-major, 4x4 with its padding rows


def test_layer_speed_benchmark_sums_every_quantized_layer_once(tmp_path, int_mm_calls):
    """benchmarks/layer_speed.py on a shrunk SD-shaped UNet: every quantized layer lands in one row, the integer
    variant ran the int8 GEMMs, and the whole step is the layers plus the rest."""
    bench = benchmark_module("layer_speed")
    out = tmp_path / "layers.md"
    bench.main(["--sd-channels", "32", "32", "64", "64", "--cross-attention-dim", "32", "--latent", "8", "--rounds",
                "1", "--variants", "bf16", "bf16_int_w4a4", "--output", str(out)])
    assert int_mm_calls
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    kinds, totals = rows[:-3], {r[0][2:]: r for r in rows[-3:]}
    fp32 = bench.bench.sd_unet((32, 32, 64, 64), 32)
    quantized = bench.bench.build_variant(fp32, "int_w4a4", bench.bench.model_inputs(fp32, 8, 1))
    assert int(totals["**all quantized layers**"][1]) == sum(int(r[1]) for r in kinds) == len(
        convert.quant_layers(quantized))
    assert any(r[0].startswith("| conv 3x3") for r in kinds) and any(r[0].startswith("| linear") for r in kinds)
    for i in (2, 3):  # bf16 ms, bf16_int_w4a4 ms: the layers take time, and the step takes more
        assert float(totals["**all quantized layers**"][i]) > 0 and float(totals["**the rest of the step**"][i]) > 0
    for variants in (["bf16", "nonsense"], ["bf16", "compiled_w4a4"]):
        with pytest.raises(SystemExit):
            bench.main(["--variants", *variants])
