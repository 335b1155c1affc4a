"""Bad input to convert/info: one sentence, exit code 2, nothing written, inputs untouched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import tree_digest

from sdcompress.checkpoint.resolve import load_model
from sdcompress.checkpoint.writers import save_single_file


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "tiny.safetensors"
    save_single_file(load_model("tiny-sd"), path)
    return path


def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.code == 2, result
    assert len(lines) == 1 and lines[0].startswith("error:"), result
    assert "Traceback" not in result.stderr
    return lines[0]


def _nothing_written(folder: Path, before: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == before


def test_missing_path(cli, tmp_path):
    line = _one_error_line(cli("convert", tmp_path / "nope.safetensors", "-o", tmp_path / "out"))
    assert "does not exist" in line
    _nothing_written(tmp_path, set())


def test_truncated_safetensors(cli, tmp_path, tiny_file):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(tiny_file.read_bytes()[: tiny_file.stat().st_size // 2])
    digest = tree_digest(bad)
    line = _one_error_line(cli("convert", bad, "-o", tmp_path / "out"))
    assert "truncated" in line
    _nothing_written(tmp_path, {"cut.safetensors"})
    assert tree_digest(bad) == digest


def test_text_file_named_safetensors(cli, tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("these are not weights, just some notes that happen to be long enough\n" * 3)
    line = _one_error_line(cli("info", bad))
    assert "not a valid safetensors file" in line


def test_pickle_needs_allow_pickle(cli, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    model = load_model("tiny-sd")
    from sdcompress.checkpoint.writers import single_file_state_dict

    sd = {k: v.load() for k, v in single_file_state_dict(model)[0].items()}
    torch.save({"state_dict": sd}, ckpt)
    line = _one_error_line(cli("convert", ckpt, "-o", tmp_path / "out"))
    assert "--allow-pickle" in line
    _nothing_written(tmp_path, {"model.ckpt"})
    r = cli("convert", ckpt, "-o", tmp_path / "out.safetensors", "--allow-pickle")
    assert r.code == 0, r


def test_unknown_family(cli, tmp_path):
    from safetensors.torch import save_file

    weird = tmp_path / "weird.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(48, 4, 3, 3),
            "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": torch.zeros(48, 48, 3, 3),
            "model.diffusion_model.out.2.weight": torch.zeros(4, 48, 3, 3),
        },
        str(weird),
    )
    line = _one_error_line(cli("convert", weird, "-o", tmp_path / "out"))
    assert "U-Net" in line or "family" in line
    save_file({"foo.weight": torch.zeros(3)}, str(tmp_path / "foo.safetensors"))
    line = _one_error_line(cli("convert", tmp_path / "foo.safetensors", "-o", tmp_path / "out"))
    assert "no Stable Diffusion U-Net" in line


def test_existing_output_needs_overwrite(cli, tmp_path, tiny_file):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    line = _one_error_line(cli("convert", tiny_file, "-o", out))
    assert "--overwrite" in line
    assert out.read_bytes() == b"precious"
    assert cli("convert", tiny_file, "-o", out, "--overwrite").code == 0
    assert out.read_bytes() != b"precious"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_directory(cli, tmp_path, tiny_file):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = _one_error_line(cli("convert", tiny_file, "-o", locked / "out"))
        assert "not writable" in line
    finally:
        locked.chmod(0o700)


def test_unwritable_output_directory_as_root(cli, tmp_path, tiny_file, monkeypatch):
    """os.access decides; root passes it, so simulate a read-only directory the way the check sees it."""
    import sdcompress.checkpoint.atomic as atomic

    monkeypatch.setattr(atomic.os, "access", lambda path, mode: False)
    line = _one_error_line(cli("convert", tiny_file, "-o", tmp_path / "sub" / "out"))
    assert "not writable" in line
    assert not (tmp_path / "sub").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu(cli, tmp_path, tiny_file):
    digest = tree_digest(tiny_file)
    line = _one_error_line(cli("convert", tiny_file, "-o", tmp_path / "out", "--device", "cuda"))
    assert "no CUDA GPU" in line
    assert not (tmp_path / "out").exists()
    assert tree_digest(tiny_file) == digest


def test_debug_shows_the_traceback(cli, tmp_path):
    from sdcompress.errors import SdcError

    with pytest.raises(SdcError):
        cli("--debug", "info", tmp_path / "missing")


def test_interrupted_write_leaves_nothing(tmp_path, tiny_file):
    from sdcompress.checkpoint.safetensors_io import read_state_dict, write_safetensors
    from sdcompress.checkpoint.tensors import LazyTensor

    sd = dict(read_state_dict(tiny_file))
    name = next(iter(sd))

    def boom():
        raise RuntimeError("disk on fire")

    sd[name] = LazyTensor(sd[name].shape, sd[name].dtype, boom)
    with pytest.raises(RuntimeError):
        write_safetensors(tmp_path / "x.safetensors", sd)
    assert list(tmp_path.iterdir()) == []
