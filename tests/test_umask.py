"""Every file and folder sdcompress writes has the mode plain creation gives under the umask (issue 19.1).

Temporary files (0600), temporary folders (0700) and safetensors' own 0600
temporary files must not leak into outputs: a service user, a teammate or a web
server has to be able to read what we wrote when the umask says so. With
`--overwrite` the replaced output keeps its mode.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from _lowrank_fixtures import write_pair
from safetensors.torch import save_file

from sdcompress.checkpoint.atomic import MANIFEST, atomic_dir, replacing_dir
from sdcompress.training.demo_data import write_demo_dataset


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny single-file base and a tuned copy, written under the default umask."""
    base, tuned, _, _ = write_pair(tmp_path_factory.mktemp("pair"), "tiny-sd", single_file=True)
    return base, tuned


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def assert_plain_modes(path: Path, mask: int) -> None:
    """`path` and everything under it: 0666 / 0777 minus the umask."""
    paths = [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]
    wrong = {
        str(p): oct(_mode(p))
        for p in paths
        if not p.is_symlink() and _mode(p) != (0o777 if p.is_dir() else 0o666) & ~mask
    }
    assert not wrong, (oct(mask), wrong)
    assert len(paths) >= 1


def test_convert_both_directions(cli, tmp_path, umask, pair):
    folder, single = tmp_path / "folder", tmp_path / "single.safetensors"
    assert cli("convert", pair[0], "-o", folder).code == 0
    assert_plain_modes(folder, umask)
    assert (folder / MANIFEST).is_file() and (
        folder / "unet" / "diffusion_pytorch_model.safetensors"
    ).is_file()
    assert cli("convert", folder, "-o", single).code == 0
    assert_plain_modes(single, umask)


def test_prune(cli, tmp_path, umask):
    out = tmp_path / "student"
    r = cli("prune", "--teacher", "tiny-sd", "--preset", "bk-base", "--select", "uniform", "-o", out)
    assert r.code == 0, r
    assert_plain_modes(out, umask)


def test_extract_and_merge(cli, tmp_path, umask, pair):
    base, tuned = pair
    lora = tmp_path / "lora.safetensors"
    assert cli("extract-lora", base, tuned, "--rank", "2", "-o", lora).code == 0
    assert_plain_modes(lora, umask)
    merged = tmp_path / "merged.safetensors"
    assert cli("merge", base, "--lora", lora, "-o", merged).code == 0
    assert_plain_modes(merged, umask)
    folder = tmp_path / "merged"
    assert cli("merge", base, tuned, "-o", folder).code == 0
    assert_plain_modes(folder, umask)
    loras = tmp_path / "loras.safetensors"
    assert cli("merge", "--lora", lora, "--lora", lora, "-o", loras).code == 0
    assert_plain_modes(loras, umask)


def test_lora_train_output_and_checkpoints(cli, tmp_path, umask):
    data = write_demo_dataset(tmp_path / "data", 2, size=32)
    assert_plain_modes(data, umask)
    out = tmp_path / "adapter"
    r = cli(
        "lora", "train", "--model", "tiny-sd", "--data", data, "-o", out, "--resolution", "32",
        "--max-steps", "1", "--rank", "2", "--cpu", "--checkpoint-every", "1", "--num-workers", "0",
        "--json",
    )  # fmt: skip
    assert r.code == 0, r
    assert_plain_modes(out, umask)
    checkpoints = tmp_path / "adapter.train" / "checkpoints"
    assert any(checkpoints.iterdir())
    for checkpoint in checkpoints.iterdir():  # accelerate writes through safetensors' 0600 files
        assert_plain_modes(checkpoint, umask)


def test_library_writers_fix_files_others_write_into_our_folders(tmp_path, umask):
    """What the demo and the trainers do: safetensors/diffusers write files (0600) into our folders."""
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir(mode=0o700)
        save_file({"a": torch.zeros(2)}, str(tmp / "sub" / "w.safetensors"))
    assert_plain_modes(tmp_path / "out", umask)
    with replacing_dir(tmp_path / "demo") as root:
        save_file({"a": torch.zeros(2)}, str(root / "w.safetensors"))
    assert_plain_modes(tmp_path / "demo", umask)


def test_overwrite_keeps_the_mode_it_replaces(cli, tmp_path, umask, pair):
    single = tmp_path / "single.safetensors"
    assert cli("convert", pair[0], "-o", single).code == 0
    single.chmod(0o640)
    assert cli("convert", pair[0], "-o", single, "--overwrite").code == 0
    assert _mode(single) == 0o640
    folder = tmp_path / "folder"
    assert cli("convert", pair[0], "-o", folder).code == 0
    folder.chmod(0o750)
    (folder / "model_index.json").chmod(0o604)
    assert cli("convert", pair[0], "-o", folder, "--overwrite").code == 0
    assert _mode(folder) == 0o750 and _mode(folder / "model_index.json") == 0o604
    assert _mode(folder / "unet") == 0o777 & ~umask
