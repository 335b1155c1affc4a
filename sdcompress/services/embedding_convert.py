"""Embedding layout conversion (A1111/ComfyUI file <-> diffusers `learned_embeds`), called by `convert`.

The vectors are copied unchanged (cast only with `--dtype`); the token travels
with them: diffusers keeps it as the tensor's name, sdcompress's A1111 files in
their metadata (A1111 and ComfyUI themselves prompt by the file name).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdcompress.checkpoint.atomic import check_output
from sdcompress.checkpoint.embedding_files import (
    DIFFUSERS_FILES,
    is_embedding,
    read_embedding,
    write_a1111,
    write_diffusers,
)
from sdcompress.choices import ConvertFormat, resolve_dtype
from sdcompress.errors import SdcError
from sdcompress.services.lora_convert import _unused_options

if TYPE_CHECKING:
    from sdcompress.services.convert import ConvertRequest

LAYOUTS = (ConvertFormat.A1111, ConvertFormat.DIFFUSERS)
__all__ = ["convert_embedding", "is_embedding"]


@dataclass
class EmbeddingConvertResult:
    output: str
    files: list[str]
    token: str
    vectors: int
    family: str
    format: str


def _format(req: ConvertRequest) -> ConvertFormat:
    """--format, else from the output: a `.safetensors` path gets the A1111 file, anything else the folder."""
    fmt = req.format or (
        ConvertFormat.A1111 if str(req.output).lower().endswith(".safetensors") else ConvertFormat.DIFFUSERS
    )
    if fmt not in LAYOUTS:
        raise SdcError(
            f"{req.src} is an embedding, which converts to --format a1111 or diffusers, not {fmt}."
        )
    if fmt == ConvertFormat.A1111 and not str(req.output).lower().endswith(".safetensors"):
        raise SdcError(f"{req.output} must end in .safetensors; the A1111/ComfyUI embedding is one file.")
    if fmt == ConvertFormat.DIFFUSERS and str(req.output).lower().endswith(".safetensors"):
        raise SdcError(
            f"{req.output} names a file, but the diffusers layout is a folder ({', '.join(DIFFUSERS_FILES)} for "
            "SDXL); give a folder path."
        )
    return fmt


def convert_embedding(req: ConvertRequest) -> EmbeddingConvertResult:
    """`convert` of an embedding: the other layout (--format a1111|diffusers) and dtype; model options refused."""
    unused = _unused_options(req)
    if unused:
        one = len(unused) == 1
        flags = unused[0] if one else f"{', '.join(unused[:-1])} and {unused[-1]}"
        raise SdcError(
            f"{flags} {'does' if one else 'do'} not apply to an embedding (convert changes only its layout "
            f"and dtype); drop {'it' if one else 'them'}."
        )
    fmt = _format(req)
    kind = "file" if fmt == ConvertFormat.A1111 else "dir"
    check_output(req.output, overwrite=req.overwrite, inputs=[req.src], kind=kind)
    emb = read_embedding(req.src)
    dtype = resolve_dtype(req.dtype)
    if fmt == ConvertFormat.A1111:
        files = [write_a1111(Path(req.output), emb, dtype=dtype, overwrite=req.overwrite)]
    else:
        files = write_diffusers(Path(req.output), emb, dtype=dtype, overwrite=req.overwrite)
    return EmbeddingConvertResult(
        output=str(req.output),
        files=[str(f) for f in files],
        token=emb.token,
        vectors=emb.count,
        family=emb.describe(),
        format=str(fmt),
    )
