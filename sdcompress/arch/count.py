"""Parameter counts: from a config (on the meta device) or from a state dict.

Counting from a state dict needs no model at all; counting from a config
builds the diffusers module on the meta device, which costs no memory, so
full-size SDXL counts are instant.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from sdcompress.arch.shapes import Shaped, TensorSpec

_STAGE = re.compile(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.")


def meta_unet(config: Mapping[str, Any]) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel(**cfg)


def meta_state_dict(module: torch.nn.Module) -> dict[str, TensorSpec]:
    return {k: TensorSpec.of(v) for k, v in module.state_dict().items()}


def count_state_dict(sd: Mapping[str, Shaped]) -> int:
    return sum(t.numel for t in sd.values())


def stage_of(key: str) -> str:
    m = _STAGE.match(key)
    return m.group(1) if m else "other"


def count_by_stage(sd: Mapping[str, Shaped]) -> dict[str, int]:
    """U-Net parameters per stage (down_blocks.N, mid_block, up_blocks.N, other), in forward order."""
    counts: dict[str, int] = {}
    for key, t in sd.items():
        counts[stage_of(key)] = counts.get(stage_of(key), 0) + t.numel
    order = sorted(counts, key=lambda s: (s.startswith("up"), s == "mid_block", s.startswith("down"), s))
    order = [s for s in counts if s.startswith("down")] + [s for s in counts if s == "mid_block"]
    order += [s for s in counts if s.startswith("up")] + [s for s in counts if s == "other"]
    return {s: counts[s] for s in order}


def count_unet_config(config: Mapping[str, Any]) -> int:
    return sum(p.numel() for p in meta_unet(config).parameters())
