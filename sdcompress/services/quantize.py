"""`quantize`: fp8, scaled fp8 and GGUF files, and diffusers-quantized folders, with each layer's error measured.

The job: resolve the model, bake `--lora` files at full precision (a delta added to fp8 codes
vanishes in rounding), decide per tensor what stays at the source precision (the keep-list,
then with `--budget`/`--max-error` the most sensitive layers by measurement), stream the
file out one tensor at a time, and report what the loader will see: per-layer weight SNR and
the U-Net output's error against the source on fixed inputs.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdcompress.checkpoint.atomic import Overwrite, atomic_dir, atomic_file, check_output
from sdcompress.checkpoint.keymap import unet as unet_map
from sdcompress.checkpoint.model import Model, disk_size
from sdcompress.checkpoint.resolve import load_model
from sdcompress.checkpoint.safetensors_io import write_safetensors
from sdcompress.checkpoint.tensors import LazyTensor, StateDict
from sdcompress.checkpoint.writers import single_file_metadata, single_file_state_dict
from sdcompress.choices import QuantFormat, parse_choices
from sdcompress.errors import SdcError
from sdcompress.lowrank.rank import parse_size
from sdcompress.quantize import fp8
from sdcompress.quantize.describe import META_KEY, Quantization, check_not_quantized
from sdcompress.quantize.keep import KeepList
from sdcompress.quantize.report import LayerReport, OutputError
from sdcompress.quantize.roundtrip import bits, quantized_bytes, roundtrip
from sdcompress.services.merge import LoraRef

Progress = Callable[[str, int, int], None]
TEXT_KEEP = ("embedding", "embed", "positional")  # token and position tables stay: lookups, not matmuls


@dataclass
class QuantizeRequest:
    model: str
    output: str
    format: QuantFormat
    keep: list[str] = field(default_factory=list)
    budget: str | None = None  # output size, e.g. "1.6GB"
    max_error: float | None = None  # U-Net output relative error
    fast: bool = False  # score layers by weight error, not output error
    text_encoders: bool = False
    loras: list[LoraRef] = field(default_factory=list)
    report: bool = True
    overwrite: bool | Overwrite = False
    allow_pickle: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        parse_choices(self)


@dataclass
class QuantizeResult:
    output: str
    format: str
    family: str
    bits: float
    quantized_fraction: float  # of the U-Net's floating-point weights
    conv_fraction: float  # of the U-Net's weights that are convolutions (Linear-only formats leave them)
    source_bytes: int | None
    bytes_written: int
    seconds: float
    kept_by_allocation: list[str] = field(default_factory=list)
    output_error: OutputError | None = None
    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ----- checks -------------------------------------------------------------------------------------


def _check_request(req: QuantizeRequest) -> tuple[int | None, str]:
    fmt = req.format
    want = ".gguf" if fmt.is_gguf else ".safetensors" if fmt.is_fp8 else None
    if want and not req.output.lower().endswith(want):
        raise SdcError(f"--format {fmt} writes one {want} file; give an output path ending in {want}.")
    if fmt.is_diffusers and req.output.lower().endswith((".safetensors", ".gguf")):
        raise SdcError(f"--format {fmt} writes a diffusers folder; give a folder as the output, not a file.")
    if fmt.is_diffusers and (req.keep or req.budget or req.max_error is not None or req.loras):
        raise SdcError(
            f"--keep, --budget, --max-error and --lora apply to fp8 and GGUF files; --format {fmt} uses "
            "diffusers' own quantizer, which chooses its layers itself."
        )
    if fmt.is_gguf and req.text_encoders:
        raise SdcError("GGUF files hold the U-Net alone; drop --text-encoders or use an fp8 format.")
    if req.max_error is not None and not req.max_error > 0:
        raise SdcError(f"--max-error must be above 0, got {req.max_error}.")
    budget = parse_size(req.budget) if req.budget is not None else None
    kind = "dir" if fmt.is_diffusers else "file"
    inputs = [req.model, *(r.path for r in req.loras)]
    check_output(req.output, overwrite=req.overwrite, inputs=inputs, kind=kind)
    return budget, kind


# ----- what stays, what goes ----------------------------------------------------------------------


def _smallest_size(model_bytes: int, unet_sf: StateDict, quantized: list[str], fmt: QuantFormat) -> int:
    return model_bytes - sum(unet_sf[n].nbytes - quantized_bytes(fmt, unet_sf[n].shape) for n in quantized)


HEADER_BYTES = 160  # a safetensors header entry or a GGUF tensor record, about


def _unquantized_size(req: QuantizeRequest, model: Model, unet_sf: StateDict) -> int:
    """The output file with nothing quantized: what `--budget` is weighed against."""
    sd = unet_sf if req.format.is_gguf else single_file_state_dict(model)[0]
    return sum(t.nbytes + HEADER_BYTES for t in sd.values())


def _allocate(
    req: QuantizeRequest, model: Model, unet_sf: StateDict, keep: KeepList, budget: int | None,
    progress: Progress | None,
) -> tuple[KeepList, list[str], list[str], dict[str, float]]:  # fmt: skip
    """The keep-list plus the layers the measurement keeps; notes on how they were chosen; the scores."""
    from sdcompress.quantize import sensitivity

    fmt = req.format
    candidates = [n for n, t in unet_sf.items() if not keep.keeps(n, t)]
    rt = lambda t: roundtrip(fmt, t)  # noqa: E731
    if req.fast:
        scores = sensitivity.weight_scores(unet_sf, candidates, rt)
        how = "weight error (--fast)"
    else:
        from sdcompress.quantize.report import fixed_inputs

        to_diffusers = unet_map.from_single_file_names(candidates, model.unet_layout)
        scores = sensitivity.output_scores(model, to_diffusers, rt, fixed_inputs(model), progress=progress)
        how = "U-Net output error with each layer alone quantized"
    saving = {n: unet_sf[n].nbytes - quantized_bytes(fmt, unet_sf[n].shape) for n in candidates}
    smallest = _smallest_size(_unquantized_size(req, model, unet_sf), unet_sf, candidates, fmt)
    alloc = sensitivity.allocate(scores, saving, smallest, budget=budget, max_error=req.max_error)
    notes = [
        f"allocation by {how}: kept {len(alloc.kept)} of {len(candidates)} quantizable layers, "
        f"estimated error {alloc.estimated_error:.3g}"
    ]
    return keep.with_forced(alloc.kept), alloc.kept, notes, scores


def _text_keep(name: str, t: LazyTensor) -> bool:
    return (
        len(t.shape) < 2
        or t.numel <= 1024
        or not t.dtype.is_floating_point
        or any(w in name for w in TEXT_KEEP)
    )


# ----- writing ------------------------------------------------------------------------------------


def _write_fp8(
    req: QuantizeRequest, model: Model, unet_sf: StateDict, keep: KeepList, meta: Quantization,
    on_tensor: Callable[[str, LazyTensor], None] | None,
) -> None:  # fmt: skip
    full, _ = single_file_state_dict(model)
    prefix = "" if model.unet_only else unet_map.SINGLE_FILE_PREFIX
    q_unet, _ = fp8.quantized_state_dict(unet_sf, req.format, keep.keeps, prefix=prefix)
    out: StateDict = dict(q_unet)
    groups = []
    if req.text_encoders:
        groups = [s.single_file_prefix for s in model.family.text_encoders if s.component in model.components]
    for p in groups:
        te = {k[len(p) :]: v for k, v in full.items() if k.startswith(p)}
        q_te, _ = fp8.quantized_state_dict(te, req.format, _text_keep, prefix=p, scales=False)
        out.update(q_te)
    for k, v in full.items():
        if not (k.startswith(prefix) and k[len(prefix) :] in unet_sf) and k not in out:
            out[k] = v
    metadata = {**single_file_metadata(model), META_KEY: meta.to_json()}
    # The fp8 rounding is CPU work per tensor (reading and writing are copies): one load thread per core.
    workers = min(4, os.cpu_count() or 1)
    write_safetensors(
        req.output, out, metadata, overwrite=req.overwrite, on_tensor=on_tensor, load_workers=workers
    )


def _write_gguf(req: QuantizeRequest, model: Model, unet_sf: StateDict, keep: KeepList) -> float:
    """Write the U-Net GGUF; returns the share of its weights stored quantized (the writer adds
    ComfyUI-GGUF's own keep rules to ours, so its records are the truth)."""
    from sdcompress.quantize import gguf

    size = _smallest_size(sum(t.nbytes for t in unet_sf.values()), unet_sf, list(unet_sf), req.format)
    arch = gguf.arch_for_family(model.family)
    with atomic_file(req.output, overwrite=req.overwrite, size=size) as tmp:
        tensors = ((n, t.load()) for n, t in unet_sf.items())
        records = gguf.write_gguf(Path(tmp), tensors, arch=arch, fmt=req.format, keep=keep.keeps)
    total = sum(math.prod(r.shape) for r in records)
    return sum(math.prod(r.shape) for r in records if r.quantized) / total if total else 0.0


def _dequantized_unet(req: QuantizeRequest, model: Model) -> StateDict:
    """The written file as a loader reads it, in diffusers names (what the report measures)."""
    if req.format.is_gguf:
        from sdcompress.quantize.gguf import read_gguf

        sf = {k: LazyTensor.of(t) for k, t in read_gguf(Path(req.output))}
        return unet_map.unet_from_single_file(sf, model.unet_layout)
    return load_model(req.output).components["unet"]


# ----- the job ------------------------------------------------------------------------------------


def _fractions(unet_sf: StateDict, keep: KeepList) -> tuple[float, float]:
    total = quantized = conv = 0
    for n, t in unet_sf.items():
        if not t.dtype.is_floating_point:
            continue
        total += t.numel
        conv += t.numel if len(t.shape) == 4 else 0
        quantized += 0 if keep.keeps(n, t) else t.numel
    return quantized / total, conv / total


def quantize(
    req: QuantizeRequest,
    progress: Progress | None = None,
    on_tensor: Callable[[str, LazyTensor], None] | None = None,
) -> QuantizeResult:
    start = time.perf_counter()
    budget, _ = _check_request(req)
    fmt = req.format
    if fmt.is_diffusers:
        return _diffusers_folder(req, start)
    model = load_model(req.model, allow_pickle=req.allow_pickle)
    check_not_quantized(model, "quantize its full-precision source instead.")
    notes: list[str] = []
    if req.loras:
        from sdcompress.lowrank.layouts import read_lora
        from sdcompress.services.merge import bake_loras

        loras = [(read_lora(r.path), r.weight) for r in req.loras]
        model, adapted = bake_loras(model, loras)
        notes.append(f"baked {len(loras)} LoRA(s) into {adapted} tensors at the source precision first")
    unet_sf = unet_map.unet_to_single_file(model.components["unet"], model.unet_layout)
    keep = KeepList(tuple(req.keep))
    kept: list[str] = []
    scores: dict[str, float] = {}
    if budget is not None or req.max_error is not None:
        keep, kept, more, scores = _allocate(req, model, unet_sf, keep, budget, progress)
        notes += more
    quantized, conv = _fractions(unet_sf, keep)
    meta = Quantization(fmt.value, bits(fmt), quantized)
    if fmt.is_gguf:
        quantized = _write_gguf(req, model, unet_sf, keep)
        notes.append("GGUF holds the U-Net alone; load the VAE and text encoders from the source")
    else:
        _write_fp8(req, model, unet_sf, keep, meta, on_tensor)
        notes.append(
            "VAE left at the source precision"
            + ("" if req.text_encoders else "; text encoders too (--text-encoders quantizes them)")
        )
    if conv > 0.5:  # fp8 and GGUF quantize them too (ComfyUI-GGUF's ops dequantize Conv2d weights)
        notes.append(
            f"{conv:.0%} of this U-Net's weights are convolutions; formats that quantize Linear layers "
            "only (nf4, int8) save little here"
        )
    if fmt == QuantFormat.FP8_SCALED:
        notes.append(
            "convolutions are stored as plain fp8 casts (ComfyUI applies scale_weight to Linear layers "
            "only); ComfyUI 0.3.64 and older also round the Linears this file keeps to fp8, newer "
            "versions keep them (docs/quantize.md)"
        )
    result = QuantizeResult(
        output=req.output,
        format=fmt.value,
        family=model.family.name,
        bits=bits(fmt),
        quantized_fraction=quantized,
        conv_fraction=conv,
        source_bytes=disk_size(model.path) if model.path is not None else model.size_bytes(),
        bytes_written=disk_size(Path(req.output)) or 0,
        seconds=0.0,
        kept_by_allocation=kept,
        notes=notes,
    )
    if req.report:
        _add_report(result, req, model, unet_sf, keep)
        for layer in result.layers:
            layer.sensitivity = scores.get(layer.name)
    result.seconds = time.perf_counter() - start
    return result


def _add_report(
    result: QuantizeResult, req: QuantizeRequest, model: Model, unet_sf: StateDict, keep: KeepList
) -> None:
    from sdcompress.quantize.report import fixed_inputs, layer_snrs, output_error

    result.layers = layer_snrs(
        unet_sf, lambda n: not keep.keeps(n, unet_sf[n]), lambda t: roundtrip(req.format, t)
    )
    result.output_error = output_error(model, _dequantized_unet(req, model), fixed_inputs(model))


def _diffusers_folder(req: QuantizeRequest, start: float) -> QuantizeResult:
    from sdcompress.quantize.diffusers_folder import quantize_folder

    model = load_model(req.model, allow_pickle=req.allow_pickle)
    with atomic_dir(req.output, overwrite=req.overwrite) as tmp:  # all of the folder or none of it
        quantize_folder(
            req.model, tmp, req.format, text_encoders=req.text_encoders, allow_pickle=req.allow_pickle
        )
    return QuantizeResult(
        output=req.output,
        format=req.format.value,
        family=model.family.name,
        bits=4.0 if req.format == QuantFormat.NF4 else 8.0,
        quantized_fraction=float("nan"),
        conv_fraction=_fractions(
            unet_map.unet_to_single_file(model.components["unet"], model.unet_layout), KeepList()
        )[1],
        source_bytes=disk_size(model.path) if model.path is not None else model.size_bytes(),
        bytes_written=disk_size(Path(req.output)) or 0,
        seconds=time.perf_counter() - start,
        notes=["diffusers' quantizer replaces Linear layers only; convolutions stay at the source precision"],
    )
