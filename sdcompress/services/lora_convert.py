"""LoRA layout conversion (kohya <-> PEFT), called by `convert` for LoRA files.

Module names are resolved against a model's key set: the given base model, or
the full-size SD 1 / SDXL skeleton the file's names and metadata point to.
Values are copied unchanged (alpha kept), so the converted file applies the
same update.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sdcompress.arch.families import get_family
from sdcompress.checkpoint.atomic import Overwrite, check_output
from sdcompress.checkpoint.finite import check_finite, overflow_note
from sdcompress.checkpoint.resolve import load_model
from sdcompress.choices import ConvertFormat, LoraFormat, resolve_dtype
from sdcompress.errors import SdcError
from sdcompress.lowrank.layouts import (
    FORMATS,
    KOHYA,
    LoraFile,
    LoraModule,
    derived_metadata,
    is_lora_state,
    read_lora,
    resolve,
    write_lora,
)
from sdcompress.lowrank.targets import naming_for
from sdcompress.services.merge import skeleton_naming

if TYPE_CHECKING:
    from sdcompress.services.convert import ConvertRequest


@dataclass
class LoraConvertResult:
    output: str
    source_layout: str
    format: str
    modules: int


def is_lora_file(path: str | Path) -> bool:
    """True when `path` is a safetensors file holding LoRA tensors (for `convert` to route it here)."""
    from sdcompress.checkpoint.safetensors_io import SafetensorsFile

    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        return False
    try:
        keys = SafetensorsFile(p).keys()
    except SdcError:
        return False
    return is_lora_state(keys)


def _refuse_lycoris(lora: LoraFile) -> None:
    """LyCORIS kinds have no kohya/PEFT LoRA form: say what convert does and what to do with the file."""
    odd = [a for a in lora.adapters.values() if a.label not in ("LoRA", "DoRA")]
    if not odd:
        return
    kinds = ", ".join(sorted({a.label for a in odd}))
    raise SdcError(
        f"{lora.path} is a LyCORIS file ({kinds} modules, e.g. {odd[0].name}); convert rewrites plain "
        "LoRAs (lora_down/lora_up) between the kohya and PEFT layouts only, so use this file as it is "
        "(ComfyUI, A1111/Forge and LyCORIS load it) or bake it into a model with "
        "`sdcompress merge BASE --lora FILE -o OUT`."
    )


def _output_magnitude(a, out: int, path: str) -> torch.Tensor | None:
    """A DoRA's magnitude per output channel (the form both layouts hold), None for a plain LoRA."""
    if not a.decomposed:
        return None
    scale = a.tensors.get("dora_scale")
    if scale is not None and scale.shape[0] != out:
        raise SdcError(
            f"{path} is a DoRA with one magnitude per input channel ({a.name}.dora_scale), which the PEFT "
            "layout cannot hold; use the file as it is or bake it with `sdcompress merge`."
        )
    return a.magnitude((out, 0))[0]


def convert_lora(
    src: str | Path,
    dst: str | Path,
    to: str = KOHYA,
    *,
    base: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool | Overwrite = False,
    allow_nonfinite: bool = False,
) -> LoraConvertResult:
    """Rewrite the LoRA `src` in layout `to` ("kohya" or "peft") at `dst`; NaN/inf refused unless allowed."""
    if to not in FORMATS:
        raise SdcError(f"unknown LoRA format {to!r}; choose kohya or peft.")
    check_output(dst, overwrite=overwrite, inputs=[src, base], kind="file")
    lora = read_lora(src, allow_nonfinite=allow_nonfinite)
    _refuse_lycoris(lora)
    naming = naming_for(load_model(base)) if base else skeleton_naming(bool(lora.looks_sdxl()))
    modules = []
    for target, a in resolve(lora, naming).items():
        up, down = a.tensors["up"].load(), a.tensors["down"].load()
        alpha = a.alpha if a.alpha is not None else float(down.shape[0])
        modules.append(LoraModule(target, up, down, alpha, _output_magnitude(a, up.shape[0], lora.path)))
    out_dtype = dtype or modules[0].down.dtype
    if not allow_nonfinite and out_dtype != modules[0].down.dtype:
        for m in modules:
            for part, t in (("lora_up", m.up), ("lora_down", m.down)):
                what = f"the output tensor {naming.kohya(m.target)}.{part}.weight"
                check_finite(t.to(out_dtype), what, overflow_note(out_dtype))
    family = get_family("sdxl" if naming.sdxl else "sd1")  # for a source without family keys (PEFT)
    keep = derived_metadata([lora.metadata], title=Path(dst).stem, family=family)
    write_lora(dst, modules, naming, fmt=to, dtype=out_dtype, metadata=keep, overwrite=overwrite)
    return LoraConvertResult(str(dst), lora.layout, to, len(modules))


def _unused_options(req: ConvertRequest) -> list[str]:
    """The `convert` options that only mean something for a model, among those the user set."""
    given = {
        "--vae-dtype": req.vae_dtype is not None,
        "--ema": req.ema,
        "--unet-only": req.unet_only,
        "--prediction-type": req.prediction_type is not None,
        "--tokenizer": req.tokenizer is not None,
        "--allow-pickle": req.allow_pickle,
        "--device": req.device not in ("auto", ""),
    }
    return [flag for flag, set_ in given.items() if set_]


def convert_lora_file(req: ConvertRequest) -> LoraConvertResult:
    """`convert` of a LoRA file: a new layout (--format kohya|peft) and dtype; model options are refused."""
    unused = _unused_options(req)
    if unused:
        one = len(unused) == 1
        flags = unused[0] if one else f"{', '.join(unused[:-1])} and {unused[-1]}"
        raise SdcError(
            f"{flags} {'does' if one else 'do'} not apply to a LoRA file (convert changes only its layout "
            f"and dtype); drop {'it' if one else 'them'}."
        )
    fmt = req.format or ConvertFormat.KOHYA
    if fmt not in (ConvertFormat.KOHYA, ConvertFormat.PEFT):
        raise SdcError(f"{req.src} is a LoRA file, which converts to --format kohya or peft, not {fmt}.")
    return convert_lora(
        req.src,
        req.output,
        LoraFormat(fmt.value),
        dtype=resolve_dtype(req.dtype),
        overwrite=req.overwrite,
        allow_nonfinite=req.allow_nonfinite,
    )
