"""`distill --objective lcm` on tiny-sd: the LCM student and the LCM-LoRA load in diffusers, resume is exact."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import load_lora_file
from test_lora_train import assert_bit_identical, stop_after, tensors_of

from sdcompress.errors import SdcError
from sdcompress.hub.lineage import RUN_RECORD
from sdcompress.services.distill import DistillRequest, distill
from sdcompress.training.config import ConsistencyConfig, LossConfig, NoiseConfig
from sdcompress.training.data import DataConfig
from sdcompress.training.demo_data import write_demo_dataset
from sdcompress.training.engine import TrainConfig
from sdcompress.training.lcm_task import DdimSolver, boundary_scalings, guidance_embedding

RES = 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", 4, size=40)


def lcm_request(data: Path, out: Path, steps: int = 3, **consistency) -> DistillRequest:
    return DistillRequest(
        teacher="tiny-sd",
        student=None,
        output=out,
        data=DataConfig(data_dir=data, resolution=RES),
        train=TrainConfig(
            work_dir=out.with_name(out.name + ".train"),
            max_steps=steps,
            batch_size=2,
            lr=1e-4,
            checkpoint_every=0,
            cpu=True,
            seed=3,
        ),
        save_dtype="fp32",
        consistency=ConsistencyConfig(objective="lcm", ddim_timesteps=10, **consistency),
    )


def test_solver_and_boundary_match_diffusers():
    from diffusers import DDPMScheduler, LCMScheduler

    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    solver = DdimSolver(ddpm.alphas_cumprod, 1000, 50)
    assert solver.timesteps[0] == 19 and solver.timesteps[-1] == 999 and solver.skip == 20
    lcm = LCMScheduler.from_config(ddpm.config)
    t = torch.tensor([0, 19, 999])
    c_skip, c_out = boundary_scalings(t, 10.0)
    for i, step in enumerate(t.tolist()):
        skip, out = lcm.get_scalings_for_boundary_condition_discrete(step)
        assert c_skip[i].item() == pytest.approx(float(skip)) and c_out[i].item() == pytest.approx(float(out))
    assert c_skip[0] == 1 and c_out[0] == 0  # f(z, 0) = z
    assert guidance_embedding(torch.tensor([3.0, 7.0]), 16).shape == (2, 16)


@pytest.mark.slow  # over ~6 s on 2 idle cores: the fast lane stays under 4 minutes
def test_lcm_student_loads_with_lcm_scheduler_and_resumes_exactly(tmp_path, data_dir):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    straight = distill(lcm_request(data_dir, tmp_path / "straight", steps=4))
    assert straight.steps == 4 and set(straight.last_losses) == {"loss", "consistency"}
    out = straight.output
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.original_inference_steps == 10
    assert pipe.unet.config.time_cond_proj_dim == 256
    image = pipe(
        "a red circle", num_inference_steps=4, guidance_scale=8.0, height=RES, width=RES, output_type="np"
    ).images[0]
    assert image.shape == (RES, RES, 3)
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["objective"] == "lcm" and record["consistency"]["consistency_loss"] == "huber"
    assert record["inference"]["steps"] == 4 and record["inference"]["sampler"] == "LCMScheduler"

    # Ctrl-C after step 2 and --resume: the EMA target network comes back too, so the weights are equal
    first = lcm_request(data_dir, tmp_path / "resumed", steps=4)
    first = replace(first, train=replace(first.train, checkpoint_every=100))
    stopped = distill(first, stop_after(2))
    assert stopped.interrupted and stopped.steps == 2
    resumed = distill(replace(first, train=replace(first.train, resume="latest")))
    assert resumed.steps == 4
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert_bit_identical(tensors_of(out / unet), tensors_of(resumed.output / unet))


def test_lcm_lora_in_kohya_layout_loads_everywhere(tmp_path, data_dir):
    from diffusers import StableDiffusionPipeline

    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.lowrank.layouts import read_lora, resolve
    from sdcompress.lowrank.targets import naming_for

    result = distill(lcm_request(data_dir, tmp_path / "lora", steps=2, lora=4))
    path = result.output / "pytorch_lora_weights.safetensors"
    lora = read_lora(path)
    assert lora.layout == "kohya" and lora.metadata["ss_network_dim"] == "4"
    resolved = resolve(lora, naming_for(load_model("tiny-sd")))
    assert len(resolved) == len(lora.adapters)  # every module of the file names a module of the model
    assert any("conv" in t.path for t in resolved)  # convs too, as LCM-LoRA
    pipe = StableDiffusionPipeline.from_pretrained(load_model("tiny-sd").path)
    load_lora_file(pipe, path)
    adapted = sum(1 for _, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and m.lora_A)
    assert adapted == len(lora.adapters)  # diffusers consumed every module of the file
    assert "time_cond_proj_dim" not in json.loads(
        (load_model("tiny-sd").path / "unet/config.json").read_text()
    )


def test_lora_without_lcm_and_bad_guidance_refused(tmp_path, data_dir):
    req = lcm_request(data_dir, tmp_path / "out")
    with pytest.raises(SdcError, match="--lora needs --objective lcm"):
        distill(replace(req, consistency=ConsistencyConfig(lora=4)))
    with pytest.raises(SdcError, match="--w-min"):
        distill(replace(req, consistency=ConsistencyConfig(objective="lcm", w_min=9, w_max=3)))
    with pytest.raises(SdcError, match="--timesteps does not apply to --objective lcm"):
        distill(replace(req, loss=LossConfig(noise=NoiseConfig(timesteps="trailing:4"))))
    with pytest.raises(SdcError, match="--student is required"):
        distill(replace(req, consistency=ConsistencyConfig()))
    assert not (tmp_path / "out").exists()


def test_cli_lcm_lora_and_student_required_for_distill(cli, tmp_path, data_dir):
    out = tmp_path / "out"
    common = ["--teacher", "tiny-sd", "--data", data_dir, "--resolution", RES, "--cpu", "--max-steps", 1]
    r = cli("distill", *common, "-o", out)
    assert r.code == 2 and "--student is required" in r.stderr and not out.exists()
    r = cli(
        "distill", *common, "--objective", "lcm", "--lora", 2, "--ddim-timesteps", 10, "-o", out, "--json"
    )
    assert r.code == 0, r
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["consistency"]["lora"] == 2 and record["student"] == "tiny-sd"


@pytest.mark.slow
def test_sdxl_lcm_and_lcm_lora_load_in_diffusers(tmp_path, data_dir):
    """SDXL: zero unconditional embeddings and pooled text as SDXL's pipeline uses; both outputs load."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.lowrank.layouts import read_lora

    full = distill(replace(lcm_request(data_dir, tmp_path / "full", steps=1), teacher="tiny-sdxl"))
    pipe = StableDiffusionXLPipeline.from_pretrained(full.output)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim == 256
    image = pipe("a red circle", num_inference_steps=2, height=RES, width=RES, output_type="np").images[0]
    assert image.shape == (RES, RES, 3)
    lora = distill(replace(lcm_request(data_dir, tmp_path / "lora", steps=1, lora=2), teacher="tiny-sdxl"))
    # the same first step: a zero LoRA B and a zero guidance projection both start at the teacher
    assert lora.first_losses["consistency"] == pytest.approx(full.first_losses["consistency"], rel=1e-5)
    path = lora.output / "pytorch_lora_weights.safetensors"
    base = StableDiffusionXLPipeline.from_pretrained(load_model("tiny-sdxl").path)
    load_lora_file(base, path)
    adapted = sum(1 for _, m in base.unet.named_modules() if hasattr(m, "lora_A") and m.lora_A)
    assert adapted == len(read_lora(path).adapters)


@pytest.mark.slow  # over ~6 s on 2 idle cores: the fast lane stays under 4 minutes
def test_bench_seconds_per_image_for_teacher_and_lcm_student(tmp_path, data_dir, cli):
    """steps needed / steps per second: 50 guided steps for the teacher, 4 unguided-batch steps for the LCM."""
    from sdcompress.services.bench import BenchRequest, bench

    lcm = distill(lcm_request(data_dir, tmp_path / "lcm", steps=1)).output
    req = BenchRequest(
        models=["tiny-sd", str(lcm)], batch_sizes=(1,), resolution=RES, steps=1, warmup=0, device="cpu"
    )
    teacher, student = bench(req).models
    assert (teacher.image_steps, teacher.cfg, teacher.results[0].unet_batch) == (50, True, 2)
    assert (student.image_steps, student.cfg, student.results[0].unet_batch) == (4, False, 1)
    for m in (teacher, student):
        r = m.results[0]
        assert r.seconds_per_image == pytest.approx(m.image_steps / r.images_per_s)
    teacher, student = bench(replace(req, image_steps=(8,))).models
    assert teacher.image_steps == student.image_steps == 8
    r = cli("bench", "tiny-sd", lcm, "--image-steps", "50,4,2", "--device", "cpu")
    assert r.code == 2 and "--image-steps needs one positive step count, or one per model (2)" in r.stderr
