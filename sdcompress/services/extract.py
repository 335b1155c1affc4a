"""`extract-lora`: turn a fine-tune into a LoRA file.

Resolves both models lazily, checks they share an architecture, factors the
difference layer by layer (`lowrank.extract`), and writes kohya or PEFT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sdcompress.checkpoint.atomic import check_output
from sdcompress.checkpoint.model import Model
from sdcompress.checkpoint.resolve import load_model
from sdcompress.errors import SdcError
from sdcompress.lowrank.extract import Extraction, ExtractOptions, LayerResult, extract
from sdcompress.lowrank.layouts import KOHYA, kohya_metadata, write_lora
from sdcompress.lowrank.targets import Naming


@dataclass
class ExtractRequest:
    base: str
    tuned: str
    output: str
    options: ExtractOptions = field(default_factory=ExtractOptions)
    format: str = KOHYA
    overwrite: bool = False
    allow_pickle: bool = False


@dataclass
class BlockSummary:
    block: str
    layers: int
    mean_rank: float
    max_rank: int
    rel_error: float  # over the block: sqrt(sum err / sum energy)
    retained: float


@dataclass
class ExtractResult:
    output: str
    format: str
    file_bytes: int
    modules: int
    layers: list[LayerResult]
    blocks: list[BlockSummary]
    unchanged: int
    clamped: list[str]
    rel_error: float
    retained: float
    family: str


def naming_for(model: Model) -> Naming:
    return Naming({c: list(sd) for c, sd in model.components.items()}, sdxl=model.family.is_sdxl)


def summarize(layers: list[LayerResult]) -> list[BlockSummary]:
    by_block: dict[str, list[LayerResult]] = {}
    for layer in layers:
        by_block.setdefault(layer.target.block, []).append(layer)
    out = []
    for block, ls in by_block.items():
        energy = sum(x.energy for x in ls)
        err = sum(x.sq_error for x in ls)
        out.append(
            BlockSummary(
                block,
                len(ls),
                sum(x.rank for x in ls) / len(ls),
                max(x.rank for x in ls),
                (err / energy) ** 0.5 if energy else 0.0,
                1 - err / energy if energy else 1.0,
            )
        )
    return out


def run_extract(
    request: ExtractRequest, progress: Callable[[str, int, int], None] | None = None
) -> ExtractResult:
    check_output(
        request.output, overwrite=request.overwrite, inputs=[request.base, request.tuned], kind="file"
    )
    if Path(request.output).suffix != ".safetensors":
        raise SdcError(
            f"{request.output} must end in .safetensors; LoRAs are written as one safetensors file."
        )
    base = load_model(request.base, allow_pickle=request.allow_pickle)
    tuned = load_model(request.tuned, allow_pickle=request.allow_pickle)
    if base.family.topology != tuned.family.topology:
        raise SdcError(
            f"the base is {base.family.title} and the tuned model is {tuned.family.title}; "
            "extract from two models of the same family."
        )
    options = request.options
    ex: Extraction = extract(base.components, tuned.components, options, progress)
    fam = base.family
    meta = kohya_metadata(
        family=fam,
        title=Path(request.output).stem,
        rank=options.rank,
        conv_rank=options.conv_rank,
        alpha=options.rank,
        prediction_type="v" if base.prediction_type == "v_prediction" else "epsilon",
        resolution=fam.resolution,
    )
    meta["sdcompress.extracted_from"] = f"{Path(request.base).name} -> {Path(request.tuned).name}"
    size = write_lora(
        request.output,
        ex.modules,
        naming_for(base),
        fmt=request.format,
        dtype=options.dtype,
        metadata=meta,
        overwrite=request.overwrite,
    )
    energy = sum(x.energy for x in ex.layers)
    err = sum(x.sq_error for x in ex.layers)
    return ExtractResult(
        output=str(request.output),
        format=request.format,
        file_bytes=size,
        modules=len(ex.modules),
        layers=ex.layers,
        blocks=summarize(ex.layers),
        unchanged=len(ex.unchanged),
        clamped=[f"{x.target.component}.{x.target.path}" for x in ex.layers if x.clamped],
        rel_error=(err / energy) ** 0.5 if energy else 0.0,
        retained=1 - err / energy if energy else 1.0,
        family=fam.name,
    )
