"""benchmarks/ptq_compare.py: the table it writes from a JSONL file of finished runs (nothing is rerun)."""
import json

import pytest
from tiny_models import benchmark_module


def _ptq_compare():
    return benchmark_module("ptq_compare")


def _row(method, seed, fd, **extra):
    row = {"model": "digits", "bits": "FP32" if method == "fp" else "W4A4", "method": method, "seed": seed,
           "steps": 25, "base": {} if method == "fp" else {"calib_num_inference_steps": 25}, "fd": fd,
           "accuracy": 1.0, "peak_rss_mb": 700.0, "eval_seed": seed + 1000}
    row.update(extra)
    return row


def test_the_table_summarises_every_run_in_the_jsonl_and_names_the_given_command(tmp_path):
    jsonl, table = tmp_path / "runs.jsonl", tmp_path / "runs.md"
    rows = [_row("fp", s, fd) for s, fd in enumerate([6.0, 7.0, 8.0])]
    rows += [_row("qdiffusion:lowrank_rank=4", s, fd, psnr=30.0, trajectory_mse=2e-3, checkpoint_bytes=2048,
                 lever_params=130688)
             for s, fd in enumerate([10.0, 12.0, 14.0])]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _ptq_compare().main(["--jsonl", str(jsonl), "--methods", "fp", "qdiffusion:lowrank_rank=4", "--table", str(table),
                         "--table-command", "bash benchmarks/levers_sweep.sh digits"])
    text = table.read_text()
    assert "```\nbash benchmarks/levers_sweep.sh digits\n```" in text
    assert "seeds [1000, 1001, 1002]; calibration seeds [0, 1, 2]" in text
    lines = [line for line in text.splitlines() if line.startswith("| digits")]
    assert len(lines) == 2 and "full precision" in lines[0] and "| 7.00 ± 1.00 |" in lines[0]
    assert "(lowrank_rank=4)" in lines[1] and "| 12.00 ± 2.00 |" in lines[1] and "| 2.000 ± 0.000 |" in lines[1]
    assert lines[1].split(" | ")[10:12] == ["2", "130688"] and lines[0].split(" | ")[10:12] == ["-", "-"]
    assert len(jsonl.read_text().splitlines()) == 6  # every run was there: none was added


def test_the_table_names_its_own_command_by_default(tmp_path):
    jsonl, table = tmp_path / "runs.jsonl", tmp_path / "runs.md"
    jsonl.write_text("".join(json.dumps(_row("fp", s, 6.0)) + "\n" for s in range(3)))
    _ptq_compare().main(["--jsonl", str(jsonl), "--methods", "fp", "--table", str(table)])
    assert f"--jsonl {jsonl} --methods fp --table {table}\n```" in table.read_text()


def test_evaluation_seeds_must_not_overlap_calibration_seeds(tmp_path):
    with pytest.raises(SystemExit):
        _ptq_compare().main(["--jsonl", str(tmp_path / "x.jsonl"), "--seeds", "0", "5", "--eval-seed-offset", "5"])


def test_the_paper_method_is_the_papers_configuration():
    from diffusers_gac import GACConfig

    options = _ptq_compare().method_options("gac-paper")
    paper = GACConfig.paper()
    assert {k: getattr(paper, k) for k in options if k.startswith("gac_") or k == "weighting"} == {
        k: v for k, v in options.items() if k.startswith("gac_") or k == "weighting"}
    defaults = GACConfig()
    changed = {k for k in GACConfig.option_names() if getattr(paper, k) != getattr(defaults, k)}
    assert changed <= set(options)  # every option the paper form changes is in the benchmark's method
