"""`info`: what a model is, counted from its headers or its config (nothing is loaded)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from sdcompress.arch.count import count_by_stage, count_state_dict, meta_state_dict, meta_unet
from sdcompress.arch.families import get_family
from sdcompress.arch.layout import layout_from_config
from sdcompress.arch.presets import get_preset, preset_for_family
from sdcompress.checkpoint.model import Model, disk_size
from sdcompress.checkpoint.resolve import load_model
from sdcompress.errors import SdcError


@dataclass
class InfoResult:
    ref: str
    format: str
    family: str
    family_title: str
    preset: str | None
    prediction_type: str
    dtypes: dict[str, str]
    parameters: dict[str, int]
    unet_stages: dict[str, int]
    transformer_blocks: int
    unet_config: dict[str, Any]
    size_on_disk: int | None
    notes: list[str] = field(default_factory=list)
    quantization: dict[str, Any] | None = None  # format, bits, quantized_fraction (quantized files)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_info(model: Model) -> InfoResult:
    from sdcompress.quantize.describe import of_model

    unet_cfg = model.configs["unet"]
    quant = of_model(model)
    return InfoResult(
        ref=model.ref,
        format=model.format,
        family=model.family.name,
        family_title=model.family.title,
        preset=model.preset,
        prediction_type=model.prediction_type,
        dtypes=model.dtype_summary(),
        parameters={name: count_state_dict(sd) for name, sd in model.components.items()},
        unet_stages=count_by_stage(model.components["unet"]),
        transformer_blocks=layout_from_config(unet_cfg).transformer_blocks(),
        unet_config=unet_cfg,
        size_on_disk=disk_size(model.path),
        notes=list(model.notes),
        quantization=asdict(quant) if quant is not None else None,
    )


def architecture_info(name: str, family: str | None = None) -> InfoResult:
    """A family or preset built at full size on the meta device: counts without any weights.

    `family` is the family a preset is applied to (default: the first one it was published for).
    """
    try:
        fam = get_family(name)
        config, preset = dict(fam.unet), None
    except SdcError:
        preset_obj = get_preset(name)
        fam = get_family(family or preset_obj.topologies[0])
        config, preset = preset_for_family(name, fam).student_config(fam.unet), preset_obj.name
    sd = meta_state_dict(meta_unet(config))
    return InfoResult(
        ref=name,
        format="architecture",
        family=fam.name,
        family_title=fam.title,
        preset=preset,
        prediction_type=fam.prediction_type,
        dtypes={"unet": "float32"},
        parameters={"unet": count_state_dict(sd)},
        unet_stages=count_by_stage(sd),
        transformer_blocks=layout_from_config(config).transformer_blocks(),
        unet_config=config,
        size_on_disk=None,
    )


def info(
    ref: str, *, arch: bool = False, family: str | None = None, allow_pickle: bool = False
) -> InfoResult:
    if arch:
        return architecture_info(ref, family)
    return model_info(load_model(os.fspath(ref), allow_pickle=allow_pickle))
