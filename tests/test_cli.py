"""The ``diffusers-gac`` command end to end on the embedded model (small sample counts, few steps)."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image

from diffusers_gac import zoo
from diffusers_gac.cli import build_parser, main
from diffusers_gac.cli.common import bits

SMALL = ["--num-samples", "20", "--steps", "3", "--quiet"]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``main(argv)`` in-process; an argparse error's ``SystemExit`` becomes its exit code."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def model_copies(tmp_path_factory):
    """The embedded model saved again (identical weights) and a slightly perturbed copy, as ``unet/`` folders."""
    root = tmp_path_factory.mktemp("models")
    unet = zoo.load_embedded_unet()
    unet.save_pretrained(root / "copy" / "unet")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    unet.save_pretrained(root / "perturbed" / "unet")
    return root / "copy", root / "perturbed"


def test_sample_writes_a_png_grid(tmp_path, capsys):
    output = tmp_path / "grid.png"
    code, out, _ = run_cli(["sample", "--output", str(output), *SMALL], capsys)
    assert code == 0 and str(output) in out
    with Image.open(output) as image:
        image.verify()
    with Image.open(output) as image:
        # 20 samples of 8x8 with balanced labels: 10 per row, enlarged 4x with a 1-pixel border
        assert image.format == "PNG" and image.size == ((10 * 9 + 1) * 4, (2 * 9 + 1) * 4)


def test_sample_one_class_from_a_folder(tmp_path, capsys, model_copies):
    output = tmp_path / "sevens.png"
    code, _, _ = run_cli(["sample", "--model", str(model_copies[0]), "--class-label", "7", "--output", str(output), *SMALL], capsys)
    assert code == 0 and output.is_file()


def test_sample_rejects_a_class_the_model_lacks(tmp_path, capsys):
    code, _, err = run_cli(["sample", "--class-label", "10", "--output", str(tmp_path / "x.png"), *SMALL], capsys)
    assert code == 2 and "--class-label must be between 0 and 9, got 10" in err
    assert not (tmp_path / "x.png").exists()


def test_evaluate_json_against_the_embedded_reference(capsys, model_copies):
    copy, perturbed = model_copies
    code, out, _ = run_cli(["evaluate", str(copy), str(perturbed), "--json", "--seeds", "0", "1", *SMALL], capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["model"] for r in rows] == [str(copy), str(perturbed)]
    for row in rows:
        assert {"model", "fd", "psnr", "accuracy"} <= row.keys()
        assert row["seeds"] == [0, 1] and len(row["runs"]) == 2
        assert row["num_samples"] == 20 and row["num_inference_steps"] == 3
        assert row["fd"] > 0 and 0 <= row["accuracy"] <= 1
    assert rows[0]["psnr"] == math.inf  # same weights, same noise: identical samples
    assert 10 < rows[1]["psnr"] < math.inf


def test_evaluate_without_models_scores_the_reference_itself(capsys):
    code, out, _ = run_cli(["evaluate", *SMALL], capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:2] == ["model", "steps"]
    assert lines[2].startswith("digits") and " inf " in lines[2]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "/no/such/folder"], "/no/such/folder does not exist"),
        (["evaluate", "--reference", "digitz"], "'digitz' is neither an embedded model (available: ['digits', 'photos'])"),
        (["sample", "--model", "nope"], "'nope' is neither an embedded model"),
        (["evaluate", "--steps", "0"], "argument --steps: must be a positive integer, got 0"),
        (["sample", "--num-samples", "0"], "argument --num-samples: must be a positive integer, got 0"),
        (["evaluate", "--num-samples", "many"], "expected a positive integer, got 'many'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and message in err and out == ""


def test_a_folder_without_a_model_is_named(tmp_path, capsys):
    code, _, err = run_cli(["evaluate", str(tmp_path)], capsys)
    assert code == 2 and f"{tmp_path} is not a model folder" in err


def test_bits_type_allows_2_to_8():
    assert bits("4") == 4
    for bad in ("1", "9", "four"):
        with pytest.raises(argparse.ArgumentTypeError):
            bits(bad)


def test_parser_has_one_subcommand_per_function():
    parser = build_parser()
    args = parser.parse_args(["evaluate", "--seed", "3"])
    assert args.seeds == [3] and args.func.__name__ == "run_evaluate"
    assert parser.parse_args(["sample"]).func.__name__ == "run_sample"


def test_console_entry_point_reports_errors_with_exit_code_2():
    result = subprocess.run(
        [sys.executable, "-m", "diffusers_gac.cli", "evaluate", "--steps", "0"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "must be a positive integer, got 0" in result.stderr


def test_calibrate_end_to_end_writes_a_loadable_folder(tmp_path, monkeypatch):
    import json

    from diffusers_gac.cli import commands
    from diffusers_gac.zoo import load_model

    out = tmp_path / "w4a4"
    assert main(["calibrate", "--output", str(out), "--iters", "3", "--eval-samples", "50", "--steps", "5",
                 "--quiet"]) == 0
    assert {p.name for p in out.iterdir()} == {"unet", "scheduler", "samples.png", "report.json", "diagnostics.png"}
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["config"]["w_bits"] == 4
    q, fp = report["evaluation"]["quantized"], report["evaluation"]["full_precision"]
    assert q["psnr"] > 25 and q["accuracy"] >= 0.9 and q["fd"] < 1.5 * fp["fd"]  # about 29 dB, 1.0, 1.08x here
    assert fp["psnr"] == float("inf")  # the full-precision row is scored against its own samples
    assert q["seeds"] == fp["seeds"] == [1000]  # evaluation noise disjoint from calibration seed 0's
    unet, _ = load_model(str(out))
    assert unet.is_quantized
    # evaluating on the calibration seed is allowed, with a warning naming it
    warnings = []
    monkeypatch.setattr(commands.logger, "warning", warnings.append)
    assert main(["evaluate", str(out), "--seeds", "0", "1000", *SMALL]) == 0
    assert len(warnings) == 1 and "evaluation seed 0 is the calibration seed of" in warnings[0]
    warnings.clear()
    assert main(["evaluate", str(out), *SMALL]) == 0 and not warnings  # the default seed is 1000
    # what `push` would upload: the checkpoint and a card carrying the measured quality of report.json
    preview = tmp_path / "preview"
    assert main(["push", str(out), "my-org/digits-w4a4", "--dry-run", str(preview)]) == 0
    card = (preview / "README.md").read_text()
    q = report["evaluation"]["quantized"]
    assert f"{q['psnr']:.2f}" in card and "my-org/digits-w4a4" in card
    assert (preview / "diffusion_pytorch_model.safetensors").is_file()


def test_push_refuses_a_full_precision_model(tmp_path, capsys):
    from diffusers_gac.zoo import embedded_model_path

    with pytest.raises(SystemExit) as err:
        main(["push", str(embedded_model_path()), "org/x", "--dry-run", str(tmp_path / "p")])
    assert err.value.code == 2 and "full-precision model" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_calibrate_refuses_a_non_empty_output_and_bad_bits(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(SystemExit) as err:
        main(["calibrate", "--output", str(tmp_path / "taken")])
    assert err.value.code == 2 and "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["calibrate", "--output", str(tmp_path / "x"), "--w-bits", "9"])
    assert err.value.code == 2 and "between 2 and 8" in capsys.readouterr().err
