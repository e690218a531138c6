"""The activation-side levers (quant/levers.py): per-group and clipped dynamic ranges, smoothing and the low-rank
branch. Each transform keeps the float function, the search lowers the quantized error, gradients reach what is
learned, and checkpoints carry (and check) every new tensor."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file
from tiny_models import tiny_unet2d
from torch import nn

import diffusers_gac
from diffusers_gac import GACConfig, quantize_model
from diffusers_gac.calibration.resume import unit_state
from diffusers_gac.calibration.units import Unit
from diffusers_gac.cli import main
from diffusers_gac.quant import intexec, levers
from diffusers_gac.quant.convert import (
    convert_model,
    dequantize_model,
    quant_layers,
    set_execution,
)
from diffusers_gac.quant.layers import QuantConv2d, QuantLinear
from diffusers_gac.quant.quantizers import ActQuantizer

LEVERS = dict(act_group_size=8, act_clipping=True, smoothing=True, lowrank_rank=2)
FAST = dict(reconstruction="none", calib_num_inference_steps=3, calib_num_timesteps=2, calib_samples_per_timestep=2,
            batch_size=4, act_scheme="dynamic", weight_init="minmax")
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _outlier_input(shape, channel_dim, generator):
    x = torch.randn(*shape, generator=generator)
    index = [slice(None)] * len(shape)
    index[channel_dim] = 3
    x[tuple(index)] *= 40  # one outlier channel, as in real activations
    return x


def _layers():
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(16, 12, 3, stride=2, padding=1)
    linear = nn.Linear(32, 24)
    nn.init.normal_(conv.weight, generator=g)
    nn.init.normal_(linear.weight, generator=g)
    return [(conv, _outlier_input((4, 16, 8, 8), 1, g), {}),
            (linear, _outlier_input((4, 5, 32), -1, g), {}),
            (nn.Conv2d(16, 8, 1), _outlier_input((4, 16, 6, 6), 1, g), {"split": 8})]


def _quantized(module, **options):
    cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
    return cls.from_module(copy.deepcopy(module), w_bits=4, a_bits=4, act_scheme="dynamic", **options)


@pytest.mark.parametrize("case", range(3), ids=["conv3x3", "linear", "split-1x1"])
def test_smoothing_and_branch_keep_the_float_function(case):
    module, x, extra = _layers()[case]
    layer = _quantized(module, smoothing=True, rank=3, **extra)
    smooth = torch.rand(layer.weight_shape[1], generator=torch.Generator().manual_seed(1)) * 4 + 0.1
    levers.set_levers(layer, module.weight.detach(), smooth)
    assert torch.equal(layer.smooth, smooth)
    # the branch holds the top singular directions of W s, the layer's weight the rest
    scaled = module.weight.detach() * smooth.view(1, -1, *([1] * (module.weight.dim() - 2)))
    assert torch.allclose(layer.weight + levers.lowrank_weight(layer), scaled, atol=1e-4)
    top = torch.linalg.svdvals(scaled.flatten(1))
    assert torch.allclose(torch.linalg.svdvals(layer.weight.flatten(1))[:3], top[3:6], rtol=1e-3)
    layer.quantize_weight, layer.input_quantizer.enabled = False, False
    for q in layer.input_quantizer.modules():
        q.enabled = False
    with torch.no_grad():
        assert torch.allclose(layer(x), module(x), atol=1e-3, rtol=1e-4)
        # folded back into one plain weight (dequantize_model) it is the layer's function again
        assert torch.allclose(levers.float_weight(layer, layer.weight), module.weight, atol=1e-5)


def test_rank_follows_the_option_and_stays_below_half_the_weight():
    assert levers.layer_rank((64, 32, 3, 3), 8) == 8
    assert levers.layer_rank((64, 32, 3, 3), 0.25) == 16  # a quarter of min(64, 288)
    assert levers.layer_rank((4, 3, 3, 3), 8) == 2
    assert levers.layer_rank((64, 32), 0) == 0


def test_per_group_ranges_quantize_each_group_alone():
    x = _outlier_input((2, 16, 3, 3), 1, torch.Generator().manual_seed(0))
    grouped = ActQuantizer(4, "dynamic", channel_dim=1, group_size=4)
    per_token = ActQuantizer(4, "dynamic", channel_dim=1)
    expected = torch.cat([per_token(part) for part in x.split(4, dim=1)], dim=1)
    assert torch.equal(grouped(x), expected)
    assert (grouped(x) - x).pow(2).mean() < 0.5 * (per_token(x) - x).pow(2).mean()
    assert torch.equal(grouped(x[:, :6]), per_token(x[:, :6]))  # 4 does not divide 6: per token
    assert grouped.channel_groups(16) == 4 and grouped.channel_groups(4) == 4 and grouped.channel_groups(6) == 6


def test_clipping_shrinks_every_range():
    x = _outlier_input((2, 5, 16), -1, torch.Generator().manual_seed(0))
    q = ActQuantizer(4, "dynamic", channel_dim=-1, clipping=True)
    assert torch.equal(q(x), ActQuantizer(4, "dynamic", channel_dim=-1)(x))  # ratio 1 until searched
    q.clip.fill_(0.5)
    top = x.abs().amax(-1, keepdim=True)
    assert (q(x).abs() <= top * (0.5 + 1 / 15) + 1e-6).all()  # half the range, give or take the zero point's step
    assert (q(x).abs().amax(-1, keepdim=True) < 0.75 * top).all()
    assert "clip" in dict(q.named_buffers())


@pytest.mark.parametrize("case", range(3), ids=["conv3x3", "linear", "split-1x1"])
def test_the_search_lowers_the_quantized_error(case):
    module, x, extra = _layers()[case]
    reference = module(x).detach()
    plain = _quantized(module, **extra)
    layer = _quantized(module, smoothing=True, clipping=True, rank=2, **extra)
    with torch.no_grad():
        before = (plain(x) - reference).pow(2).mean()
        chosen = levers.search_levers(layer, [x[:2], x[2:]])
        after = (layer(x) - reference).pow(2).mean()
    assert set(chosen) == {"smoothing", "clip"}
    assert chosen["smoothing"] is not None  # the outlier channel makes smoothing pay
    assert after < 0.5 * before


def test_gradients_reach_the_rounding_and_static_steps_with_levers():
    module, x, _ = _layers()[0]
    for scheme in ("dynamic", "static"):
        cls_options = dict(smoothing=True, rank=2) if scheme == "static" else dict(smoothing=True, rank=2, clipping=True,
                                                                                  group_size=4)
        layer = QuantConv2d.from_module(copy.deepcopy(module), w_bits=4, a_bits=4, act_scheme=scheme, **cls_options)
        levers.search_levers(layer, [x])
        if scheme == "static":
            layer.input_quantizer.start_observing()
            layer(x)
            layer.input_quantizer.finish_observing()
            layer.input_quantizer.scale.requires_grad_(True)
        layer.weight_quantizer.init_rounding(layer.weight)
        factors = [layer.lowrank_down.requires_grad_(True), layer.lowrank_up.requires_grad_(True)]
        (layer(x) - module(x).detach()).pow(2).mean().backward()
        assert layer.weight_quantizer.alpha.grad.abs().sum() > 0
        assert all(f.grad.abs().sum() > 0 for f in factors)
        if scheme == "static":
            assert layer.input_quantizer.scale.grad.abs().sum() > 0


@pytest.mark.parametrize("case", range(3), ids=["conv3x3", "linear", "split-1x1"])
@pytest.mark.parametrize("a_bits", [4, 8])
def test_integer_execution_serves_every_lever(case, a_bits):
    """Smoothing, the branch, clipping and per-group ranges (one int8 GEMM per channel group) on the CPU kernels
    give the fake-quant reference's output."""
    if not intexec.integer_kernels_available("cpu"):
        pytest.skip("no int8 kernels on this CPU")
    module, x, extra = _layers()[case]
    cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
    layer = cls.from_module(copy.deepcopy(module), w_bits=4, a_bits=a_bits, act_scheme="dynamic", smoothing=True,
                            clipping=True, rank=2, group_size=4, **extra)
    levers.search_levers(layer, [x])
    for q in layer.input_quantizer.modules():
        if isinstance(q, ActQuantizer):
            q.clip.fill_(0.8)
    layer.freeze()
    with torch.no_grad():
        fake = layer(x)
        assert layer.set_execution("integer")
        assert len(layer._int_spec.parts) == layer.weight_shape[1] // 4
        assert torch.allclose(layer(x), fake, atol=1e-4, rtol=1e-4)


def test_per_group_ranges_of_a_grouped_convolution_stay_on_the_reference():
    """The quantizer groups the whole input's channels (here 16 per range over 128, one range per convolution
    group), which the integer layout's parts (counted over a convolution group's 16 input channels) cannot express:
    such a layer refuses the integer kernels and keeps the reference's output (it ran them, 10% off, before)."""
    torch.manual_seed(0)
    x = torch.randn(2, 128, 6, 6) * torch.linspace(0.1, 4, 128).view(1, -1, 1, 1) + 0.3
    layer = QuantConv2d.from_module(nn.Conv2d(128, 64, 3, padding=1, groups=8), w_bits=4, a_bits=4,
                                    weight_init="minmax", act_scheme="dynamic", group_size=16)
    layer.freeze()
    with torch.no_grad():
        reference = layer(x)
        assert intexec.integer_support(layer) == "activation ranges per channel group with groups"
        assert not layer.set_execution("integer") and layer.execution == "fake"
        assert torch.equal(layer(x), reference)


def test_reconstruction_refines_the_branch_factors():
    """With ``lr_lowrank`` the factors learn from the reconstruction loss (lowering it where the rounding alone
    stops); with 0 they stay the SVD's."""
    results = {}
    for lr in (0.0, 1e-3):
        model = tiny_unet2d()
        options = {**FAST, **LEVERS, "reconstruction": "adaround", "weighting": "uniform", "iters": 40, "lr_lowrank": lr}
        report = quantize_model(model, GACConfig(**options), scheduler=DDIMScheduler(num_train_timesteps=1000),
                                show_progress=False)
        factors = {n: (l.lowrank_down.clone(), l.lowrank_up.clone()) for n, l in quant_layers(model).items()
                   if l.lowrank_up is not None}
        results[lr] = factors, report.units
    (fixed, fixed_units), (refined, refined_units) = results[0.0], results[1e-3]
    assert fixed and fixed.keys() == refined.keys()
    assert all(not torch.equal(fixed[n][0], refined[n][0]) and not torch.equal(fixed[n][1], refined[n][1])
               for n in fixed)
    assert not any(f.requires_grad for pair in refined.values() for f in pair)
    # the first unit with a branch has the same inputs in both runs
    first = next(i for i, u in enumerate(fixed_units) if any(n.startswith(u.name + ".") for n in fixed))
    assert refined_units[first].loss_after < fixed_units[first].loss_after
    with pytest.raises(ValueError, match="lr_lowrank must be a finite number >= 0"):
        GACConfig(lr_lowrank=-1e-3)


@pytest.mark.parametrize("options, message", [
    (dict(act_group_size=8, act_scheme="static"), "act_group_size .*act_scheme='dynamic'"),
    (dict(act_clipping=True, act_scheme="timestep"), "act_clipping .*act_scheme='dynamic'"),
    (dict(act_group_size=0), "act_group_size must be a positive integer"),
    (dict(act_clipping="yes"), "act_clipping must be True or False"),
    (dict(smoothing=1), "smoothing must be True or False"),
    (dict(lowrank_rank=1.5), "lowrank_rank must be an integer >= 0"),
    (dict(lowrank_rank=-1), "lowrank_rank must be"),
    (dict(lowrank_rank=True), "lowrank_rank must be"),
    (dict(lowrank_rank=4, lowrank_bits=4), "lowrank_bits must be 16 .* or 8 .*, got 4"),
    (dict(lowrank_rank=4, lowrank_bits=8, lr_lowrank=1e-3), "use lr_lowrank=0 with lowrank_bits=8"),
])
def test_lever_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        GACConfig(**options)


@pytest.fixture(scope="module")
def lever_checkpoint(tmp_path_factory):
    model = tiny_unet2d()
    quantize_model(model, GACConfig(**FAST, **LEVERS), scheduler=DDIMScheduler(num_train_timesteps=1000),
                   show_progress=False)
    folder = tmp_path_factory.mktemp("levers") / "w4a4"
    diffusers_gac.save_pretrained(model, folder)
    return model, folder


def _out(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(2, 1, 8, 8, generator=g), torch.tensor([10, 900]), class_labels=torch.tensor([1, 2])).sample


def test_a_lever_checkpoint_reloads_identically(lever_checkpoint):
    model, folder = lever_checkpoint
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["format_version"] == 2 and config["smoothing"] and config["act_group_size"] == 8
    ranked = {n: s["rank"] for n, s in config["layout"]["layers"].items() if "rank" in s}
    assert ranked and all(r == 2 for r in ranked.values())
    state = load_file(folder / WEIGHTS)
    for name in ranked:
        assert state[f"{name}.lowrank_down"].dtype == torch.float16 and state[f"{name}.smooth"].dtype == torch.float16
    assert any(k.endswith("input_quantizer.clip") for k in state)
    loaded = UNet2DModel.from_pretrained(folder)
    set_execution(model, "fake"), set_execution(loaded, "fake")
    assert torch.equal(_out(loaded), _out(model))
    chosen = [l.input_quantizer.clip for l in quant_layers(loaded).values() if isinstance(l.input_quantizer, ActQuantizer)]
    assert chosen and all(0 < float(c) <= 1 for c in chosen)


@pytest.mark.parametrize("edit, message", [
    (lambda s, n: s.__setitem__(f"{n}.smooth", -s[f"{n}.smooth"]), "scales <= 0"),
    (lambda s, n: s.__setitem__(f"{n}.lowrank_up", s[f"{n}.lowrank_up"] * float("nan")), "non-finite"),
    (lambda s, n: s.__setitem__(f"{n}.lowrank_down", s[f"{n}.lowrank_down"][:1]), "has shape"),
    (lambda s, n: s.pop(f"{n}.smooth"), "missing from the weights"),
    (lambda s, n: s.__setitem__(f"{n}.input_quantizer.clip", torch.tensor(1.5)), "clipping ratio lies in"),
    (lambda s, n: s.__setitem__(f"{n}.lowrank_up", s[f"{n}.lowrank_up"].to(torch.int32)), "it is floating point"),
])
def test_a_damaged_lever_tensor_is_refused(lever_checkpoint, tmp_path, edit, message):
    assert_damage_refused(lever_checkpoint[1], tmp_path, edit, message)


def assert_damage_refused(folder, tmp_path, edit, message, name="down_blocks.0.resnets.0.conv2"):
    """A copy of the checkpoint in ``folder`` with layer ``name``'s tensors changed by ``edit`` refuses to load."""
    state = load_file(folder / WEIGHTS)
    assert f"{name}.lowrank_up" in state
    edit(state, name)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text((folder / "config.json").read_text())
    save_file(state, damaged / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message):
        UNet2DModel.from_pretrained(damaged)


def test_dequantize_folds_the_levers_back(lever_checkpoint):
    _, folder = lever_checkpoint
    loaded = UNet2DModel.from_pretrained(folder)
    set_execution(loaded, "fake")
    for q in loaded.modules():
        if isinstance(q, ActQuantizer):
            q.enabled = False
    expected = _out(loaded)  # quantized weights, float inputs
    plain = dequantize_model(loaded)
    assert not quant_layers(plain)
    assert torch.allclose(_out(plain), expected, atol=1e-4)


def test_resume_state_carries_the_changed_weight_and_the_levers():
    """A resumed calibration restores a finished unit from this state: the weight the levers changed must be in it."""
    model = tiny_unet2d()
    convert_model(model, GACConfig(**FAST, **LEVERS))
    block = model.down_blocks[0].resnets[0]
    layers = {f"down_blocks.0.resnets.0.{n}": l for n, l in block.named_modules() if n in ("conv1", "conv2")}
    state = unit_state(Unit("down_blocks.0.resnets.0", block, layers))
    assert {"conv2.weight", "conv2.smooth", "conv2.lowrank_down", "conv2.lowrank_up", "conv2.input_quantizer.clip",
            "conv1.weight"} <= set(state)
    assert "conv_in.weight" not in state


def test_the_command_line_takes_the_levers(tmp_path, capsys):
    out = tmp_path / "levers"
    assert main(["calibrate", "--output", str(out), "--reconstruction", "none", "--eval-samples", "0", "--steps", "3",
                 "--quiet", "--act-group-size", "16", "--act-clipping", "--smoothing", "--lowrank-rank", "2"]) == 0
    config = json.loads((out / "report.json").read_text())["calibration"]["config"]
    assert (config["act_group_size"], config["act_clipping"], config["smoothing"], config["lowrank_rank"]) == (
        16, True, True, 2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate", "--output", str(tmp_path / "x"), "--lowrank-rank", "1.5"])
    assert exit_.value.code == 2
    assert "--lowrank-rank: must be an integer >= 0 or a fraction in (0, 1), got '1.5'" in capsys.readouterr().err
