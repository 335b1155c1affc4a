"""The pruning plan: the student's structure and starting depths, then which teacher blocks it keeps.

Two steps around the (optional) measurement in `importance`: `plan_structure`
reads a preset or the surgery options into a skeleton and depths without
touching any weight, and `choose_blocks` turns the depths still to be cut
and the scores (if any) into the teacher blocks each student stack keeps.
`candidates` says which blocks need a score at all, so the teacher is loaded
only when there is a choice to make.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdcompress.arch.families import Config
from sdcompress.arch.presets import preset_for_family
from sdcompress.checkpoint.model import Model
from sdcompress.choices import MidBlock, SelectMethod
from sdcompress.errors import SdcError
from sdcompress.prune.selection import (
    Scores,
    block_path,
    greedy_drop,
    importance_cost,
    kept_blocks,
    max_droppable,
    positional_cost,
    reachable,
)
from sdcompress.prune.surgery import Skeleton, apply_depths, make_skeleton, parse_depths, skeleton_for_config
from sdcompress.prune.surgery import student_config as surgery_config


@dataclass
class Plan:
    skeleton: Skeleton
    depths: dict[str, int]
    drop: int  # transformer blocks still to remove, chosen by the selection method
    config: Config | None  # the published config for presets; None: derive from the layout


def plan_structure(
    model: Model,
    *,
    preset: str | None = None,
    drop_transformer_blocks: int | None = None,
    layers_per_block: int | None = None,
    mid_block: MidBlock | str | None = None,
    depths: str | None = None,
) -> Plan:
    """Skeleton and starting depths from a preset or from the surgery options (no weights read)."""
    teacher_cfg = model.configs["unet"]
    surgery = (drop_transformer_blocks, layers_per_block, mid_block, depths)
    if preset is not None:
        if any(x is not None for x in surgery):
            raise SdcError(
                "--preset fixes the whole layout; drop --drop-transformer-blocks, --layers-per-block, "
                "--mid-block and --depths, or drop --preset."
            )
        cfg = preset_for_family(preset, model.family).student_config(teacher_cfg)
        skeleton, start = skeleton_for_config(teacher_cfg, cfg)
        return Plan(skeleton, start, 0, cfg)
    if all(x is None for x in surgery):
        raise SdcError(
            "nothing to prune; give --preset, --drop-transformer-blocks N, --layers-per-block, --mid-block or --depths."
        )
    asked = MidBlock.parse_optional(mid_block, "--mid-block")
    spec = parse_depths(depths) if depths is not None else {}
    mid = asked or MidBlock.KEEP
    if spec.get("mid") == [0]:
        if asked not in (None, MidBlock.RESNET):
            raise SdcError(f"--depths mid=0 means --mid-block resnet, which contradicts --mid-block {asked}.")
        mid = MidBlock.RESNET
    skeleton = make_skeleton(model.unet_layout, layers_per_block=layers_per_block, mid=mid)
    start = apply_depths(skeleton, spec)
    surgery_config(teacher_cfg, skeleton, start)  # raises a clear error for a layout diffusers cannot build
    drop = drop_transformer_blocks or 0
    if drop < 0:
        raise SdcError("--drop-transformer-blocks must be a positive number.")
    if drop:
        available = max_droppable(teacher_cfg, skeleton, start)
        if drop > available:
            raise SdcError(
                f"--drop-transformer-blocks {drop} is more than this student can lose: at most {available} of its "
                f"{sum(start.values())} transformer blocks can go (every attention stack keeps at least one)."
            )
        if not reachable(skeleton, start, drop):
            raise SdcError(
                f"--drop-transformer-blocks {drop} cannot be met exactly: blocks here go one per stack, two at a time "
                "for the mid block, or a whole level's attention at once; choose a nearby number."
            )
    return Plan(skeleton, start, drop, None)


def candidates(plan: Plan) -> list[str]:
    """Teacher blocks whose fate is a choice (their stack is cut, or may be cut by --drop-transformer-blocks)."""
    out = []
    for s in plan.skeleton.stacks():
        depth = plan.depths[s.student]
        if depth > 0 and (plan.drop or depth < s.teacher_depth):
            out += [block_path(s.teacher, j) for j in range(s.teacher_depth)]
    return out


def choose_blocks(
    teacher_cfg: Config, plan: Plan, method: SelectMethod | str, scores: Scores | None
) -> tuple[dict[str, int], dict[str, tuple[int, ...]]]:
    """Final depths per student stack, and the teacher block indices each kept stack takes.

    With scores (`--select importance`), removals go to the least important
    blocks; without, to the deepest stacks first.
    """
    method = SelectMethod.parse(method, "--select")
    depths = plan.depths
    if plan.drop:
        cost = importance_cost(scores) if scores else positional_cost
        depths = greedy_drop(teacher_cfg, plan.skeleton, depths, plan.drop, cost)
    kept = {
        s.student: kept_blocks(s, depths[s.student], method, scores)
        for s in plan.skeleton.stacks()
        if depths[s.student] > 0
    }
    return depths, kept


def student_config(teacher_cfg: Config, plan: Plan, depths: dict[str, int]) -> Config:
    """The student's U-Net config: the preset's published one, or derived from the planned layout."""
    return plan.config or surgery_config(teacher_cfg, plan.skeleton, depths)


def removed_blocks(
    model: Model, plan: Plan, kept: dict[str, tuple[int, ...]], scores: Scores
) -> list[dict[str, Any]]:
    """Every teacher transformer block the student lacks, with its score and why it went.

    `selection`: its stack survives and the method left it out; `structure`:
    its whole stack went with a level, a resnet or the mid block.
    """
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
