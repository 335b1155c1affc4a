"""Step-distilled teachers: their prediction type and timesteps are honoured, and the student keeps them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _models import mean_losses
from test_distill import _unet, make_student, request

from sdcompress.errors import SdcError
from sdcompress.hub.lineage import RUN_RECORD
from sdcompress.services.distill import distill
from sdcompress.training.config import LossConfig, NoiseConfig
from sdcompress.training.demo_data import write_demo_dataset
from sdcompress.training.distill_task import DistillTask
from sdcompress.training.features import pair_features
from sdcompress.training.noise import convert_prediction, timestep_set
from sdcompress.training.task import DiffusionParts

TRAILING_4 = [249, 499, 749, 999]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", 4, size=40)


def lightning_like_teacher(out: Path, prediction_type: str = "sample") -> Path:
    """tiny-sd saved with an Euler scheduler that predicts x0 at trailing timesteps (as SDXL-Lightning's x0 UNet)."""
    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.checkpoint.writers import save_diffusers

    model = load_model("tiny-sd")
    scheduler = {
        "_class_name": "EulerDiscreteScheduler",
        **{k: model.configs["scheduler"][k] for k in ("beta_start", "beta_end", "beta_schedule")},
        "num_train_timesteps": 1000,
        "prediction_type": prediction_type,
        "timestep_spacing": "trailing",
        "steps_offset": 1,
    }
    model = model.with_unet(model.components["unet"], model.configs["unet"])
    model.configs["scheduler"] = scheduler
    save_diffusers(model, out)
    return out


@pytest.fixture(scope="module")
def sample_teacher(tmp_path_factory) -> Path:
    return lightning_like_teacher(tmp_path_factory.mktemp("t") / "teacher")


def test_timestep_specs():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    assert timestep_set("trailing:4", scheduler).tolist() == TRAILING_4
    assert timestep_set("999, 749,499,249", scheduler).tolist() == TRAILING_4
    assert timestep_set(None, scheduler) is None
    for bad in ("trailing:0", "trailing:x", "1000", "a,b", "-1,5"):
        with pytest.raises(SdcError):
            timestep_set(bad, scheduler)


def test_predictions_convert_between_every_space():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 500, 990])
    noisy = scheduler.add_noise(x0, eps, t)
    truth = {"epsilon": eps, "sample": x0, "v_prediction": scheduler.get_velocity(x0, eps, t)}
    for source, value in truth.items():
        for target, expected in truth.items():
            got = convert_prediction(value, source, target, noisy, t, scheduler)
            torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def fixed_terms(teacher: str, student_unet, data: Path, loss: LossConfig) -> dict[str, float]:
    """Loss terms on fixed images, noise and timesteps, with the run's noise settings."""
    from sdcompress.checkpoint.instantiate import build_pipeline
    from sdcompress.checkpoint.resolve import load_model

    parts = DiffusionParts.from_pipeline(build_pipeline(load_model(teacher)))
    teacher_unet, parts.unet = parts.unet, student_unet
    pairs = pair_features(student_unet, teacher_unet, "blocks")
    task = DistillTask(parts, teacher_unet, pairs, feature_norm=True, loss=loss, saver=lambda *a: None)
    task.bind({"unet": student_unet}, torch.device("cpu"), torch.float32)
    return mean_losses(task, data)


def test_sample_trailing_teacher_lowers_every_term_and_scheduler_round_trips(
    tmp_path, data_dir, sample_teacher
):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    student = make_student("tiny-sd", "bk-small", tmp_path / "student")
    loss = LossConfig(noise=NoiseConfig(timesteps="trailing:4"))
    before = fixed_terms(str(sample_teacher), _unet(student), data_dir, loss)
    out = tmp_path / "distilled"
    req = replace(request(str(sample_teacher), student, data_dir, out), loss=loss)
    result = distill(req)
    assert result.steps == 8 and not result.interrupted
    after = fixed_terms(str(sample_teacher), _unet(out), data_dir, loss)
    for term in ("task", "output", "features", "loss"):
        assert after[term] < before[term], (term, before[term], after[term])

    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.prediction_type == "sample"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    pipe.scheduler.set_timesteps(4)
    assert sorted(int(t) for t in pipe.scheduler.timesteps) == TRAILING_4
    lcm = LCMScheduler.from_config(pipe.scheduler.config)
    assert lcm.config.prediction_type == "sample" and lcm.config.timestep_spacing == "trailing"
    image = pipe("a red circle", num_inference_steps=4, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["prediction_type"] == "sample" and record["teacher_prediction_type"] == "sample"
    assert record["timesteps"] == "trailing:4"


def test_epsilon_student_of_sample_teacher(tmp_path, data_dir, sample_teacher):
    """Another prediction type: features refused in one sentence; without them the teacher is converted."""
    student = make_student("tiny-sd", "bk-small", tmp_path / "student")
    loss = LossConfig(noise=NoiseConfig(prediction_type="epsilon", timesteps="trailing:4"))
    req = replace(request(str(sample_teacher), student, data_dir, tmp_path / "out", max_steps=2), loss=loss)
    with pytest.raises(SdcError, match="their features cannot be compared; pass --features none"):
        distill(req)
    assert not (tmp_path / "out").exists()
    result = distill(replace(req, features="none"))
    assert result.steps == 2 and result.last_losses["output"] > 0
    config = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "epsilon" and config["timestep_spacing"] == "trailing"


def test_bad_timesteps_refused_before_training(tmp_path, data_dir, sample_teacher):
    student = make_student("tiny-sd", "bk-small", tmp_path / "student")
    req = request(str(sample_teacher), student, data_dir, tmp_path / "out")
    with pytest.raises(SdcError, match="must lie in 0..999"):
        distill(replace(req, loss=LossConfig(noise=NoiseConfig(timesteps="1000,500"))))
    assert not (tmp_path / "out").exists()
