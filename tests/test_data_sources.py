"""`data prepare` from WebDataset tar shards, and training from a prepared dataset behind a URL.

Offline: URLs are `file://` and `http://127.0.0.1` (a loopback server started
and stopped inside the test, with Range support, which fsspec's ranged reads need).
"""

from __future__ import annotations

import contextlib
import http.server
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tree_digest
from test_data_prepare import RES, images, prepare_request, prepared, student  # noqa: F401 (fixtures)
from test_distill import request

from sdcompress.errors import SdcError
from sdcompress.services.data_prepare import data_prepare
from sdcompress.services.distill import distill
from sdcompress.training import shards
from sdcompress.training.data import DataConfig, build_dataset

pytest.importorskip("webdataset")
pytest.importorskip("fsspec")


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            import io

            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def tars(images, tmp_path_factory) -> Path:  # noqa: F811
    """The image folder as two WebDataset shards (key = file stem; image + txt caption), broken image included."""
    folder = tmp_path_factory.mktemp("tars")
    samples = []
    for image in sorted(p for p in images.iterdir() if p.suffix == ".png"):
        caption = image.with_suffix(".txt").read_text(encoding="utf-8").encode()
        samples.append([(image.name, image.read_bytes()), (f"{image.stem}.txt", caption)])
    half = len(samples) // 2
    _tar(folder / "000000.tar", [m for s in samples[:half] for m in s])
    _tar(folder / "000001.tar", [m for s in samples[half:] for m in s])
    return folder


def _dataset_bytes(root: Path) -> dict[str, bytes]:
    """Every file of a prepared dataset but the index (which names its source)."""
    return {Path(k).name: v for k, v in tree_digest(root).items() if Path(k).name != shards.INDEX}


@contextlib.contextmanager
def serve(root: Path) -> Iterator[str]:
    """A loopback HTTP server for `root` with byte ranges; stopped on exit."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            ranged = self.headers.get("Range")
            path = Path(self.translate_path(self.path))
            if not ranged or not path.is_file():
                return super().do_GET()
            data = path.read_bytes()
            first, _, last = ranged.removeprefix("bytes=").partition("-")
            start, end = int(first), min(int(last) + 1 if last else len(data), len(data))
            self.send_response(206)
            self.send_header("Content-Length", str(end - start))
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            self.wfile.write(data[start:end])

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_tar_shards_prepare_to_the_same_bytes_as_their_folder(images, prepared, tars, tmp_path):  # noqa: F811
    """Brace pattern, file:// URL and loopback http: the shards equal the folder's; the broken member is skipped."""
    pytest.importorskip("aiohttp")
    before = tree_digest(tars)
    expected = _dataset_bytes(prepared)
    sources = {"local": f"{tars}/{{000000..000001}}.tar", "file": f"file://{tars}/{{000000..000001}}.tar"}
    with serve(tars) as url:
        sources["http"] = f"{url}/{{000000..000001}}.tar"
        for name, source in sources.items():
            out = tmp_path / name
            result = data_prepare(prepare_request(source, out))
            assert result.skipped == 1 and "broken.png" in result.skipped_examples[0], name
            assert _dataset_bytes(out) == expected, name
            assert shards.read_index(out).data["source"]["data"] == source
    assert tree_digest(tars) == before  # inputs are never modified


def test_a_missing_tar_shard_or_a_non_tar_url_is_one_sentence(tars, tmp_path):
    with pytest.raises(SdcError, match=r"cannot read shard .*000002\.tar"):
        data_prepare(prepare_request(f"{tars}/{{000000..000002}}.tar", tmp_path / "a"))
    with pytest.raises(SdcError, match="names no .tar shards"):
        data_prepare(prepare_request(f"file://{tars}", tmp_path / "b"))
    with pytest.raises(SdcError, match="not a prepared dataset"):
        build_dataset(DataConfig(data_dir=f"{tars}/000000.tar", resolution=RES), seed=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_training_from_a_prepared_dataset_url_equals_training_from_its_folder(prepared, student, tmp_path):  # noqa: F811
    """`--data file://...` and `--data http://127.0.0.1/...`: ranged reads give the same U-Net, bit for bit."""
    from safetensors.torch import load_file

    pytest.importorskip("aiohttp")
    weights = []
    with serve(prepared.parent) as url:
        sources = {"local": prepared, "file": f"file://{prepared}", "http": f"{url}/{prepared.name}"}
        for name, data in sources.items():
            req = request("tiny-sd", student, data, tmp_path / name, max_steps=2)
            req = replace(req, data=DataConfig(data_dir=data, resolution=RES, caption_dropout=0.5))
            distill(req)
            weights.append(load_file(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors"))
        dataset, stats = build_dataset(DataConfig(data_dir=sources["http"], resolution=RES), seed=0)
        local, _ = build_dataset(DataConfig(data_dir=prepared, resolution=RES), seed=0)
        assert isinstance(dataset, shards.PreparedDataset) and stats.images == 6
        assert torch.equal(dataset[(3, 0)]["latents"], local[(3, 0)]["latents"])
    for other in weights[1:]:
        assert all(torch.equal(weights[0][k], other[k]) for k in weights[0])


def test_a_url_without_a_prepared_dataset_is_one_sentence(tmp_path):
    with pytest.raises(SdcError, match="not a prepared dataset"):
        build_dataset(DataConfig(data_dir=f"file://{tmp_path}", resolution=RES), seed=0)


def test_urls_survive_the_command_line(tars, prepared, tmp_path, cli):  # noqa: F811
    """Typer would fold `file:///x` into `file:/x` for a Path option; the source and --data stay strings."""
    out = tmp_path / "cli"
    source = f"file://{tars}/{{000000..000001}}.tar"
    r = cli(
        "data", "prepare", source, "--model", "tiny-sd", "-o", out, "--resolution", RES, "--buckets",
        "--shard-size", "2", "--device", "cpu", "--json",
    )  # fmt: skip
    assert r.code == 0, r
    assert shards.read_index(out).data["source"]["data"] == source and shards.read_index(out).samples == 6
    r = cli(
        "finetune", "--model", "tiny-sdxl", "--data", f"file://{prepared}", "-o", tmp_path / "o",
        "--max-steps", "1", "--cpu", "--checkpoint-every", "0",
    )  # fmt: skip
    assert r.code == 2 and "encoded for another model family" in r.stderr, r  # its index read through the URL
    r = cli("data", "prepare", f"file://{tars}", "--model", "tiny-sd", "-o", tmp_path / "n")
    assert r.code == 2 and "names no .tar shards" in r.stderr
