"""`extract-lora`: turn a fine-tune into a LoRA file.

Resolves both models lazily, checks they share an architecture, factors the
difference layer by layer (`lowrank.extract`), and writes kohya, PEFT, or both
(`kohya,peft`: the PEFT copy goes beside the kohya file as `<stem>.peft.safetensors`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sdcompress.checkpoint.atomic import Overwrite, check_output
from sdcompress.checkpoint.resolve import load_model
from sdcompress.errors import SdcError
from sdcompress.lowrank.extract import Extraction, ExtractOptions, LayerResult, extract
from sdcompress.lowrank.layouts import KOHYA, PEFT, kohya_metadata, parse_formats, write_lora
from sdcompress.lowrank.targets import naming_for


@dataclass
class ExtractRequest:
    base: str
    tuned: str
    output: str
    options: ExtractOptions = field(default_factory=ExtractOptions)
    format: str = KOHYA  # kohya, peft or kohya,peft
    overwrite: bool | Overwrite = False
    allow_pickle: bool = False

    def outputs(self) -> dict[str, Path]:
        """The file each layout goes to: OUTPUT, and with both layouts the PEFT copy at OUTPUT.peft.safetensors."""
        formats = parse_formats(str(self.format))
        out = Path(self.output)
        if len(formats) == 1:
            return {formats[0]: out}
        return {KOHYA: out, PEFT: out.with_name(out.stem + ".peft.safetensors")}


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
    file_bytes: int  # of OUTPUT
    modules: int
    layers: list[LayerResult]
    blocks: list[BlockSummary]
    unchanged: int
    clamped: list[str]
    rel_error: float
    retained: float
    family: str
    files: list[str] = field(default_factory=list)  # every file written, OUTPUT first


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
    outputs = request.outputs()
    for path in outputs.values():
        check_output(path, overwrite=request.overwrite, inputs=[request.base, request.tuned], kind="file")
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
    naming = naming_for(base)
    sizes = {
        fmt: write_lora(
            path,
            ex.modules,
            naming,
            fmt=fmt,
            dtype=options.dtype,
            metadata=meta,
            overwrite=request.overwrite,
        )
        for fmt, path in outputs.items()
    }
    energy = sum(x.energy for x in ex.layers)
    err = sum(x.sq_error for x in ex.layers)
    return ExtractResult(
        output=str(request.output),
        format=",".join(outputs),
        file_bytes=next(iter(sizes.values())),
        modules=len(ex.modules),
        layers=ex.layers,
        blocks=summarize(ex.layers),
        unchanged=len(ex.unchanged),
        clamped=[f"{x.target.component}.{x.target.path}" for x in ex.layers if x.clamped],
        rel_error=(err / energy) ** 0.5 if energy else 0.0,
        retained=1 - err / energy if energy else 1.0,
        family=fam.name,
        files=[str(p) for p in outputs.values()],
    )
