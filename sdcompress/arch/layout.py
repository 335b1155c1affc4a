"""The shape of a U-Net as plain numbers, and its translation to diffusers configs.

diffusers spells one U-Net topology in several ways (an int, a list per level,
a list of lists plus `reverse_transformer_layers_per_block`). `UNetLayout` is
the one canonical description: for every level, how many resnets it has and
how deep the attention after each resnet is (0 = no attention), plus the mid
block. Key mapping, config inference, pruning and parameter reports all work
on it, so two configs describe the same U-Net exactly when their layouts and
widths are equal.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from sdcompress.errors import SdcError

Config = dict[str, Any]

MID_CROSS_ATTN = "UNetMidBlock2DCrossAttn"
MID_RESNET = "UNetMidBlock2D"


@dataclass(frozen=True)
class UNetLayout:
    down: tuple[tuple[int, ...], ...]  # per level, attention depth after each resnet (0: none)
    up: tuple[tuple[int, ...], ...]  # per up level in diffusers order, same meaning
    mid: int | None  # None: no mid block; 0: one resnet only; d > 0: resnet, attention of depth d, resnet

    @property
    def levels(self) -> int:
        return len(self.down)

    def transformer_blocks(self) -> int:
        return sum(map(sum, self.down)) + sum(map(sum, self.up)) + (self.mid or 0)

    def attention_stacks(self) -> list[tuple[str, int]]:
        """Every attention stack as (diffusers module path, depth), in forward order."""
        out = []
        for x, level in enumerate(self.down):
            out += [(f"down_blocks.{x}.attentions.{i}", d) for i, d in enumerate(level) if d]
        if self.mid:
            out.append(("mid_block.attentions.0", self.mid))
        for x, level in enumerate(self.up):
            out += [(f"up_blocks.{x}.attentions.{i}", d) for i, d in enumerate(level) if d]
        return out


def _per_level(value: Any, n: int) -> list[Any]:
    return [value] * n if isinstance(value, int) else list(value)


def _per_resnet(value: Any, n: int) -> list[int]:
    return [value] * n if isinstance(value, int) else list(value)


def layout_from_config(cfg: Config) -> UNetLayout:
    """Read a diffusers UNet2DConditionModel config the way diffusers' constructor does."""
    down_types = cfg["down_block_types"]
    up_types = cfg["up_block_types"]
    n = len(down_types)
    lpb = _per_level(cfg.get("layers_per_block", 2), n)
    tlpb = _per_level(cfg.get("transformer_layers_per_block", 1), n)
    rev = cfg.get("reverse_transformer_layers_per_block")
    rev = list(reversed(tlpb)) if rev is None else list(rev)
    rev_lpb = list(reversed(lpb))
    down = []
    for x, kind in enumerate(down_types):
        depths = _per_resnet(tlpb[x], lpb[x]) if "CrossAttn" in kind else [0] * lpb[x]
        down.append(tuple(depths[: lpb[x]]))
    up = []
    for x, kind in enumerate(up_types):
        nres = rev_lpb[x] + 1
        depths = _per_resnet(rev[x], nres) if "CrossAttn" in kind else [0] * nres
        up.append(tuple(depths[:nres]))
    mid_type = cfg.get("mid_block_type", MID_CROSS_ATTN)
    if mid_type is None:
        mid = None
    elif mid_type == MID_RESNET:
        mid = 0
    elif mid_type == MID_CROSS_ATTN:
        last = tlpb[-1]
        mid = last if isinstance(last, int) else last[0]
    else:
        raise SdcError(f"mid block type {mid_type!r} is not supported.")
    return UNetLayout(tuple(down), tuple(up), mid)


def _level_depth(level: tuple[int, ...]) -> int | None | bool:
    """The one depth of a level's attentions; None without attention; False when they differ."""
    nonzero = set(level) - {0}
    if not nonzero:
        return None
    return nonzero.pop() if len(nonzero) == 1 else False


def _symmetric_depths(layout: UNetLayout) -> list[int] | None:
    """One depth per level that serves the down path, the mirrored up path and the mid block.

    Levels without attention are free: they take whatever value makes the short spelling work.
    None when no such list exists (then lists of lists are needed).
    """
    n = layout.levels
    merged: list[int | None] = []
    for x in range(n):
        down, up = _level_depth(layout.down[x]), _level_depth(layout.up[n - 1 - x])
        if down is False or up is False or (down is not None and up is not None and down != up):
            return None
        merged.append(down if down is not None else up)
    if layout.mid:
        if merged[-1] not in (None, layout.mid):
            return None
        merged[-1] = layout.mid
    known = [d for d in merged if d is not None]
    fill = max(set(known), key=known.count) if known else 1
    return [fill if d is None else d for d in merged]


def config_from_layout(base: Config, layout: UNetLayout, *, channels: list[int] | None = None) -> Config:
    """A diffusers config for `layout`, every other field taken from `base`.

    The simplest spelling diffusers accepts is used: an int or a list per level
    when depths are symmetric, lists of lists and
    `reverse_transformer_layers_per_block` otherwise.
    """
    cfg = copy.deepcopy(base)
    n = layout.levels
    if len(layout.up) != n:
        raise SdcError("a U-Net needs as many up levels as down levels.")
    down_res = [len(level) for level in layout.down]
    up_res = [len(level) for level in layout.up]
    if up_res != [r + 1 for r in reversed(down_res)]:
        raise SdcError(
            "diffusers requires every up level to have one resnet more than its down level; "
            f"got down {down_res} and up {up_res}."
        )
    for levels in (layout.down, layout.up):
        for level in levels:
            if any(level) and not all(level):
                raise SdcError(
                    "a level with attention needs at least one transformer block after every resnet."
                )
    old_channels = list(base["block_out_channels"])
    cfg["block_out_channels"] = list(channels) if channels is not None else old_channels[:n]
    for key in ("attention_head_dim", "num_attention_heads", "cross_attention_dim"):
        value = cfg.get(key)
        if isinstance(value, list) and len(value) != n:
            cfg[key] = value[:n]
    cfg["down_block_types"] = ["CrossAttnDownBlock2D" if any(lv) else "DownBlock2D" for lv in layout.down]
    cfg["up_block_types"] = ["CrossAttnUpBlock2D" if any(lv) else "UpBlock2D" for lv in layout.up]
    cfg["layers_per_block"] = down_res[0] if len(set(down_res)) == 1 else down_res
    cfg["mid_block_type"] = (
        None if layout.mid is None else (MID_RESNET if layout.mid == 0 else MID_CROSS_ATTN)
    )
    cfg.pop("reverse_transformer_layers_per_block", None)

    depths = _symmetric_depths(layout)
    if depths is not None:
        cfg["transformer_layers_per_block"] = depths[0] if len(set(depths)) == 1 else depths
    else:
        down_lists = [[d or 1 for d in level] for level in layout.down]
        if layout.mid and down_lists[-1][0] != layout.mid:
            raise SdcError(
                "diffusers ties the mid block's depth to the first attention of the deepest level; "
                f"a mid depth of {layout.mid} with {down_lists[-1][0]} there cannot be written as a config."
            )
        cfg["transformer_layers_per_block"] = down_lists
        cfg["reverse_transformer_layers_per_block"] = [
            [d or 1 for d in level] if any(level) else 1 for level in layout.up
        ]
    if layout_from_config(cfg) != layout:  # the spelling must read back as the same U-Net
        raise AssertionError(f"config_from_layout produced a config for another layout: {cfg}")
    return cfg
