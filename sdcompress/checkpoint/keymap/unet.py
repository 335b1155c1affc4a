"""U-Net names: single file (original LDM/SGM) <-> diffusers, for any layout.

One rule, derived from the `UNetLayout`, replaces the per-family, per-depth
tables other converters carry: walk the levels in forward order, give each
resnet, attention stack and resampler the next `input_blocks` /
`output_blocks` index, and rename the few resnet parameters whose names
differ. Attention stacks keep their inner names in both formats, so
transformer depth never needs a table; pruned students (one resnet per level,
no or single-resnet mid block, asymmetric depths, a dropped level) map with
contiguous indices, as ComfyUI and A1111 infer them from a key set.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from sdcompress.arch.layout import UNetLayout
from sdcompress.checkpoint.tensors import StateDict

SINGLE_FILE_PREFIX = "model.diffusion_model."

_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_RENAMES_BACK = {v: k for k, v in _RESNET_RENAMES.items()}

_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def module_table(layout: UNetLayout) -> dict[str, tuple[str, str]]:
    """diffusers module path -> (single-file module path, kind), kind in resnet/attention/plain."""
    table: dict[str, tuple[str, str]] = {d: (s, "plain") for d, s in _TOP_LEVEL.items()}
    idx = 1
    for x, level in enumerate(layout.down):
        for i, depth in enumerate(level):
            table[f"down_blocks.{x}.resnets.{i}"] = (f"input_blocks.{idx}.0", "resnet")
            if depth:
                table[f"down_blocks.{x}.attentions.{i}"] = (f"input_blocks.{idx}.1", "attention")
            idx += 1
        if x < layout.levels - 1:
            table[f"down_blocks.{x}.downsamplers.0.conv"] = (f"input_blocks.{idx}.0.op", "plain")
            idx += 1
    if layout.mid is not None:
        table["mid_block.resnets.0"] = ("middle_block.0", "resnet")
        if layout.mid:
            table["mid_block.attentions.0"] = ("middle_block.1", "attention")
            table["mid_block.resnets.1"] = ("middle_block.2", "resnet")
    idx = 0
    for x, level in enumerate(layout.up):
        for i, depth in enumerate(level):
            table[f"up_blocks.{x}.resnets.{i}"] = (f"output_blocks.{idx}.0", "resnet")
            if depth:
                table[f"up_blocks.{x}.attentions.{i}"] = (f"output_blocks.{idx}.1", "attention")
            if i == len(level) - 1 and x < layout.levels - 1:
                table[f"up_blocks.{x}.upsamplers.0.conv"] = (
                    f"output_blocks.{idx}.{2 if depth else 1}.conv",
                    "plain",
                )
            idx += 1
    return table


def _split(key: str, prefixes: dict[str, tuple[str, str]]) -> tuple[str, str]:
    parts = key.split(".")
    for n in range(min(len(parts) - 1, 5), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in prefixes:
            return prefix, ".".join(parts[n:])
    raise KeyError(key)


def _rename_inner(rest: str, kind: str, renames: dict[str, str]) -> str:
    if kind != "resnet":
        return rest
    for old, new in renames.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def to_single_file_names(keys: Iterable[str], layout: UNetLayout) -> dict[str, str]:
    """diffusers key -> single-file key (without `model.diffusion_model.`)."""
    table = module_table(layout)
    out = {}
    for key in keys:
        prefix, rest = _split(key, table)
        target, kind = table[prefix]
        out[key] = f"{target}.{_rename_inner(rest, kind, _RESNET_RENAMES)}"
    return out


def from_single_file_names(keys: Iterable[str], layout: UNetLayout) -> dict[str, str]:
    """single-file key (without prefix) -> diffusers key."""
    back = {s: (d, kind) for d, (s, kind) in module_table(layout).items()}
    out = {}
    for key in keys:
        prefix, rest = _split(key, back)
        target, kind = back[prefix]
        out[key] = f"{target}.{_rename_inner(rest, kind, _RESNET_RENAMES_BACK)}"
    return out


def unet_to_single_file(sd: StateDict, layout: UNetLayout) -> StateDict:
    names = to_single_file_names(sd, layout)
    return {names[k]: v for k, v in sd.items()}


def unet_from_single_file(sd: StateDict, layout: UNetLayout) -> StateDict:
    names = from_single_file_names(sd, layout)
    return {names[k]: v for k, v in sd.items()}


# ----- reading the layout off a key set ---------------------------------------------------------

_DEPTH = re.compile(r"\.transformer_blocks\.(\d+)\.")


def _depth(keys: Iterable[str], prefix: str) -> int:
    depth = 0
    for k in keys:
        if k.startswith(prefix):
            m = _DEPTH.search(k[len(prefix) - 1 :])
            if m:
                depth = max(depth, int(m.group(1)) + 1)
    return depth


def _group(keys: Iterable[str], pattern: str) -> dict[int, set[str]]:
    """Keys matching `pattern` (with one (\\d+) index) grouped by that index."""
    rx = re.compile(pattern)
    groups: dict[int, set[str]] = {}
    for k in keys:
        m = rx.match(k)
        if m:
            groups.setdefault(int(m.group(1)), set()).add(k)
    return groups


def layout_from_single_file_keys(keys: Iterable[str]) -> UNetLayout:
    """Walk input/middle/output blocks in order; resamplers mark the level boundaries."""
    keys = list(keys)
    inputs = _group(keys, r"input_blocks\.(\d+)\.")
    down: list[list[int]] = [[]]
    for idx in sorted(i for i in inputs if i > 0):
        block = inputs[idx]
        if any(k.startswith(f"input_blocks.{idx}.0.op.") for k in block):
            down.append([])
            continue
        down[-1].append(_depth(block, f"input_blocks.{idx}.1."))
    middle = [k for k in keys if k.startswith("middle_block.")]
    if not middle:
        mid = None
    elif any(k.startswith("middle_block.1.") for k in middle):
        mid = _depth(middle, "middle_block.1.")
    else:
        mid = 0
    outputs = _group(keys, r"output_blocks\.(\d+)\.")
    up: list[list[int]] = [[]]
    for idx in sorted(outputs):
        block = outputs[idx]
        depth = _depth(block, f"output_blocks.{idx}.1.")
        up[-1].append(depth)
        if any(re.match(rf"output_blocks\.{idx}\.[12]\.conv\.", k) for k in block):
            up.append([])
    return UNetLayout(tuple(map(tuple, down)), tuple(map(tuple, up)), mid)


def layout_from_diffusers_keys(keys: Iterable[str]) -> UNetLayout:
    keys = list(keys)

    def levels(kind: str) -> tuple[tuple[int, ...], ...]:
        groups = _group(keys, rf"{kind}_blocks\.(\d+)\.")
        out = []
        for x in range(len(groups)):
            resnets = _group(groups[x], rf"{kind}_blocks\.{x}\.resnets\.(\d+)\.")
            out.append(
                tuple(_depth(groups[x], f"{kind}_blocks.{x}.attentions.{i}.") for i in range(len(resnets)))
            )
        return tuple(out)

    middle = [k for k in keys if k.startswith("mid_block.")]
    if not middle:
        mid = None
    elif any(k.startswith("mid_block.attentions.0.") for k in middle):
        mid = _depth(middle, "mid_block.attentions.0.")
    else:
        mid = 0
    return UNetLayout(levels("down"), levels("up"), mid)
