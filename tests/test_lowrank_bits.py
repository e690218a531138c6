"""8-bit low-rank factors (``lowrank_bits=8``): the split stays exact, the codes are what a checkpoint stores (int8,
half the bytes of float16 factors), a reloaded model computes what was saved, and a damaged code or scale is refused.
A config without levers is written as releases before the levers wrote it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from safetensors.torch import load_file
from test_levers import FAST, LEVERS, WEIGHTS, _layers, _out, _quantized, assert_damage_refused
from tiny_models import tiny_unet2d

import diffusers_gac
from diffusers_gac import GACConfig, quantize_model
from diffusers_gac.calibration.resume import unit_state
from diffusers_gac.calibration.units import Unit
from diffusers_gac.cli import main
from diffusers_gac.quant import levers
from diffusers_gac.quant.convert import convert_model, quant_layers, set_execution


@pytest.mark.parametrize("case", range(3), ids=["conv3x3", "linear", "split-1x1"])
def test_8bit_factors_are_codes_and_the_split_stays_exact(case):
    module, _, extra = _layers()[case]
    smooth = torch.rand(module.weight.shape[1], generator=torch.Generator().manual_seed(1)) * 4 + 0.1
    coded, plain = (_quantized(module, smoothing=True, rank=3, rank_bits=bits, **extra) for bits in (8, 16))
    for layer in (coded, plain):
        levers.set_levers(layer, module.weight.detach(), smooth)
    for codes in (coded.lowrank_down, coded.lowrank_up):  # int8 in memory: a quarter of float32 factors' bytes
        assert codes.dtype == torch.int8 and int(codes.abs().max()) == levers.FACTOR_CODE_MAX
    for scale in (coded.lowrank_down_scale, coded.lowrank_up_scale):
        assert (scale > 0).all() and torch.equal(scale.half().float(), scale)
    # the residual absorbs the codes' rounding: branch + residual is still the smoothed weight
    scaled = module.weight.detach() * smooth.view(1, -1, *([1] * (module.weight.dim() - 2)))
    assert torch.allclose(coded.weight + levers.lowrank_weight(coded), scaled, atol=1e-4)
    # and the coded branch is the float one up to 8-bit rounding
    error = (levers.lowrank_weight(coded) - levers.lowrank_weight(plain)).norm() / levers.lowrank_weight(plain).norm()
    assert 0 < error < 0.02


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for bits in (16, 8):
        model = tiny_unet2d()
        quantize_model(model, GACConfig(**FAST, **LEVERS, lowrank_bits=bits),
                       scheduler=DDIMScheduler(num_train_timesteps=1000), show_progress=False)
        folder = tmp_path_factory.mktemp("lowrank") / f"factors{bits}"
        diffusers_gac.save_pretrained(model, folder)
        out[bits] = model, folder
    return out


def test_an_8bit_branch_checkpoint_stores_int8_codes_and_reloads_identically(checkpoints):
    model, folder = checkpoints[8]
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["format_version"] == 2 and config["lowrank_bits"] == 8
    state = load_file(folder / WEIGHTS)
    ranked = [n for n, s in config["layout"]["layers"].items() if "rank" in s]
    assert ranked
    for name in ranked:
        assert state[f"{name}.lowrank_down"].dtype == state[f"{name}.lowrank_up"].dtype == torch.int8
        assert state[f"{name}.lowrank_up_scale"].dtype == torch.float16
    branch_bytes = {bits: sum(t.numel() * t.element_size() for k, t in load_file(f / WEIGHTS).items()
                              if ".lowrank_" in k) for bits, (_, f) in checkpoints.items()}
    assert branch_bytes[8] < 0.75 * branch_bytes[16]  # half the factor bytes, plus the row scales
    loaded = UNet2DModel.from_pretrained(folder)
    assert all(l.lowrank_up_scale is not None for n, l in quant_layers(loaded).items() if n in ranked)
    for execution in ("fake", "integer"):
        set_execution(model, execution), set_execution(loaded, execution)
        assert torch.equal(_out(loaded), _out(model))
    # loaded in bfloat16 the codes stay int8 (a dtype cast moves floating-point tensors only)
    half = UNet2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert all(l.lowrank_up.dtype == torch.int8 for n, l in quant_layers(half).items() if n in ranked)
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 1, 8, 8, generator=g), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        reference, result = model(x, t, class_labels=c).sample, half(x.bfloat16(), t, class_labels=c).sample.float()
    # bfloat16 inputs flip some 4-bit activation codes of this tiny model: close, not equal
    assert ((result - reference).norm() / reference.norm()).item() < 0.25


@pytest.mark.parametrize("edit, message", [
    (lambda s, n: s.__setitem__(f"{n}.lowrank_up", s[f"{n}.lowrank_up"].float() + 0.5), "outside the 8-bit factor"),
    (lambda s, n: s.__setitem__(f"{n}.lowrank_down", s[f"{n}.lowrank_down"].float() * 2), "outside the 8-bit factor"),
    (lambda s, n: s.__setitem__(f"{n}.lowrank_up", torch.full_like(s[f"{n}.lowrank_up"], -128)),
     "outside the 8-bit factor"),
    (lambda s, n: s.__setitem__(f"{n}.lowrank_up", s[f"{n}.lowrank_up"].to(torch.int32)), "int8 or floating point"),
    (lambda s, n: s.__setitem__(f"{n}.lowrank_down_scale", -s[f"{n}.lowrank_down_scale"]), "scales <= 0"),
    (lambda s, n: s.pop(f"{n}.lowrank_up_scale"), "missing from the weights"),
])
def test_a_damaged_8bit_factor_is_refused(checkpoints, tmp_path, edit, message):
    assert_damage_refused(checkpoints[8][1], tmp_path, edit, message)


def test_the_8bit_scales_are_part_of_a_resumed_unit():
    model = tiny_unet2d()
    convert_model(model, GACConfig(**FAST, **LEVERS, lowrank_bits=8))
    block = model.down_blocks[0].resnets[0]
    layers = {f"down_blocks.0.resnets.0.{n}": l for n, l in block.named_modules() if n in ("conv1", "conv2")}
    state = unit_state(Unit("down_blocks.0.resnets.0", block, layers))
    assert {"conv2.lowrank_down", "conv2.lowrank_up", "conv2.lowrank_down_scale", "conv2.lowrank_up_scale"} <= set(state)


def test_a_config_without_levers_is_written_as_before_them():
    plain = GACConfig().to_dict()
    assert plain["format_version"] == 1 and not set(plain) & {"act_group_size", "smoothing", "lowrank_rank",
                                                             "lowrank_bits"}
    assert GACConfig.from_dict(copy.deepcopy(plain)).options() == GACConfig().options()
    lever = GACConfig(lowrank_rank=4, lowrank_bits=8).to_dict()
    assert lever["format_version"] == 2 and lever["lowrank_bits"] == 8 and lever["act_group_size"] is None
    assert GACConfig.from_dict(lever).lowrank_bits == 8


def test_the_command_line_takes_lowrank_bits(tmp_path, capsys):
    out = tmp_path / "coded"
    assert main(["calibrate", "--output", str(out), "--reconstruction", "none", "--eval-samples", "0", "--steps", "3",
                 "--quiet", "--lowrank-rank", "2", "--lowrank-bits", "8"]) == 0
    config = json.loads((out / "report.json").read_text())["calibration"]["config"]
    assert (config["lowrank_rank"], config["lowrank_bits"]) == (2, 8)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["calibrate", "--output", str(tmp_path / "x"), "--lowrank-bits", "4"])
    assert "--lowrank-bits: invalid choice: 4" in capsys.readouterr().err
