"""The explicit student-key -> teacher-key map, and the student state dict built from it.

Every student weight is a teacher weight of the same shape: kept layers by
identical key, inherited resnets / attentions / resamplers through the
skeleton's module table (BK-SDM up-path indices, bk-tiny's level shift), and
kept transformer blocks renumbered contiguously. The student state dict holds
the teacher's own `LazyTensor`s, so nothing is read until the writer copies
the bytes, and kept weights are bit-identical by construction.
"""

from __future__ import annotations

from collections.abc import Mapping

from sdcompress.arch.count import meta_state_dict, meta_unet
from sdcompress.arch.families import Config
from sdcompress.checkpoint.tensors import StateDict
from sdcompress.errors import SdcError
from sdcompress.prune.surgery import Skeleton


def prefix_table(skeleton: Skeleton, kept: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """Student module prefix -> teacher module prefix, transformer blocks included."""
    table = skeleton.module_sources()
    sources = {s.student: s.teacher for s in skeleton.stacks()}
    for student, blocks in kept.items():
        for j, tj in enumerate(blocks):
            table[f"{student}.transformer_blocks.{j}"] = f"{sources[student]}.transformer_blocks.{tj}"
    return table


def teacher_key(key: str, table: Mapping[str, str]) -> str:
    """The teacher key a student key comes from (longest module prefix wins; top-level keys are shared)."""
    parts = key.split(".")
    for n in range(min(len(parts) - 1, 6), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in table:
            return ".".join([table[prefix], *parts[n:]])
    return key


def student_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Every key and shape of a U-Net with this config (built on the meta device: no memory)."""
    return {k: v.shape for k, v in meta_state_dict(meta_unet(config)).items()}


def key_map(shapes: Mapping[str, tuple[int, ...]], table: Mapping[str, str]) -> dict[str, str]:
    return {k: teacher_key(k, table) for k in shapes}


def student_state_dict(
    teacher: StateDict, shapes: Mapping[str, tuple[int, ...]], mapping: Mapping[str, str]
) -> StateDict:
    """The student's weights as the teacher's lazy tensors; a key with no same-shape source is an error."""
    out: StateDict = {}
    for key, shape in shapes.items():
        source = mapping[key]
        tensor = teacher.get(source)
        if tensor is None:
            raise SdcError(
                f"student weight {key} has no teacher source ({source} is missing from the teacher); "
                "the teacher's U-Net is incomplete or not of the family it claims."
            )
        if tuple(tensor.shape) != tuple(shape):
            raise SdcError(
                f"student weight {key} {tuple(shape)} cannot come from teacher weight {source} "
                f"{tuple(tensor.shape)}; this teacher does not fit the requested student layout."
            )
        out[key] = tensor
    return out
