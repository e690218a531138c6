"""Data-parallel calibration over two real CPU processes (accelerate launch, gloo), and resuming a calibration
process that was killed."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

CHILD = Path(__file__).parent / "calibration_child.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch_two(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(CHILD), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)


def run_one(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHILD), *map(str, args)], capture_output=True, text=True, env=_env(),
                          timeout=900)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Gradient-aligned weighting (meta-gradients reduced too), dynamic activation ranges (the default)."""
    out = tmp_path_factory.mktemp("dp")
    result = launch_two(out, "--act-scheme", "dynamic")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_two_processes_really_took_part(two_processes):
    world = json.loads((two_processes / "world.json").read_text())
    assert world == {"processes": 2, "sum": 3.0}  # 1 + 2: the all-reduce reached both
    sizes = [len(load_file(str(two_processes / f"data-{r}.safetensors"))["step_index"]) for r in (0, 1)]
    assert sizes == [6 * 4, 6 * 4]  # 8 trajectories x 6 steps, shared out: each process keeps its own 4


def test_every_process_ends_with_the_same_model(two_processes):
    a, b = (load_file(str(two_processes / f"state-{r}.safetensors")) for r in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_give_the_model_of_one_process_on_the_same_data(two_processes):
    """Same global batches, data and seed. Only the order of floating-point sums can differ (the all-reduce adds the
    two processes' partial gradients). The tolerance stated: at most 0.5% of the 4-bit weight codes differ, and the
    two models' outputs differ by less than 1% of their difference from full precision on a fixed call (on this
    model they come out identical)."""
    result = run_one(two_processes, "--data", two_processes / "data-0.safetensors", two_processes / "data-1.safetensors",
                     "--act-scheme", "dynamic")
    assert result.returncode == 0, result.stderr[-3000:]
    dp = load_file(str(two_processes / "state-0.safetensors"))
    single = load_file(str(two_processes / "state-single.safetensors"))
    assert dp.keys() == single.keys()
    codes_differ = codes_total = 0
    for k in dp:
        if k.endswith("packed_weight"):
            codes = lambda t: torch.stack([t & 0x0F, t >> 4])  # noqa: E731  (both 4-bit codes of every byte)
            codes_differ += int((codes(dp[k]) != codes(single[k])).sum())
            codes_total += 2 * dp[k].numel()
    assert codes_total > 0 and codes_differ <= 0.005 * codes_total
    fp = single["probe.full_precision"]
    assert torch.equal(fp, dp["probe.full_precision"])
    between = (dp["probe.quantized"] - single["probe.quantized"]).norm()
    assert between <= 0.01 * (single["probe.quantized"] - fp).norm()


def test_activation_ranges_are_set_from_every_process_observations(tmp_path):
    """Static ranges, one reconstruction step: the ranges observed over both processes' data are those observed
    over the same data in one process. (Over more steps, Adam's normalised steps turn the summation order's last-bit
    differences in near-zero step-size gradients into steps of a full learning rate, as a change of the thread
    count does: models with learned activation step sizes then differ between runs by more than float rounding.)"""
    result = launch_two(tmp_path, "--act-scheme", "static", "--weighting", "uniform", "--iters", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    single = run_one(tmp_path, "--data", tmp_path / "data-0.safetensors", tmp_path / "data-1.safetensors",
                     "--act-scheme", "static", "--weighting", "uniform", "--iters", "1")
    assert single.returncode == 0, single.stderr[-3000:]
    dp, one = load_file(str(tmp_path / "state-0.safetensors")), load_file(str(tmp_path / "state-single.safetensors"))
    scales = [k for k in dp if k.endswith("input_quantizer.scale") or k.endswith(".first.scale")]
    assert scales and all(torch.allclose(dp[k], one[k], rtol=1e-3) for k in scales)
    assert torch.equal(dp["probe.quantized"], one["probe.quantized"])


def test_a_killed_calibration_resumes_to_the_uninterrupted_model(tmp_path):
    args = ("--iters", "150", "--weighting", "gradient_aligned")
    reference = run_one(tmp_path / "reference", "--checkpoint", tmp_path / "reference-ck", *args)
    assert reference.returncode == 0, reference.stderr[-3000:]
    checkpoint, out = tmp_path / "ck", tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, str(CHILD), str(out), "--checkpoint", str(checkpoint), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    progress = checkpoint / "progress.json"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file() and len(json.loads(progress.read_text())["units"]) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the calibration ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(json.loads(progress.read_text())["units"])
    assert 3 <= finished and not (out / "state-0.safetensors").exists()
    resumed = run_one(out, "--checkpoint", checkpoint, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(str(out / "state-0.safetensors"))
    b = load_file(str(tmp_path / "reference" / "state-0.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_other_options_is_refused(tmp_path):
    first = run_one(tmp_path / "a", "--checkpoint", tmp_path / "ck", "--iters", "5")
    assert first.returncode == 0, first.stderr[-3000:]
    other = run_one(tmp_path / "b", "--checkpoint", tmp_path / "ck", "--iters", "6")
    assert other.returncode != 0 and "holds the progress of another calibration" in other.stderr
