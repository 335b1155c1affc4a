"""`distill` end to end on the tiny models: every loss term goes down, the output loads in plain diffusers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _models import mean_losses

from sdcompress.errors import SdcError
from sdcompress.hub.lineage import RUN_RECORD
from sdcompress.services.distill import DistillRequest, distill
from sdcompress.training.data import DataConfig
from sdcompress.training.demo_data import write_demo_dataset
from sdcompress.training.distill_task import DistillTask
from sdcompress.training.engine import TrainConfig
from sdcompress.training.features import pair_features
from sdcompress.training.task import DiffusionParts


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", 4, size=40)


def make_student(teacher: str, preset: str, out: Path, **config_changes) -> Path:
    """A pruned student folder: the preset's U-Net, teacher weights where the key and shape match."""
    from sdcompress.arch.presets import preset_config
    from sdcompress.checkpoint.instantiate import module_from_config
    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.checkpoint.tensors import lazy_state_dict
    from sdcompress.checkpoint.writers import save_diffusers

    model = load_model(teacher)
    config = {**preset_config(preset, teacher), **config_changes}
    shapes = module_from_config("unet", config).state_dict()
    source = model.components["unet"]
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for key, meta in shapes.items():
        if key in source and tuple(source[key].shape) == tuple(meta.shape):
            weights[key] = source[key].load()
        else:
            weights[key] = torch.randn(meta.shape, generator=generator) * 0.02
    save_diffusers(model.with_unet(lazy_state_dict(weights), config), out, unet_only=True)
    return out


def request(teacher: str, student: Path, data: Path, out: Path, **train_changes) -> DistillRequest:
    train = TrainConfig(
        work_dir=out.with_name(out.name + ".train"),
        max_steps=8,
        batch_size=2,
        lr=1e-3,
        checkpoint_every=0,
        cpu=True,
        seed=3,
    )
    return DistillRequest(
        teacher=teacher,
        student=str(student),
        output=out,
        data=DataConfig(data_dir=data, resolution=32),
        train=replace(train, **train_changes),
        feature_norm=True,
    )


def fixed_terms(teacher: str, student_unet, data: Path) -> dict[str, float]:
    """Loss terms of `student_unet` on fixed images, noise and timesteps (the same for every call)."""
    from sdcompress.checkpoint.instantiate import build_pipeline
    from sdcompress.checkpoint.resolve import load_model

    pipe = build_pipeline(load_model(teacher))
    parts = DiffusionParts.from_pipeline(pipe)
    teacher_unet, parts.unet = parts.unet, student_unet
    task = DistillTask(
        parts,
        teacher_unet,
        pair_features(student_unet, teacher_unet, "blocks"),
        feature_norm=True,
        saver=lambda *a: None,
    )
    task.bind({"unet": student_unet}, torch.device("cpu"), torch.float32)
    return mean_losses(task, data)


def _unet(folder: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(
        folder, subfolder="unet" if (folder / "unet").is_dir() else None
    )


@pytest.mark.parametrize(
    ("teacher", "preset", "pipeline_class", "lr"),
    [
        ("tiny-sd", "bk-small", "StableDiffusionPipeline", 1e-3),
        pytest.param("tiny-sdxl", "ssd-1b", "StableDiffusionXLPipeline", 2e-4, marks=pytest.mark.slow),
    ],
)
def test_distill_lowers_every_term_and_output_loads_in_diffusers(
    tmp_path, data_dir, teacher, preset, pipeline_class, lr
):
    import diffusers

    student = make_student(teacher, preset, tmp_path / "student")
    out = tmp_path / "distilled"
    before = fixed_terms(teacher, _unet(student), data_dir)
    result = distill(request(teacher, student, data_dir, out, lr=lr))
    assert result.output == out and result.steps == 8 and not result.interrupted
    after = fixed_terms(teacher, _unet(out), data_dir)
    for term in ("task", "output", "features", "loss"):
        assert after[term] < before[term], (term, before[term], after[term])

    pipe = getattr(diffusers, pipeline_class).from_pretrained(out)
    assert (
        pipe.unet.config.layers_per_block
        == json.loads((student / "config.json").read_text())["layers_per_block"]
    )
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)

    record = json.loads((out / RUN_RECORD).read_text())
    assert record["teacher"] == teacher and record["preset"] == preset and record["steps"] == 8
    assert len(record["loss_curve"]) == 8 and set(record["loss_curve"][0]) >= {"task", "output", "features"}
    assert record["feature_pairs"] and record["student_unet_parameters"] < record["teacher_unet_parameters"]


@pytest.fixture(scope="module")
def sd_student(tmp_path_factory) -> Path:
    return make_student("tiny-sd", "bk-small", tmp_path_factory.mktemp("s") / "student")


def test_empty_data_folder(tmp_path, sd_student):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SdcError, match="no usable images"):
        distill(request("tiny-sd", sd_student, tmp_path / "empty", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_uncaptioned_images_refused_with_require_captions(tmp_path, sd_student, data_dir):
    from PIL import Image

    data = write_demo_dataset(tmp_path / "d", 2, size=32)
    Image.new("RGB", (32, 32), "red").save(data / "bare.png")
    req = request("tiny-sd", sd_student, data, tmp_path / "out")
    with pytest.raises(SdcError, match="1 of 3 images have no caption"):
        distill(replace(req, data=replace(req.data, require_captions=True)))
    result = distill(replace(req, train=replace(req.train, max_steps=1)))
    assert result.data["missing_captions"] == 1 and result.data["images"] == 3


def test_student_from_another_teacher_cannot_be_paired(tmp_path, data_dir):
    wide = make_student("tiny-sd", "bk-small", tmp_path / "wide", block_out_channels=[32, 96, 128, 128])
    with pytest.raises(SdcError, match="no matching feature in the teacher"):
        distill(request("tiny-sd", wide, data_dir, tmp_path / "out"))
    xl = make_student("tiny-sdxl", "ssd-1b", tmp_path / "xl")
    with pytest.raises(SdcError, match="cross_attention_dim"):
        distill(request("tiny-sd", xl, data_dir, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused(tmp_path, sd_student, data_dir):
    (tmp_path / "out").mkdir()
    with pytest.raises(SdcError, match="already exists"):
        distill(request("tiny-sd", sd_student, data_dir, tmp_path / "out"))


def test_cli_with_config_file_and_override(tmp_path, sd_student, data_dir):
    from typer.testing import CliRunner

    from sdcompress.cli.app import app

    config = tmp_path / "run.toml"
    config.write_text(
        f'teacher = "tiny-sd"\nstudent = "{sd_student}"\ndata = "{data_dir}"\nresolution = 32\n'
        'cpu = true\nnum-workers = 0\n[distill]\nmax_steps = 3\nfeature-norm = true\nfeatures = "attentions"\n'
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["distill", "--config", str(config), "-o", str(out), "--max-steps", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["steps"] == 2 and record["feature_norm"] is True and record["features"] == "attentions"
    assert all(".attentions." in p["student"] for p in record["feature_pairs"])

    config.write_text(config.read_text() + "bogus_option = 1\n")
    bad = CliRunner().invoke(app, ["distill", "--config", str(config), "-o", str(tmp_path / "o2")])
    assert isinstance(bad.exception, SdcError) and "bogus_option" in str(bad.exception)
