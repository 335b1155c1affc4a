"""`eval` renders each model as it is used: a few-step student at its run record's settings, a per-model
`MODEL@steps=...` override above that, the command's flags for the rest (issue 18, item 4)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from sdcompress.checkpoint.sampling import FROM_RECORD, FROM_SCHEDULER, OwnSampling, own_sampling
from sdcompress.choices import Sampler
from sdcompress.errors import SdcError
from sdcompress.evaluation.sampling import (
    FROM_FLAGS,
    FROM_OVERRIDE,
    ModelSpec,
    own_settings_note,
    parse_model_spec,
    resolve_sampling,
)
from sdcompress.hub.lineage import RUN_RECORD

TRAINED = [999, 749, 499, 249]
INFERENCE = {"steps": 4, "timesteps": TRAINED, "sampler": "LCMScheduler", "guidance_scale": 0.0}


def _link_or_copy(src: str, dst: str) -> None:
    """Weights are linked (the cached tiny model is never written through); small files are copied."""
    if src.endswith(".safetensors"):
        os.symlink(src, dst)
    else:
        shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def dmd_student(tmp_path_factory) -> Path:
    """tiny-sd as `distill --objective dmd2` saves a full student: LCMScheduler set to the trained
    timesteps, and the run record's `inference` block (4 steps, guidance 0)."""
    from sdcompress.checkpoint.tiny import tiny_model_path
    from sdcompress.services.dmd import scheduler_config

    out = tmp_path_factory.mktemp("dmd") / "dmd2-student"
    shutil.copytree(tiny_model_path("tiny-sd"), out, copy_function=_link_or_copy)
    config_file = out / "scheduler" / "scheduler_config.json"
    config = scheduler_config(json.loads(config_file.read_text()), "epsilon", TRAINED)
    config_file.write_text(json.dumps(config))
    (out / RUN_RECORD).write_text(json.dumps({"command": "distill", "inference": INFERENCE}))
    return out


def test_model_specs_parse_and_bad_ones_are_one_sentence(tmp_path):
    assert parse_model_spec("tiny-sd") == ModelSpec("tiny-sd", "tiny-sd")
    spec = parse_model_spec("out/student@steps=4,guidance=0,scheduler=TCD")
    assert (spec.ref, spec.steps, spec.guidance, spec.scheduler) == ("out/student", 4, 0.0, Sampler.TCD)
    assert parse_model_spec("me/model@main").ref == "me/model@main"  # not settings: the name as typed
    odd = tmp_path / "run@steps=4"
    odd.mkdir()
    assert parse_model_spec(str(odd)).ref == str(odd)  # an existing path is the path it names
    for text, message in [
        ("m@steps=0", "steps must be"),
        ("m@steps=four", "steps must be"),
        ("m@guidance=-1", "guidance must be"),
        ("m@scheduler=heun", "is not one of"),
        ("m@seed=3", "unknown setting 'seed'"),
        ("m@steps=2,steps=3", "twice"),
        ("@steps=2", "no model"),
    ]:
        with pytest.raises(SdcError, match=message):
            parse_model_spec(text)


def test_a_run_record_then_a_few_step_scheduler_say_how_a_model_is_sampled(tmp_path):
    assert own_sampling(tmp_path, "PNDMScheduler") == OwnSampling()
    assert own_sampling(tmp_path, "LCMScheduler") == OwnSampling(steps=4, source=FROM_SCHEDULER)
    (tmp_path / RUN_RECORD).write_text(json.dumps({"inference": INFERENCE}))
    own = own_sampling(tmp_path, "LCMScheduler")
    assert (own.steps, own.guidance, own.timesteps, own.source) == (4, 0.0, tuple(TRAINED), FROM_RECORD)
    assert own.unguided
    (tmp_path / RUN_RECORD).write_text("{broken")
    assert own_sampling(tmp_path, "PNDMScheduler") == OwnSampling()  # a broken record is no record


def test_override_beats_the_record_which_beats_the_flags():
    flags = {"steps": 25, "guidance": 7.5, "scheduler": Sampler.DDIM}
    own = OwnSampling(steps=4, guidance=0.0, sampler="LCMScheduler", source=FROM_RECORD)
    plain = resolve_sampling(ModelSpec("t", "t"), OwnSampling(), "PNDMScheduler", **flags)
    assert (plain.steps, plain.guidance, plain.scheduler) == (25, 7.5, Sampler.DDIM)
    assert set(plain.sources.values()) == {FROM_FLAGS}
    recorded = resolve_sampling(ModelSpec("s", "s"), own, "LCMScheduler", **flags)
    assert (recorded.steps, recorded.guidance, recorded.scheduler) == (4, 0.0, Sampler.MODEL)
    overridden = resolve_sampling(ModelSpec("s@steps=2", "s", steps=2), own, "LCMScheduler", **flags)
    assert (overridden.steps, overridden.guidance) == (2, 0.0)
    assert overridden.sources == {"steps": FROM_OVERRIDE, "guidance": FROM_RECORD, "scheduler": FROM_RECORD}
    # a U-Net-only student borrows the teacher's PNDM: the scheduler its record names is used instead
    borrowed = resolve_sampling(ModelSpec("s", "s"), own, "PNDMScheduler", **flags)
    assert borrowed.scheduler == Sampler.LCM
    # an LCM student without a record: 4 steps and its own scheduler; --guidance reaches its embedding
    lcm = resolve_sampling(
        ModelSpec("l", "l"), OwnSampling(steps=4, source=FROM_SCHEDULER), "LCMScheduler", **flags
    )
    assert (lcm.steps, lcm.guidance, lcm.scheduler) == (4, 7.5, Sampler.MODEL)
    assert own_settings_note("l", "l", lcm, "LCMScheduler").startswith("l: steps 4, scheduler LCMScheduler (")
    assert own_settings_note("t", "t", plain, "DDIMScheduler") is None  # nothing to say: no note


def test_eval_renders_each_model_as_its_record_or_override_says(dmd_student, tmp_path, monkeypatch):
    """Teacher at --steps with CFG; the DMD2 student at its 4 trained timesteps without the CFG batch;
    the override's steps and scheduler beat the record. Counted at the U-Net, checked in the JSON."""
    import sdcompress.evaluation.generation as generation
    from sdcompress.services.eval import EvalRequest, evaluate

    calls: dict[int, list[tuple[int, int]]] = {}
    real = generation.build_pipeline

    def counting(model, sampler, dtype, device):
        pipe = real(model, sampler, dtype, device)
        seen = calls.setdefault(len(calls), [])
        pipe.unet.register_forward_pre_hook(lambda m, args: seen.append((int(args[1]), args[0].shape[0])))
        return pipe

    monkeypatch.setattr(generation, "build_pipeline", counting)
    (tmp_path / "p.txt").write_text("a red cube\n")
    override = f"{dmd_student}@steps=2,scheduler=tcd"
    request = EvalRequest(
        models=[str(dmd_student), override],
        prompts=str(tmp_path / "p.txt"),
        output=tmp_path / "eval",
        teacher="tiny-sd",
        steps=3,
        resolution=32,
        device="cpu",
    )
    result = evaluate(request)
    teacher, student, fast = result.models
    assert (teacher.steps, teacher.guidance, teacher.scheduler) == (3, 7.5, "PNDMScheduler")
    assert (student.steps, student.guidance, student.scheduler) == (4, 0.0, "LCMScheduler")
    assert student.timesteps == TRAINED and student.sampling_from["steps"] == FROM_RECORD
    assert (fast.steps, fast.guidance, fast.scheduler, fast.timesteps) == (2, 0.0, "TCDScheduler", [999, 499])
    assert fast.spec == override and fast.sampling_from["steps"] == FROM_OVERRIDE
    # each pipeline: one untimed one-step warm-up image, then the image at its own settings
    teacher_calls, student_calls, fast_calls = (calls[i][1:] for i in range(3))
    assert [b for _, b in teacher_calls] == [2] * len(teacher.timesteps)  # CFG: two halves per step
    assert student_calls == [(t, 1) for t in TRAINED]  # guidance 0: one batch, the trained timesteps
    assert fast_calls == [(999, 1), (499, 1)]
    assert len({m.cache_key for m in result.models}) == 3  # settings are part of the image folder's key
    assert any("from its run record, not --steps" in n for n in result.notes)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert [m["steps"] for m in saved["models"]] == [3, 4, 2]
    assert all(m["render_seconds_per_image"] > 0 for m in saved["models"])
    from sdcompress.hub.card import CardFacts, card_body
    from sdcompress.hub.lineage import Lineage

    card = card_body(CardFacts("me/s", "pipeline", None, None, {}, [], Lineage(evaluation=saved)))
    assert f"| `{dmd_student}`, 4 steps, guidance 0.0, LCMScheduler |" in card  # not the teacher's 3

    rerun = evaluate(request)  # all cached: nothing rendered, seconds per image still reported
    assert [(m.generated, m.render_seconds_per_image) for m in rerun.models] == [
        (0, m.render_seconds_per_image) for m in result.models
    ]
    assert len(calls) == 3


def test_eval_cli_refuses_a_bad_model_setting_in_one_sentence(cli, tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n")
    out = tmp_path / "out"
    r = cli("eval", "tiny-sd@steps=0", "--prompts", tmp_path / "p.txt", "--teacher", "tiny-sd", "-o", out)
    assert r.code == 2 and "steps must be" in r.stderr and "Traceback" not in r.stderr, r
    assert not out.exists()
