"""No command writes over its inputs, `--overwrite` replaces only what sdcompress wrote, and a full
disk is one sentence with the old output intact (issue 16.1, 16.3)."""

from __future__ import annotations

import errno
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from conftest import tree_digest

from sdcompress.checkpoint import atomic
from sdcompress.checkpoint import safetensors_io as stio
from sdcompress.checkpoint.resolve import load_model
from sdcompress.checkpoint.writers import save_single_file
from sdcompress.errors import SdcError


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "tiny.safetensors"
    save_single_file(load_model("tiny-sd"), path)
    return path


def _error(result) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.code == 2, result
    assert len(lines) == 1 and lines[0].startswith("error:"), result
    assert "Traceback" not in result.stderr
    return lines[0]


def _no_leftovers(folder: Path) -> None:
    left = [p.name for p in folder.iterdir() if p.name.endswith((".partial", ".old"))]
    assert left == [], left


# ---------------------------------------------------------------------------- outputs vs inputs


def test_convert_into_the_folder_that_holds_the_input(cli, tmp_path, tiny_file):
    """The reported loss: `convert holder/model.safetensors -o holder --overwrite` emptied holder/."""
    holder = tmp_path / "holder"
    holder.mkdir()
    model = holder / "model.safetensors"
    shutil.copy(tiny_file, model)
    (holder / "notes.txt").write_text("my notes\n")
    before = tree_digest(holder)
    for flag in ("--overwrite", "--overwrite-foreign"):
        line = _error(cli("convert", model, "-o", holder, flag))
        assert "contains the input" in line
        assert tree_digest(holder) == before
    _no_leftovers(tmp_path)


@pytest.mark.parametrize(
    "args",
    [
        ("extract-lora", "{a}", "{b}", "-o", "{b}"),
        ("merge", "{a}", "{b}", "-o", "{a}"),
        ("merge", "--lora", "{a}", "--lora", "{b}", "-o", "{b}"),
        ("convert", "{a}", "-o", "{a}"),
    ],
    ids=["extract-lora", "merge", "merge-loras", "convert"],
)
def test_output_is_an_input(cli, tmp_path, args):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"model a")
    b.write_bytes(b"model b")
    argv = [x.format(a=a, b=b) for x in args]
    line = _error(cli(*argv, "--overwrite"))
    assert "is the input" in line
    assert a.read_bytes() == b"model a" and b.read_bytes() == b"model b"


def test_output_through_a_symlink_to_the_input(cli, tmp_path, tiny_file):
    src = tmp_path / "model.safetensors"
    shutil.copy(tiny_file, src)
    link = tmp_path / "link.safetensors"
    link.symlink_to(src)
    line = _error(cli("convert", src, "-o", link, "--overwrite"))
    assert "is the input" in line
    assert src.read_bytes() == tiny_file.read_bytes()


def test_output_inside_an_input_folder(cli, tmp_path):
    folder = tmp_path / "pipeline"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    line = _error(cli("convert", folder, "-o", folder / "single.safetensors"))
    assert "lies inside the input" in line
    line = _error(cli("prune", "--teacher", folder, "--preset", "bk-base", "-o", folder / "student"))
    assert "lies inside the input" in line
    assert [p.name for p in folder.iterdir()] == ["model_index.json"]


@pytest.mark.parametrize("command", ["finetune", "lora"])
def test_training_output_inside_its_data(cli, tmp_path, command):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("a caption\n")
    argv = ["lora", "train"] if command == "lora" else [command]
    line = _error(cli(*argv, "--model", "tiny-sd", "--data", data, "-o", data / "out"))
    assert "lies inside the input" in line
    assert [p.name for p in data.iterdir()] == ["a.txt"]


@pytest.mark.parametrize("command", ["finetune", "lora", "distill"])
def test_training_refuses_a_foreign_folder(cli, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    data = tmp_path / "data"
    data.mkdir()
    argv = {
        "finetune": ["finetune", "--model", "tiny-sd"],
        "lora": ["lora", "train", "--model", "tiny-sd"],
    }.get(command, ["distill", "--teacher", "tiny-sdxl", "--student", "tiny-sdxl"])
    line = _error(cli(*argv, "--data", data, "-o", out, "--overwrite"))
    assert "notes.txt" in line and "--overwrite-foreign" in line
    # the stronger flag is there, and never lifts the input rule
    line = _error(cli(*argv, "--data", data, "-o", data / "out", "--overwrite-foreign"))
    assert "lies inside the input" in line
    assert (out / "notes.txt").read_text() == "mine\n"


def test_distill_output_is_the_student(cli, tmp_path):
    student = tmp_path / "student"
    student.mkdir()
    (student / "model_index.json").write_text("{}")
    line = _error(
        cli("distill", "--teacher", "tiny-sdxl", "--student", student, "--data", tmp_path, "-o", student)
    )
    assert "input" in line
    assert [p.name for p in student.iterdir()] == ["model_index.json"]


# ---------------------------------------------------------------------------- what --overwrite replaces


def test_overwrite_refuses_a_folder_sdcompress_did_not_write(cli, tmp_path, tiny_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    line = _error(cli("convert", tiny_file, "-o", out, "--overwrite"))
    assert "did not write" in line and "notes.txt" in line and "--overwrite-foreign" in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    _no_leftovers(tmp_path)
    r = cli("convert", tiny_file, "-o", out, "--overwrite-foreign")
    assert r.code == 0, r
    assert not (out / "notes.txt").exists() and (out / "model_index.json").is_file()


def test_overwrite_replaces_our_folder_but_not_files_added_to_it(cli, tmp_path, tiny_file):
    out = tmp_path / "out"
    assert cli("convert", tiny_file, "-o", out).code == 0
    listed = set(atomic._manifest_files(out))
    assert "unet/diffusion_pytorch_model.safetensors" in listed and atomic.foreign_files(out) == []
    r = cli("convert", tiny_file, "-o", out, "--overwrite")
    assert r.code == 0, r
    (out / "unet" / "my-notes.txt").write_text("mine\n")
    line = _error(cli("convert", tiny_file, "-o", out, "--overwrite"))
    assert "unet/my-notes.txt" in line
    assert (out / "unet" / "my-notes.txt").read_text() == "mine\n"


def test_push_leaves_the_manifest_at_home(tmp_path):
    from sdcompress.hub.upload import folder_files

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    atomic.write_manifest(tmp_path / "unet")
    atomic.write_manifest(tmp_path)
    assert [f.path_in_repo for f in folder_files(tmp_path)] == ["unet/config.json"]


def test_demo_refuses_a_foreign_folder(cli, tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"jpeg")
    line = _error(cli("demo", "-o", out, "--overwrite"))
    assert "holiday.jpg" in line
    assert (out / "holiday.jpg").read_bytes() == b"jpeg"


def test_a_folder_where_a_file_goes_and_a_file_where_a_folder_goes(cli, tmp_path, tiny_file):
    folder = tmp_path / "x.safetensors"
    folder.mkdir()
    line = _error(cli("convert", tiny_file, "-o", folder, "--overwrite"))
    assert "is a folder" in line
    file = tmp_path / "pipeline"
    file.write_bytes(b"not a folder")
    line = _error(cli("convert", tiny_file, "-o", file, "--overwrite"))
    assert "is a file" in line
    assert file.read_bytes() == b"not a folder" and folder.is_dir()
    _no_leftovers(tmp_path)


def test_symlink_loops_as_input_and_output(cli, tmp_path, tiny_file):
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    _error(cli("info", loop))
    _error(cli("convert", loop, "-o", tmp_path / "out"))
    line = _error(cli("convert", tiny_file, "-o", loop, "--overwrite"))
    assert "loop" in line
    assert loop.is_symlink()


def test_an_existing_symlink_is_not_replaced(cli, tmp_path, tiny_file):
    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes(b"precious")
    link = tmp_path / "out.safetensors"
    link.symlink_to(elsewhere)
    line = _error(cli("convert", tiny_file, "-o", link, "--overwrite"))
    assert "symbolic link" in line
    assert link.is_symlink() and elsewhere.read_bytes() == b"precious"


# ---------------------------------------------------------------------------- the old output survives


def _failing_after(monkeypatch, calls: int, error: BaseException) -> None:
    """The writer fails on its `calls`-th tensor: both the kernel-copy and the plain write path."""
    count = [0]
    copy, write = stio._copy_range, stio._write_tensor

    def fail_or(fn):
        def wrapped(*args):
            count[0] += 1
            if count[0] >= calls:
                raise error
            return fn(*args)

        return wrapped

    monkeypatch.setattr(stio, "_copy_range", fail_or(copy))
    monkeypatch.setattr(stio, "_write_tensor", fail_or(write))


@pytest.mark.parametrize("output", ["out.safetensors", "out"])
def test_old_output_intact_when_the_new_one_fails(tmp_path, tiny_file, monkeypatch, output):
    from sdcompress.services.convert import ConvertRequest, convert

    out = tmp_path / output
    convert(ConvertRequest(src=str(tiny_file), output=str(out)))
    before = tree_digest(out)
    _failing_after(monkeypatch, 20, RuntimeError("power cut"))
    with pytest.raises(RuntimeError, match="power cut"):
        convert(ConvertRequest(src=str(tiny_file), output=str(out), overwrite=True))
    assert tree_digest(out) == before
    _no_leftovers(tmp_path)


# ---------------------------------------------------------------------------- full disk


Usage = namedtuple("Usage", "total used free")


@pytest.mark.parametrize("output", ["out.safetensors", "out"])
def test_not_enough_free_space_is_refused_before_writing(cli, tmp_path, tiny_file, monkeypatch, output):
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    line = _error(cli("convert", tiny_file, "-o", tmp_path / output))
    size = tiny_file.stat().st_size
    assert "not enough space" in line and "mounted at" in line and "1000 bytes" not in line.split("needs")[0]
    needed = int(line.split("(")[1].split(" bytes")[0])
    assert size * 0.9 < needed <= size * 1.1  # the weights' size, named in bytes
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("output", ["out.safetensors", "out"])
def test_disk_full_while_writing(cli, tmp_path, tiny_file, monkeypatch, output):
    """ENOSPC mid-write (as a 20 MB tmpfs gives): one sentence, temp removed, old output untouched."""
    out = tmp_path / output
    assert cli("convert", tiny_file, "-o", out).code == 0
    before = tree_digest(out)
    _failing_after(monkeypatch, 10, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    line = _error(cli("convert", tiny_file, "-o", out, "--overwrite"))
    assert "ran out of space" in line and f"mounted at {atomic.mount_point(tmp_path)}" in line
    assert "bytes" in line and str(out) in line
    assert tree_digest(out) == before
    _no_leftovers(tmp_path)


def test_disk_full_during_a_training_checkpoint_is_one_sentence(tmp_path):
    with pytest.raises(SdcError, match="ran out of space"), atomic.disk_full_as_error(tmp_path / "ckpt"):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match="other"), atomic.disk_full_as_error(tmp_path / "ckpt"):
        raise OSError(errno.EIO, "other")


def test_a_disk_that_fills_during_an_unsized_write_is_one_sentence(cli, monkeypatch):
    """A full disk outside the sized writers (a log, a validation grid) is exit 2 and one line, not a traceback."""
    import errno

    import sdcompress.services.info as info_service

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/outputs/run/log.txt")

    monkeypatch.setattr(info_service, "info", full)
    r = cli("info", "tiny-sd")
    assert r.code == 2, r
    assert "disk is full while writing /outputs/run/log.txt" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
