"""The structure of a student U-Net and where each of its parts comes from in the teacher.

A `Skeleton` fixes everything but the transformer depths: how many levels,
which teacher resnet each student resnet inherits (the BK-SDM scheme: the
down path keeps the first resnets, the up path keeps teacher indices
{0, ..., S-2, T-1}, i.e. {0, 2} when three become two), which teacher up
level a student up level comes from (bk-tiny drops the deepest level, so
student up level k inherits teacher up level k+1), and the mid block kind.
Its attention stacks (`Stack`) then receive depths, and `Skeleton.layout`
gives the student's `UNetLayout`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from sdcompress.arch.families import Config
from sdcompress.arch.layout import UNetLayout, config_from_layout, layout_from_config
from sdcompress.errors import SdcError

MID_MODES = ("keep", "resnet", "none")
MID_STACK = "mid_block.attentions.0"


@dataclass(frozen=True)
class Stack:
    """One student attention stack, the teacher stack it inherits, and the teacher's depth there."""

    student: str  # e.g. "up_blocks.0.attentions.1"
    teacher: str  # e.g. "up_blocks.0.attentions.2"
    teacher_depth: int
    group: str  # "down1", "mid", "up0": the level it belongs to (the unit --depths names)


@dataclass(frozen=True)
class Skeleton:
    teacher: UNetLayout
    down_res: tuple[tuple[int, ...], ...]  # per student down level: teacher resnet index of each resnet
    up_res: tuple[tuple[int, ...], ...]  # per student up level: teacher resnet index of each resnet
    up_shift: int  # student up level k inherits teacher up level k + up_shift
    mid: str  # "keep" | "resnet" | "none"

    @property
    def levels(self) -> int:
        return len(self.down_res)

    def stacks(self) -> list[Stack]:
        """Every student attention stack that can exist (its teacher source has attention), in forward order."""
        out = []
        for x, res in enumerate(self.down_res):
            for i, ti in enumerate(res):
                if d := self.teacher.down[x][ti]:
                    out.append(
                        Stack(
                            f"down_blocks.{x}.attentions.{i}",
                            f"down_blocks.{x}.attentions.{ti}",
                            d,
                            f"down{x}",
                        )
                    )
        if self.mid == "keep" and self.teacher.mid:
            out.append(Stack(MID_STACK, MID_STACK, self.teacher.mid, "mid"))
        for k, res in enumerate(self.up_res):
            tk = k + self.up_shift
            for i, ti in enumerate(res):
                if d := self.teacher.up[tk][ti]:
                    out.append(
                        Stack(f"up_blocks.{k}.attentions.{i}", f"up_blocks.{tk}.attentions.{ti}", d, f"up{k}")
                    )
        return out

    def full_depths(self) -> dict[str, int]:
        return {s.student: s.teacher_depth for s in self.stacks()}

    def layout(self, depths: Mapping[str, int]) -> UNetLayout:
        """The student layout when each stack has the given depth (0: the stack is gone)."""
        down = tuple(
            tuple(depths.get(f"down_blocks.{x}.attentions.{i}", 0) for i in range(len(res)))
            for x, res in enumerate(self.down_res)
        )
        up = tuple(
            tuple(depths.get(f"up_blocks.{k}.attentions.{i}", 0) for i in range(len(res)))
            for k, res in enumerate(self.up_res)
        )
        if self.mid == "none" or self.teacher.mid is None:
            mid = None
        elif self.mid == "resnet" or not self.teacher.mid:
            mid = 0
        else:
            mid = depths.get(MID_STACK, self.teacher.mid)
        return UNetLayout(down, up, mid)

    def module_sources(self) -> dict[str, str]:
        """Student module path -> teacher module path, for every resnet, attention stack and resampler."""
        table: dict[str, str] = {}
        for x, res in enumerate(self.down_res):
            for i, ti in enumerate(res):
                table[f"down_blocks.{x}.resnets.{i}"] = f"down_blocks.{x}.resnets.{ti}"
                table[f"down_blocks.{x}.attentions.{i}"] = f"down_blocks.{x}.attentions.{ti}"
            table[f"down_blocks.{x}.downsamplers"] = f"down_blocks.{x}.downsamplers"
        table["mid_block.resnets.0"] = "mid_block.resnets.0"
        table[MID_STACK] = MID_STACK
        for k, res in enumerate(self.up_res):
            tk = k + self.up_shift
            for i, ti in enumerate(res):
                table[f"up_blocks.{k}.resnets.{i}"] = f"up_blocks.{tk}.resnets.{ti}"
                table[f"up_blocks.{k}.attentions.{i}"] = f"up_blocks.{tk}.attentions.{ti}"
            table[f"up_blocks.{k}.upsamplers"] = f"up_blocks.{tk}.upsamplers"
        return table


def _up_indices(student: int, teacher: int) -> tuple[int, ...]:
    """BK-SDM: an up level keeps its first resnets and its last (teacher {0, 2} when 3 become 2)."""
    if student == teacher:
        return tuple(range(teacher))
    return (*range(student - 1), teacher - 1)


def make_skeleton(
    teacher: UNetLayout,
    *,
    levels: int | None = None,
    layers_per_block: int | list[int] | None = None,
    mid: str = "keep",
) -> Skeleton:
    """The student structure: fewer levels (dropping the deepest), fewer resnets per level, another mid block."""
    if mid not in MID_MODES:
        raise SdcError(f"--mid-block must be one of {', '.join(MID_MODES)}, not {mid!r}.")
    n = teacher.levels if levels is None else levels
    if not 1 <= n <= teacher.levels:
        raise SdcError(f"a student can keep 1 to {teacher.levels} levels of this teacher, not {n}.")
    if layers_per_block is None:
        per_level = [len(teacher.down[x]) for x in range(n)]
    elif isinstance(layers_per_block, int):
        per_level = [layers_per_block] * n
    else:
        per_level = list(layers_per_block)
    for x, count in enumerate(per_level):
        if not 1 <= count <= len(teacher.down[x]):
            raise SdcError(
                f"--layers-per-block {count} is not possible at level {x}: the teacher has "
                f"{len(teacher.down[x])} resnets there and pruning can only remove layers."
            )
    shift = teacher.levels - n
    down_res = tuple(tuple(range(c)) for c in per_level)
    up_res = tuple(_up_indices(per_level[n - 1 - k] + 1, len(teacher.up[k + shift])) for k in range(n))
    if mid != "keep" and teacher.mid is None:
        raise SdcError("the teacher has no mid block, so --mid-block can only be keep or none.")
    return Skeleton(teacher, down_res, up_res, shift, mid)


def channels_for(teacher_cfg: Config, skeleton: Skeleton) -> list[int]:
    return list(teacher_cfg["block_out_channels"])[: skeleton.levels]


def student_config(teacher_cfg: Config, skeleton: Skeleton, depths: Mapping[str, int]) -> Config:
    """A diffusers config for the student (raises SdcError when diffusers cannot express the layout)."""
    return config_from_layout(
        teacher_cfg, skeleton.layout(depths), channels=channels_for(teacher_cfg, skeleton)
    )


def expressible(teacher_cfg: Config, skeleton: Skeleton, depths: Mapping[str, int]) -> bool:
    try:
        student_config(teacher_cfg, skeleton, depths)
    except SdcError:
        return False
    return True


def skeleton_for_config(teacher_cfg: Config, student_cfg: Config) -> tuple[Skeleton, dict[str, int]]:
    """The skeleton and depths that turn this teacher into a given student config (a preset)."""
    teacher = layout_from_config(teacher_cfg)
    target = layout_from_config(student_cfg)
    if teacher.mid is not None and target.mid == 0 and teacher.mid > 0:
        mid = "resnet"
    elif target.mid is None and teacher.mid is not None:
        mid = "none"
    else:
        mid = "keep"
    skeleton = make_skeleton(
        teacher, levels=target.levels, layers_per_block=[len(level) for level in target.down], mid=mid
    )
    depths: dict[str, int] = {}
    for s in skeleton.stacks():
        if s.student == MID_STACK:
            depths[s.student] = target.mid or 0
            continue
        part, x, _, i = s.student.split(".")
        levels = target.down if part == "down_blocks" else target.up
        depths[s.student] = levels[int(x)][int(i)]
    for s in skeleton.stacks():
        if depths[s.student] > s.teacher_depth:
            raise SdcError(
                f"the student needs {depths[s.student]} blocks in {s.student} but the teacher has {s.teacher_depth}."
            )
    if skeleton.layout(depths) != target:
        raise SdcError(
            "this student layout cannot be cut from this teacher (it needs layers the teacher lacks)."
        )
    return skeleton, depths


# ----- --depths "down2=4,4 mid=0 up0=4,4,10 up1=2,1,1" -----------------------------------------------

_ITEM = re.compile(r"^(down|up)(\d+)$|^mid$")


def parse_depths(spec: str) -> dict[str, list[int]]:
    """`down2=4,4 mid=0 up0=4,4,10` -> {"down2": [4, 4], "mid": [0], "up0": [4, 4, 10]}."""
    out: dict[str, list[int]] = {}
    for item in re.split(r"[\s;]+", spec.strip()):
        if not item:
            continue
        name, sep, values = item.partition("=")
        name = name.strip().lower()
        if not sep or not _ITEM.match(name):
            raise SdcError(
                f'--depths item {item!r} is not NAME=DEPTHS; use e.g. "down2=4,4 mid=0 up0=4,4,10".'
            )
        try:
            depths = [int(v) for v in values.split(",")]
        except ValueError:
            raise SdcError(f"--depths item {item!r} needs whole numbers, e.g. up1=2,1,1.") from None
        if any(d < 0 for d in depths):
            raise SdcError(f"--depths item {item!r} has a negative depth.")
        if name in out:
            raise SdcError(f"--depths names {name} twice.")
        out[name] = depths
    if not out:
        raise SdcError('--depths is empty; use e.g. "down2=4,4 mid=0 up0=4,4,10".')
    return out


def apply_depths(skeleton: Skeleton, spec: Mapping[str, list[int]]) -> dict[str, int]:
    """Depths per student stack after the user's --depths (unnamed stacks keep the teacher's depth)."""
    depths = skeleton.full_depths()
    stacks = skeleton.stacks()
    for name, values in spec.items():
        if name == "mid":
            if len(values) != 1:
                raise SdcError(
                    "--depths mid takes one depth, e.g. mid=4 (mid=0 keeps one resnet, no attention)."
                )
            if values[0] == 0:
                continue  # handled by the caller as --mid-block resnet
            if MID_STACK not in depths:
                raise SdcError("--depths sets the mid block's depth, but the student has no attention there.")
            group = [s for s in stacks if s.student == MID_STACK]
        else:
            part, level = ("down", int(name[4:])) if name.startswith("down") else ("up", int(name[2:]))
            res = skeleton.down_res if part == "down" else skeleton.up_res
            if level >= len(res):
                raise SdcError(
                    f"--depths names {name}, but the student has {len(res)} {part} levels (0 to {len(res) - 1})."
                )
            group = [s for s in stacks if s.group == name]
            count = len(res[level])
            if len(values) == 1:
                values = values * count
            if len(values) != count:
                raise SdcError(
                    f"--depths {name} needs {count} depths (one per resnet of that level), got {len(values)}."
                )
            with_attention = {int(s.student.rsplit(".", 1)[1]) for s in group}
            for i, v in enumerate(values):
                if v and i not in with_attention:
                    raise SdcError(
                        f"--depths {name} gives attention to a resnet that has none in the teacher."
                    )
            values = [values[int(s.student.rsplit(".", 1)[1])] for s in group]
        for s, v in zip(group, values, strict=True):
            if v > s.teacher_depth:
                raise SdcError(
                    f"--depths asks for {v} blocks in {s.student}, but its teacher stack {s.teacher} has "
                    f"{s.teacher_depth}; pruning can only remove blocks."
                )
            depths[s.student] = v
    return depths
