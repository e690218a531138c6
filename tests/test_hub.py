"""push_to_hub and from_pretrained("org/name") over real HTTP against a loopback Hub, and from the offline cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from hub_server import LoopbackHub
from tiny_models import tiny_unet2d

import diffusers_gac
from diffusers_gac import GACConfig, quantize_model
from diffusers_gac.hub import model_card, write_hub_folder
from diffusers_gac.quantizer import REPORT_NAME
from diffusers_gac.saving import PLOT_NAME

FAST = dict(iters=4, calib_num_inference_steps=5, calib_num_timesteps=3, calib_samples_per_timestep=4, batch_size=8)
CHILD = Path(__file__).parent / "hub_child.py"


def run_child(mode: str, workdir: Path, **env) -> dict:
    child_env = {**os.environ, "HF_HOME": str(workdir / "hf_home"), "HF_TOKEN": "hf_loopback_test",
                 "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "DIFFUSERS_VERBOSITY": "error",
                 **env}
    for key in ("HF_HUB_OFFLINE", "HF_ENDPOINT"):
        if key not in env:
            child_env.pop(key, None)
    proc = subprocess.run([sys.executable, str(CHILD), mode, str(workdir)], env=child_env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """Push over HTTP in a child process; yields (server, child's results, workdir)."""
    workdir = tmp_path_factory.mktemp("hub")
    with LoopbackHub() as hub:
        result = run_child("push", workdir, HF_ENDPOINT=hub.url)
        yield hub, result, workdir


def test_model_push_and_load_by_repo_id(pushed):
    hub, result, _ = pushed
    assert result["model_is_quantized"] and result["model_identical"] and result["native_model_identical"]
    files = hub.repos["org/tiny-w4a4"].commits[-1][1]
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md", PLOT_NAME, REPORT_NAME} <= set(files)
    assert json.loads(files["config.json"])["quantization_config"]["quant_method"] == "gac"
    assert files[PLOT_NAME].startswith(b"\x89PNG")
    assert ("POST", "/api/models/org/tiny-w4a4/commit/main") in hub.requests


def test_model_card_is_generated(pushed):
    hub, _, _ = pushed
    card = hub.repos["org/tiny-w4a4"].commits[-1][1]["README.md"].decode()
    assert card.startswith("---\n") and "library_name: diffusers" in card and "diffusers-gac" in card
    assert "W4A4" in card and "gradient-aligned" in card
    assert f"![]({PLOT_NAME})" in card or f"]({PLOT_NAME})" in card
    assert "| `gac_meta_steps` | `2` |" in card  # the calibration settings table
    assert 'UNet2DModel.from_pretrained("org/tiny-w4a4")' in card
    assert "No quality numbers were given" in card  # none were measured for this upload, and the card says so


def test_pipeline_push_and_load_by_repo_id(pushed):
    hub, result, _ = pushed
    assert result["pipeline_identical"] and result["native_pipeline_identical"]
    files = hub.repos["org/tiny-ddpm-w4a4"].commits[-1][1]
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
            "README.md", f"unet/{REPORT_NAME}"} <= set(files)
    assert "DiffusionPipeline.from_pretrained" in files["README.md"].decode()


def test_offline_cache_layout_loads_without_a_server(pushed):
    hub, _, workdir = pushed
    cache = workdir / "hf_home" / "hub" / "models--org--tiny-w4a4"
    assert (cache / "refs" / "main").is_file() and any((cache / "blobs").iterdir())
    commit = (cache / "refs" / "main").read_text().strip()
    assert (cache / "snapshots" / commit / "config.json").is_file()
    # a dead endpoint: any network access would fail, so success means the cache alone served the load
    result = run_child("offline", workdir, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    assert result["offline_identical"]


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_unet2d()
    quantize_model(model, GACConfig(weighting="gradient_aligned", gac_meta_steps=2, **FAST),
                   scheduler=DDIMScheduler(num_train_timesteps=1000), show_progress=False)
    return model


def test_card_shows_measured_quality_and_base_model(calibrated):
    evaluation = {"full_precision": {"fd": 6.72, "fd_std": 0.31, "psnr": None, "accuracy": 0.998, "accuracy_std": 0.001},
                  "quantized": {"fd": 6.78, "fd_std": 0.23, "psnr": 32.42, "psnr_std": 0.04, "accuracy": 0.997,
                                "accuracy_std": 0.002, "num_samples": 1000, "num_inference_steps": 25, "seeds": [0, 1, 2]}}
    card = str(model_card(calibrated, repo_id="org/x", evaluation=evaluation, base_model="org/digits-fp"))
    assert "base_model: org/digits-fp" in card
    assert "| FD (lower is better) | 6.72 ± 0.31 | 6.78 ± 0.23 |" in card
    assert "| PSNR vs full precision, dB | - | 32.42 ± 0.04 |" in card
    assert "1000 samples, 25 sampler steps" in card


def test_hub_folder_is_a_loadable_checkpoint(calibrated, tmp_path):
    from diffusers import UNet2DModel

    write_hub_folder(calibrated, tmp_path, repo_id="org/x")
    assert (tmp_path / PLOT_NAME).is_file() and (tmp_path / "README.md").is_file()
    loaded = UNet2DModel.from_pretrained(tmp_path)
    # the calibration report is read back from beside the checkpoint
    assert [(u["name"], u["loss_after"]) for u in loaded.hf_quantizer.calibration_report["units"]] == [
        (u["name"], u["loss_after"]) for u in calibrated.hf_quantizer.calibration_report["units"]]
    call = dict(sample=torch.randn(2, 1, 8, 8), timestep=torch.tensor([3, 700]), class_labels=torch.tensor([0, 1]))
    with torch.no_grad():
        assert torch.equal(loaded(**call).sample, calibrated(**call).sample)


def test_push_refuses_a_model_that_was_not_calibrated():
    with pytest.raises(ValueError, match="nothing in this object was quantized"):
        diffusers_gac.push_to_hub(tiny_unet2d(), "org/fp")
