"""`distill --objective dmd2`: a few-step student by distribution matching (DMD2), on the distill job's inputs.

`services.distill` loads the teacher, the student and the data as for any distillation and hands them
here; this module adds what DMD2 needs around `training.dmd_task.Dmd2Task`: the student's timesteps, the
scheduler config that samples exactly those in diffusers (an `LCMScheduler`: x0 estimate, then fresh
noise to the next timestep, which is the backward simulation the student trained with), the fake score
(full, or `--fake-lora` adapters on the teacher), and the writers (a diffusers pipeline, or the student
LoRA in kohya and PEFT layouts through the one LoRA writer).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdcompress.errors import SdcError
from sdcompress.hub.lineage import write_run_record
from sdcompress.services.consistency import few_step_record, save_student_pipeline
from sdcompress.services.lora_train import PEFT_FILE
from sdcompress.training.config import AdapterSpec
from sdcompress.training.dmd_task import Dmd2Task
from sdcompress.training.task import DiffusionParts, TrainingSummary

if TYPE_CHECKING:
    from sdcompress.services.distill import DistillRequest

KOHYA_FILE = "lora_kohya.safetensors"  # ComfyUI, A1111/Forge; the PEFT file is diffusers' default name
SAMPLER = "LCMScheduler"


def student_timesteps(spec: str, total: int = 1000) -> list[int]:
    """`--student-steps`: N (N evenly spaced steps ending at T - 1: 4 -> 999,749,499,249) or a list."""
    text = str(spec).replace(" ", "").strip(",")
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise SdcError(
            f"--student-steps {spec!r} is neither a step count (1, 2, 4) nor a timestep list such as "
            "999,749,499,249."
        ) from None
    if len(values) == 1 and "," not in text:
        count = values[0]
        if not 1 <= count <= total:
            raise SdcError(f"--student-steps must be a step count from 1 to {total} (e.g. 4), not {count}.")
        return [total - 1 - i * (total // count) for i in range(count)]
    if not values or min(values) < 0 or max(values) >= total or len(set(values)) != len(values):
        raise SdcError(
            f"--student-steps {spec!r} must list distinct timesteps in 0..{total - 1}, e.g. 999,749,499,249."
        )
    return sorted(values, reverse=True)


def scheduler_config(teacher_scheduler: dict[str, Any], prediction: str, timesteps: list[int]) -> dict:
    """An LCMScheduler config whose `set_timesteps(len(timesteps))` gives exactly the student's timesteps.

    LCMScheduler picks its timesteps from a grid of `original_inference_steps` points; the first grid
    that yields the trained list is taken, so `pipe(prompt, num_inference_steps=N)` needs no hand edits.
    """
    from diffusers import LCMScheduler

    from sdcompress.services.consistency import lcm_scheduler_config
    from sdcompress.training.config import ConsistencyConfig

    total = int(teacher_scheduler.get("num_train_timesteps", 1000))
    base = lcm_scheduler_config(teacher_scheduler, prediction, ConsistencyConfig(ddim_timesteps=total))
    scheduler = LCMScheduler.from_config(base)
    for grid in range(total, len(timesteps) - 1, -1):
        scheduler.set_timesteps(len(timesteps), original_inference_steps=grid)
        if scheduler.timesteps.tolist() == timesteps:
            return base | {"original_inference_steps": grid}
    raise SdcError(
        f"no diffusers scheduler samples the timesteps {','.join(map(str, timesteps))} as given; use "
        "--student-steps N (evenly spaced, ending at 999) or a list LCMScheduler can reproduce."
    )


def check_request(request: DistillRequest) -> None:
    """What can be refused before any model is loaded: the step list, a step-distilled teacher."""
    if request.loss.noise.timesteps:
        raise SdcError(
            "--timesteps marks a step-distilled teacher, which is no score at every noise level; for "
            "--objective dmd2 give its base model as --teacher and the distilled model as --student "
            "(the student's timesteps are --student-steps)."
        )
    student_timesteps(request.dmd.student_steps)


def dmd2_task(
    request: DistillRequest,
    teacher,
    student,
    parts: DiffusionParts,
    teacher_unet: torch.nn.Module,
    save_dtype: torch.dtype | None,
    resolution: int,
) -> Dmd2Task:
    """The DMD2 task with its saver; `parts.unet` is the student."""
    from sdcompress.services.distill import student_prediction
    from sdcompress.training.features import pair_features

    config, consistency = request.dmd, request.consistency
    check_request(request)
    if student.family.topology != teacher.family.topology:
        raise SdcError(
            f"the student is a {student.family.title} model and the teacher {request.teacher} a "
            f"{teacher.family.title} one; DMD2 needs a teacher of the student's family."
        )
    total = int(teacher.configs["scheduler"].get("num_train_timesteps", 1000))
    timesteps = student_timesteps(config.student_steps, total)
    prediction = student_prediction(request, teacher)
    sched_config = scheduler_config(teacher.configs["scheduler"], prediction, timesteps)
    from diffusers import LCMScheduler

    parts.extra_components["scheduler"] = LCMScheduler.from_config(sched_config)
    spec = fake = None
    if consistency.lora is not None:
        spec = AdapterSpec(rank=consistency.lora, targets=consistency.lora_targets)
        spec.validate()
    if config.fake_lora is not None:
        fake = AdapterSpec(rank=config.fake_lora, targets=consistency.lora_targets)
        fake.validate()
    pairs = []
    if config.kd_weight:
        pairs = pair_features(parts.unet, teacher_unet, request.features, request.teacher)
    guidance = config.guidance(teacher.family.is_sdxl)
    inference = {
        "steps": len(timesteps),
        "timesteps": timesteps,
        "sampler": SAMPLER,
        "guidance_scale": 0.0,
        "prediction_type": prediction,
    }

    def save(task: Dmd2Task, out: Path, summary: TrainingSummary) -> None:
        record = few_step_record(
            request,
            teacher,
            summary,
            "dmd2",
            prediction,
            dmd2=asdict(config) | {"teacher_guidance": guidance},
            inference=inference,
            lora_files=[KOHYA_FILE, PEFT_FILE] if spec is not None else None,
        )
        if spec is None:
            unet_config = dict(student.configs["unet"])
            save_student_pipeline(task, out, teacher, unet_config, sched_config, record, save_dtype)
            return
        _save_lora(request, task, out, teacher, student, spec, summary, prediction, resolution, save_dtype)
        _write_scheduler(out, sched_config)
        write_run_record(out, record)

    return Dmd2Task(
        parts,
        teacher_unet,
        config,
        timesteps,
        guidance,
        saver=save,
        loss=request.loss,
        teacher_prediction=teacher.prediction_type,
        lora_spec=spec,
        fake_spec=fake,
        fake_lr=config.fake_lr or request.train.lr,
        kd_pairs=pairs,
        seed=request.train.seed,
    )


def dmd2_train_config(train, task: Dmd2Task):
    """Validation samples as the student is used: its own steps, no classifier-free guidance."""
    from sdcompress.services.distill import default_validation_steps

    train = default_validation_steps(train, len(task.timesteps))
    return replace(train, validation=replace(train.validation, guidance_scale=0.0))


def _write_scheduler(out: Path, config: dict) -> None:
    """The LoRA's sampler beside it: `LCMScheduler.from_pretrained(out, subfolder="scheduler")`."""
    import json

    folder = out / "scheduler"
    folder.mkdir()
    (folder / "scheduler_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_lora(request, task, out, teacher, student, spec, summary, prediction, resolution, dtype) -> None:
    """The student LoRA in kohya layout (ComfyUI, A1111) and PEFT layout (diffusers), by the one writer."""
    from sdcompress.lowrank.targets import naming_for
    from sdcompress.services.consistency import _lora_metadata
    from sdcompress.services.lora_train import write_adapters

    meta = _lora_metadata(request, teacher, spec, summary, prediction, resolution)
    meta["ss_training_comment"] = "DMD2 LoRA trained with sdcompress distill --objective dmd2 --lora"
    model = teacher.with_unet(student.components["unet"], student.configs["unet"])
    write_adapters(
        out, KOHYA_FILE.removesuffix(".safetensors"), task.export_lora(), naming_for(model),
        "kohya,peft", dtype or torch.float32, meta,
    )  # fmt: skip
