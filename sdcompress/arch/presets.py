"""The published compressed U-Net layouts, as config changes from their teacher.

Each preset is the exact set of config fields its publisher changed
(`shared/reference/architectures.md`), so the student config is the
published one to the field. `teacher_levels_kept` says which teacher up
levels a student level inherits from (bk-tiny drops the deepest level).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from sdcompress.arch.families import Config, Family, family_hub_repo, get_family
from sdcompress.errors import SdcError


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    topologies: tuple[str, ...]  # teacher topologies it applies to
    changes: Config
    drop_last_level: bool = False
    aliases: tuple[str, ...] = ()
    extra: Config = field(default_factory=dict)
    hub_id: str | None = None  # the publisher's own weights, when they are on the Hub

    def student_config(self, teacher: Config) -> Config:
        cfg = copy.deepcopy(teacher)
        if self.drop_last_level:
            n = len(cfg["block_out_channels"]) - 1
            cfg["block_out_channels"] = cfg["block_out_channels"][:n]
            for key in ("attention_head_dim", "num_attention_heads", "transformer_layers_per_block"):
                if isinstance(cfg.get(key), list):
                    cfg[key] = cfg[key][:n]
            cfg["down_block_types"] = ["CrossAttnDownBlock2D"] * n
            cfg["up_block_types"] = ["CrossAttnUpBlock2D"] * n
        cfg.update(copy.deepcopy(self.changes))
        return cfg


PRESETS: dict[str, Preset] = {}


def _register(p: Preset) -> None:
    PRESETS[p.name] = p


_SD = ("sd1", "sd2")
_XL = ("sdxl",)

_register(Preset("bk-base", "BK-SDM-Base", _SD, {"layers_per_block": 1}, aliases=("small-sd",)))
_register(Preset("bk-small", "BK-SDM-Small", _SD, {"layers_per_block": 1, "mid_block_type": None}))
_register(
    Preset(
        "bk-tiny",
        "BK-SDM-Tiny",
        _SD,
        {"layers_per_block": 1, "mid_block_type": None},
        drop_last_level=True,
        aliases=("tiny-sd-segmind",),
    )
)
_register(
    Preset(
        "ssd-1b",
        "Segmind SSD-1B",
        _XL,
        {
            "mid_block_type": "UNetMidBlock2D",
            "transformer_layers_per_block": [[1], [2, 2], [4, 4]],
            "reverse_transformer_layers_per_block": [[4, 4, 10], [2, 1, 1], 1],
        },
        hub_id="segmind/SSD-1B",
    )
)
_register(
    Preset(
        "vega",
        "Segmind Vega",
        _XL,
        {
            "mid_block_type": "UNetMidBlock2D",
            "transformer_layers_per_block": [[1], [1, 1], [2, 2]],
            "reverse_transformer_layers_per_block": [[2, 2, 2], [1, 1, 1], 1],
        },
        hub_id="segmind/Segmind-Vega",
    )
)
_register(
    Preset("koala-1b", "KOALA-1B", _XL, {"layers_per_block": 1, "transformer_layers_per_block": [1, 2, 6]})
)
_register(
    Preset(
        "koala-700m",
        "KOALA-700M",
        _XL,
        {"layers_per_block": 1, "transformer_layers_per_block": [1, 2, 5], "mid_block_type": None},
    )
)


def get_preset(name: str) -> Preset:
    preset = find_preset(name)
    if preset is None:
        raise SdcError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}.")
    return preset


def find_preset(name: str) -> Preset | None:
    key = name.lower()
    return next((p for p in PRESETS.values() if key == p.name or key in p.aliases), None)


def hub_repo(name: str) -> str | None:
    """The Hub repository a short name stands for (SD15, SD21, SDXL, ssd-1b...): a family, one of its
    aliases, or a preset whose publisher's weights are on the Hub. None: not such a name."""
    preset = find_preset(name)
    return family_hub_repo(name) or (preset.hub_id if preset is not None else None)


def preset_for_family(name: str, family: Family) -> Preset:
    preset = get_preset(name)
    if family.topology not in preset.topologies:
        wanted = " or ".join(get_family(t).title for t in preset.topologies)
        raise SdcError(
            f"preset {preset.name} applies to {wanted} teachers, but the teacher is {family.title}; "
            "choose a preset for that family."
        )
    return preset


def preset_config(name: str, teacher_family: str) -> Config:
    family = get_family(teacher_family)
    return preset_for_family(name, family).student_config(family.unet)


def match_preset(unet_config: Config, family: Family) -> str | None:
    """The preset whose student has this U-Net's layout and widths, if any."""
    from sdcompress.arch.layout import layout_from_config

    layout = layout_from_config(unet_config)
    for p in PRESETS.values():
        if family.topology not in p.topologies:
            continue
        cfg = p.student_config(family.unet)
        if (
            layout_from_config(cfg) == layout
            and cfg["block_out_channels"] == unet_config["block_out_channels"]
        ):
            return p.name
    return None


def describe() -> list[dict[str, Any]]:
    return [{"name": p.name, "title": p.title, "teachers": list(p.topologies)} for p in PRESETS.values()]
