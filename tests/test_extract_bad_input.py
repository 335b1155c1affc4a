"""extract-lora on bad input: one clear sentence, exit code 2, no output file."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from _lowrank_fixtures import tuned_copy
from typer.testing import CliRunner

from sdcompress.checkpoint.safetensors_io import SafetensorsFile
from sdcompress.checkpoint.tensors import LazyTensor
from sdcompress.checkpoint.tiny import tiny_model
from sdcompress.checkpoint.writers import save_diffusers
from sdcompress.cli.app import app
from sdcompress.errors import SdcError

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    base = tiny_model("tiny-sd")
    save_diffusers(base, tmp / "base")
    save_diffusers(tuned_copy(base, text=False), tmp / "tuned")
    other = dict(base.components["unet"])
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    other[key] = LazyTensor.of(torch.zeros(64, 16))
    save_diffusers(dataclasses.replace(base, components={**base.components, "unet": other}), tmp / "other")
    return tmp


def _run(*args):
    return runner.invoke(app, list(map(str, args)))


def test_identical_models_say_nothing_changed(models, tmp_path):
    out = tmp_path / "x.safetensors"
    r = _run("extract-lora", models / "base", models / "base", "-o", out)
    assert isinstance(r.exception, SdcError) and "nothing changed" in str(r.exception)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_different_architectures_name_the_layer(models, tmp_path):
    out = tmp_path / "x.safetensors"
    r = _run("extract-lora", models / "base", models / "other", "-o", out)
    assert isinstance(r.exception, SdcError)
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight" in str(r.exception)
    assert not out.exists()


def test_other_family_is_refused(models, tmp_path):
    r = _run("extract-lora", models / "base", "tiny-sdxl", "-o", tmp_path / "x.safetensors")
    assert isinstance(r.exception, SdcError) and "family" in str(r.exception)


def test_rank_larger_than_a_layer_is_clamped_and_reported(models, tmp_path):
    out = tmp_path / "big.safetensors"
    r = _run("extract-lora", models / "base", models / "tuned", "-o", out, "--rank", 1000, "--json")
    assert r.exit_code == 0, r.output
    import json

    data = json.loads(r.stdout)
    assert data["clamped"] and all(x["rank"] <= min(x["shape"][0], x["shape"][1]) for x in data["layers"])
    f = SafetensorsFile(out)
    assert all(f.entries[k][1][0] <= 128 for k in f.entries if k.endswith("lora_down.weight"))


def test_corrupt_file_exits_2(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    out = tmp_path / "x.safetensors"
    p = subprocess.run(
        [sys.executable, "-m", "sdcompress", "extract-lora", str(bad), str(bad), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and "bad.safetensors" in p.stderr
    assert not out.exists()


def test_existing_output_needs_overwrite(models, tmp_path):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep")
    r = _run("extract-lora", models / "base", models / "tuned", "-o", out)
    assert isinstance(r.exception, SdcError) and out.read_bytes() == b"keep"


def test_modes_and_budget(models, tmp_path):
    from sdcompress.lowrank.extract import ExtractOptions
    from sdcompress.services.extract import ExtractRequest, run_extract

    b, t = str(models / "base"), str(models / "tuned")
    fixed = run_extract(ExtractRequest(b, t, str(tmp_path / "f.safetensors"), ExtractOptions(rank=4)))
    energy = run_extract(
        ExtractRequest(
            b, t, str(tmp_path / "e.safetensors"), ExtractOptions(rank=32, mode="energy", mode_param=0.9)
        )
    )
    assert all(x.retained >= 0.9 - 1e-6 or x.rank == min(32, *x.shape[:1]) for x in energy.layers)
    from sdcompress.lowrank.extract import HEADER_BYTES_FIXED, HEADER_BYTES_PER_MODULE

    # the budget reserves a header estimate; grant it so the data budget equals the fixed file's
    budget = fixed.file_bytes + HEADER_BYTES_FIXED + HEADER_BYTES_PER_MODULE * fixed.modules
    opt = ExtractOptions(rank=32, size_budget=budget)
    sized = run_extract(ExtractRequest(b, t, str(tmp_path / "s.safetensors"), opt))
    assert sized.file_bytes <= budget
    # for the same bytes, the joint allocation loses no more energy than a fixed rank
    err = lambda r: sum(x.sq_error for x in r.layers)  # noqa: E731
    assert err(sized) <= err(fixed) * 1.0001
    conv = run_extract(
        ExtractRequest(b, t, str(tmp_path / "c.safetensors"), ExtractOptions(rank=4, conv_rank=2))
    )
    assert conv.modules > fixed.modules
    clamped = run_extract(
        ExtractRequest(b, t, str(tmp_path / "q.safetensors"), ExtractOptions(rank=4, clamp_quantile=0.9))
    )
    assert err(clamped) > err(fixed)
