"""`convert`: single file <-> diffusers folder, both ways, for every family and pruned layout.

The direction follows the output: a path ending in `.safetensors` gets a
single file, anything else a diffusers folder. Conversion is a rename, so
unchanged tensors are copied byte for byte by the kernel; only a dtype change
loads values, one tensor at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sdcompress.checkpoint.atomic import Overwrite, check_output
from sdcompress.checkpoint.finite import finite_model
from sdcompress.checkpoint.model import disk_size
from sdcompress.checkpoint.resolve import load_model
from sdcompress.checkpoint.tensors import LazyTensor, StateDict
from sdcompress.checkpoint.writers import component_dtype, save_diffusers, save_single_file
from sdcompress.choices import (
    ConvertFormat,
    DType,
    ModelFormat,
    PredictionType,
    output_kind,
    parse_choices,
    resolve_dtype,
)
from sdcompress.devices import resolve_device
from sdcompress.errors import SdcError


@dataclass
class ConvertRequest:
    src: str
    output: str
    dtype: DType | None = None
    vae_dtype: DType | None = None
    ema: bool = False
    unet_only: bool = False
    overwrite: bool | Overwrite = False
    tokenizer: str | None = None
    allow_pickle: bool = False
    allow_nonfinite: bool = False  # write NaN/inf (e.g. an fp16 overflow) instead of refusing them
    device: str = "auto"
    prediction_type: PredictionType | None = None
    # single-file | diffusers for models (default: from the output path); kohya | peft for LoRA files
    format: ConvertFormat | None = None

    def __post_init__(self) -> None:
        parse_choices(self)


@dataclass
class ConvertResult:
    src: str
    output: str
    direction: str
    family: str
    preset: str | None
    tensors: int
    bytes_written: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def _on_device(sd: StateDict, device: torch.device, dtype: torch.dtype | None) -> StateDict:
    """Cast on the GPU when asked: move, cast there, bring back.

    Only tensors whose dtype changes go through the device; the others keep
    their byte ranges, so the writer still copies them file-to-file.
    """
    if dtype is None:
        return sd
    out: StateDict = {}
    for k, v in sd.items():
        if v.dtype.is_floating_point and v.dtype != dtype:
            out[k] = LazyTensor(v.shape, dtype, lambda v=v: v.loader().to(device).to(dtype).cpu())
        else:
            out[k] = v
    return out


def _target(req: ConvertRequest) -> ModelFormat:
    if req.format is None:
        return output_kind(req.output)
    if req.format not in (ConvertFormat.SINGLE_FILE, ConvertFormat.DIFFUSERS):
        raise SdcError(
            f"--format {req.format} is a LoRA layout but {req.src} is a model; use single-file or diffusers."
        )
    return ModelFormat(req.format.value)


def convert(req: ConvertRequest, on_tensor: Callable[[str, LazyTensor], None] | None = None) -> ConvertResult:
    start = time.perf_counter()
    dtype = resolve_dtype(req.dtype)
    vae_dtype = resolve_dtype(req.vae_dtype, "--vae-dtype")
    device = resolve_device(req.device)
    target = _target(req)
    kind = "file" if target == "single-file" else "dir"
    out = check_output(req.output, overwrite=req.overwrite, inputs=[req.src, req.tokenizer], kind=kind)
    model = load_model(
        req.src,
        allow_pickle=req.allow_pickle,
        ema=req.ema,
        tokenizer=req.tokenizer,
        prediction_type=req.prediction_type,
    )
    notes = []
    if dtype is None:
        from sdcompress.quantize.describe import of_model

        if (quant := of_model(model)) is not None:  # loaders expect float weights in a converted model
            dtype = torch.float16
            notes.append(f"dequantized {quant.format} to fp16 (--dtype fp32 for fp32)")
    if device.type != "cpu":
        model.components = {
            k: _on_device(v, device, component_dtype(model, k, dtype, vae_dtype))
            for k, v in model.components.items()
        }
    if not req.allow_nonfinite:
        model = finite_model(model, dtype, vae_dtype)
    notes = list(model.notes) + notes
    save = save_single_file if target == ModelFormat.SINGLE_FILE else save_diffusers
    notes += save(
        model,
        out,
        dtype=dtype,
        vae_dtype=vae_dtype,
        overwrite=req.overwrite,
        unet_only=req.unet_only,
        on_tensor=on_tensor,
    )
    written = disk_size(out) or 0
    return ConvertResult(
        src=req.src,
        output=str(out),
        direction=f"{model.format} -> {target}",
        family=model.family.name,
        preset=model.preset,
        tensors=sum(len(sd) for sd in model.components.values()),
        bytes_written=written,
        seconds=time.perf_counter() - start,
        notes=notes,
    )
