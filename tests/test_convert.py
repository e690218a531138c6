import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch import nn
from tiny_models import example_call, tiny_dit, tiny_transformer2d, tiny_unet2d, tiny_unet2d_condition

from diffusers_gac.calibration.data import CalibrationData
from diffusers_gac.calibration.reconstruction import reconstruct_model
from diffusers_gac.calibration.units import find_units
from diffusers_gac.config import GACConfig
from diffusers_gac.quant.attention import QuantAttnProcessor
from diffusers_gac.quant.convert import (
    act_quantizers,
    convert_model,
    float_layers,
    freeze_model,
    quant_layers,
    quantization_disabled,
    set_quant_state,
    skip_join_splits,
)
from diffusers_gac.quant.quantizers import SplitActQuantizer

FAMILIES = {
    "unet2d": tiny_unet2d,
    "unet2d_condition": tiny_unet2d_condition,
    "dit": tiny_dit,
    "transformer2d": tiny_transformer2d,
}


def _float_layers(model):
    return {n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)}


def _out(model, call):
    return model(**call, return_dict=False)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_conv_and_linear_is_converted(family):
    model = FAMILIES[family]()
    before = _float_layers(model)
    report = convert_model(model, GACConfig(w_bits=4, a_bits=4))
    assert set(report.layers) == before
    assert not _float_layers(model)
    assert set(quant_layers(model)) == before


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_equals_float_model_with_quantization_off(family):
    model = FAMILIES[family]()
    call = example_call(model)
    with torch.no_grad():
        expected = _out(model, call)
        convert_model(model, GACConfig(w_bits=4, a_bits=8, act_scheme="dynamic", attn_bits=8))
        with quantization_disabled(model):
            same = _out(model, call)
        quantized = _out(model, call)
    assert torch.allclose(same, expected, atol=1e-5)
    assert torch.isfinite(quantized).all() and not torch.allclose(quantized, expected, atol=1e-5)


def test_special_layers_get_special_bits_or_stay_float():
    model = tiny_unet2d()
    report = convert_model(model, GACConfig(w_bits=4, a_bits=4, special_bits=8))
    for name in ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"):
        assert report.layers[name]["w_bits"] == 8 and report.layers[name]["a_bits"] == 8
    assert report.layers["down_blocks.0.resnets.0.conv1"]["w_bits"] == 4

    model = tiny_unet2d()
    convert_model(model, GACConfig(w_bits=4, a_bits=4, special_bits=None))
    assert {"conv_in", "conv_out", "time_embedding.linear_1"} <= set(float_layers(model))
    assert type(model.conv_in) is nn.Conv2d


def test_dit_special_layers_are_found():
    model = tiny_dit()
    convert_model(model, GACConfig(special_bits=None))
    skipped = float_layers(model)
    assert "pos_embed.proj" in skipped and "proj_out_2" in skipped
    assert any("timestep_embedder" in n for n in skipped)


def test_modules_to_not_convert_by_name_or_prefix():
    model = tiny_unet2d()
    report = convert_model(model, GACConfig(modules_to_not_convert=["down_blocks.1", "up_blocks.0.resnets.0.conv1"]))
    assert all(not n.startswith("down_blocks.1.") for n in report.layers)
    assert type(model.up_blocks[0].resnets[0].conv1) is nn.Conv2d
    assert "down_blocks.1.attentions.0.to_q" in float_layers(model)


@pytest.mark.parametrize("family", ["unet2d", "unet2d_condition"])
def test_split_points_match_the_concatenations_the_model_makes(family):
    model = FAMILIES[family]()
    splits = skip_join_splits(model)
    assert splits, "up blocks with skip joins must be found"
    seen = {}
    for j, block in enumerate(model.up_blocks):
        def hook(mod, args, kwargs, j=j):
            res = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            for i in range(len(mod.resnets)):
                seen[f"up_blocks.{j}.resnets.{i}.conv_shortcut"] = mod.resnets[i].in_channels - res[-(i + 1)].shape[1]
        block.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        _out(model, example_call(model))
    for name, split in splits.items():
        assert seen[name] == split
    convert_model(model, GACConfig())
    for name, split in splits.items():
        q = model.get_submodule(name).input_quantizer
        assert isinstance(q, SplitActQuantizer) and int(q.split) == split


def test_attention_matmuls_are_quantized_through_a_processor():
    model = tiny_unet2d_condition()
    report = convert_model(model, GACConfig(attn_bits=8, act_scheme="dynamic"))
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(report.attention) == len(attns) > 0
    assert all(isinstance(a.processor, QuantAttnProcessor) for a in attns)
    assert all(hasattr(a, "probs_quantizer") for a in attns)
    keys = model.state_dict().keys()
    assert any(k.endswith("probs_quantizer.scale") for k in keys)


@pytest.mark.parametrize("family", FAMILIES)
def test_units_cover_every_quantized_layer_in_execution_order(family):
    model = FAMILIES[family]()
    convert_model(model, GACConfig())
    set_quant_state(model, weights=False, acts=False)
    units = find_units(model, example_call(model, batch=2))
    covered = [n for u in units for n in u.layers]
    assert sorted(covered) == sorted(quant_layers(model))
    names = [u.name for u in units]
    if family == "unet2d":
        assert names.index("conv_in") < names.index("down_blocks.0.resnets.0") < names.index("mid_block.resnets.0")
        assert names.index("up_blocks.1.resnets.1") < names.index("conv_out")
        assert "down_blocks.1.attentions.0" in names  # an attention module is one unit (a QuantAttention once converted)


def _calibration_data(model, n=24):
    calls = [example_call(model, batch=n // 3, seed=s) for s in range(3)]
    inputs = {k: torch.cat([c[k] for c in calls]) for k in calls[0]}
    return CalibrationData(inputs=inputs, step_index=torch.arange(n) % 3, static={})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", ["static", "timestep", "dynamic"])
def test_calibration_runs_on_every_family_and_scheme(family, scheme):
    model = FAMILIES[family]()
    data = _calibration_data(model)
    call = data.batch(torch.arange(4))
    with torch.no_grad():
        expected = _out(model, call)
    config = GACConfig(w_bits=4, a_bits=8, act_scheme=scheme, act_timestep_groups=3, attn_bits=8, iters=3,
                       batch_size=8)
    layout = convert_model(model, config)
    reports = reconstruct_model(model, data, config, show_progress=False)
    freeze_model(model)
    assert sum(r.layers for r in reports) == len(layout.layers) == len(quant_layers(model))
    assert all(layer.frozen for layer in quant_layers(model).values())
    # every activation quantizer has the scheme's ranges, observed on the data (probabilities: a fixed [0, 1] grid)
    expected_groups = {"static": 1, "timestep": 3, "dynamic": 0}[scheme]
    for q in act_quantizers(model):
        if q.fixed_range:
            assert q.groups == 1 and q.scale.item() == pytest.approx(1 / 255)
        else:
            assert q.groups == expected_groups and not torch.any(q.scale == 1.0)
    with torch.no_grad():
        out = _out(model, call)
    relative = ((out - expected).pow(2).mean() / expected.pow(2).mean()).item()
    assert 1e-7 < relative < 0.05  # quantized (not the float model), and close to it at W4A8
