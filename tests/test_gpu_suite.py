"""benchmarks/gpu_suite.py is proven on the CPU before a GPU is at hand: `--tiny` runs every step.

The GPU loan is short and has no second try, so the script itself must be known to work: the
tiny run goes through the same steps, child processes, budgets and reports as the full one.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_suite.py"


def _suite_module():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # 2-3 minutes on an idle 2-core machine (6 on a busy one): a dozen child processes
def test_tiny_suite_runs_every_step_and_reports(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.run(
        [sys.executable, str(SUITE), "--tiny", "--out", str(out)], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_suite.json").read_text())
    gs = _suite_module()
    assert [s["name"] for s in report["steps"]] == list(gs.STEP_NAMES)
    assert all(s["ok"] for s in report["steps"]) and report["failed"] == []
    steps = {s["name"]: s["metrics"] for s in report["steps"]}
    assert set(steps["prune"]) == {"ssd-1b", "koala-700m", "vega"}
    rows = steps["bench"]["rows"]
    assert {r["model"] for r in rows} == {"tiny-sdxl", "ssd-1b", "koala-700m", "vega"}
    assert all(r["steps_per_s"] > 0 for r in rows)
    for name in ("extract-cuda", "extract-cpu"):
        # the extraction's error over sampled layers, against exact SVDs: near the optimum
        assert 1.0 - 1e-6 <= steps[name]["error_vs_exact"] < 1.05, steps[name]
    assert steps["convert"]["identical"] is True
    quant = steps["quantize"]
    assert {(r["model"], r["format"]) for r in quant["rows"]} == {
        (m, f) for m in ("tiny-sdxl", "ssd-1b") for f in ("fp32", "fp8", "fp8-scaled")
    }
    for row in quant["rows"]:
        assert row["steps_per_s"] > 0 and row["peak_memory"] > 0, row
        if row["format"] != "fp32":
            assert row["file_vs_source"] < 0.5 and "per layer" in row["compute"], row
            source = next(x for x in quant["rows"] if x["model"] == row["model"] and x["format"] == "fp32")
            assert row["weights_bytes"] < 0.5 * source["weights_bytes"], row  # fp8 codes in memory
            assert quant["files"][row["model"]][row["format"]]["bytes"] == row["file_bytes"]
    for name in ("distill", "finetune", "lora-train", "dmd2-lora", "dmd2-full"):
        assert steps[name]["losses_finite"] and steps[name]["steps"] == 2, steps[name]
    assert not (out / "work").exists()  # work files go unless --keep
    md = (out / "gpu_suite.md").read_text()
    for name in gs.STEP_NAMES:
        assert f"| {name} | ok |" in md
    assert "| ssd-1b |" in md and "1.56x" in md  # Segmind's published batch-1 ratio beside ours
    assert "| ssd-1b | fp8-scaled |" in md
    assert "Every step passed." in md


def test_failed_step_is_named_and_its_dependants_are_not_run(tmp_path, capsys):
    gs = _suite_module()
    plan = gs.Plan.make(tiny=True)
    runner = gs.Runner(plan, tmp_path, tmp_path / "work")

    def broken():
        raise gs.StepFailed("exit 2: the model is missing")

    runner.step("build", broken)
    runner.step("prune", lambda: {"never": "run"})
    runner.step("bench", lambda: None)
    by_name = {r.name: r for r in runner.results}
    assert not by_name["build"].ok and by_name["build"].error == "exit 2: the model is missing"
    assert not by_name["prune"].ok and by_name["prune"].error == "not run: needs build"
    assert by_name["bench"].ok
    runner.deadline = 0  # the total budget is spent: nothing more starts
    runner.step("pytest-gpu", lambda: None)
    assert runner.results[-1].error == "not run: the suite's total time budget was spent"


def test_a_child_over_its_budget_is_killed_and_reported(tmp_path):
    gs = _suite_module()
    with pytest.raises(gs.StepFailed, match="over its time budget"):
        gs._run([sys.executable, "-c", "import time; time.sleep(60)"], 1, tmp_path / "log")


def test_only_runs_the_named_steps_and_what_they_need():
    gs = _suite_module()
    assert gs.selected_steps(None) == gs.STEP_NAMES
    assert gs.selected_steps("quantize") == ("build", "prune", "quantize")
    assert gs.selected_steps("pytest-gpu,bench") == ("bench", "pytest-gpu")  # the suite's order
    assert gs.selected_steps("dmd2-full, convert") == ("build", "prune", "convert", "dmd2-full")


def test_only_with_an_unknown_step_is_one_sentence_and_exit_2(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.run(
        [sys.executable, str(SUITE), "--tiny", "--only", "quantize,quantise", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "quantise" in proc.stderr
    assert not out.exists()
