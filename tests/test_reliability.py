"""Bad input and damaged checkpoints (issue 13): every case gives a clear error, nothing is silent, nothing is
unpickled. docs/reliability.md lists these cases and what each gives; keep the two in step."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNet2DModel
from safetensors.torch import load_file, save_file
from tiny_models import tiny_unet2d, tiny_unet2d_condition

import diffusers_gac
from diffusers_gac import CalibrationData, CalibrationInputs, GACConfig, quantize_model
from diffusers_gac.cli import main
from diffusers_gac.quant.checkpoint import CheckpointError, TensorSpec, check_checkpoint, check_tensor
from diffusers_gac.quant.convert import quant_layers, requantize
from diffusers_gac.quant.quantizers import ActQuantizer
from diffusers_gac.saving import replace_folder_atomically
from diffusers_gac.sampling import prompt_embeds_sampler

# round-to-nearest, static activation ranges and quantized attention: every kind of quantized tensor, in seconds
FAST = dict(reconstruction="none", calib_num_inference_steps=3, calib_num_timesteps=2, calib_samples_per_timestep=2,
            batch_size=4, act_scheme="static", attn_bits=8, weight_init="minmax")
WEIGHTS = "diffusion_pytorch_model.safetensors"
SPLIT_LAYER = "up_blocks.0.resnets.0.conv_shortcut"  # a skip-join shortcut: split input quantizer
ATTENTION = "mid_block.attentions.0"


def _out(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(2, 1, 8, 8, generator=g), torch.tensor([10, 900]), class_labels=torch.tensor([1, 2])).sample


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_unet2d()
    quantize_model(model, GACConfig(**FAST), scheduler=DDIMScheduler(num_train_timesteps=1000), show_progress=False)
    return model


@pytest.fixture(scope="module")
def checkpoint(calibrated, tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint") / "w4a4"
    diffusers_gac.save_pretrained(calibrated, folder)
    return folder


def damaged(checkpoint: Path, tmp_path: Path, config=None, tensors=None) -> Path:
    """A copy of ``checkpoint`` with its quantization config and/or its tensors edited in place by the callables."""
    folder = tmp_path / "damaged"
    shutil.copytree(checkpoint, folder)
    if config is not None:
        data = json.loads((folder / "config.json").read_text())
        config(data)
        (folder / "config.json").write_text(json.dumps(data))
    if tensors is not None:
        state = load_file(folder / WEIGHTS)
        tensors(state)
        save_file(state, folder / WEIGHTS, metadata={"format": "pt"})
    return folder


def _layers(d):
    return d["quantization_config"]["layout"]["layers"]


def _set(key, fn):
    def edit(state):
        state[key] = fn(state[key])
    return edit


# -- 1. no pickle on a load path ----------------------------------------------------------------------------------

def test_calibration_data_never_unpickles_a_sidecar(tmp_path):
    """A .static.pt written by an older release is a pickle: loading it could run code. It is refused, unread."""
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "calib.safetensors"
    save_file({"inputs.sample": torch.zeros(2, 1), "inputs.timestep": torch.zeros(2), "step_index": torch.zeros(2)},
              str(path), metadata={"static": "['x']"})
    torch.save({"x": Payload()}, str(path) + ".static.pt")
    with pytest.raises(ValueError, match="pickle"):
        CalibrationData.load(path)
    assert not marker.exists()


def test_calibration_data_saves_one_safetensors_file_with_json(tmp_path):
    data = CalibrationData(inputs={"sample": torch.randn(3, 2), "timestep": torch.arange(3)}, step_index=torch.arange(3),
                           static={"cross_attention_kwargs": {"scale": 0.5}, "flag": True})
    data.save(tmp_path / "calib.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["calib.safetensors"]
    assert CalibrationData.load(tmp_path / "calib.safetensors").static == data.static
    with pytest.raises(ValueError, match="JSON values"):
        CalibrationData(inputs=data.inputs, step_index=data.step_index, static={"f": object()}).save(tmp_path / "x")


def test_no_unpickling_call_in_the_package():
    package = Path(diffusers_gac.__file__).parent
    offenders = [f"{p.relative_to(package)}:{i}" for p in package.rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "torch.load(" in line or "pickle" in line.split("#")[0] and "import" in line]
    assert offenders == []


# -- 2. a checkpoint whose config.json and tensors disagree never loads --------------------------------------------

def test_the_intact_checkpoint_loads_identically(calibrated, checkpoint):
    assert torch.equal(_out(UNet2DModel.from_pretrained(checkpoint)), _out(calibrated))


def test_checkpoints_store_zero_points_as_uint8_and_no_empty_tensors(tmp_path):
    """The compact form: frozen layers save zero points as uint8 and their biases and weight scales as float16 (both
    exact) and dynamic quantizers save nothing; a checkpoint of the earlier form (float32 zero points, scales and
    biases, empty dynamic tensors) loads to the same outputs."""
    model = tiny_unet2d()
    quantize_model(model, GACConfig(**{**FAST, "act_scheme": "dynamic", "attn_bits": None}),
                   scheduler=DDIMScheduler(num_train_timesteps=1000), show_progress=False)
    diffusers_gac.save_pretrained(model, tmp_path / "new")
    state = load_file(tmp_path / "new" / WEIGHTS)
    zero_points = {k: t for k, t in state.items() if k.endswith("zero_point")}
    assert zero_points and all(t.dtype == torch.uint8 for t in zero_points.values())
    halves = {k: t for k, t in state.items() if t.dtype == torch.float16}
    assert set(halves) == {f"{name}.{k}" for name, layer in quant_layers(model).items() for k in layer.float16_tensors()}
    assert all(t.numel() for t in state.values())
    assert not any(k.endswith("input_quantizer.scale") for k in state)  # all dynamic here
    expected = _out(model)
    loaded = UNet2DModel.from_pretrained(tmp_path / "new")
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])  # the unsaved empty ranges too
    assert torch.equal(_out(loaded), expected)
    assert torch.equal(_out(UNet2DModel.from_pretrained(tmp_path / "new", device_map="cpu")), expected)

    def earlier_form(s):
        s.update({k: t.float() for k, t in {**zero_points, **halves}.items()})
        for name, module in model.named_modules():
            if isinstance(module, ActQuantizer):
                s[f"{name}.scale"], s[f"{name}.zero_point"] = torch.ones(0), torch.zeros(0)
    older = damaged(tmp_path / "new", tmp_path, tensors=earlier_form)
    assert load_file(older / WEIGHTS)["conv_in.input_quantizer.scale"].numel() == 0
    assert load_file(older / WEIGHTS)["conv_in.weight_quantizer.scale"].dtype == torch.float32
    assert torch.equal(_out(UNet2DModel.from_pretrained(older)), expected)


DAMAGE = {
    "top-level w_bits edited 4 -> 8": (
        dict(config=lambda d: d["quantization_config"].update(w_bits=8)), "contradicts its own layout"),
    "top-level a_bits edited 4 -> 8": (
        dict(config=lambda d: d["quantization_config"].update(a_bits=8)), "a_bits is 8"),
    "special_bits edited 8 -> 6": (
        dict(config=lambda d: d["quantization_config"].update(special_bits=6)), "contradicts its own layout"),
    "a layer removed from the layout": (
        dict(config=lambda d: _layers(d).pop("down_blocks.0.resnets.0.conv1")),
        "belong to no layer of the layout: down_blocks.0.resnets.0.conv1"),
    "a layer's a_bits nulled": (
        dict(config=lambda d: _layers(d)["down_blocks.0.resnets.0.conv1"].update(a_bits=None)), "a_bits"),
    "a layer's split nulled": (
        dict(config=lambda d: _layers(d)[SPLIT_LAYER].update(split=None)), "missing from the weights"),
    "a layer's split changed": (
        dict(config=lambda d: _layers(d)[SPLIT_LAYER].update(split=4)), "input_quantizer.split is 16 but the layout says 4"),
    "a layer of the layout the model lacks": (
        dict(config=lambda d: _layers(d).update({"no.such.conv": {"w_bits": 4, "a_bits": 4, "split": None}})),
        "'no.such.conv', which UNet2DModel does not have"),
    "a malformed layer entry": (
        dict(config=lambda d: _layers(d).update(conv_in={"w_bits": 8})), "must be a dict with the keys"),
    "an unknown option in config.json": (
        dict(config=lambda d: d["quantization_config"].update(w_bit=3)), "'w_bit' \\(did you mean 'w_bits'\\?\\)"),
    "a newer format_version": (
        dict(config=lambda d: d["quantization_config"].update(format_version=99)), "upgrade the package"),
    "act_scheme edited static -> dynamic": (
        dict(config=lambda d: d["quantization_config"].update(act_scheme="dynamic")), "has shape \\(1,\\) but the config"),
    "quantization_config deleted": (
        dict(config=lambda d: d.pop("quantization_config")), "no quantization_config"),
    "a scale stored as int64": (
        dict(tensors=_set("conv_in.weight_quantizer.scale", lambda t: t.long())), "stored as torch.int64"),
    "a NaN scale": (
        dict(tensors=_set("conv_in.weight_quantizer.scale", lambda t: t.index_fill(0, torch.tensor([0]), math.nan))),
        "non-finite"),
    "an infinite activation scale": (
        dict(tensors=_set("conv_in.input_quantizer.scale", lambda t: t.fill_(math.inf))), "non-finite"),
    "a zero scale": (
        dict(tensors=_set("down_blocks.0.resnets.0.conv1.weight_quantizer.scale", torch.zeros_like)), "scales <= 0"),
    "a zero point out of range": (
        dict(tensors=_set("conv_in.weight_quantizer.zero_point", lambda t: t.float() + 300)), "zero points outside"),
    "a zero point stored as int64": (
        dict(tensors=_set("conv_in.weight_quantizer.zero_point", lambda t: t.long())), "is uint8 or floating point"),
    "a fractional zero point": (
        dict(tensors=_set("conv_in.input_quantizer.zero_point", lambda t: t + 0.5)), "zero points outside"),
    "packed weights stored as float": (
        dict(tensors=_set("conv_in.packed_weight", lambda t: t.float())), "packed weight codes are torch.uint8"),
    "packed weights of the wrong shape": (
        dict(tensors=_set("conv_in.packed_weight", lambda t: t[:, :-1].contiguous())), "has shape"),
    "a quantized tensor missing": (
        dict(tensors=lambda s: s.pop("conv_in.weight_quantizer.scale")),
        "missing from the weights: conv_in.weight_quantizer.scale"),
    "a softmax quantizer's fixed step changed": (
        dict(tensors=_set(f"{ATTENTION}.probs_quantizer.scale", lambda t: t * 2)), "fixed step"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_never_loads(case, checkpoint, tmp_path):
    edits, message = DAMAGE[case]
    folder = damaged(checkpoint, tmp_path, **edits)
    with pytest.raises(ValueError, match=message):
        UNet2DModel.from_pretrained(folder)


def test_an_unknown_calibration_option_of_a_checkpoint_is_reported_not_fatal(calibrated, checkpoint, tmp_path):
    """Calibration options only document how a checkpoint was made; one this release does not know (another release
    wrote it) is logged and dropped, while unknown format options stop the load (above)."""
    folder = damaged(checkpoint, tmp_path, config=lambda d: d["quantization_config"]["calibration"].update(newer=1))
    assert torch.equal(_out(UNet2DModel.from_pretrained(folder)), _out(calibrated))
    with pytest.raises(ValueError, match="'newer'"):
        GACConfig.from_dict({"calibration": {"newer": 1}})


def test_the_model_card_cannot_advertise_other_bits(checkpoint, tmp_path):
    """The card reads the top-level bits; a checkpoint whose top level disagrees with its layers never gets that far."""
    folder = damaged(checkpoint, tmp_path, config=lambda d: d["quantization_config"].update(w_bits=8))
    with pytest.raises(ValueError, match="w_bits is 8"):
        UNet2DModel.from_pretrained(folder)


def test_a_damaged_calibration_report_does_not_block_loading(calibrated, checkpoint, tmp_path):
    folder = damaged(checkpoint, tmp_path)
    (folder / "gac_calibration.json").write_text("{not json")
    model = UNet2DModel.from_pretrained(folder)
    assert model.hf_quantizer.calibration_report is None and torch.equal(_out(model), _out(calibrated))


def test_check_checkpoint_names_every_problem(checkpoint):
    config = GACConfig.from_dict(json.loads((checkpoint / "config.json").read_text())["quantization_config"])
    model = tiny_unet2d()
    requantize(model, config)
    tensors = load_file(checkpoint / WEIGHTS)
    check_checkpoint(model, config, tensors)  # the intact checkpoint passes
    tensors["conv_in.weight_quantizer.scale"] = -tensors["conv_in.weight_quantizer.scale"]
    tensors["conv_out.packed_weight"] = tensors["conv_out.packed_weight"].to(torch.int32)
    del tensors["conv_in.input_quantizer.zero_point"]
    tensors["extra.packed_weight"] = torch.zeros(1, dtype=torch.uint8)
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(model, config, tensors)
    assert len(err.value.problems) == 4
    for name in ("conv_in.weight_quantizer.scale", "conv_out.packed_weight", "conv_in.input_quantizer.zero_point",
                 "extra.packed_weight"):
        assert name in str(err.value)


def test_codes_beyond_the_bit_width_are_refused():
    spec = TensorSpec("codes", (1, 2), bits=3, num_codes=3)
    assert check_tensor("x.packed_weight", torch.tensor([[0x75, 0x01]], dtype=torch.uint8), spec) == []
    assert "outside the 3-bit range" in check_tensor("x.packed_weight", torch.tensor([[0x79, 0]], dtype=torch.uint8),
                                                     spec)[0]


def test_split_quantizer_state_loads_exactly_in_half_precision(checkpoint):
    """Every quantizer tensor is quantizer state, the split halves' included: never cast to torch_dtype."""
    model = UNet2DModel.from_pretrained(checkpoint, torch_dtype=torch.float16)
    quantizer = model.get_submodule(SPLIT_LAYER).input_quantizer
    assert quantizer.first.scale.dtype == quantizer.second.zero_point.dtype == torch.float32


def test_activation_scales_are_stored_positive(calibrated):
    from diffusers_gac.quant.convert import act_quantizers

    assert all((q.scale > 0).all() for q in act_quantizers(calibrated))


# -- 3. options -----------------------------------------------------------------------------------------------------

OPTIONS = {
    "a positional argument": (lambda: GACConfig(8), TypeError, "keyword arguments only, e.g. GACConfig\\(w_bits=8\\)"),
    "a typo in from_dict": (lambda: GACConfig.from_dict({"w_bit": 3}), ValueError, "'w_bit' \\(did you mean 'w_bits'"),
    "a typo among the calibration options": (lambda: GACConfig.from_dict({"calibration": {"lr_actt": 1e-3}}),
                                             ValueError, "did you mean 'lr_act'"),
    "a non-boolean boolean": (lambda: GACConfig(split_skip_inputs="yes"), ValueError, "split_skip_inputs must be True"),
    "an integer for a boolean": (lambda: GACConfig(split_skip_inputs=1), ValueError, "split_skip_inputs must be True"),
    "an infinite learning rate": (lambda: GACConfig(lr_act=math.inf), ValueError, "lr_act must be a positive finite"),
    "a NaN learning rate": (lambda: GACConfig(lr_round=math.nan), ValueError, "lr_round must be a positive finite"),
    "a NaN regulariser weight": (lambda: GACConfig(round_reg_weight=math.nan), ValueError, "round_reg_weight must be"),
    "a boolean regulariser weight": (lambda: GACConfig(round_reg_weight=True), ValueError, "round_reg_weight must be"),
    "an infinite guidance scale": (lambda: GACConfig(calib_guidance_scale=math.inf), ValueError, "calib_guidance_scale"),
    "an infinite gradient-matching weight": (lambda: GACConfig(gac_gm_weight=math.inf), ValueError, "gac_gm_weight"),
    "an infinite logit bound": (lambda: GACConfig(gac_max_logit=math.inf), ValueError, "gac_max_logit"),
    "a negative seed": (lambda: GACConfig(seed=-1), ValueError, "seed must be an integer from 0 to 2\\*\\*63 - 1"),
    "a huge seed": (lambda: GACConfig(seed=2**64), ValueError, "seed must be an integer from 0"),
    "a boolean seed": (lambda: GACConfig(seed=True), ValueError, "seed must be an integer"),
    "learned weights without reconstruction": (
        lambda: GACConfig(reconstruction="none", weighting="gradient_aligned"), ValueError, "reconstruction='none'"),
    "Fisher weights without reconstruction": (
        lambda: GACConfig(reconstruction="none", weighting="fisher"), ValueError, "weighting='fisher'"),
    "another quant_method": (lambda: GACConfig(quant_method="bitsandbytes"), ValueError, "quant_method must be 'gac'"),
    "an empty module name": (lambda: GACConfig(modules_to_not_convert=[""]), ValueError, "modules_to_not_convert"),
}


@pytest.mark.parametrize("case", list(OPTIONS))
def test_a_bad_option_is_named(case):
    build, error, message = OPTIONS[case]
    with pytest.raises(error, match=message):
        build()


def test_the_options_still_take_good_values():
    config = GACConfig(w_bits=3, split_skip_inputs=False, lr_act=1e-3, seed=2**63 - 1, calib_guidance_scale=7)
    assert GACConfig.from_dict(config.to_dict()) == config
    assert GACConfig.from_dict(config.options()) == config


def test_good_options_still_calibrate_while_loading(tmp_path):
    tiny_unet2d().save_pretrained(tmp_path)
    model = UNet2DModel.from_pretrained(tmp_path, quantization_config=GACConfig(modules_to_not_convert=["mid_block"],
                                                                               **FAST))
    assert model.is_quantized and type(model.mid_block.resnets[0].conv1) is torch.nn.Conv2d


def test_modules_to_not_convert_naming_no_module(tmp_path):
    tiny_unet2d().save_pretrained(tmp_path)
    config = GACConfig(modules_to_not_convert=["mid_blok"], **FAST)
    with pytest.raises(ValueError, match="modules_to_not_convert names no module of UNet2DModel: 'mid_blok'"):
        UNet2DModel.from_pretrained(tmp_path, quantization_config=config)
    with pytest.raises(ValueError, match="'mid_blok'"):
        quantize_model(tiny_unet2d(), config, scheduler=DDIMScheduler(), show_progress=False)


# -- 4. what cannot be calibrated is refused up front ---------------------------------------------------------------

@pytest.fixture
def never_calibrates(monkeypatch):
    """Fail the test if the weights load or calibration starts: the refusal must come before."""
    from diffusers_gac import GACQuantizer
    from diffusers_gac.calibration import flow

    def fail(*args, **kwargs):
        raise AssertionError("the weights loaded or calibration started before the refusal")

    monkeypatch.setattr(GACQuantizer, "_process_model_after_weight_loading", fail)
    monkeypatch.setattr(flow, "record_calibration_data", fail)


def test_a_model_that_is_no_denoiser(tmp_path, never_calibrates):
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=8).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="AutoencoderKL is not a diffusion denoiser"):
        AutoencoderKL.from_pretrained(tmp_path, quantization_config=GACConfig(**FAST))
    with pytest.raises(ValueError, match="not a diffusion denoiser"):
        quantize_model(AutoencoderKL.from_pretrained(tmp_path), GACConfig(**FAST), scheduler=DDIMScheduler())


def test_prompt_embeddings_of_the_wrong_width(tmp_path, never_calibrates):
    tiny_unet2d_condition(cross_attention_dim=12).save_pretrained(tmp_path)
    inputs = CalibrationInputs(prompt_embeds=torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="width 7 but UNet2DConditionModel takes prompt embeddings of width 12"):
        UNet2DConditionModel.from_pretrained(tmp_path, quantization_config=GACConfig(calibration_inputs=inputs, **FAST))
    with pytest.raises(ValueError, match="width 7"):
        prompt_embeds_sampler(tiny_unet2d_condition(), DDIMScheduler(), 3, torch.randn(2, 3, 7))


def test_prompt_embeddings_for_a_model_without_text(tmp_path, never_calibrates):
    tiny_unet2d().save_pretrained(tmp_path)
    inputs = CalibrationInputs(prompt_embeds=torch.randn(2, 3, 12))
    with pytest.raises(ValueError, match="UNet2DModel takes no prompt embeddings"):
        UNet2DModel.from_pretrained(tmp_path, quantization_config=GACConfig(calibration_inputs=inputs, **FAST))


def test_a_text_model_without_inputs_is_refused_before_its_weights_load(tmp_path, never_calibrates):
    tiny_unet2d_condition().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="text-conditional"):
        UNet2DConditionModel.from_pretrained(tmp_path, quantization_config=GACConfig(**FAST))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_calibrating_in_half_precision(dtype, tmp_path, never_calibrates):
    tiny_unet2d().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="calibrating while loading needs float32"):
        UNet2DModel.from_pretrained(tmp_path, quantization_config=GACConfig(**FAST), torch_dtype=dtype)
    with pytest.raises(ValueError, match="float32"):
        quantize_model(tiny_unet2d().to(dtype), GACConfig(**FAST), scheduler=DDIMScheduler(), show_progress=False)


def test_a_pre_quantized_checkpoint_still_loads_in_half_precision(calibrated, checkpoint):
    model = UNet2DModel.from_pretrained(checkpoint, torch_dtype=torch.float16)
    assert model.conv_in.bias.dtype == torch.float16 and model.conv_in.packed_weight.dtype == torch.uint8


def test_quantizing_an_already_quantized_model(checkpoint):
    model = UNet2DModel.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="already quantized \\(by gac\\)"):
        quantize_model(model, GACConfig(**FAST), scheduler=DDIMScheduler(), show_progress=False)


@pytest.mark.parametrize("device_map", ["cuda:99", "xpu:99"])
def test_a_device_that_does_not_exist(device_map, checkpoint, tmp_path):
    tiny_unet2d().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"device_map '{device_map}' does not exist on this machine"):
        UNet2DModel.from_pretrained(checkpoint, device_map=device_map)
    with pytest.raises(ValueError, match="does not exist on this machine"):
        UNet2DModel.from_pretrained(tmp_path, quantization_config=GACConfig(**FAST), device_map=device_map)


def test_a_process_that_never_imported_the_package(checkpoint):
    """No auto-registration (see docs/reliability.md): without the import, diffusers refuses the unknown method;
    importing diffusers_gac is the fix its docs and the model card name, and it works in the same process."""
    code = (
        "import sys\nfrom diffusers import UNet2DModel\n"
        f"try:\n    UNet2DModel.from_pretrained({str(checkpoint)!r})\nexcept ValueError as err:\n    print('refused:', err)\n"
        f"import diffusers_gac\nprint('loaded:', UNet2DModel.from_pretrained({str(checkpoint)!r}).is_quantized)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert "refused: Unknown quantization type, got gac" in result.stdout and "loaded: True" in result.stdout


# -- 5. files -------------------------------------------------------------------------------------------------------

def _default_modes(folder: Path) -> tuple[int, int]:
    probe = folder / "probe"
    probe.mkdir()
    dir_mode = probe.stat().st_mode & 0o777
    probe.rmdir()
    return dir_mode, dir_mode & 0o666


def test_a_saved_checkpoint_has_the_permissions_of_mkdir(calibrated, tmp_path):
    dir_mode, file_mode = _default_modes(tmp_path)
    diffusers_gac.save_pretrained(calibrated, tmp_path / "w4a4")
    assert (tmp_path / "w4a4").stat().st_mode & 0o777 == dir_mode
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "w4a4").iterdir()}
    assert {"config.json", WEIGHTS, "gac_calibration.json"} <= set(modes) and set(modes.values()) == {file_mode}


def test_a_calibrate_output_has_the_permissions_of_mkdir(tmp_path):
    dir_mode, file_mode = _default_modes(tmp_path)

    def write(folder):
        (folder / "unet").mkdir()
        (folder / "report.json").write_text("{}")
        save_file({"a": torch.zeros(1)}, folder / "unet" / WEIGHTS)  # safetensors writes owner-only files

    replace_folder_atomically(tmp_path / "out", write)
    assert [(tmp_path / "out" / p).stat().st_mode & 0o777 for p in ("", "unet", "report.json", f"unet/{WEIGHTS}")] == [
        dir_mode, dir_mode, file_mode, file_mode]


def test_a_folder_being_written_is_never_loadable(calibrated, tmp_path, monkeypatch):
    """The temporary sibling holds the new folder one level down: no config.json at its root."""
    seen = {}
    import diffusers_gac.saving as saving

    real = saving.write_checkpoint

    def spy(obj, folder, **kwargs):
        plots = real(obj, folder, **kwargs)
        seen["sibling"] = next(p for p in [Path(folder), *Path(folder).parents] if p.parent == tmp_path)
        with pytest.raises(OSError, match="config.json"):
            UNet2DModel.from_pretrained(seen["sibling"])
        return plots

    monkeypatch.setattr(saving, "write_checkpoint", spy)
    diffusers_gac.save_pretrained(calibrated, tmp_path / "w4a4")
    assert seen["sibling"].name.startswith(".w4a4.partial-") and not seen["sibling"].exists()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_next_save_cleans_what_a_killed_save_left(calibrated, checkpoint, tmp_path):
    pid, host = _dead_pid(), socket.gethostname()
    stale = [tmp_path / f".w4a4.partial-{host}-{pid}-0000beef", tmp_path / ".w4a4.partial-k3x9q2zz",  # an old release's
             tmp_path / f".w4a4.previous-{host}-{pid}-0000cafe"]
    for folder in stale:
        shutil.copytree(checkpoint, folder / "w4a4")
    running = tmp_path / f".w4a4.partial-{host}-{os.getpid()}-0000f00d"  # this process's own save is not stale
    running.mkdir()
    (tmp_path / "w4a4").mkdir()
    diffusers_gac.save_pretrained(calibrated, tmp_path / "w4a4")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["w4a4", running.name])


def test_a_save_killed_during_the_swap_gets_its_old_folder_back(calibrated, checkpoint, tmp_path):
    """Killed between setting the old folder aside and moving the new one in: the old one comes back (with the
    files it held) before the next save adds to it."""
    aside = tmp_path / f".w4a4.previous-{socket.gethostname()}-{_dead_pid()}-0000cafe" / "w4a4"
    shutil.copytree(checkpoint, aside)
    (aside / "notes.txt").write_text("mine")
    diffusers_gac.save_pretrained(calibrated, tmp_path / "w4a4")
    assert (tmp_path / "w4a4" / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["w4a4"]


def test_a_resave_without_shards_leaves_no_stale_index(calibrated, tmp_path):
    folder = tmp_path / "w4a4"
    diffusers_gac.save_pretrained(calibrated, folder, max_shard_size="20KB")
    assert (folder / f"{WEIGHTS}.index.json").is_file()
    (folder / "notes.txt").write_text("mine")
    diffusers_gac.save_pretrained(calibrated, folder)
    assert not [p.name for p in folder.iterdir() if "index" in p.name or "-of-" in p.name]
    assert (folder / WEIGHTS).is_file() and (folder / "notes.txt").read_text() == "mine"
    assert torch.equal(_out(UNet2DModel.from_pretrained(folder)), _out(calibrated))


# -- 6. the command line --------------------------------------------------------------------------------------------

def run_cli(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    return exit_.value.code, err


@pytest.fixture(scope="module")
def cli_folders(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "notes.txt").write_text("x")
    (root / "images.png").mkdir()
    broken = root / "broken"
    shutil.copytree(checkpoint, broken)
    state = load_file(broken / WEIGHTS)
    state["conv_in.weight_quantizer.scale"] = state["conv_in.weight_quantizer.scale"].long()
    save_file(state, broken / WEIGHTS, metadata={"format": "pt"})
    return root


CLI = {
    "a folder that holds no model": (["sample", "--model", "{root}/not-a-model"], "is not a model folder"),
    "a device name torch does not know": (["sample", "--device", "gpu"], "argument --device: must name a torch device"),
    "a device this machine lacks": (["sample", "--device", "cuda:99"], "'cuda:99' does not exist on this machine"),
    "an unknown image extension": (["sample", "--output", "{root}/grid.jpgg"], "no image extension PIL can write"),
    "an image file name that is a folder": (["sample", "--output", "{root}/images.png"], "is a folder"),
    "an output under a file": (["sample", "--output", "{root}/not-a-model/notes.txt/grid.png"], "cannot create it"),
    "a negative seed": (["sample", "--seed", "-1"], "a seed is an integer from 0"),
    "a damaged checkpoint": (["sample", "--model", "{root}/broken", "--num-samples", "1"], "stored as torch.int64"),
    "options GACConfig refuses": (["calibrate", "--output", "{root}/new", "--reconstruction", "none",
                                   "--weighting", "gradient_aligned"], "reconstruction='none'"),
    "calibrate into a folder under a file": (["calibrate", "--output", "{root}/not-a-model/notes.txt/out"],
                                             "cannot create it"),
    "push of a missing folder": (["push", "{root}/missing", "org/x"], "is not a folder"),
    "push of a folder that holds no model": (["push", "{root}/not-a-model", "org/x"], "is not a model folder"),
    "push to a malformed repo id": (["push", "{root}/broken", "bad repo id!", "--dry-run", "{root}/dry"],
                                    "is not a Hub repository id"),
    "push of a damaged checkpoint": (["push", "{root}/broken", "org/x", "--dry-run", "{root}/dry"],
                                     "stored as torch.int64"),
}


@pytest.mark.parametrize("case", list(CLI))
def test_bad_command_line_input_gives_one_message_and_exit_code_2(case, cli_folders, capsys):
    argv, message = CLI[case]
    code, err = run_cli([a.format(root=cli_folders) for a in argv], capsys)
    assert code == 2 and "error:" in err
    assert message in " ".join(err.split())
    assert not (cli_folders / "dry").exists() and not (cli_folders / "new").exists()


def test_push_in_offline_mode_is_refused_before_anything_runs(cli_folders, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, err = run_cli(["push", str(cli_folders / "broken"), "org/x"], capsys)
    assert code == 2 and "offline mode is on (HF_HUB_OFFLINE is set)" in err


def test_library_errors_are_one_line(capsys, monkeypatch):
    from diffusers_gac import zoo

    def refuse(*args, **kwargs):
        raise ValueError("first line\n  second line")

    monkeypatch.setattr(zoo, "load_model", refuse)
    code, err = run_cli(["sample", "--quiet"], capsys)
    assert code == 2 and err == "diffusers-gac sample: error: first line second line\n"


def test_ctrl_c_prints_one_line(capsys, monkeypatch):
    from diffusers_gac import zoo

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "load_model", interrupt)
    code, err = run_cli(["sample", "--quiet"], capsys)
    assert code == 130 and err == "diffusers-gac sample: interrupted\n"


def test_ctrl_c_in_a_real_process(tmp_path):
    import os
    import signal
    import time

    code = ("import sys, diffusers_gac.cli as cli\n"
            f"sys.exit(cli.main(['sample', '--steps', '1000', '--num-samples', '100000', '--output', "
            f"{str(tmp_path / 'x.png')!r}]))\n")
    # as from a terminal: a test run started in the background (nohup, &) passes SIGINT down as ignored, and Python
    # then keeps it ignored
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, deadline = b"", time.monotonic() + 300
    while b"sampling" not in seen:  # interrupt the denoising loop itself, whatever the machine's load
        assert child.poll() is None and time.monotonic() < deadline, seen[-2000:]
        seen += os.read(child.stderr.fileno(), 4096)
    child.send_signal(signal.SIGINT)
    _, rest = child.communicate(timeout=300)
    err = (seen + rest).decode()
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("sampling")]  # no bars
    assert child.returncode == 130 and lines == ["diffusers-gac sample: interrupted"]


@pytest.mark.parametrize("command", [[], ["sample"], ["evaluate"], ["calibrate"], ["push"]])
def test_help_is_plain_text(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("usage: diffusers-gac")
    assert "`" not in out and ":func:" not in out
