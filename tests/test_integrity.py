"""Checkpoints that prove they are intact (issue 21): every save records a digest of its tensors, every load checks
it before any weight is used, and what a digest cannot see (a file edited and re-digested, a checkpoint from before
digests) meets plausibility checks. docs/reliability.md lists these cases; keep the two in step."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import tiny_unet2d

import diffusers_gac
from diffusers_gac import GACConfig, quantize_model, quantizer
from diffusers_gac.quant.digest import DIGEST_KEY, DigestError, read_header

FAST = dict(reconstruction="none", calib_num_inference_steps=3, calib_num_timesteps=2, calib_samples_per_timestep=2,
            batch_size=4, act_scheme="static", attn_bits=8, weight_init="minmax")
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _out(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(2, 1, 8, 8, generator=g), torch.tensor([10, 900]), class_labels=torch.tensor([1, 2])).sample


def _calibrated(seed: int):
    model = tiny_unet2d()
    quantize_model(model, GACConfig(**FAST, seed=seed), scheduler=DDIMScheduler(num_train_timesteps=1000),
                   show_progress=False)
    return model


@pytest.fixture(scope="module")
def calibrated():
    return _calibrated(0)


@pytest.fixture(scope="module")
def checkpoint(calibrated, tmp_path_factory):
    folder = tmp_path_factory.mktemp("integrity") / "w4a4"
    diffusers_gac.save_pretrained(calibrated, folder)
    return folder


def copy(checkpoint: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(checkpoint, folder)
    return folder


def flip(folder: Path, tensor: str, byte: int = 0, bit: int = 0) -> None:
    """Flip one bit of one tensor's bytes in place; the header (and the digest in it) stays as saved."""
    path = folder / WEIGHTS
    header, start, _ = read_header(path)
    data = bytearray(path.read_bytes())
    data[start + header[tensor]["data_offsets"][0] + byte] ^= 1 << bit
    path.write_bytes(bytes(data))


def resave(folder: Path, edit) -> None:
    """Rewrite the tensors with ``edit`` applied, keeping the header's metadata (the digest) as it was saved."""
    path = folder / WEIGHTS
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata=metadata)


# a byte in each kind of tensor: quantized codes, quantizer state, plain float tensors
FLIPS = {
    "a packed 4-bit code": ("down_blocks.0.resnets.0.conv1.packed_weight", 3, 0),
    "an 8-bit code (first layer)": ("conv_in.packed_weight", 1, 6),
    "a zero point": ("down_blocks.0.resnets.0.conv1.weight_quantizer.zero_point", 0, 0),
    "a bias": ("down_blocks.0.resnets.0.conv1.bias", 0, 0),
    "a GroupNorm weight": ("down_blocks.0.resnets.0.norm1.weight", 2, 3),
    "a static input scale": ("down_blocks.0.resnets.0.conv1.input_quantizer.scale", 0, 0),
    "the class embedding": ("class_embedding.weight", 5, 1),
    "an exponent bit of a scale": ("conv_in.input_quantizer.scale", 1, 6),  # float16
}


def warnings_of(monkeypatch) -> list[str]:
    """The quantizer's warnings (its logger hangs below diffusers', which does not propagate to pytest's)."""
    warnings = []
    monkeypatch.setattr(quantizer.logger, "warning", warnings.append)
    return warnings


def test_a_save_records_a_digest_and_the_intact_checkpoint_loads_identically(calibrated, checkpoint, monkeypatch):
    with safe_open(checkpoint / WEIGHTS, framework="pt") as f:
        record = json.loads(f.metadata()[DIGEST_KEY])
        assert record["count"] == len(list(f.keys())) and record["config"]["calibration"]["seed"] == 0
    warnings = warnings_of(monkeypatch)
    assert torch.equal(_out(UNet2DModel.from_pretrained(checkpoint)), _out(calibrated))
    assert warnings == []


@pytest.mark.parametrize("case", list(FLIPS))
def test_one_flipped_bit_is_refused_naming_the_file_and_tensor(case, checkpoint, tmp_path):
    tensor, byte, bit = FLIPS[case]
    folder = copy(checkpoint, tmp_path)
    flip(folder, tensor, byte, bit)
    with pytest.raises(DigestError, match=f"1 tensors differ from those saved .*{tensor} in .*{WEIGHTS}"):
        UNet2DModel.from_pretrained(folder)


def test_every_code_of_a_layer_changed_is_refused(checkpoint, tmp_path):
    folder = copy(checkpoint, tmp_path)
    resave(folder, lambda s: s.update({"down_blocks.0.resnets.0.conv2.packed_weight":
                                       s["down_blocks.0.resnets.0.conv2.packed_weight"] ^ 0x11}))
    with pytest.raises(DigestError, match="down_blocks.0.resnets.0.conv2.packed_weight"):
        UNet2DModel.from_pretrained(folder)


def test_two_same_shaped_layers_swapped_are_refused(checkpoint, tmp_path):
    a, b = "down_blocks.0.resnets.0.conv1.packed_weight", "down_blocks.0.resnets.0.conv2.packed_weight"
    folder = copy(checkpoint, tmp_path)

    def swap(s):
        assert s[a].shape == s[b].shape and not torch.equal(s[a], s[b])
        s[a], s[b] = s[b], s[a]
    resave(folder, swap)
    with pytest.raises(DigestError, match="2 tensors differ"):
        UNet2DModel.from_pretrained(folder)


def test_a_header_dtype_edited_in_place_is_refused(checkpoint, tmp_path):
    """F32 -> I32 in the header of a plain float32 weight (same length, so the file stays well-formed)."""
    folder = copy(checkpoint, tmp_path)
    path = folder / WEIGHTS
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    raw = path.read_bytes()
    header = raw[8:8 + length].decode()
    entry = '"down_blocks.0.resnets.0.norm1.weight":{"dtype":"F32"'
    assert entry in header
    path.write_bytes(raw[:8] + header.replace(entry, entry.replace("F32", "I32")).encode() + raw[8 + length:])
    with pytest.raises(DigestError, match="down_blocks.0.resnets.0.norm1.weight"):
        UNet2DModel.from_pretrained(folder)


def test_a_tensor_added_or_dropped_is_refused(checkpoint, tmp_path):
    folder = copy(checkpoint, tmp_path)
    resave(folder, lambda s: s.update(extra=torch.zeros(3)))
    with pytest.raises(DigestError, match="not the .* that were saved with these names"):
        UNet2DModel.from_pretrained(folder)


@pytest.fixture(scope="module")
def other_calibration(tmp_path_factory):
    """The same model calibrated with another seed: same layout and shapes, other weights and options."""
    folder = tmp_path_factory.mktemp("other") / "w4a4"
    diffusers_gac.save_pretrained(_calibrated(1), folder, max_shard_size="30KB")
    assert (folder / f"{WEIGHTS}.index.json").is_file()
    return folder


def test_a_foreign_shard_set_beside_the_weights_is_refused_not_preferred(checkpoint, other_calibration, tmp_path):
    folder = copy(checkpoint, tmp_path)
    for p in other_calibration.glob("diffusion_pytorch_model*"):
        shutil.copy(p, folder)
    with pytest.raises(DigestError, match="seed is 0 in config.json but 1 in the weights"):
        UNet2DModel.from_pretrained(folder)


def test_a_config_from_another_calibration_is_refused(checkpoint, other_calibration, tmp_path):
    folder = copy(checkpoint, tmp_path)
    shutil.copy(other_calibration / "config.json", folder / "config.json")
    with pytest.raises(DigestError, match="seed is 1 in config.json but 0 in the weights"):
        UNet2DModel.from_pretrained(folder)


def test_shards_of_two_checkpoints_mixed_are_refused(calibrated, other_calibration, tmp_path):
    folder = tmp_path / "mine"
    diffusers_gac.save_pretrained(calibrated, folder, max_shard_size="30KB")
    shard = sorted(folder.glob("*-of-*.safetensors"))[-1]
    shutil.copy(other_calibration / shard.name, shard)
    with pytest.raises(DigestError, match="saved with other tensors than|differ from those saved"):
        UNet2DModel.from_pretrained(folder)


def test_a_sharded_save_by_diffusers_itself_carries_and_checks_the_digest(calibrated, tmp_path):
    calibrated.save_pretrained(tmp_path / "plain", max_shard_size="30KB")  # diffusers' own save_pretrained
    shards = sorted((tmp_path / "plain").glob("*-of-*.safetensors"))
    assert len(shards) > 1
    assert torch.equal(_out(UNet2DModel.from_pretrained(tmp_path / "plain")), _out(calibrated))
    header, start, _ = read_header(shards[-1])
    name = next(n for n in header if n != "__metadata__" and header[n]["data_offsets"][1] > header[n]["data_offsets"][0])
    data = bytearray(shards[-1].read_bytes())
    data[start + header[name]["data_offsets"][0]] ^= 1
    shards[-1].write_bytes(bytes(data))
    with pytest.raises(DigestError, match=f"{name} in .*{shards[-1].name}"):
        UNet2DModel.from_pretrained(tmp_path / "plain")


def test_a_checkpoint_from_before_digests_loads_with_a_warning(calibrated, checkpoint, tmp_path, monkeypatch):
    folder = copy(checkpoint, tmp_path)
    save_file(load_file(folder / WEIGHTS), folder / WEIGHTS, metadata={"format": "pt"})
    warnings = warnings_of(monkeypatch)
    assert torch.equal(_out(UNet2DModel.from_pretrained(folder)), _out(calibrated))
    assert len(warnings) == 1 and "carries no digest" in warnings[0]


def test_an_edited_and_redigested_scale_meets_the_plausibility_bound(checkpoint, tmp_path):
    """What a digest cannot see (here: a checkpoint without one) still meets the value checks: a scale whose
    exponent bit flipped (about 1e36) spans a range no weight or activation needs."""
    folder = copy(checkpoint, tmp_path)
    path = folder / WEIGHTS
    state = load_file(path)
    scale = state["conv_in.input_quantizer.scale"].float()  # earlier checkpoints stored float32 scales
    scale.view(torch.int32)[0] ^= 1 << 30  # the top exponent bit
    assert scale[0] > 1e30
    state["conv_in.input_quantizer.scale"] = scale
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="conv_in.input_quantizer.scale holds a scale of .* wider than any"):
        UNet2DModel.from_pretrained(folder)


def test_a_plain_weight_holding_nan_is_refused(checkpoint, tmp_path):
    folder = copy(checkpoint, tmp_path)
    path = folder / WEIGHTS
    state = load_file(path)
    state["down_blocks.0.resnets.0.norm1.weight"][0] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(DigestError, match="non-finite .*down_blocks.0.resnets.0.norm1.weight"):
        UNet2DModel.from_pretrained(folder)


UNREADABLE = {
    "truncated": (lambda b: b[:len(b) // 2], "not a complete safetensors file|is truncated"),
    "empty": (lambda b: b"", "holds 0 bytes"),
    "junk appended": (lambda b: b + b"junk", "holds 4 bytes after its last tensor"),
    "a broken header": (lambda b: b[:8] + b"x" + b[9:], "broken safetensors header"),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_an_unreadable_weights_file_is_named_with_what_is_wrong(case, checkpoint, tmp_path):
    damage, message = UNREADABLE[case]
    folder = copy(checkpoint, tmp_path)
    (folder / WEIGHTS).write_bytes(damage((folder / WEIGHTS).read_bytes()))
    with pytest.raises(DigestError, match=f"{WEIGHTS}.*({message})"):
        UNet2DModel.from_pretrained(folder)


def test_an_unreadable_plain_model_file_is_named_too(tmp_path):
    """The explanation applies to every diffusers load, quantized or not."""
    tiny_unet2d().save_pretrained(tmp_path / "fp")
    (tmp_path / "fp" / WEIGHTS).write_bytes((tmp_path / "fp" / WEIGHTS).read_bytes()[:100])
    with pytest.raises(DigestError, match="not a complete safetensors file"):
        UNet2DModel.from_pretrained(tmp_path / "fp")


def test_a_pickle_save_of_a_calibrated_model_is_refused(calibrated, tmp_path):
    with pytest.raises(ValueError, match="safe_serialization=True"):
        calibrated.save_pretrained(tmp_path / "bin", safe_serialization=False)


# -- resuming an interrupted calibration ----------------------------------------------------------------------------

def _killed_before_its_first_unit(folder: Path, monkeypatch, **options) -> None:
    """A calibration that recorded its data into ``folder`` and was stopped before any unit finished."""
    from diffusers_gac.calibration import flow

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(flow, "reconstruct_model", killed)
        with pytest.raises(KeyboardInterrupt):
            quantize_model(tiny_unet2d(), GACConfig(**{**FAST, **options}), scheduler=DDIMScheduler(
                num_train_timesteps=1000), checkpoint_dir=folder, show_progress=False)
    assert (folder / "run.json").is_file() and list(folder.glob("data-*.safetensors"))


@pytest.mark.parametrize("change, named", [({"seed": 1}, "options.seed"),
                                           ({"calib_samples_per_timestep": 1}, "options.calib_samples_per_timestep")])
def test_a_run_killed_before_its_first_unit_resumes_only_as_itself(change, named, tmp_path, monkeypatch):
    _killed_before_its_first_unit(tmp_path / "ck", monkeypatch)
    with pytest.raises(ValueError, match=f"holds the progress of another calibration run .*{named}"):
        quantize_model(tiny_unet2d(), GACConfig(**{**FAST, **change}), scheduler=DDIMScheduler(num_train_timesteps=1000),
                       checkpoint_dir=tmp_path / "ck", show_progress=False)
    resumed = tiny_unet2d()  # the same run resumes, and ends as an uninterrupted one
    quantize_model(resumed, GACConfig(**FAST), scheduler=DDIMScheduler(num_train_timesteps=1000),
                   checkpoint_dir=tmp_path / "ck", show_progress=False)
    fresh = tiny_unet2d()
    quantize_model(fresh, GACConfig(**FAST), scheduler=DDIMScheduler(num_train_timesteps=1000), show_progress=False)
    assert torch.equal(_out(resumed), _out(fresh))


def test_a_folder_without_a_run_record_is_refused(tmp_path, monkeypatch):
    _killed_before_its_first_unit(tmp_path / "ck", monkeypatch)
    (tmp_path / "ck" / "run.json").unlink()
    with pytest.raises(ValueError, match="but no run.json"):
        quantize_model(tiny_unet2d(), GACConfig(**FAST), scheduler=DDIMScheduler(num_train_timesteps=1000),
                       checkpoint_dir=tmp_path / "ck", show_progress=False)


@pytest.mark.parametrize("name", ["run.json", "progress.json", "units/0000.safetensors"])
def test_a_truncated_progress_file_is_named(name, tmp_path):
    folder = tmp_path / "ck"
    quantize_model(tiny_unet2d(), GACConfig(**{**FAST, "reconstruction": "adaround", "iters": 2}),
                   scheduler=DDIMScheduler(num_train_timesteps=1000), checkpoint_dir=folder, show_progress=False)
    path = folder / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{name} is damaged"):
        quantize_model(tiny_unet2d(), GACConfig(**{**FAST, "reconstruction": "adaround", "iters": 2}),
                       scheduler=DDIMScheduler(num_train_timesteps=1000), checkpoint_dir=folder, show_progress=False)


# -- stale state ----------------------------------------------------------------------------------------------------

def test_a_save_without_a_report_leaves_no_old_report_or_plot(checkpoint, tmp_path):
    from diffusers_gac.quantizer import REPORT_NAME
    from diffusers_gac.saving import PLOT_NAME

    folder = copy(checkpoint, tmp_path)
    (folder / PLOT_NAME).write_bytes(b"\x89PNG old")
    assert (folder / REPORT_NAME).is_file()
    model = UNet2DModel.from_pretrained(folder)
    model.hf_quantizer.calibration_report = None  # e.g. a model downloaded without one
    diffusers_gac.save_pretrained(model, folder)
    assert not (folder / REPORT_NAME).exists() and not (folder / PLOT_NAME).exists()
    assert torch.equal(_out(UNet2DModel.from_pretrained(folder)), _out(model))


def test_push_deletes_what_an_earlier_push_left_and_nothing_else(calibrated, monkeypatch):
    """The upload's delete patterns, applied the way huggingface_hub applies them to the repository's files."""
    from huggingface_hub.utils import filter_repo_objects

    from diffusers_gac import hub

    seen = {}
    monkeypatch.setattr(hub, "create_repo", lambda repo_id, **kw: type("R", (), {"repo_id": repo_id})())

    def upload(folder_path, delete_patterns, **kw):
        seen["uploaded"] = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*")
                                  if p.is_file())
        seen["patterns"] = delete_patterns
    monkeypatch.setattr(hub, "upload_folder", upload)
    hub.push_to_hub(calibrated, "org/m")
    remote = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model.safetensors.index.json",
              "diffusion_pytorch_model.safetensors", "gac_calibration.png", "gac_calibration.json", "notes.md",
              "README.md", "model_index.json", "text_encoder/model.safetensors", "unet/gac_calibration.json"]
    deleted = set(filter_repo_objects(remote, allow_patterns=seen["patterns"])) - set(seen["uploaded"])
    assert deleted == {"diffusion_pytorch_model-00001-of-00002.safetensors",
                       "diffusion_pytorch_model.safetensors.index.json", "gac_calibration.png"}


def test_saving_through_a_symlink_keeps_the_link(calibrated, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    diffusers_gac.save_pretrained(calibrated, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / WEIGHTS).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    assert torch.equal(_out(UNet2DModel.from_pretrained(tmp_path / "link")), _out(calibrated))


def test_a_save_that_cannot_write_leaves_no_partial_folder(calibrated, tmp_path, monkeypatch):
    """As a save into a read-only folder fails (simulated: tests may run as root, whom permissions do not stop)."""
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(args[0]))
    monkeypatch.setattr(UNet2DModel, "save_pretrained", refuse)
    with pytest.raises(PermissionError):
        diffusers_gac.save_pretrained(calibrated, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# -- options --------------------------------------------------------------------------------------------------------

def test_from_dict_refuses_a_misspelt_keyword():
    with pytest.raises(ValueError, match="'w_bit' \\(did you mean 'w_bits'\\?\\)"):
        GACConfig.from_dict({}, w_bit=3)
    assert GACConfig.from_dict({}, w_bits=3).w_bits == 3
    config, unused = GACConfig.from_dict({}, return_unused_kwargs=True, w_bit=3)  # diffusers' protocol
    assert unused == {"w_bit": 3} and config.w_bits == 4


def test_modules_to_not_convert_that_leaves_nothing_is_refused():
    model = tiny_unet2d()
    with pytest.raises(ValueError, match="leaves no Conv2d or Linear layer of UNet2DModel to quantize"):
        quantize_model(model, GACConfig(**FAST, modules_to_not_convert=["conv_in", "time_embedding", "class_embedding",
                                                                         "down_blocks", "mid_block", "up_blocks",
                                                                         "conv_out"]),
                       scheduler=DDIMScheduler(num_train_timesteps=1000), show_progress=False)


# -- outputs --------------------------------------------------------------------------------------------------------

@pytest.fixture
def nan_model(checkpoint, tmp_path):
    """A checkpoint without a digest whose plain weights pass every check but whose outputs are NaN: a GroupNorm
    weight of 1e38 overflows the next layer."""
    folder = copy(checkpoint, tmp_path)
    state = load_file(folder / WEIGHTS)
    state["down_blocks.0.resnets.0.norm1.weight"].fill_(3e38)
    save_file(state, folder / WEIGHTS, metadata={"format": "pt"})
    from diffusers_gac.sampling import sample_images

    model = UNet2DModel.from_pretrained(folder)
    images, _ = sample_images(model, DDIMScheduler(num_train_timesteps=1000), 2, num_inference_steps=2,
                              show_progress=False)
    assert not torch.isfinite(images).all()
    return folder, model


def test_sample_writes_no_image_from_non_finite_outputs(nan_model, tmp_path, capsys):
    from diffusers_gac.cli import main

    folder, _ = nan_model
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--model", str(folder), "--num-samples", "2", "--steps", "2", "--output",
              str(tmp_path / "grid.png"), "--quiet"])
    assert exit_.value.code == 2 and "non-finite values" in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists()


def test_evaluate_makes_no_metric_from_non_finite_outputs(nan_model):
    from diffusers_gac.evaluation import evaluate_denoiser

    _, model = nan_model
    with pytest.raises(ValueError, match="UNet2DModel's samples: 2 of 2 hold non-finite values"):
        evaluate_denoiser(model, DDIMScheduler(num_train_timesteps=1000), num_samples=2, num_inference_steps=2,
                          show_progress=False)


def test_push_without_a_network_is_one_line_and_exit_code_2(checkpoint, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_x", "HF_HOME": str(tmp_path)}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-m", "diffusers_gac.cli", "push", str(checkpoint), "org/x"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "could not reach the Hub (http://127.0.0.1:9)" in proc.stderr
