"""`bench` on tiny-sd and a pruned tiny student (table, JSON, plot), random-weight architectures,
inputs for every full-size layout (forwarded on the meta device), and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _models import random_student

FAST = ("--resolution", "16", "--steps", "2", "--warmup", "1", "--device", "cpu")


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """tiny-sd with a BK-SDM-Small U-Net (random weights), as a diffusers folder."""
    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.checkpoint.writers import save_diffusers

    out = tmp_path_factory.mktemp("bench") / "bk-small-student"
    save_diffusers(random_student(load_model("tiny-sd"), "bk-small"), out)
    return out


def test_bench_tiny_sd_vs_pruned_student_json_and_plot(cli, student, tmp_path):
    plot = tmp_path / "bench.png"
    r = cli(
        "bench", "tiny-sd", student, "--batch-sizes", "1,2", *FAST, "--warmup", "0", "--json", "--plot", plot
    )
    assert r.code == 0, r
    result = json.loads(r.stdout)
    assert result["device"] == "cpu" and result["dtype"] == "float32" and result["cfg"] is True
    assert result["memory_kind"] == "cpu_peak_rss_delta"
    assert result["baseline"] == "tiny-sd"
    teacher, pruned = result["models"]
    assert pruned["preset"] == "bk-small"
    assert pruned["parameters"] < teacher["parameters"]
    assert teacher["size_on_disk"] > pruned["size_on_disk"] > 0
    assert teacher["weights_bytes"] == 4 * teacher["parameters"]
    for m in (teacher, pruned):
        assert m["resolution"] == 16 and m["latent_size"] == 8  # tiny VAE halves once
        assert [(x["batch_size"], x["unet_batch"]) for x in m["results"]] == [(1, 2), (2, 4)]
        for x in m["results"]:
            assert x["steps_per_s"] > 0 and x["error"] is None
            assert x["ms_per_step"] == pytest.approx(1000 / x["steps_per_s"])
            assert x["images_per_s"] == pytest.approx(x["steps_per_s"] * x["batch_size"])
            assert x["peak_memory"] > 0
    assert [x["speedup"] for x in teacher["results"]] == [1.0, 1.0]
    for t, p in zip(teacher["results"], pruned["results"], strict=True):
        assert p["speedup"] == pytest.approx(p["steps_per_s"] / t["steps_per_s"])

    from PIL import Image

    with Image.open(plot) as img:
        assert img.format == "PNG" and img.size == (900, 520)
    # an existing plot is not overwritten without --overwrite, and nothing is measured first
    r = cli("bench", "tiny-sd", *FAST, "--plot", plot)
    assert r.code == 2 and "already exists" in r.stderr


def test_bench_table(cli, student):
    r = cli("bench", "tiny-sd", student, "--batch-sizes", "1", "--no-cfg", *FAST, "--warmup", "0")
    assert r.code == 0, r
    assert "Denoising speed" in r.stdout and "CFG off" in r.stdout
    assert "bk-small" in r.stdout and "tiny-sd" in r.stdout
    assert "1.00x" in r.stdout
    assert "peak RSS" in r.stdout  # CPU memory is labelled as what it is
    assert "resident memory" in r.stderr


def test_random_weights_sdxl_shaped_presets(cli):
    """An SDXL-shaped U-Net (added text/time conditioning) and a KOALA student of it, with no weights read."""
    args = ("--random-weights", "--batch-sizes", "1", *FAST, "--steps", "1", "--warmup", "0", "--json")
    r = cli("bench", "tiny-sdxl", "koala-700m", *args)
    assert r.code == 0, r
    result = json.loads(r.stdout)
    base, koala = result["models"]
    assert base["random_weights"] and base["size_on_disk"] is None
    assert (koala["family"], koala["preset"]) == ("tiny-sdxl", "koala-700m")  # applied to the baseline family
    assert koala["parameters"] < base["parameters"]
    assert koala["results"][0]["speedup"] > 0


def test_random_unet_is_built_in_the_target_dtype():
    from sdcompress.arch.families import get_family
    from sdcompress.services.bench import random_unet

    unet = random_unet(get_family("tiny-sd").unet, torch.device("cpu"), torch.bfloat16, seed=1)
    params = dict(unet.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    assert torch.all(params["conv_norm_out.weight"] == 1) and torch.all(params["conv_in.bias"] == 0)
    assert params["conv_in.weight"].float().std() > 0


@pytest.mark.parametrize("name", ["sdxl", "ssd-1b", "koala-700m", "sdxl-refiner", "sd2-v"])
def test_inputs_fit_full_size_layouts(name):
    """The inputs bench builds are what the full-size U-Nets take (forwarded on the meta device)."""
    from sdcompress.arch.count import meta_unet
    from sdcompress.services.bench import _arch_subject, latent_size, unet_inputs

    subject = _arch_subject(name, None, 0)
    latent = latent_size(subject, subject.family.resolution)
    assert latent == subject.family.resolution // 8
    unet = meta_unet(subject.config)
    inputs = unet_inputs(
        subject.config, 2, latent, torch.device("meta"), torch.float32, subject.text_embed_dim
    )
    with torch.inference_mode():
        out = unet(**inputs).sample
    assert out.shape == (2, 4, latent, latent)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("tiny-sd", "--resolution", "40", "--device", "cpu"), "multiple of 16"),
        (("tiny-sd", "--batch-sizes", "1,x"), "--batch-sizes"),
        (("tiny-sd", "--batch-sizes", "0"), "positive"),
        (("tiny-sd", "--steps", "0"), "--steps"),
        (("not-a-layout", "--random-weights"), "neither a family nor a preset"),
        (("tiny-sd", "--device", "cuda"), "no CUDA GPU"),
        (("tiny-sd", "bk-small", "--random-weights", "--family", "sdxl"), "applies to"),
    ],
)
def test_bad_input(cli, args, message):
    r = cli("bench", *args)
    assert r.code == 2, r
    assert message in r.stderr and "Traceback" not in r.stderr


def test_a_few_step_student_is_benched_as_its_run_record_says(student, tmp_path):
    """A DMD2 student's record says 4 steps without guidance: one U-Net batch per step, 4 steps an image."""
    import shutil

    from sdcompress.hub.lineage import RUN_RECORD
    from sdcompress.services.bench import BenchRequest, bench

    dmd = tmp_path / "dmd2-student"
    shutil.copytree(student, dmd)
    inference = {
        "steps": 4,
        "timesteps": [999, 749, 499, 249],
        "sampler": "LCMScheduler",
        "guidance_scale": 0.0,
    }
    (dmd / RUN_RECORD).write_text(
        json.dumps({"command": "distill", "inference": inference}), encoding="utf-8"
    )
    req = BenchRequest(
        models=[str(student), str(dmd)], batch_sizes=(1,), resolution=16, steps=1, warmup=0, device="cpu"
    )
    plain, few = bench(req).models
    assert (plain.image_steps, plain.cfg, plain.results[0].unet_batch) == (50, True, 2)
    assert (few.image_steps, few.cfg, few.results[0].unet_batch) == (4, False, 1)
    (dmd / RUN_RECORD).write_text("{not json", encoding="utf-8")  # a broken record is no record
    assert bench(req).models[1].image_steps == 50
