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
from sdcompress.checkpoint.atomic import check_output
from sdcompress.checkpoint.model import Model, disk_size
from sdcompress.checkpoint.resolve import load_model
from sdcompress.checkpoint.tensors import LazyTensor
from sdcompress.checkpoint.writers import save_diffusers
from sdcompress.devices import resolve_device
from sdcompress.errors import SdcError
from sdcompress.prune import importance as imp
from sdcompress.prune.flops import unet_flops
from sdcompress.prune.mapping import key_map, prefix_table, student_shapes, student_state_dict
from sdcompress.prune.selection import (
    METHODS,
    Scores,
    block_path,
    greedy_drop,
    importance_cost,
    kept_blocks,
    max_droppable,
    positional_cost,
    reachable,
)
from sdcompress.prune.surgery import (
    Skeleton,
    apply_depths,
    make_skeleton,
    parse_depths,
    skeleton_for_config,
    student_config,
)

RECORD_FILE = "sdcompress_prune.json"
Progress = Callable[[str, int, int], None]


@dataclass
class PruneRequest:
    teacher: str
    output: str
    preset: str | None = None
    drop_transformer_blocks: int | None = None
    layers_per_block: int | None = None
    mid_block: str | None = None  # keep | resnet | none (None: keep)
    depths: str | None = None  # "down2=4,4 mid=0 up0=4,4,10 up1=2,1,1"
    select: str = "importance"
    prompts: str | None = None
    calibration_samples: int = 8
    calibration_size: int | None = None  # pixels; default: the family's resolution
    batch_size: int = 4
    seed: int = 0
    device: str = "auto"
    evaluate: bool = False
    unet_only: bool = False
    overwrite: bool = False
    allow_pickle: bool = False


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


@dataclass
class Plan:
    skeleton: Skeleton
    depths: dict[str, int]
    drop: int
    config: Config | None  # the published config for presets; None: derive from the layout


def _surgery_requested(req: PruneRequest) -> bool:
    return any(
        x is not None for x in (req.drop_transformer_blocks, req.layers_per_block, req.mid_block, req.depths)
    )


def plan_structure(model: Model, req: PruneRequest) -> Plan:
    """Skeleton and starting depths from a preset or from the surgery options (no weights read)."""
    teacher_cfg = model.configs["unet"]
    if req.preset is not None:
        if _surgery_requested(req):
            raise SdcError(
                "--preset fixes the whole layout; drop --drop-transformer-blocks, --layers-per-block, "
                "--mid-block and --depths, or drop --preset."
            )
        cfg = preset_for_family(req.preset, model.family).student_config(teacher_cfg)
        skeleton, depths = skeleton_for_config(teacher_cfg, cfg)
        return Plan(skeleton, depths, 0, cfg)
    if not _surgery_requested(req):
        raise SdcError(
            "nothing to prune; give --preset, --drop-transformer-blocks N, --layers-per-block, --mid-block or --depths."
        )
    spec = parse_depths(req.depths) if req.depths is not None else {}
    mid = req.mid_block or "keep"
    if spec.get("mid") == [0]:
        if req.mid_block not in (None, "resnet"):
            raise SdcError(
                f"--depths mid=0 means --mid-block resnet, which contradicts --mid-block {req.mid_block}."
            )
        mid = "resnet"
    skeleton = make_skeleton(model.unet_layout, layers_per_block=req.layers_per_block, mid=mid)
    depths = apply_depths(skeleton, spec)
    student_config(teacher_cfg, skeleton, depths)  # raises a clear error for a layout diffusers cannot build
    drop = req.drop_transformer_blocks or 0
    if drop < 0:
        raise SdcError("--drop-transformer-blocks must be a positive number.")
    if drop:
        available = max_droppable(teacher_cfg, skeleton, depths)
        if drop > available:
            raise SdcError(
                f"--drop-transformer-blocks {drop} is more than this student can lose: at most {available} of its "
                f"{sum(depths.values())} transformer blocks can go (every attention stack keeps at least one)."
            )
        if not reachable(skeleton, depths, drop):
            raise SdcError(
                f"--drop-transformer-blocks {drop} cannot be met exactly: blocks here go one per stack, two at a time "
                "for the mid block, or a whole level's attention at once; choose a nearby number."
            )
    return Plan(skeleton, depths, drop, None)


def _candidates(plan: Plan) -> list[str]:
    """Teacher blocks whose fate is a choice (their stack is cut, or may be cut by --drop-transformer-blocks)."""
    out = []
    for s in plan.skeleton.stacks():
        depth = plan.depths[s.student]
        if depth > 0 and (plan.drop or depth < s.teacher_depth):
            out += [block_path(s.teacher, j) for j in range(s.teacher_depth)]
    return out


def _removed(
    model: Model, plan: Plan, kept: dict[str, tuple[int, ...]], scores: Scores
) -> list[dict[str, Any]]:
    by_teacher: dict[str, set[int]] = {}
    chosen = {s.teacher for s in plan.skeleton.stacks() if plan.depths[s.student] > 0}
    sources = {s.student: s.teacher for s in plan.skeleton.stacks()}
    for student, blocks in kept.items():
        by_teacher.setdefault(sources[student], set()).update(blocks)
    out = []
    for stack, depth in model.unet_layout.attention_stacks():
        for j in range(depth):
            if j in by_teacher.get(stack, set()):
                continue
            path = block_path(stack, j)
            out.append(
                {
                    "block": path,
                    "score": scores.get(path),
                    "reason": "selection" if stack in chosen else "structure",
                }
            )
    return out


def _stages(teacher: dict[str, int], student: dict[str, int]) -> list[dict[str, Any]]:
    names = list(teacher) + [s for s in student if s not in teacher]
    return [{"stage": s, "teacher": teacher.get(s, 0), "student": student.get(s, 0)} for s in names]


def prune(
    req: PruneRequest,
    *,
    progress: Progress | None = None,
    on_tensor: Callable[[str, LazyTensor], None] | None = None,
) -> PruneResult:
    start = time.perf_counter()
    if req.select not in METHODS:
        raise SdcError(f"--select must be one of {', '.join(METHODS)}, not {req.select!r}.")
    out = check_output(req.output, overwrite=req.overwrite, inputs=[req.teacher, req.prompts], kind="dir")
    model = load_model(req.teacher, allow_pickle=req.allow_pickle)
    if model.path is not None and out.resolve() == Path(model.path).resolve():
        raise SdcError("the output is the teacher; choose another output path (inputs are never modified).")
    teacher_cfg = model.configs["unet"]
    plan = plan_structure(model, req)
    candidates = _candidates(plan)
    scoring = req.select == "importance" and bool(candidates)
    notes = list(model.notes)
    scores: Scores = {}
    teacher_unet = None
    calib_info = None
    eval_set = None
    if scoring or req.evaluate:
        device = resolve_device(req.device)
        latent = (req.calibration_size or model.family.resolution) // 2 ** (
            len(model.family.vae["block_out_channels"]) - 1
        )
        if latent < 8:
            raise SdcError("--calibration-size is too small; give at least 64 pixels.")
        prompts = imp.read_prompts(req.prompts)
        te_dtype = imp.compute_dtype(imp._unet_dtype(model), device)
        if progress:
            progress("encoding prompts", 0, 1)
        embeds = imp.encode(model, prompts, device, te_dtype)
        teacher_unet, dtype = imp.load_teacher_unet(model, device)
        common = dict(samples=req.calibration_samples, latent=latent, device=device, dtype=dtype)
        score_set = imp.calibration(model, embeds, seed=req.seed, **common)
        eval_set = imp.calibration(model, embeds, seed=req.seed + 1, **common) if req.evaluate else None
        calib_info = {
            "samples": req.calibration_samples,
            "latent_size": latent,
            "prompts": len(prompts),
            "seed": req.seed,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
        }
        if dtype != imp._unet_dtype(model):
            notes.append(
                f"scored in {calib_info['dtype']} ({device.type} has no fast kernels for the teacher's dtype)"
            )
        if scoring:
            scores = imp.score_blocks(
                teacher_unet, score_set, candidates, batch_size=req.batch_size, progress=progress
            )
    depths = plan.depths
    if plan.drop:
        cost = importance_cost(scores) if scoring else positional_cost
        depths = greedy_drop(teacher_cfg, plan.skeleton, depths, plan.drop, cost)
    method = req.select
    kept = {
        s.student: kept_blocks(s, depths[s.student], method, scores)
        for s in plan.skeleton.stacks()
        if depths[s.student] > 0
    }
    config = plan.config or student_config(teacher_cfg, plan.skeleton, depths)
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
        reference = imp.predict(teacher_unet, eval_set, req.batch_size)
        init_mse = imp.mse(imp.predict(student_unet, eval_set, req.batch_size), reference)
        del student_unet
    del teacher_unet
    gc.collect()

    teacher_stages = count_by_stage(model.components["unet"])
    student_stages = count_by_stage(student_sd)
    removed = _removed(model, plan, kept, scores)
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
