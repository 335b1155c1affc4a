"""`sdcompress demo`: the README's main job, end to end on the tiny model, offline."""

from __future__ import annotations

import json
import time

import pytest


@pytest.mark.slow
def test_demo_runs_the_whole_workflow(cli, tmp_path):
    out = tmp_path / "demo"
    start = time.perf_counter()
    r = cli("demo", "-o", out, "--json")
    elapsed = time.perf_counter() - start
    assert r.code == 0, r
    result = json.loads(r.stdout)
    teacher, student, few_step = result["rows"]
    assert student["unet_parameters"] < teacher["unet_parameters"]
    # the LCM stage: 4 steps instead of 50, and no CFG doubling, so far fewer seconds per image
    assert (teacher["image_steps"], student["image_steps"], few_step["image_steps"]) == (50, 50, 4)
    assert few_step["seconds_per_image"] < student["seconds_per_image"] / 5
    assert (out / "lcm" / "scheduler" / "scheduler_config.json").is_file()
    assert teacher["transformer_blocks"] == 70 and student["transformer_blocks"] == 34
    for term in ("task", "output", "features"):
        assert result["losses_after"][term] < result["losses_before"][term], term
    for name in ("student", "distilled"):
        assert (out / name / "model_index.json").is_file()
    assert (out / "distilled.safetensors").stat().st_size > 0
    assert (out / "distill-delta.safetensors").stat().st_size > 0
    fp8 = out / "distilled-fp8.safetensors"  # the demo ends with an fp8 student
    assert 0 < fp8.stat().st_size < (out / "distilled.safetensors").stat().st_size
    assert json.loads(cli("info", fp8, "--json").stdout)["quantization"]["format"] == "fp8"
    assert int(result["paths"]["lora_modules"]) > 0
    print(f"demo took {elapsed:.0f} s")
    # an existing output is refused unless --overwrite
    assert cli("demo", "-o", out).code == 2
