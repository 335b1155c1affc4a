"""A loaded model: lazy component state dicts in diffusers names, plus their configs.

Whatever the user handed us (a single file, a diffusers folder, a U-Net-only
file, a hub id, a tiny built-in model), every command sees the same thing:
`components["unet" | "vae" | "text_encoder" | "text_encoder_2"]` as lazy
state dicts with diffusers key names, `configs` for each (and the scheduler),
and `extras`: single-file tensors that have no diffusers home (markers,
OpenCLIP layers diffusers does not use), kept so a round trip loses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdcompress.arch.families import Config, Family
from sdcompress.arch.layout import UNetLayout, layout_from_config
from sdcompress.checkpoint.tensors import StateDict

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def disk_size(path: Path | None) -> int | None:
    """Bytes a file or a folder (every file under it) takes on disk; None for in-memory models."""
    if path is None:
        return None
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class Model:
    ref: str
    path: Path | None
    format: str  # "diffusers" | "single-file" | "unet-only"
    family: Family
    components: dict[str, StateDict]
    configs: dict[str, Config]
    extras: StateDict = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    tokenizer_dirs: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def tiny(self) -> bool:
        return self.family.tiny

    @property
    def unet_only(self) -> bool:
        return set(self.components) == {"unet"}

    @property
    def prediction_type(self) -> str:
        return self.configs.get("scheduler", self.family.scheduler).get("prediction_type", "epsilon")

    @property
    def unet_layout(self) -> UNetLayout:
        return layout_from_config(self.configs["unet"])

    @property
    def preset(self) -> str | None:
        from sdcompress.arch.presets import match_preset

        return match_preset(self.configs["unet"], self.family)

    def with_unet(self, unet: StateDict, config: Config, **changes: Any) -> Model:
        """A copy with another U-Net (a pruned or trained student), sharing everything else."""
        components = dict(self.components)
        components["unet"] = unet
        configs = dict(self.configs)
        configs["unet"] = config
        fields = dict(self.__dict__)
        fields.update(components=components, configs=configs, **changes)
        return Model(**fields)

    def dtype_summary(self) -> dict[str, str]:
        out = {}
        for name, sd in self.components.items():
            dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in sd.values()})
            out[name] = "/".join(dtypes)
        return out

    def size_bytes(self) -> int:
        return sum(t.nbytes for sd in self.components.values() for t in sd.values())
