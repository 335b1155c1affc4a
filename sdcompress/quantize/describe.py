"""What a quantized file is: its format, bits and the share of the U-Net's weights quantized.

Files sdcompress writes say so in their header (`sdcompress.quantization`); fp8 files from
elsewhere are recognised by their tensors' dtypes, scaled fp8 by ComfyUI's marker tensor.
`info` shows this; `merge` and `quantize` refuse to add to it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from sdcompress.checkpoint.model import Model
from sdcompress.checkpoint.tensors import LazyTensor
from sdcompress.errors import SdcError

META_KEY = "sdcompress.quantization"
FP8_NAMES = {torch.float8_e4m3fn: "fp8", torch.float8_e5m2: "fp8-e5m2"}


@dataclass(frozen=True)
class Quantization:
    format: str  # a QuantFormat value
    bits: float  # per quantized weight, as stored
    quantized_fraction: float  # of the U-Net's floating-point weights (by count)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def describe(self) -> str:
        return f"{self.format}, {self.bits:g} bits, {self.quantized_fraction:.0%} of the U-Net's weights quantized"


def from_metadata(metadata: Mapping[str, str]) -> Quantization | None:
    text = metadata.get(META_KEY)
    if not text:
        return None
    try:
        data = json.loads(text)
        return Quantization(str(data["format"]), float(data["bits"]), float(data["quantized_fraction"]))
    except (ValueError, KeyError, TypeError):
        return None  # a header someone edited: fall back to the dtypes


def from_dtypes(unet: Mapping[str, LazyTensor], *, scaled: bool = False) -> Quantization | None:
    """Recognise fp8 tensors by dtype (a file written by another tool)."""
    total = quantized = 0
    seen: dict[torch.dtype, int] = {}
    for t in unet.values():
        if not t.dtype.is_floating_point:
            continue
        total += t.numel
        if t.dtype in FP8_NAMES:
            quantized += t.numel
            seen[t.dtype] = seen.get(t.dtype, 0) + t.numel
    if not quantized:
        return None
    name = FP8_NAMES[max(seen, key=seen.__getitem__)]
    return Quantization("fp8-scaled" if scaled else name, 8.0, quantized / total)


def of_model(model: Model) -> Quantization | None:
    return from_metadata(model.metadata) or from_dtypes(model.components["unet"])


def check_not_quantized(model: Model, what: str) -> None:
    """A quantized model cannot take more rounding or a LoRA delta: one sentence, before any work."""
    q = of_model(model)
    if q is not None:
        raise SdcError(f"{model.ref} is already quantized ({q.format}); {what}")
