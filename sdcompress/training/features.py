"""Feature distillation: where to tap a teacher and a student U-Net, and how the taps pair up.

Pairs are found from the two modules' structure, not from names in a table:
every tap gets a descriptor (path kind, channels, resolution level), and a
student tap pairs with the teacher tap that has the same descriptor, in order.
That reproduces the published schemes without special cases:

- BK-SDM base/small: the 4 down and 4 up block outputs pair by index (the
  student's missing mid block simply has no term);
- bk-tiny: the student's last down block has no downsampler, so its output
  lives one level higher than the teacher's; it pairs with the teacher block's
  last pre-downsample layer (its second attention), and student up block k
  pairs with teacher up block k+1;
- SDXL students (ssd-1b, vega, koala): same levels and channels, index pairs.

A student tap that finds no partner means the student was not made from this
teacher, which is an error, not a skipped term. Hooks attach to the unwrapped
modules, so DDP's `module.` prefix never matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdcompress.errors import SdcError
from sdcompress.training.config import FeatureMode

FEATURE_MODES = tuple(FeatureMode)


@dataclass(frozen=True)
class Tap:
    """A module whose output is a feature: where it is and what it looks like."""

    path: str
    kind: str  # "down", "mid" or "up"
    channels: int
    level: int  # spatial downsampling exponent: the feature is (H / 2**level, W / 2**level)
    block: str  # the U-Net block it belongs to
    inner: bool = False  # a layer inside a block (pre-resampling), not the block output


@dataclass(frozen=True)
class FeaturePair:
    student: str
    teacher: str

    def to_dict(self) -> dict[str, str]:
        return {"student": self.student, "teacher": self.teacher}


def _out_channels(block) -> int:
    return block.resnets[-1].out_channels


def _last_layer(block, path: str) -> str:
    attentions = getattr(block, "attentions", None)
    if attentions is not None and len(attentions):
        return f"{path}.attentions.{len(attentions) - 1}"
    return f"{path}.resnets.{len(block.resnets) - 1}"


def block_taps(unet: torch.nn.Module) -> list[Tap]:
    """Block outputs and, for resampling blocks, their last layer before the resampler."""
    taps: list[Tap] = []
    level = 0
    for i, block in enumerate(unet.down_blocks):
        path, ch = f"down_blocks.{i}", _out_channels(block)
        if block.downsamplers is not None:
            taps.append(Tap(_last_layer(block, path), "down", ch, level, path, inner=True))
            level += 1
        taps.append(Tap(path, "down", ch, level, path))
    if getattr(unet, "mid_block", None) is not None:
        taps.append(Tap("mid_block", "mid", _out_channels(unet.mid_block), level, "mid_block"))
    for j, block in enumerate(unet.up_blocks):
        path, ch = f"up_blocks.{j}", _out_channels(block)
        if block.upsamplers is not None:
            taps.append(Tap(_last_layer(block, path), "up", ch, level, path, inner=True))
            level -= 1
        taps.append(Tap(path, "up", ch, level, path))
    return taps


def _descriptor(tap: Tap) -> tuple[str, int, int]:
    return (tap.kind, tap.channels, tap.level)


def _unpaired(student: Tap, teacher_name: str) -> SdcError:
    return SdcError(
        f"the student's {student.path} ({student.channels} channels at 1/{2**student.level} resolution) has no "
        f"matching feature in the teacher {teacher_name}; distill a student pruned from this teacher "
        "(or pass --features none)."
    )


def pair_blocks(
    student: torch.nn.Module, teacher: torch.nn.Module, teacher_name: str = ""
) -> list[FeaturePair]:
    """Student block outputs paired with teacher block outputs (or pre-resampling layers) by descriptor."""
    s_taps = [t for t in block_taps(student) if not t.inner]
    t_taps = block_taps(teacher)
    pairs: list[FeaturePair] = []
    for kind in ("down", "mid", "up"):
        wanted = [t for t in s_taps if t.kind == kind]
        for descriptor in dict.fromkeys(_descriptor(t) for t in wanted):
            ss = [t for t in wanted if _descriptor(t) == descriptor]
            ts = [t for t in t_taps if _descriptor(t) == descriptor and not t.inner]
            ts = ts or [t for t in t_taps if _descriptor(t) == descriptor]
            if len(ts) < len(ss):
                raise _unpaired(ss[len(ts)] if kind != "up" else ss[0], teacher_name)
            # Levels are lost at the deep end: down paths align at the start, up paths at the end.
            chosen = ts[-len(ss) :] if kind == "up" else ts[: len(ss)]
            pairs += [FeaturePair(s.path, t.path) for s, t in zip(ss, chosen, strict=True)]
    order = {t.path: i for i, t in enumerate(s_taps)}
    return sorted(pairs, key=lambda p: order[p.student])


def _teacher_block(path: str) -> str:
    parts = path.split(".")
    return ".".join(parts[:2]) if parts[0] != "mid_block" else "mid_block"


def _index_map(n_student: int, n_teacher: int, kind: str) -> list[int]:
    """Which teacher layer each student layer stands for (BK-SDM: down keeps the first, up keeps the last)."""
    if kind == "up" and n_student < n_teacher:
        return [j if j < n_student - 1 else n_teacher - 1 for j in range(n_student)]
    return list(range(n_student))


def _attention_pairs(
    student, teacher, block_pairs: list[FeaturePair]
) -> list[tuple[str, str, torch.nn.Module]]:
    pairs = []
    for bp in block_pairs:
        t_block_path = _teacher_block(bp.teacher)
        s_block = student.get_submodule(bp.student)
        t_block = teacher.get_submodule(t_block_path)
        s_att = getattr(s_block, "attentions", None)
        t_att = getattr(t_block, "attentions", None)
        if not s_att:
            continue
        if not t_att or len(t_att) < len(s_att):
            raise SdcError(
                f"the student's {bp.student} has attention layers the teacher's {t_block_path} lacks; "
                "distill a student pruned from this teacher (or pass --features blocks)."
            )
        kind = "up" if bp.student.startswith("up") else "down"
        for j, k in enumerate(_index_map(len(s_att), len(t_att), kind)):
            pairs.append((f"{bp.student}.attentions.{j}", f"{t_block_path}.attentions.{k}", s_att[j]))
    return pairs


def pair_features(
    student: torch.nn.Module, teacher: torch.nn.Module, mode: FeatureMode, teacher_name: str = ""
) -> list[FeaturePair]:
    """The feature pairs for `mode`; raises SdcError when the student cannot be paired with the teacher."""
    if mode not in FEATURE_MODES:
        raise SdcError(f"unknown --features {mode!r}; use one of {', '.join(FEATURE_MODES)}.")
    if mode == "none":
        return []
    blocks = pair_blocks(student, teacher, teacher_name)
    if mode == "blocks":
        return blocks
    attentions = _attention_pairs(student, teacher, blocks)
    if mode == "attentions":
        return [FeaturePair(s, t) for s, t, _ in attentions]
    pairs = []
    for s_path, t_path, s_module in attentions:
        t_module = teacher.get_submodule(t_path)
        n_s, n_t = len(s_module.transformer_blocks), len(t_module.transformer_blocks)
        for j, k in enumerate(_index_map(n_s, n_t, "up")):
            pairs.append(
                FeaturePair(
                    f"{s_path}.transformer_blocks.{j}.attn1", f"{t_path}.transformer_blocks.{k}.attn1"
                )
            )
    return pairs


def check_compatible(student_config: dict, teacher_config: dict, teacher_name: str = "") -> None:
    """The student must take the teacher's inputs and give its outputs, or no loss can compare them."""
    for key in ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type"):
        s, t = student_config.get(key), teacher_config.get(key)
        if s != t:
            raise SdcError(
                f"the student's {key} is {s} but the teacher {teacher_name}'s is {t}; "
                "distill a student pruned from this teacher."
            )


def _feature(output):
    if isinstance(output, tuple):
        output = output[0]
    return getattr(output, "sample", output)


class FeatureTaps:
    """Forward hooks that keep the latest output of each tapped module."""

    def __init__(self, model: torch.nn.Module, paths: list[str], *, detach: bool) -> None:
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []
        for path in dict.fromkeys(paths):
            module = model.get_submodule(path)
            self._handles.append(module.register_forward_hook(self._hook(path, detach)))

    def _hook(self, path: str, detach: bool):
        def hook(module, inputs, output) -> None:
            if (
                path in self.features
            ):  # gradient checkpointing re-runs forwards during backward: keep the first
                return
            value = _feature(output)
            self.features[path] = value.detach() if detach else value

        return hook

    def clear(self) -> None:
        self.features = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
