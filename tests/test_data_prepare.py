"""`data prepare` and training from prepared shards, on the tiny models.

What the shards promise: a run from them equals a run from the image folder
they came from (bit for bit on the CPU with fp32 storage), an interrupted
prepare resumes to the same bytes, broken images are skipped and reported,
and data encoded for one family is refused by another.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tree_digest
from PIL import Image
from test_distill import make_student, request

from sdcompress.errors import SdcError
from sdcompress.services.data_prepare import DataPrepareRequest, data_prepare, work_dir_of
from sdcompress.services.distill import distill
from sdcompress.training import shards
from sdcompress.training.data import DataConfig, build_dataset, collate
from sdcompress.training.demo_data import write_demo_dataset

pytest.importorskip("webdataset")
RES = 32


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Square demo shapes, two wide images (a second bucket with --buckets), one broken file."""
    folder = write_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", 4, size=40)
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (64, 32), colour).save(folder / f"wide{i}.png")
        (folder / f"wide{i}.txt").write_text(f"a wide {colour} picture")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "broken.txt").write_text("never seen")
    return folder


def prepare_request(images: Path, out: Path, model: str = "tiny-sd", **changes) -> DataPrepareRequest:
    base = DataPrepareRequest(
        model=model,
        output=out,
        data=DataConfig(data_dir=images, resolution=RES, buckets=True),
        dtype="fp32",
        shard_size=2,
        batch_size=2,
        device="cpu",
    )
    return replace(base, **changes)


@pytest.fixture(scope="module")
def prepared(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "sd"
    result = data_prepare(prepare_request(images, out))
    assert result.output == out and not result.interrupted
    return out


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    return make_student("tiny-sd", "bk-small", tmp_path_factory.mktemp("student") / "bk-small")


def test_prepared_samples_are_what_the_trainer_computes(images, prepared):
    index = shards.read_index(prepared)
    assert index.samples == 6 and len(index.shards) == 3  # 4 shapes + 2 wide, shards of 2
    assert index.data["skipped"]["count"] == 1 and "broken.png" in index.data["skipped"]["examples"][0]
    assert index.conditioning == {
        "family": "tiny-sd",
        "model": "tiny-sd",
        "latent_channels": 4,
        "text_dim": 32,
        "pooled_dim": None,
    }
    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.training.data import model_bucket_step

    configs = load_model("tiny-sd").configs
    step = model_bucket_step(configs["vae"], configs["unet"])  # as the services set it
    raw_config = DataConfig(data_dir=images, resolution=RES, buckets=True, bucket_step=step)
    raw, raw_stats = build_dataset(raw_config, seed=0)
    ready, stats = build_dataset(DataConfig(data_dir=prepared, resolution=RES), seed=0)
    assert isinstance(ready, shards.PreparedDataset)
    assert list(ready.targets) == list(raw.targets) and len(set(raw.targets)) == 2
    assert stats.images == raw_stats.images and stats.unreadable == raw_stats.unreadable == 1
    sample, image = ready[(5, 0)], raw[(5, 0)]
    for key in ("caption", "original_size", "crop_top_left", "target_size"):
        assert sample[key] == image[key], key
    assert sample["latents"].dtype == torch.float32 and sample["latents"].shape[0] == 4


def test_training_from_shards_equals_training_from_the_folder(images, prepared, student, tmp_path):
    """Same seed, centre crops, no flip, fp32 storage: the distilled U-Nets are identical, bit for bit.

    Caption dropout is on, so the stored empty-prompt embedding stands in for dropped captions.
    Every image is encoded in a batch of two both times (shards of 2 images of one bucket, batch
    size 2 with full batches): on the CPU a batch of one runs other convolution kernels, whose last
    bits differ (docs/data.md says so).
    """
    from safetensors.torch import load_file

    weights, histories = [], []
    for name, data in (("raw", images), ("shards", prepared)):
        req = request("tiny-sd", student, data, tmp_path / name, max_steps=4)
        req = replace(req, data=DataConfig(data_dir=data, resolution=RES, buckets=True, caption_dropout=0.5))
        result = distill(req)
        histories.append(result.data)
        weights.append(load_file(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors"))
    raw, ready = weights
    assert raw.keys() == ready.keys()
    different = [k for k in raw if not torch.equal(raw[k], ready[k])]
    assert not different, different[:3]
    assert histories[0]["images"] == histories[1]["images"] == 6


@pytest.mark.parametrize("task_class", ["DiffusionTask", "UNetTrainingTask"])
def test_training_from_shards_runs_no_vae_or_text_encoder(prepared, task_class):
    """The shared task and finetune / lora train's task (which encodes captions its own way) alike."""
    from sdcompress.checkpoint.instantiate import build_pipeline
    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.training import finetune_task, task
    from sdcompress.training.config import LossConfig
    from sdcompress.training.task import DiffusionParts

    parts = DiffusionParts.from_pipeline(build_pipeline(load_model("tiny-sd")))
    calls = []
    parts.vae.encode = lambda *a, **k: calls.append("vae")  # type: ignore[method-assign]
    parts.text_encoders[0].forward = lambda *a, **k: calls.append("text")  # type: ignore[method-assign]
    task = getattr(task, task_class, None) or getattr(finetune_task, task_class)
    task = task(parts, LossConfig())
    dataset, _ = build_dataset(DataConfig(data_dir=prepared, resolution=RES), seed=0)
    task.check_dataset(dataset)
    batch = collate([dataset[(i, 0)] for i in (0, 1)])
    prepared_batch = task.prepare(batch, torch.Generator().manual_seed(0))
    assert calls == [] and prepared_batch.cond.hidden_states.shape == (2, 77, 32)


def test_interrupted_prepare_resumes_to_the_same_shards(images, prepared, tmp_path):
    out = tmp_path / "again"

    def ctrl_c_after_first_shard(event) -> None:
        if event.shard == 0:
            raise KeyboardInterrupt

    stopped = data_prepare(prepare_request(images, out), ctrl_c_after_first_shard)
    work = work_dir_of(out)
    assert stopped.interrupted and stopped.output is None and not out.exists()
    assert (work / shards.shard_name(0)).is_file() and not (work / shards.shard_name(1)).exists()
    assert not list(work.glob("*.partial"))

    with pytest.raises(SdcError, match="interrupted prepare; pass --resume"):
        data_prepare(prepare_request(images, out))
    with pytest.raises(SdcError, match=r"other settings \(shard_size\)"):
        data_prepare(prepare_request(images, out, shard_size=4, resume=True))

    resumed = data_prepare(prepare_request(images, out, resume=True))
    assert resumed.kept_shards == 1 and resumed.output == out and not work.exists()
    strip = lambda digest, root: {Path(k).relative_to(root): v for k, v in digest.items()}  # noqa: E731
    assert strip(tree_digest(out), out) == strip(tree_digest(prepared), prepared)


def test_sd1_data_is_refused_for_an_sdxl_model_in_one_sentence(prepared, tmp_path, cli):
    r = cli(
        "finetune", "--model", "tiny-sdxl", "--data", prepared, "-o", tmp_path / "o",
        "--max-steps", "1", "--cpu", "--checkpoint-every", "0",
    )  # fmt: skip
    assert r.code == 2, r
    assert "encoded for another model family" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_training_the_text_encoders_on_prepared_data_is_refused(prepared, tmp_path, cli):
    r = cli(
        "finetune", "--model", "tiny-sd", "--data", prepared, "-o", tmp_path / "o", "--resolution", RES,
        "--max-steps", "1", "--cpu", "--checkpoint-every", "0", "--train-text-encoder",
    )  # fmt: skip
    assert r.code == 2, r
    assert "the text encoders cannot train on it" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_damaged_prepared_dataset_is_one_sentence(prepared, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    (copy / shards.shard_name(1)).unlink()
    with pytest.raises(SdcError, match="lacks shard-00001.tar; copy the whole folder"):
        build_dataset(DataConfig(data_dir=copy, resolution=RES), seed=0)
    (copy / shards.INDEX).write_text("[1, 2]")
    with pytest.raises(SdcError, match="not an index this sdcompress reads"):
        build_dataset(DataConfig(data_dir=copy, resolution=RES), seed=0)


def test_random_augmentation_is_refused_with_prepared_data(prepared):
    with pytest.raises(SdcError, match="drop --random-crop and --random-flip"):
        build_dataset(DataConfig(data_dir=prepared, resolution=RES, random_flip=True), seed=0)


def test_cli_prepares_reports_and_refuses_bad_input(images, prepared, tmp_path, cli):
    before = tree_digest(images)
    out = tmp_path / "cli"
    r = cli(
        "data", "prepare", images, "--model", "tiny-sd", "-o", out, "--resolution", RES,
        "--dtype", "fp16", "--shard-size", "4", "--device", "cpu", "--json",
    )  # fmt: skip
    assert r.code == 0, r
    report = json.loads(r.stdout)
    assert report["samples"] == 6 and report["shards"] == 2 and report["skipped"] == 1
    assert "broken.png" in report["skipped_examples"][0]
    assert shards.read_index(out).data["dtype"] == "fp16"
    assert tree_digest(images) == before  # inputs are never modified

    r = cli("data", "prepare", images, "--model", "tiny-sd", "-o", out, "--device", "cpu")
    assert r.code == 2 and "already exists" in r.stderr
    r = cli("data", "prepare", prepared, "--model", "tiny-sd", "-o", tmp_path / "x", "--device", "cpu")
    assert r.code == 2 and "already a prepared dataset" in r.stderr
    r = cli("data", "prepare", tmp_path / "nowhere", "--model", "tiny-sd", "-o", tmp_path / "y")
    assert r.code == 2 and "is not a folder" in r.stderr
    r = cli("data", "prepare", "--model", "tiny-sd", "-o", tmp_path / "y")
    assert r.code == 2 and "give one data source" in r.stderr


def test_training_from_shards_resumes_exactly_after_a_ctrl_c(prepared, student, tmp_path):
    import signal

    from safetensors.torch import load_file

    data = DataConfig(data_dir=prepared, resolution=RES, caption_dropout=0.5)
    straight = distill(replace(request("tiny-sd", student, prepared, tmp_path / "a", max_steps=4), data=data))

    def ctrl_c_at_2(event) -> None:
        if event.kind == "step" and event.step == 2:
            signal.raise_signal(signal.SIGINT)

    req = replace(
        request("tiny-sd", student, prepared, tmp_path / "b", max_steps=4, checkpoint_every=100), data=data
    )
    stopped = distill(req, ctrl_c_at_2)
    assert stopped.interrupted and stopped.steps == 3  # the stop lands after the next step
    resumed = distill(replace(req, train=replace(req.train, resume="latest")))
    assert resumed.resumed_from is not None and resumed.steps == 4
    assert resumed.last_losses == straight.last_losses
    a = load_file(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_image_that_fails_to_decode_while_encoding_is_skipped_and_reported(images, tmp_path, monkeypatch):
    """A file that passes the scan's probe but breaks when decoded in full is skipped, not fatal."""
    from sdcompress.training.data import CaptionedImages

    real_open = CaptionedImages._open

    def flaky(self, record):
        if str(record.source).endswith("shape_00001.png"):
            raise OSError("image file is truncated")
        return real_open(self, record)

    monkeypatch.setattr(CaptionedImages, "_open", flaky)
    result = data_prepare(prepare_request(images, tmp_path / "out"))
    assert result.samples == 5 and result.skipped == 2  # the broken file (scan) and this one
    assert any("shape_00001.png (OSError)" in e for e in result.skipped_examples)
    dataset, stats = build_dataset(DataConfig(data_dir=tmp_path / "out", resolution=RES), seed=0)
    assert len(dataset) == 5 and stats.unreadable == 2
    captions = [dataset[(i, 0)]["caption"] for i in range(5)]
    assert len(set(captions)) == 5  # every kept sample readable, none twice


@pytest.mark.slow  # over ~6 s on 2 idle cores: the fast lane stays under 4 minutes
def test_sdxl_shards_carry_pooled_embeddings_and_micro_conditioning(images, tmp_path):
    """tiny-sdxl: both encoders' states, the pooled embedding and the crop/size ids train as from images."""
    from safetensors.torch import load_file

    from sdcompress.services.finetune import FinetuneRequest, finetune
    from sdcompress.training.config import TrainConfig

    out = tmp_path / "sdxl"
    data_prepare(prepare_request(images, out, model="tiny-sdxl"))
    index = shards.read_index(out)
    assert index.conditioning["pooled_dim"] is not None and index.conditioning["text_dim"] == 96
    sample = build_dataset(DataConfig(data_dir=out, resolution=RES), seed=0)[0][(5, 0)]
    assert sample["pooled"].shape == (index.conditioning["pooled_dim"],)
    assert sample["original_size"] == (32, 64) and sample["target_size"] != (RES, RES)  # a wide bucket

    weights = []
    for name, data in (("raw", images), ("shards", out)):
        result = finetune(
            FinetuneRequest(
                model="tiny-sdxl",
                output=tmp_path / name,
                data=DataConfig(data_dir=data, resolution=RES, buckets=True, caption_dropout=0.5),
                train=TrainConfig(
                    work_dir=tmp_path / f"{name}.train",
                    max_steps=3,
                    batch_size=2,
                    lr=1e-3,
                    checkpoint_every=0,
                    seed=3,
                    cpu=True,
                ),  # fmt: skip
                save_dtype="fp32",
            )
        )
        assert result.steps == 3
        weights.append(load_file(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors"))
    raw, ready = weights
    assert [k for k in raw if not torch.equal(raw[k], ready[k])] == []
