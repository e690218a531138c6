"""The "gac" backend through diffusers' own loading and saving paths (mirrors diffusers' backend checks)."""

import json

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DiffusionPipeline,
    PipelineQuantizationConfig,
    UNet2DModel,
)
from safetensors import safe_open
from tiny_models import digits_out, tiny_unet2d

import diffusers_gac
from diffusers_gac import GACConfig, quantize_model
from diffusers_gac.quant.convert import quant_layers
from diffusers_gac.quant.layers import QuantConv2d
from diffusers_gac.zoo import embedded_model_path

FAST = dict(iters=4, calib_num_inference_steps=5, calib_num_timesteps=3, calib_samples_per_timestep=4, batch_size=8)


@pytest.fixture(scope="module")
def calibrated_from_pretrained():
    return UNet2DModel.from_pretrained(embedded_model_path(), subfolder="unet",
                                       quantization_config=GACConfig(w_bits=4, a_bits=4, **FAST))


@pytest.fixture(scope="module")
def saved(calibrated_from_pretrained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    calibrated_from_pretrained.save_pretrained(folder)
    return folder


def test_from_pretrained_calibrates_and_runs_without_nan(calibrated_from_pretrained):
    model = calibrated_from_pretrained
    assert model.is_quantized and isinstance(model.conv_in, QuantConv2d)
    assert torch.isfinite(digits_out(model)).all()
    fp = UNet2DModel.from_pretrained(embedded_model_path(), subfolder="unet")
    num_float = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in fp.modules())
    assert len(quant_layers(model)) == num_float == len(model.config.quantization_config.layout.layers)
    for seed in (0, 1):  # quantized, and close to full precision: W4A4 noise predictions within 1% relative MSE
        relative = ((digits_out(model, seed) - digits_out(fp, seed)).pow(2).mean() / digits_out(fp, seed).pow(2).mean()).item()
        assert 1e-6 < relative < 0.01


def test_callers_config_is_not_mutated():
    config = GACConfig(**FAST)
    UNet2DModel.from_pretrained(embedded_model_path(), subfolder="unet", quantization_config=config)
    assert config.layout is None


def test_round_trip_gives_identical_outputs(calibrated_from_pretrained, saved):
    loaded = UNet2DModel.from_pretrained(saved)
    assert isinstance(loaded.conv_in, QuantConv2d) and loaded.conv_in.frozen
    assert torch.equal(digits_out(loaded), digits_out(calibrated_from_pretrained))


def test_checkpoint_holds_packed_weights_and_no_float_copy(saved):
    with safe_open(str(saved / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("down_blocks.0.resnets.0.conv1.packed_weight")
    assert "down_blocks.0.resnets.0.conv1.weight" not in keys
    assert packed.dtype == torch.uint8
    assert packed.shape == (32, 32 * 9 // 2)  # two 4-bit codes per byte
    fp_size = (embedded_model_path() / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert (saved / "diffusion_pytorch_model.safetensors").stat().st_size < 0.25 * fp_size


def test_memory_footprint_ratio(calibrated_from_pretrained):
    fp = UNet2DModel.from_pretrained(embedded_model_path(), subfolder="unet")
    ratio = calibrated_from_pretrained.get_memory_footprint() / fp.get_memory_footprint()
    assert ratio < 0.25


def test_config_json_carries_the_quantization_config(saved):
    config = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gac" and config["w_bits"] == 4
    assert "conv_in" in config["layout"]["layers"]
    again = GACConfig.from_dict(config)
    assert again.to_dict() == config


def test_sharded_round_trip(calibrated_from_pretrained, tmp_path):
    calibrated_from_pretrained.save_pretrained(tmp_path, max_shard_size="200KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    loaded = UNet2DModel.from_pretrained(tmp_path)
    assert torch.equal(digits_out(loaded), digits_out(calibrated_from_pretrained))


def test_cpu_device_map(saved):
    loaded = UNet2DModel.from_pretrained(saved, device_map="cpu")
    assert torch.isfinite(digits_out(loaded)).all()


def test_dtype_changes_are_refused(calibrated_from_pretrained):
    with pytest.raises(ValueError, match="quantized"):
        calibrated_from_pretrained.half()
    with pytest.raises(ValueError, match="dtype"):
        calibrated_from_pretrained.to(torch.float16)


def test_dequantize_gives_a_plain_model(saved):
    model = UNet2DModel.from_pretrained(saved)
    weight = model.down_blocks[0].resnets[0].conv1.dequantized_weight().clone()
    model.dequantize()
    assert not quant_layers(model) and type(model.conv_in) is torch.nn.Conv2d
    assert torch.equal(model.down_blocks[0].resnets[0].conv1.weight, weight)
    assert torch.isfinite(digits_out(model)).all()
    assert "quantization_config" not in model.config


def test_modules_to_not_convert():
    model = UNet2DModel.from_pretrained(embedded_model_path(), subfolder="unet",
                                        quantization_config=GACConfig(modules_to_not_convert=["mid_block"], **FAST))
    assert type(model.mid_block.resnets[0].conv1) is torch.nn.Conv2d
    assert isinstance(model.up_blocks[0].resnets[0].conv1, QuantConv2d)


def test_truncated_checkpoint_fails_clearly(saved, tmp_path):
    for f in saved.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors is truncated: its tensors need"):
        UNet2DModel.from_pretrained(tmp_path)


def test_checkpoint_not_matching_its_config_fails_clearly(saved, tmp_path):
    for f in saved.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["layout"]["layers"]["down_blocks.0.resnets.0.conv1"]["w_bits"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="packed_weight"):
        UNet2DModel.from_pretrained(tmp_path)


def test_quantize_model_result_saves_like_a_loaded_one(tmp_path):
    model = tiny_unet2d()
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    quantize_model(model, GACConfig(**FAST), scheduler=scheduler, show_progress=False)
    model.save_pretrained(tmp_path)
    loaded = UNet2DModel.from_pretrained(tmp_path)
    assert torch.equal(digits_out(loaded), digits_out(model))


def test_pipeline_from_pretrained_with_a_pipeline_quantization_config(tmp_path):
    DDPMPipeline(unet=tiny_unet2d(class_conditional=False), scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path)
    pipe = DiffusionPipeline.from_pretrained(
        tmp_path, quantization_config=PipelineQuantizationConfig(quant_mapping={"unet": GACConfig(**FAST)})
    )
    assert isinstance(pipe.unet.conv_in, QuantConv2d)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and (images >= 0).all()


def _failing_save(monkeypatch):
    import safetensors.torch

    def fail(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)


def test_a_failed_save_leaves_no_folder_behind(calibrated_from_pretrained, tmp_path, monkeypatch):
    _failing_save(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        diffusers_gac.save_pretrained(calibrated_from_pretrained, tmp_path / "w4a4")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary sibling


def test_a_failed_save_over_a_checkpoint_keeps_the_old_one(calibrated_from_pretrained, saved, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "w4a4"
    shutil.copytree(saved, folder)
    (folder / "notes.txt").write_text("mine")
    config = json.loads((folder / "config.json").read_text())
    _failing_save(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        diffusers_gac.save_pretrained(calibrated_from_pretrained, folder, max_shard_size="200KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w4a4"]
    assert json.loads((folder / "config.json").read_text()) == config
    assert torch.equal(digits_out(UNet2DModel.from_pretrained(folder)), digits_out(calibrated_from_pretrained))
    monkeypatch.undo()
    diffusers_gac.save_pretrained(calibrated_from_pretrained, folder, max_shard_size="200KB")
    assert (folder / "notes.txt").read_text() == "mine"  # what else the folder held is kept, as diffusers does
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert torch.equal(digits_out(UNet2DModel.from_pretrained(folder)), digits_out(calibrated_from_pretrained))


def test_saving_writes_the_report_and_loading_restores_it(calibrated_from_pretrained, tmp_path):
    from diffusers_gac.quantizer import REPORT_NAME
    from diffusers_gac.saving import PLOT_NAME

    diffusers_gac.save_pretrained(calibrated_from_pretrained, tmp_path)
    assert (tmp_path / REPORT_NAME).is_file() and (tmp_path / PLOT_NAME).read_bytes().startswith(b"\x89PNG")
    loaded = UNet2DModel.from_pretrained(tmp_path)
    assert loaded.hf_quantizer.calibration_report == json.loads(
        json.dumps(calibrated_from_pretrained.hf_quantizer.calibration_report, default=str))


def test_a_quantized_model_keeps_the_class_methods(calibrated_from_pretrained):
    """No per-instance method replacement: diffusers' own save_pretrained/push_to_hub are what a model carries."""
    assert "save_pretrained" not in vars(calibrated_from_pretrained)
    assert "push_to_hub" not in vars(calibrated_from_pretrained)
    assert type(calibrated_from_pretrained).save_pretrained is UNet2DModel.save_pretrained


def test_pipelines_save_through_diffusers_and_atomically(calibrated_from_pretrained, tmp_path, monkeypatch):
    import copy

    from diffusers_gac.quantizer import REPORT_NAME

    pipe = DDPMPipeline(unet=copy.deepcopy(calibrated_from_pretrained), scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.save_pretrained(tmp_path / "native", max_shard_size="200KB")  # diffusers' own, as for any backend
    assert (tmp_path / "native" / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert torch.equal(digits_out(UNet2DModel.from_pretrained(tmp_path / "native", subfolder="unet")),
                       digits_out(calibrated_from_pretrained))
    diffusers_gac.save_pretrained(pipe, tmp_path / "atomic")
    assert (tmp_path / "atomic" / "unet" / REPORT_NAME).is_file()
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "atomic")
    assert loaded.unet.hf_quantizer.calibration_report is not None
    _failing_save(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        diffusers_gac.save_pretrained(pipe, tmp_path / "atomic")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic", "native"]  # the old pipeline folder is intact
    assert torch.equal(digits_out(DiffusionPipeline.from_pretrained(tmp_path / "atomic").unet), digits_out(calibrated_from_pretrained))
