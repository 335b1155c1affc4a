"""`distill --objective lcm`: the few-step student (LCM) or its LoRA (LCM-LoRA), on the distill job's inputs.

`services.distill` loads the teacher, the student and the data as for any distillation and hands them
here; this module adds what a latent consistency model needs around `training.lcm_task.LcmTask`: the
guidance-scale embedding of a full student, the `LCMScheduler` config the output is sampled with, and
the writers (a diffusers pipeline, or an LCM-LoRA in kohya layout through the one LoRA writer).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdcompress.errors import SdcError
from sdcompress.hub.lineage import run_record, run_record_file, write_run_record
from sdcompress.training.config import AdapterSpec, ConsistencyConfig
from sdcompress.training.lcm_task import LcmTask
from sdcompress.training.task import DiffusionParts, TrainingSummary

if TYPE_CHECKING:
    from sdcompress.services.distill import DistillRequest

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights(folder) looks for
LCM_VALIDATION_STEPS = 4


def lcm_scheduler_config(teacher_scheduler: dict[str, Any], prediction_type: str, config: ConsistencyConfig):
    """An LCMScheduler on the teacher's noise schedule, sampling the DDIM grid the student learned."""
    from diffusers import LCMScheduler

    known = set(inspect.signature(LCMScheduler.__init__).parameters) - {"timestep_spacing"}
    scheduler = LCMScheduler.from_config(
        {k: v for k, v in teacher_scheduler.items() if k in known},
        prediction_type=prediction_type,
        original_inference_steps=config.ddim_timesteps,
        timestep_scaling=config.timestep_scaling,
    )
    return {"_class_name": "LCMScheduler"} | {
        k: v for k, v in scheduler.config.items() if not k.startswith("_")
    }


def with_guidance_embedding(unet: torch.nn.Module, width: int) -> torch.nn.Module:
    """The student with diffusers' guidance-scale input (`time_cond_proj_dim`) added, when it has none.

    The new projection starts at zero, so the student starts as exactly the model it was (the diffusers
    example draws it at random; zero is deterministic and costs the first steps nothing).
    """
    if not width or getattr(unet.config, "time_cond_proj_dim", None):
        return unet
    from diffusers import UNet2DConditionModel

    # a keyword, not a dict entry: from_config takes a FrozenDict's recorded keys over a plain dict's
    grown = UNet2DConditionModel.from_config(unet.config, time_cond_proj_dim=width)
    missing, unexpected = grown.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("time_embedding.cond_proj") for k in missing), missing
    torch.nn.init.zeros_(grown.time_embedding.cond_proj.weight)
    return grown.to(next(unet.parameters()).dtype)


def lcm_task(
    request: DistillRequest,
    teacher,
    student,
    parts: DiffusionParts,
    teacher_unet: torch.nn.Module,
    save_dtype: torch.dtype | None,
    resolution: int,
) -> LcmTask:
    """The LCM task with its saver; `parts.unet` is the student (it gains the guidance embedding here)."""
    from sdcompress.services.distill import student_prediction

    config = request.consistency
    if request.loss.noise.timesteps:
        raise SdcError(
            "--timesteps does not apply to --objective lcm, which trains on its own DDIM grid; "
            "drop it (set the grid with --ddim-timesteps)."
        )
    prediction = student_prediction(request, teacher)
    scheduler_config = lcm_scheduler_config(teacher.configs["scheduler"], prediction, config)
    parts.extra_components["scheduler"] = _scheduler(scheduler_config)
    spec = None
    unet_config = dict(student.configs["unet"])
    if config.lora is not None:
        spec = AdapterSpec(rank=config.lora, targets=config.lora_targets)
        spec.validate()
    elif config.w_embedding:
        parts.unet = with_guidance_embedding(parts.unet, config.w_embedding)
        unet_config["time_cond_proj_dim"] = parts.unet.config.time_cond_proj_dim

    def save(task: LcmTask, out: Path, summary: TrainingSummary) -> None:
        record = few_step_record(
            request,
            teacher,
            summary,
            "lcm",
            prediction,
            consistency=asdict(config),
            # How it is used (bench and eval read this): 4 LCMScheduler steps; no guidance_scale here,
            # since a w-embedding student takes guidance through the embedding, not as a CFG pair.
            inference={"steps": 4, "sampler": "LCMScheduler", "prediction_type": prediction},
            lora_file=LORA_FILE if spec is not None else None,
        )
        if spec is not None:
            meta = _lora_metadata(request, teacher, spec, summary, prediction, resolution)
            _save_lora(task, out, teacher, student, meta, save_dtype)
            write_run_record(out, record)
        else:
            save_student_pipeline(task, out, teacher, unet_config, scheduler_config, record, save_dtype)

    return LcmTask(
        parts,
        teacher_unet,
        config,
        saver=save,
        loss=request.loss,
        teacher_prediction=teacher.prediction_type,
        lora_spec=spec,
        seed=request.train.seed,
    )


def _scheduler(config: dict[str, Any]):
    from diffusers import LCMScheduler

    return LCMScheduler.from_config(config)


def lcm_train_config(train, task: LcmTask):
    """Validation images at the few steps an LCM student is used at, unless --validation-steps was given."""
    from sdcompress.services.distill import default_validation_steps

    return default_validation_steps(train, LCM_VALIDATION_STEPS)


def few_step_record(
    request, teacher, summary: TrainingSummary, objective: str, prediction: str, **fields
) -> dict:
    """The run record of a few-step student (LCM, DMD2): what distill records, plus the objective's own fields."""
    return run_record(
        "distill",
        family=teacher.family.name,
        preset=None,
        summary=summary,
        teacher=request.teacher,
        student=request.student or request.teacher,
        objective=objective,
        **fields,
        prediction_type=prediction,
        teacher_prediction_type=teacher.prediction_type,
        **({"stages": list(request.stages)} if request.stages else {}),
    )


def save_student_pipeline(task, out, teacher, unet_config, scheduler_config, record, dtype) -> None:
    """The trained U-Net in the teacher's pipeline, with the few-step scheduler and the run record."""
    from sdcompress.checkpoint.tensors import lazy_state_dict
    from sdcompress.checkpoint.writers import save_diffusers

    weights = lazy_state_dict({k: v.detach().cpu() for k, v in task.parts.unet.state_dict().items()})
    model = teacher.with_unet(weights, unet_config)
    model.configs["scheduler"] = scheduler_config
    save_diffusers(model, out, dtype=dtype, overwrite=True, extra_files=run_record_file(record))


def _lora_metadata(request, teacher, spec, summary, prediction, resolution) -> dict[str, str]:
    """kohya's `ss_*` and `modelspec.*` keys for the LCM-LoRA."""
    from sdcompress.lowrank.layouts import kohya_metadata

    meta = kohya_metadata(
        family=teacher.family,
        title=request.output.name,
        rank=spec.rank,
        conv_rank=spec.rank if spec.targets == "all" else None,
        alpha=spec.lora_alpha,
        prediction_type=prediction,
        resolution=resolution,
    )
    meta |= {
        "ss_sd_model_name": request.student or request.teacher,
        "ss_steps": str(summary.steps),
        "ss_training_comment": "LCM-LoRA trained with sdcompress distill --objective lcm --lora",
    }
    return meta


def _save_lora(task, out, teacher, student, meta, dtype) -> None:
    """The LCM-LoRA in kohya layout (what ComfyUI, A1111 and diffusers' load_lora_weights all read)."""
    from sdcompress.lowrank.layouts import KOHYA, write_lora
    from sdcompress.lowrank.targets import naming_for

    model = teacher.with_unet(student.components["unet"], student.configs["unet"])
    write_lora(
        out / LORA_FILE,
        task.export_lora(),
        naming_for(model),
        fmt=KOHYA,
        dtype=dtype or torch.float32,
        metadata=meta,
        overwrite=True,
    )
