"""`distill --objective dmd2`: the distribution-matching mathematics, the two time-scale updates, the
outputs in diffusers (scheduler, LoRA layouts), exact resume, bad input, and the 2-D toy."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import load_lora_file
from test_lora_train import assert_bit_identical, stop_after, tensors_of

from sdcompress.errors import SdcError
from sdcompress.hub.lineage import RUN_RECORD
from sdcompress.services import dmd as dmd_service
from sdcompress.services.distill import DistillRequest, distill
from sdcompress.services.dmd import scheduler_config, student_timesteps
from sdcompress.training.config import ConsistencyConfig, DmdConfig, LossConfig, NoiseConfig
from sdcompress.training.data import DataConfig
from sdcompress.training.demo_data import write_demo_dataset
from sdcompress.training.dmd_task import dm_gradient, dm_loss
from sdcompress.training.engine import TrainConfig

RES = 32
SD_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", 2, size=40)


def dmd_request(data: Path, out: Path, steps: int = 1, student=None, lora=None, **dmd) -> DistillRequest:
    return DistillRequest(
        teacher="tiny-sdxl",
        student=student,
        output=out,
        data=DataConfig(data_dir=data, resolution=RES),
        train=TrainConfig(
            work_dir=out.with_name(out.name + ".train"),
            max_steps=steps,
            batch_size=1,
            lr=1e-3,
            checkpoint_every=0,
            cpu=True,
            seed=5,
        ),
        save_dtype="fp32",
        consistency=ConsistencyConfig(objective="dmd2", lora=lora),
        dmd=DmdConfig(**({"fake_updates": 2} | dmd)),
    )


# ---------------------------------------------------------------------------- the mathematics


def test_loss_gradient_is_the_normalised_score_difference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=gen, requires_grad=True)
    x0_real, x0_fake = torch.randn(2, 3, 4, 5, 5, generator=gen)
    grad = dm_gradient(x.detach(), x0_real, x0_fake)
    p_real, p_fake = x.detach() - x0_real, x.detach() - x0_fake
    expected = (p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(grad, expected)
    dm_loss(x, grad).backward()
    torch.testing.assert_close(x.grad, grad / x.numel())  # d/dx 0.5 * mean((x - sg(x - g))^2)
    # the student moves toward the real score's x0 and away from the fake's
    assert torch.sum(-x.grad * (x0_real - x0_fake)) > 0


def test_loss_and_gradient_are_exactly_zero_when_fake_equals_real():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 3, generator=gen, requires_grad=True)
    x0 = torch.randn(2, 4, 3, 3, generator=gen)
    grad = dm_gradient(x.detach(), x0, x0.clone())
    loss = dm_loss(x, grad)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0 and torch.count_nonzero(x.grad) == 0


# ---------------------------------------------------------------------------- timesteps and scheduler


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("1", [999]),
        ("2", [999, 499]),
        ("4", [999, 749, 499, 249]),
        ("249, 999,499,749", [999, 749, 499, 249]),
    ],
)
def test_saved_scheduler_samples_exactly_the_trained_timesteps(spec, expected):
    from diffusers import LCMScheduler

    timesteps = student_timesteps(spec)
    assert timesteps == expected
    config = scheduler_config(SD_SCHEDULER, "v_prediction", timesteps)
    scheduler = LCMScheduler.from_config(json.loads(json.dumps(config)))  # as from_pretrained reads it
    scheduler.set_timesteps(len(expected))
    assert scheduler.timesteps.tolist() == expected and scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("spec", ["0", "-1", "abc", "999,999", "1000,3"])
def test_bad_student_steps_are_one_sentence(spec):
    with pytest.raises(SdcError, match="--student-steps"):
        student_timesteps(spec)


def test_a_list_no_scheduler_reproduces_is_refused():
    with pytest.raises(SdcError, match="no diffusers scheduler samples"):
        scheduler_config(SD_SCHEDULER, "epsilon", [999, 500, 3])


def test_dmd_options_need_the_objective():
    with pytest.raises(SdcError, match="--fake-lora needs --objective dmd2"):
        DmdConfig(fake_lora=4).validate(ConsistencyConfig().objective)
    with pytest.raises(SdcError, match="--fake-updates must be 1 or more"):
        DmdConfig(fake_updates=0).validate(ConsistencyConfig(objective="dmd2").objective)
    assert DmdConfig().guidance(is_sdxl=True) == 8.0 and DmdConfig().guidance(is_sdxl=False) == 1.75


# ---------------------------------------------------------------------------- bad input (CLI)


BAD_INPUT = [
    (["--teacher", "tiny-sdxl", "--student-steps", "0"], "--student-steps must be a step count"),
    (["--teacher", "tiny-sd", "--student", "tiny-sdxl"], "teacher"),
    (["--teacher", "tiny-sdxl", "--timesteps", "trailing:4"], "give its base model as --teacher"),
]
LAYER_RANK = (["--teacher", "tiny-sdxl", "--fake-lora", "100000"], "--fake-lora 100000 is larger than layer")


@pytest.mark.parametrize(
    "cases", [BAD_INPUT, pytest.param([LAYER_RANK], marks=pytest.mark.slow)], ids=["early", "rank"]
)
def test_bad_input_exits_2_and_writes_nothing(cli, tmp_path, data_dir, cases):
    """Refused before any model is built (the rank check needs the U-Net, so it costs a pipeline build)."""
    out = tmp_path / "out"
    common = ["--data", data_dir, "--resolution", RES, "--cpu", "--max-steps", 1, "--objective", "dmd2"]
    for args, message in cases:
        r = cli("distill", *common, *args, "-o", out)
        assert r.code == 2 and message in r.stderr, r
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert not out.exists() and not out.with_name("out.train").exists()


# ---------------------------------------------------------------------------- tiny models


def _digest(module: torch.nn.Module, keep) -> str:
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        if keep(name):
            h.update(name.encode() + value.detach().float().numpy().tobytes())
    return h.hexdigest()


def _is_adapter(name: str) -> bool:
    return "lora_" in name


@pytest.fixture
def recorded(monkeypatch):
    """The Dmd2Task a run builds, with digests of its weights taken when it was built."""
    tasks = []

    class Recording(dmd_service.Dmd2Task):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.teacher_base = _digest(self.teacher, lambda n: not _is_adapter(n))
            self.student_base = _digest(self.parts.unet, lambda n: not _is_adapter(n))
            self.student_adapters = _digest(self.parts.unet, _is_adapter)
            self.fake_adapters = _digest(self.fake, _is_adapter)
            self.encode_calls = 0
            tasks.append(self)

        def encode(self, batch):
            self.encode_calls += 1
            return super().encode(batch)

    monkeypatch.setattr(dmd_service, "Dmd2Task", Recording)
    return tasks


@pytest.mark.slow  # tiny SDXL with a fake score, a GAN head and 2 fake updates per step
def test_lora_student_with_fake_lora_and_gan(tmp_path, data_dir, recorded):
    """LoRA student, LoRA fake score on the teacher, GAN head, feature KD: finite losses, two fake
    updates per student update, only adapters change, the teacher's weights are untouched, and the
    kohya and PEFT files load; the LoRA samples in 4 steps through the scheduler saved beside it."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.lowrank.layouts import read_lora, resolve
    from sdcompress.lowrank.targets import naming_for

    req = dmd_request(
        data_dir, tmp_path / "lora", steps=1, lora=4, fake_lora=4, gan_weight=0.01, kd_weight=0.1
    )
    result = distill(req)
    (task,) = recorded
    assert result.steps == 1 and {"dm", "gan", "kd", "fake", "fake_denoise", "fake_gan"} <= set(
        result.last_losses
    )
    assert all(torch.isfinite(torch.tensor(v)) for v in result.last_losses.values())
    assert task.fake_loss_calls == 2  # --fake-updates 2, grad-accum 1: two per student update
    assert task.encode_calls == 1  # the step's batch is encoded once for its 2 fake updates and the student's
    assert _digest(task.teacher, lambda n: not _is_adapter(n)) == task.teacher_base
    assert _digest(task.parts.unet, lambda n: not _is_adapter(n)) == task.student_base
    assert _digest(task.parts.unet, _is_adapter) != task.student_adapters
    assert _digest(task.fake, _is_adapter) != task.fake_adapters

    out = result.output
    model = load_model("tiny-sdxl")
    for name, layout in (("lora_kohya.safetensors", "kohya"), ("pytorch_lora_weights.safetensors", "peft")):
        lora = read_lora(out / name)
        assert lora.layout == layout and len(resolve(lora, naming_for(model))) == len(lora.adapters)
    pipe = StableDiffusionXLPipeline.from_pretrained(model.path)
    pipe.load_lora_weights(str(out))  # diffusers' default file name: the PEFT layout
    adapted = sum(1 for _, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and m.lora_A)
    assert adapted == len(read_lora(out / "pytorch_lora_weights.safetensors").adapters)
    pipe.scheduler = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle", num_inference_steps=4, guidance_scale=0, height=RES, width=RES, output_type="np"
    )
    assert image.images[0].shape == (RES, RES, 3)
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]
    kohya = StableDiffusionXLPipeline.from_pretrained(model.path)
    load_lora_file(kohya, out / "lora_kohya.safetensors")
    adapted = sum(1 for _, m in kohya.unet.named_modules() if hasattr(m, "lora_A") and m.lora_A)
    assert adapted == len(read_lora(out / "lora_kohya.safetensors").adapters)  # every module consumed
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["objective"] == "dmd2" and record["inference"]["timesteps"] == [999, 749, 499, 249]
    assert record["dmd2"]["teacher_guidance"] == 8.0 and record["inference"]["guidance_scale"] == 0.0


@pytest.mark.slow  # a prune, then three short DMD2 runs (straight, stopped, resumed)
def test_pruned_full_student_samples_in_4_steps_and_resumes_exactly(tmp_path, data_dir):
    from diffusers import DiffusionPipeline, LCMScheduler

    from sdcompress.services.prune import PruneRequest, prune

    student = tmp_path / "pruned"
    prune(PruneRequest(teacher="tiny-sdxl", output=str(student), mid_block="none", device="cpu"))
    req = dmd_request(
        data_dir, tmp_path / "full", steps=3, student=str(student), gan_weight=0.01, fake_updates=1
    )
    straight = distill(req)
    assert all(torch.isfinite(torch.tensor(v)) for v in straight.last_losses.values())
    pipe = DiffusionPipeline.from_pretrained(straight.output)
    assert isinstance(pipe.scheduler, LCMScheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        "a red circle", num_inference_steps=4, guidance_scale=0, height=RES, width=RES, output_type="np"
    )
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249] and images.images[0].shape == (
        RES,
        RES,
        3,
    )
    assert pipe.unet.config.mid_block_type is None

    # Ctrl-C after step 2 and --resume: student, fake score, GAN head, both optimizers come back
    first = replace(
        req,
        output=tmp_path / "resumed",
        train=replace(req.train, work_dir=tmp_path / "resumed.train", checkpoint_every=100),
    )
    stopped = distill(first, stop_after(2))
    assert stopped.interrupted and stopped.steps == 2
    resumed = distill(replace(first, train=replace(first.train, resume="latest")))
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert_bit_identical(tensors_of(straight.output / unet), tensors_of(resumed.output / unet))
    assert resumed.last_losses == straight.last_losses


def test_step_distilled_teacher_refused_with_advice(tmp_path, data_dir):
    req = replace(
        dmd_request(data_dir, tmp_path / "out"), loss=LossConfig(noise=NoiseConfig(timesteps="trailing:4"))
    )
    with pytest.raises(
        SdcError, match="give its base model as --teacher and the distilled model as --student"
    ):
        distill(req)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- the toy


@pytest.mark.slow  # 2-4 s per seed on one thread
@pytest.mark.parametrize("seed", [0, 1])
def test_toy_mixture_of_gaussians(seed):
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "dmd_toy.py"
    spec = importlib.util.spec_from_file_location("dmd_toy", path)
    toy = importlib.util.module_from_spec(spec)
    sys.modules["dmd_toy"] = toy  # dataclasses resolve their module by name
    spec.loader.exec_module(toy)
    r = toy.run(seed=seed, steps=200)
    assert r.sw_ratio >= 5, r
    assert r.modes >= 7, r
    assert r.fake_error_student < r.fake_error_target, r


def test_model_card_states_steps_sampler_and_guidance():
    from sdcompress.arch.families import get_family
    from sdcompress.hub.card import CardFacts, card_body
    from sdcompress.hub.lineage import Lineage

    inference = {
        "steps": 4,
        "timesteps": [999, 749, 499, 249],
        "sampler": "LCMScheduler",
        "guidance_scale": 0.0,
    }
    run = {"command": "distill", "objective": "dmd2", "steps": 10, "inference": inference}
    facts = CardFacts("me/dmd2", "pipeline", get_family("sdxl"), None, {}, [], Lineage(run=run))
    body = card_body(facts)
    assert "- sampling: 4 steps (timesteps 999, 749, 499, 249), LCMScheduler, guidance_scale 0.0" in body
    assert "num_inference_steps=4, guidance_scale=0.0" in body
