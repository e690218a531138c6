"""examples/calibrate_ldm.py: its real-checkpoint path on tiny pipelines saved to disk (latent diffusion, DiT,
Stable-Diffusion style; no download), and two CPU processes under accelerate launch on the embedded model."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from tiny_models import tiny_dit_pipeline, tiny_ldm_pipeline, tiny_sd_pipeline

import diffusers_gac  # noqa: F401  (registers the backend for the loads below)
from diffusers_gac.quant.layers import QuantConv2d, QuantLinear

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "calibrate_ldm.py"
SMALL = ["--iters", "2", "--num-trajectories", "2", "--num-timesteps", "2", "--steps", "3", "--quiet"]


def _env() -> dict:
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=_env(),
                          timeout=900)


@pytest.mark.parametrize("kind", ["ldm", "dit", "sd"])
def test_the_script_calibrates_a_pipeline_saved_to_disk(kind, tmp_path):
    build = {"ldm": tiny_ldm_pipeline, "dit": tiny_dit_pipeline, "sd": tiny_sd_pipeline}[kind]
    build().save_pretrained(tmp_path / "pipe")
    extra = []
    if kind == "sd":
        (tmp_path / "prompts.txt").write_text("a cat\na dog on a hill\n")
        extra = ["--prompts-file", tmp_path / "prompts.txt", "--guidance-scale", "3"]
    if kind == "dit":
        extra = ["--class-labels", "1", "7", "--guidance-scale", "2"]
    result = run("--model", tmp_path / "pipe", "--output", tmp_path / "out", *SMALL, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")
    denoiser = pipe.transformer if kind == "dit" else pipe.unet
    assert denoiser.is_quantized and any(isinstance(m, (QuantConv2d, QuantLinear)) for m in denoiser.modules())
    assert not (tmp_path / "out.checkpoint").exists()  # removed once the output is written


def test_prompts_from_a_dataset_folder(tmp_path):
    from datasets import Dataset

    from diffusers_gac import load_prompts

    Dataset.from_dict({"caption": ["a red house", "", "a blue car"]}).save_to_disk(str(tmp_path / "prompts"))
    assert load_prompts(dataset=str(tmp_path / "prompts"), column="caption") == ["a red house", "a blue car"]
    with pytest.raises(ValueError, match="no column 'text'"):
        load_prompts(dataset=str(tmp_path / "prompts"))


def test_a_leftover_checkpoint_needs_resume(tmp_path):
    (tmp_path / "out.checkpoint").mkdir()
    result = run("--output", tmp_path / "out", *SMALL)
    assert result.returncode != 0 and "resume it (--resume) or delete it" in result.stderr


def test_two_cpu_processes_on_the_embedded_model(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(SCRIPT), "--output", str(tmp_path / "out"), *SMALL]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2; all-reduce over the processes gave 2" in result.stderr
    unet = UNet2DModel.from_pretrained(tmp_path / "out", subfolder="unet")
    assert unet.is_quantized and unet.hf_quantizer.calibration_report["num_calibration_samples"] == 2 * 2
    with torch.no_grad():
        out = unet(torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), class_labels=torch.tensor([1, 2])).sample
    assert torch.isfinite(out).all()
