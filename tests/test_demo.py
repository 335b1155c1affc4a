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
    teacher, student = result["rows"]
    assert student["unet_parameters"] < teacher["unet_parameters"]
    assert teacher["transformer_blocks"] == 70 and student["transformer_blocks"] == 34
    for term in ("task", "output", "features"):
        assert result["losses_after"][term] < result["losses_before"][term], term
    for name in ("student", "distilled"):
        assert (out / name / "model_index.json").is_file()
    assert (out / "distilled.safetensors").stat().st_size > 0
    assert (out / "distill-delta.safetensors").stat().st_size > 0
    assert int(result["paths"]["lora_modules"]) > 0
    print(f"demo took {elapsed:.0f} s")
    # an existing output is refused unless --overwrite
    assert cli("demo", "-o", out).code == 2
