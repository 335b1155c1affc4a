"""`prune`: cut a teacher U-Net into a student, measure what to cut, and write the student.

The plan (structure, depths, kept blocks) is decided first, with the teacher
loaded only when blocks must be scored (`--select importance` with a choice
to make) or the student measured (`evaluate`). The student state dict is the
teacher's own lazy tensors under student names, so writing it streams byte
copies from the teacher's memory-mapped files, one tensor at a time.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdcompress import __version__
from sdcompress.arch.count import count_by_stage, count_state_dict
from sdcompress.arch.families import Config
from sdcompress.arch.layout import layout_from_config
from sdcompress.arch.presets import preset_for_family
from sdcompress.checkpoint.atomic import Overwrite, check_output
from sdcompress.checkpoint.model import disk_size
from sdcompress.checkpoint.resolve import load_model
from sdcompress.checkpoint.tensors import LazyTensor
from sdcompress.checkpoint.writers import save_diffusers
from sdcompress.choices import MidBlock, SelectMethod, parse_choices
from sdcompress.devices import resolve_device
from sdcompress.errors import SdcError
from sdcompress.prune import importance as imp
from sdcompress.prune.flops import unet_flops
from sdcompress.prune.mapping import key_map, prefix_table, student_shapes, student_state_dict
from sdcompress.prune.plan import candidates as block_candidates
from sdcompress.prune.plan import choose_blocks, plan_structure, removed_blocks, student_config
from sdcompress.prune.selection import Scores

RECORD_FILE = "sdcompress_prune.json"
Progress = Callable[[str, int, int], None]


@dataclass
class PruneRequest:
    teacher: str
    output: str
    preset: str | None = None
    drop_transformer_blocks: int | None = None
    layers_per_block: int | None = None
    mid_block: MidBlock | None = None  # None: keep
    depths: str | None = None  # "down2=4,4 mid=0 up0=4,4,10 up1=2,1,1"
    select: SelectMethod = SelectMethod.IMPORTANCE
    prompts: str | None = None
    calibration_samples: int | None = None  # default: 8 on a GPU, 4 on a CPU
    calibration_size: int | None = None  # pixels; default: see importance.scoring_plan
    batch_size: int = 4
    seed: int = 0
    device: str = "auto"
    evaluate: bool = False
    unet_only: bool = False
    overwrite: bool | Overwrite = False
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        parse_choices(self)


@dataclass
class PruneResult:
    teacher: str
    output: str
    family: str
    preset: str | None
    select: str
    parameters: dict[str, int]  # teacher / student U-Net totals
    stages: list[dict[str, Any]]  # {stage, teacher, student}
    transformer_blocks: dict[str, int]
    flops_per_step: dict[str, int]
    resolution: int
    removed: list[dict[str, Any]]  # {block, score, reason}
    kept: dict[str, dict[str, Any]]  # student stack -> {teacher, blocks}
    student_config: Config
    size_on_disk: int
    unet_bytes: int
    init_mse: float | None = None
    calibration: dict[str, Any] | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stages(teacher: dict[str, int], student: dict[str, int]) -> list[dict[str, Any]]:
    names = list(teacher) + [s for s in student if s not in teacher]
    return [{"stage": s, "teacher": teacher.get(s, 0), "student": student.get(s, 0)} for s in names]


def prune(
    req: PruneRequest,
    *,
    progress: Progress | None = None,
    on_tensor: Callable[[str, LazyTensor], None] | None = None,
    on_plan: Callable[[imp.ScoringPlan], None] | None = None,
) -> PruneResult:
    """Plan, score (when a choice is to be made), and write the student.

    `on_plan` hears what scoring will cost before the teacher is loaded, so a caller can say so
    (and how to make it cheaper) before minutes of work; `progress` then counts U-Net batches.
    """
    start = time.perf_counter()
    out = check_output(req.output, overwrite=req.overwrite, inputs=[req.teacher, req.prompts], kind="dir")
    model = load_model(req.teacher, allow_pickle=req.allow_pickle)
    if model.path is not None and out.resolve() == Path(model.path).resolve():
        raise SdcError("the output is the teacher; choose another output path (inputs are never modified).")
    teacher_cfg = model.configs["unet"]
    plan = plan_structure(
        model,
        preset=req.preset,
        drop_transformer_blocks=req.drop_transformer_blocks,
        layers_per_block=req.layers_per_block,
        mid_block=req.mid_block,
        depths=req.depths,
    )
    candidates = block_candidates(plan)
    scoring = req.select == "importance" and bool(candidates)
    notes = list(model.notes)
    scores: Scores = {}
    teacher_unet = None
    calib_info = None
    eval_set = None
    if scoring or req.evaluate:
        device = resolve_device(req.device)
        if req.calibration_samples is not None and req.calibration_samples < 1:
            raise SdcError("--calibration-samples must be at least 1.")
        plan_cost = imp.scoring_plan(
            model,
            blocks=len(candidates) if scoring else 0,
            evaluate=req.evaluate,
            device=device,
            samples=req.calibration_samples,
            size=req.calibration_size,
        )
        prompts = imp.read_prompts(req.prompts)
        if on_plan is not None:
            on_plan(plan_cost)
        te_dtype = imp.compute_dtype(imp.unet_dtype(model), device)
        if progress:
            progress("encoding prompts", 0, 1)
        embeds = imp.encode(model, prompts, device, te_dtype)
        teacher_unet, dtype = imp.load_teacher_unet(model, device)
        common = dict(samples=plan_cost.samples, latent=plan_cost.latent, device=device, dtype=dtype)
        score_set = imp.calibration(model, embeds, seed=req.seed, **common)
        eval_set = imp.calibration(model, embeds, seed=req.seed + 1, **common) if req.evaluate else None
        calib_info = {
            "samples": plan_cost.samples,
            "size": plan_cost.size,
            "latent_size": plan_cost.latent,
            "prompts": len(prompts),
            "seed": req.seed,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
        }
        if dtype != imp.unet_dtype(model):
            notes.append(
                f"scored in {calib_info['dtype']} ({device.type} has no fast kernels for the teacher's dtype)"
            )
        if scoring:
            with imp.threads_for(plan_cost):
                scores = imp.score_blocks(
                    teacher_unet, score_set, candidates, batch_size=req.batch_size, progress=progress
                )
    method = req.select
    depths, kept = choose_blocks(teacher_cfg, plan, method, scores)
    config = student_config(teacher_cfg, plan, depths)
    if layout_from_config(config) != plan.skeleton.layout(depths):
        raise AssertionError("the student config does not describe the planned layout")
    shapes = student_shapes(config)
    mapping = key_map(shapes, prefix_table(plan.skeleton, kept))
    student_sd = student_state_dict(model.components["unet"], shapes, mapping)

    init_mse = None
    if eval_set is not None and teacher_unet is not None:
        if progress:
            progress("measuring the student", 0, 1)
        student_unet = imp.shared_student(teacher_unet, config, mapping)
        with imp.threads_for(plan_cost):
            reference = imp.predict(teacher_unet, eval_set, req.batch_size)
            init_mse = imp.mse(imp.predict(student_unet, eval_set, req.batch_size), reference)
        del student_unet
    del teacher_unet
    gc.collect()

    teacher_stages = count_by_stage(model.components["unet"])
    student_stages = count_by_stage(student_sd)
    removed = removed_blocks(model, plan, kept, scores)
    sources = {s.student: s.teacher for s in plan.skeleton.stacks()}
    preset_name = req.preset and preset_for_family(req.preset, model.family).name
    result = PruneResult(
        teacher=req.teacher,
        output=str(out),
        family=model.family.name,
        preset=preset_name,
        select=method if candidates else "none",
        parameters={
            "teacher": count_state_dict(model.components["unet"]),
            "student": count_state_dict(student_sd),
        },
        stages=_stages(teacher_stages, student_stages),
        transformer_blocks={
            "teacher": model.unet_layout.transformer_blocks(),
            "student": layout_from_config(config).transformer_blocks(),
        },
        flops_per_step={
            "teacher": unet_flops(teacher_cfg, model.family),
            "student": unet_flops(config, model.family),
        },
        resolution=model.family.resolution,
        removed=removed,
        kept={k: {"teacher": sources[k], "blocks": list(v)} for k, v in kept.items()},
        student_config=config,
        size_on_disk=0,
        unet_bytes=sum(t.nbytes for t in student_sd.values()),
        init_mse=init_mse,
        calibration=calib_info,
        notes=notes,
    )
    record = {
        "sdcompress": __version__,
        **{k: v for k, v in result.to_dict().items() if k not in ("output", "notes")},
    }
    record.pop("size_on_disk")
    record.pop("seconds")
    student = model.with_unet(student_sd, config)
    result.notes += save_diffusers(
        student,
        out,
        overwrite=req.overwrite,
        unet_only=req.unet_only,
        on_tensor=on_tensor,
        extra_files={RECORD_FILE: json.dumps(record, indent=2) + "\n"},
    )
    result.size_on_disk = disk_size(out) or 0
    result.seconds = time.perf_counter() - start
    return result
