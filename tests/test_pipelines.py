"""Calibration inputs for every kind of denoiser: pipelines calibrating their own denoiser (DDPM, latent diffusion,
Stable-Diffusion-style), text-conditional models through from_pretrained, and custom samplers."""

import importlib.util
import json

import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    PipelineQuantizationConfig,
    UNet2DConditionModel,
    UNet2DModel,
)
from tiny_models import tiny_dit_pipeline, tiny_ldm_pipeline, tiny_sd_pipeline, tiny_unet2d

from diffusers_gac import CalibrationInputs, GACConfig, quantize_pipeline, record_calibration_data
from diffusers_gac.hub import model_card
from diffusers_gac.quant.layers import QuantConv2d
from diffusers_gac.sampling import scheduler_sampler

FAST = dict(iters=4, calib_num_inference_steps=5, calib_num_timesteps=3, calib_samples_per_timestep=4, batch_size=8)


def _sd_call(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]),
                    encoder_hidden_states=torch.randn(2, 8, 64, generator=g)).sample


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd")
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


def _embeds(folder, prompts):
    pipe = DiffusionPipeline.from_pretrained(folder)
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=[""] * len(prompts))
    return cond, uncond[:1]


def test_quantize_pipeline_calibrates_sd_with_its_own_text_encoder(sd_folder, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(sd_folder)
    report = quantize_pipeline(pipe, GACConfig(**FAST), prompts=["a cat", "a dog"], guidance_scale=3.0,
                               show_progress=False)
    # 3 kept steps x 4 trajectories, both halves of classifier-free guidance
    assert report.num_calibration_samples == 3 * 4 * 2
    assert isinstance(pipe.unet.conv_in, QuantConv2d) and pipe.unet.is_quantized
    assert not any(type(m).__name__.startswith("Quant") for m in pipe.text_encoder.modules())  # only the denoiser
    images = pipe(["a cat"], num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(images)).all()
    pipe.save_pretrained(tmp_path)
    again = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(again.unet.conv_in, QuantConv2d)
    assert torch.equal(_sd_call(again.unet), _sd_call(pipe.unet))


def test_quantize_pipeline_needs_prompts_for_a_text_pipeline(sd_folder):
    pipe = DiffusionPipeline.from_pretrained(sd_folder)
    with pytest.raises(ValueError, match="text-conditional: pass calibration prompts"):
        quantize_pipeline(pipe, GACConfig(**FAST), show_progress=False)
    with pytest.raises(ValueError, match="'num_inference_steps' is set by the calibration"):
        quantize_pipeline(pipe, GACConfig(**FAST), prompts=["a cat"], num_inference_steps=3, show_progress=False)


def test_text_conditional_from_pretrained_without_inputs_says_how_to_pass_them(sd_folder):
    with pytest.raises(ValueError, match="CalibrationInputs.prompt_embeds=.*CalibrationInputs.sampler=fn.*quantize_pipeline"):
        UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet", quantization_config=GACConfig(**FAST))


def test_text_conditional_from_pretrained_with_prompt_embeds(sd_folder, tmp_path):
    cond, uncond = _embeds(sd_folder, ["a cat", "a dog"])
    config = GACConfig(calibration_inputs=CalibrationInputs(prompt_embeds=cond, negative_prompt_embeds=uncond),
                       calib_guidance_scale=3.0, **FAST)
    unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet", quantization_config=config)
    assert isinstance(unet.conv_in, QuantConv2d)
    assert unet.hf_quantizer.calibration_report["num_calibration_samples"] == 3 * 4 * 2
    unet.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert "calibration_inputs" not in saved and "prompt_embeds" not in json.dumps(saved)  # no tensors in config.json
    assert saved["calibration"]["calib_guidance_scale"] == 3.0
    assert torch.equal(_sd_call(UNet2DConditionModel.from_pretrained(tmp_path)), _sd_call(unet))


def test_pipeline_quantization_config_with_prompt_embeds(sd_folder):
    cond, _ = _embeds(sd_folder, ["a cat"])
    pipe = DiffusionPipeline.from_pretrained(sd_folder, quantization_config=PipelineQuantizationConfig(
        quant_mapping={"unet": GACConfig(calibration_inputs=CalibrationInputs(prompt_embeds=cond), **FAST)}))
    assert isinstance(pipe.unet.conv_in, QuantConv2d)
    images = pipe(["a cat"], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def test_diffusers_speed_recipe_on_a_quantized_pipeline(sd_folder, tmp_path):
    """diffusers' own speed-up steps work on a calibrated pipeline: fused q/k/v projections (the UNet's quantized ones
    through diffusers_gac, the VAE's float ones by diffusers) and channels-last memory; the checkpoint is unchanged."""
    cond, _ = _embeds(sd_folder, ["a cat"])
    pipe = DiffusionPipeline.from_pretrained(sd_folder, quantization_config=PipelineQuantizationConfig(
        quant_mapping={"unet": GACConfig(calibration_inputs=CalibrationInputs(prompt_embeds=cond), **FAST)}))
    run = lambda: pipe(["a cat"], num_inference_steps=3, generator=torch.Generator().manual_seed(0),  # noqa: E731
                       output_type="np").images
    before, unet_before = run(), _sd_call(pipe.unet)
    card = str(model_card(pipe.unet, repo_id="org/tiny-sd-w4a4"))
    pipe.fuse_qkv_projections()
    pipe.unet.to(memory_format=torch.channels_last)
    assert hasattr(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1, "to_qkv")
    assert hasattr(pipe.vae.encoder.mid_block.attentions[0], "to_qkv")
    # "auto" decides per layer: a fused layer may run on other kernels than its parts did (float rounding apart)
    torch.testing.assert_close(run(), before, rtol=0, atol=1e-4)
    assert str(model_card(pipe.unet, repo_id="org/tiny-sd-w4a4")) == card  # sizes: the fused copies are not saved
    pipe.unet.save_pretrained(tmp_path)
    assert torch.equal(_sd_call(UNet2DConditionModel.from_pretrained(tmp_path)), unet_before)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_text_encoder_in_bitsandbytes_beside_a_gac_unet(sd_folder):
    """Components may use other backends: here the text encoder in bitsandbytes 4-bit (its CPU kernels)."""
    from transformers import BitsAndBytesConfig

    cond, _ = _embeds(sd_folder, ["a cat"])
    pipe = DiffusionPipeline.from_pretrained(sd_folder, quantization_config=PipelineQuantizationConfig(quant_mapping={
        "unet": GACConfig(calibration_inputs=CalibrationInputs(prompt_embeds=cond), **FAST), "text_encoder": BitsAndBytesConfig(load_in_4bit=True)}))
    assert isinstance(pipe.unet.conv_in, QuantConv2d)
    assert any(type(m).__name__ == "Linear4bit" for m in pipe.text_encoder.modules())
    images = pipe(["a cat"], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(images)).all()


def test_latent_diffusion_pipeline_both_ways(tmp_path):
    tiny_ldm_pipeline().save_pretrained(tmp_path)
    pipe = DiffusionPipeline.from_pretrained(tmp_path, quantization_config=PipelineQuantizationConfig(
        quant_mapping={"unet": GACConfig(**FAST)}))
    assert isinstance(pipe.unet.conv_in, QuantConv2d)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3) and torch.isfinite(torch.from_numpy(images)).all()
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    report = quantize_pipeline(loaded, GACConfig(**FAST), batch_size=2, show_progress=False)  # two calls of 2 trajectories
    assert report.num_calibration_samples == 3 * 4
    assert isinstance(loaded.unet.conv_in, QuantConv2d)


def test_quantize_pipeline_calibrates_a_class_conditional_transformer_with_guidance():
    pipe = tiny_dit_pipeline()
    report = quantize_pipeline(pipe, GACConfig(**FAST), class_labels=[1, 2, 3], guidance_scale=4.0, show_progress=False)
    assert report.num_calibration_samples == 3 * 4 * 2  # guided: conditional and unconditional halves
    assert pipe.transformer.is_quantized
    images = pipe(class_labels=[1, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 16, 16, 3) and torch.isfinite(torch.from_numpy(images)).all()
    with pytest.raises(ValueError, match="takes no prompt"):
        quantize_pipeline(tiny_dit_pipeline(), GACConfig(**FAST), prompts=["a cat"], show_progress=False)


def test_quantize_pipeline_with_gac_validation_from_quantized_trajectories(tmp_path):
    pipe = tiny_ldm_pipeline()
    config = GACConfig(weighting="gradient_aligned", gac_validation="quantized_trajectories",
                       gac_validation_trajectories=2, gac_meta_steps=1, **FAST)
    report = quantize_pipeline(pipe, config, show_progress=False)  # the pipeline also samples the RTN model
    assert "record_validation" in report.seconds
    assert all(u.weighting.get("validation_samples") == 3 * 2 for u in report.units)


def test_custom_sampler_through_the_config(tmp_path):
    calls = []
    scheduler = tiny_ldm_pipeline().scheduler

    def sampler(denoiser, num_trajectories, seed):
        calls.append((type(denoiser).__name__, num_trajectories, seed))
        scheduler_sampler(denoiser, scheduler, FAST["calib_num_inference_steps"], show_progress=False)(num_trajectories, seed)

    tiny_unet2d(class_conditional=False).save_pretrained(tmp_path)
    config = GACConfig(calibration_inputs=CalibrationInputs(sampler=sampler), seed=5, **FAST)
    model = UNet2DModel.from_pretrained(tmp_path, quantization_config=config)
    assert calls == [("UNet2DModel", 4, 5)] and isinstance(model.conv_in, QuantConv2d)
    assert "calibration_inputs" not in config.to_dict()
    assert model.config.quantization_config.calibration_inputs is None  # the model does not keep the caller's inputs


def test_a_sampler_with_the_wrong_number_of_steps_is_refused():
    unet = tiny_unet2d(class_conditional=False)
    scheduler = tiny_ldm_pipeline().scheduler
    wrong = scheduler_sampler(unet, scheduler, 4, show_progress=False)  # 4 denoiser calls per trajectory, not 5
    with pytest.raises(ValueError, match="calib_num_inference_steps=5"):
        record_calibration_data(unet, GACConfig(**FAST), sampler=wrong)


@pytest.mark.parametrize("options, match", [
    (dict(prompt_embeds=torch.zeros(2, 8)), "prompt_embeds must be a tensor of shape"),
    (dict(negative_prompt_embeds=torch.zeros(1, 8, 12)), "without prompt_embeds"),
    (dict(prompt_embeds=torch.zeros(2, 8, 12), negative_prompt_embeds=torch.zeros(1, 7, 12)),
     r"must have shape \(1 or 2, 8, 12\)"),
    (dict(sampler="not callable"), "sampler must be a callable"),
])
def test_calibration_inputs_are_validated(options, match):
    with pytest.raises(ValueError, match=match):
        CalibrationInputs(**options)


def test_guidance_needs_negative_embeddings():
    with pytest.raises(ValueError, match="calib_guidance_scale must be a finite number >= 1"):
        GACConfig(calib_guidance_scale=0.5)
    with pytest.raises(ValueError, match="needs calibration_inputs.negative_prompt_embeds"):
        GACConfig(calibration_inputs=CalibrationInputs(prompt_embeds=torch.zeros(2, 8, 12)), calib_guidance_scale=5.0)
    with pytest.raises(ValueError, match="calibration_inputs must be a diffusers_gac.CalibrationInputs"):
        GACConfig(calibration_inputs={"prompt_embeds": torch.zeros(2, 8, 12)})


def test_class_conditional_model_keeps_working_through_from_pretrained(tmp_path):
    tiny_unet2d().save_pretrained(tmp_path)
    model = UNet2DModel.from_pretrained(tmp_path, quantization_config=GACConfig(**FAST))
    assert model.hf_quantizer.calibration_report["num_calibration_samples"] == 3 * 4
