"""Distillation in stages: teacher A, a prune, then teacher B, as one command that resumes exactly."""

from __future__ import annotations

import json
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_distill import make_student, request
from test_lora_train import assert_bit_identical, tensors_of

from sdcompress.errors import SdcError
from sdcompress.hub.lineage import RUN_RECORD
from sdcompress.services.stages import Stage, distill_stages, parse_stages, shorthand_stages
from sdcompress.training.demo_data import write_demo_dataset

UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", 4, size=40)


def perturbed_copy(ref: str, out: Path) -> Path:
    """Another teacher of the same family: `ref` with every U-Net weight nudged (a fine-tune stand-in)."""
    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.checkpoint.tensors import lazy_state_dict
    from sdcompress.checkpoint.writers import save_diffusers

    model = load_model(ref)
    gen = torch.Generator().manual_seed(7)
    weights = {
        k: v.load() + 0.01 * torch.randn(v.shape, generator=gen) for k, v in model.components["unet"].items()
    }
    save_diffusers(model.with_unet(lazy_state_dict(weights), model.configs["unet"]), out)
    return out


def stop_in_stage(stage: int, step: int):
    """Ctrl-C during `step` of `stage` (stages count their `start` events)."""
    starts = []

    def callback(event) -> None:
        starts.extend([1] if event.kind == "start" else [])
        if len(starts) == stage and event.kind == "step" and event.step == step - 1:
            signal.raise_signal(signal.SIGINT)

    return callback


@pytest.mark.parametrize(
    ("teacher", "preset", "drop"),
    [
        pytest.param("tiny-sd", "bk-small", 2, marks=pytest.mark.slow),
        pytest.param("tiny-sdxl", "ssd-1b", 4, marks=pytest.mark.slow),
    ],
)
def test_two_teachers_with_a_prune_between_resume_exactly(tmp_path, data_dir, teacher, preset, drop):
    teacher_b = perturbed_copy(teacher, tmp_path / "teacher-b")
    student = make_student(teacher, preset, tmp_path / "student")
    stages = (
        Stage(teacher, 2),
        Stage(str(teacher_b), 3, lr=5e-4, prune={"drop_transformer_blocks": drop, "select": "last"}),
    )

    def plan(name: str, **train):
        base = request(teacher, student, data_dir, tmp_path / name, lr=2e-4, **train)
        return replace(base, features="none")

    straight = distill_stages(plan("straight"), stages)
    assert straight.stage == 2 and not straight.interrupted

    first = plan("resumed", checkpoint_every=100)
    stopped = distill_stages(first, stages, stop_in_stage(2, 2))
    assert stopped.interrupted and stopped.stage == 2 and stopped.steps == 2
    assert not first.output.exists()
    resumed = distill_stages(replace(first, train=replace(first.train, resume="latest")), stages)
    assert resumed.stage == 2 and resumed.steps == 3 and resumed.resumed_from is not None
    assert_bit_identical(tensors_of(straight.output / UNET), tensors_of(resumed.output / UNET))

    record = json.loads((resumed.output / RUN_RECORD).read_text())
    assert [s["teacher"] for s in record["stages"]] == [teacher, str(teacher_b)]
    assert record["teacher"] == str(teacher_b)
    one, two = (s["student_layout"] for s in record["stages"])
    assert two["transformer_blocks"] == one["transformer_blocks"] - drop
    assert record["stages"][1]["prune"] == {"drop_transformer_blocks": drop, "select": "last"}
    assert record["stages"][1]["lr"] == 5e-4


def test_stage_plans_are_checked():
    assert shorthand_stages(("a", "b"), "20,10") == (Stage("a", 20), Stage("b", 10))
    assert shorthand_stages(("a",), None) == ()
    with pytest.raises(SdcError, match="one per teacher"):
        shorthand_stages(("a", "b"), "20")
    with pytest.raises(SdcError, match="need --stage-steps"):
        shorthand_stages(("a", "b"), None)
    stages = parse_stages([{"teacher": "a", "steps": 2, "prune": {"mid-block": "none"}}], "run.toml")
    assert stages[0].prune == {"mid_block": "none"}
    with pytest.raises(SdcError, match="unknown options \\['drop_blocks'\\]"):
        parse_stages([{"teacher": "a", "steps": 2, "prune": {"drop-blocks": 1}}], "run.toml")
    with pytest.raises(SdcError, match="stage 1 needs steps"):
        parse_stages([{"teacher": "a"}], "run.toml")


def test_cli_config_with_stages(cli, tmp_path, data_dir):
    student = make_student("tiny-sd", "bk-small", tmp_path / "student")
    config = tmp_path / "run.toml"
    config.write_text(
        f'student = "{student}"\ndata = "{data_dir}"\nresolution = 32\ncpu = true\nfeatures = "none"\n'
        '[[stages]]\nteacher = "tiny-sd"\nsteps = 1\n'
        '[[stages]]\nteacher = "tiny-sd"\nsteps = 2\nlr = 1e-4\n'
    )
    out = tmp_path / "out"
    r = cli("distill", "--config", config, "-o", out, "--json")
    assert r.code == 0, r
    record = json.loads((out / RUN_RECORD).read_text())
    assert [s["steps"] for s in record["stages"]] == [1, 2] and record["steps"] == 2
    # the model card shows the lineage, one row per stage
    from sdcompress.hub.card import CardFacts, card_body
    from sdcompress.hub.lineage import folder_lineage

    body = card_body(CardFacts("me/x", "pipeline", None, None, {}, [], folder_lineage(out)))
    stages_table = body.split("Stages:")[1].split("\n\n")[1].splitlines()
    assert [r.split("|")[1].strip() for r in stages_table[2:]] == ["1", "2"], body
    assert all("`tiny-sd`" in r and "9 transformer blocks" in r for r in stages_table[2:]), body
    r = cli(
        "distill", "--config", config, "--teacher", "tiny-sd", "--teacher", "tiny-sd", "-o", tmp_path / "o2"
    )
    assert r.code == 2 and "give the stages once" in r.stderr
