"""GGUF U-Nets in ComfyUI-GGUF's conventions: written one tensor at a time, read back dequantized.

ComfyUI-GGUF (city96) loads a U-Net-only GGUF whose header names the architecture
(`sd1`, `sdxl`) and whose tensors carry the original LDM/SGM names without the
`model.diffusion_model.` prefix. Its reference quantizer (`tools/convert.py` then
llama.cpp with `tools/lcpp.patch`) keeps the embeddings, the first and last
convolution, 1-D and small tensors unquantized, and stores a tensor whose rows
do not split into whole quantization blocks (every 3x3 and 1x1 convolution) as
rows of 256 values with its true shape in `comfy.gguf.orig_shape.<name>`. This
module writes exactly that, so the loader needs no special case for our files.

The block arithmetic is the `gguf` package's (numpy quantizers for Q4_0, Q4_1,
Q5_0, Q5_1 and Q8_0; an optional extra, imported inside the functions). Its
writer keeps every tensor in memory until the end, or spills to the system's
temporary folder; a 7 GB SDXL source must not, so quantized tensors go to an
anonymous file beside the output and are copied into place once the header,
which lists every tensor before the first byte of data, is known.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from sdcompress.choices import QuantFormat
from sdcompress.errors import SdcError

if TYPE_CHECKING:
    import numpy as np
    import torch

GGUF_MAGIC = b"GGUF"
GGUF_ARCHS = ("sd1", "sdxl")
"""The U-Net architectures ComfyUI-GGUF accepts for SD: SD 1.x and 2.x are `sd1` (ComfyUI tells them
apart from the tensors), SDXL and every student with SDXL's keys (ssd-1b, vega, koala) `sdxl`."""
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
UNET_PREFIX = "model.diffusion_model."

SMALL = 1024
"""Tensors with at most this many values stay unquantized, as in the reference conversion."""
ROW = 256
"""Row length of a reshaped tensor (the reference conversion's; any multiple of the block size reads back)."""

# lcpp.patch's rules for LLM_ARCH_SD1/SDXL: these name parts, and conv_in/conv_out by their original names.
_KEEP_PARTS = (
    "class_embedding.",
    "time_embedding.",
    "add_embedding.",
    "time_embed.",
    "label_emb.",
    "conv_in.",
    "conv_out.",
)
_KEEP_NAMES = ("input_blocks.0.0.weight", "out.2.weight")

# QuantFormat -> (stored GGML type, the file's general.file_type), both by the package's enum names.
_TYPES = {
    QuantFormat.GGUF_Q8_0: ("Q8_0", "MOSTLY_Q8_0"),
    QuantFormat.GGUF_Q5_1: ("Q5_1", "MOSTLY_Q5_1"),
    QuantFormat.GGUF_Q5_0: ("Q5_0", "MOSTLY_Q5_0"),
    QuantFormat.GGUF_Q4_1: ("Q4_1", "MOSTLY_Q4_1"),
    QuantFormat.GGUF_Q4_0: ("Q4_0", "MOSTLY_Q4_0"),
    QuantFormat.GGUF_F16: ("F16", "MOSTLY_F16"),
}


@dataclass(frozen=True)
class LayerRecord:
    """How one tensor was stored: its name, GGML type (`Q8_0`, `F16`, `F32`...), true shape and bytes in the file."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def quantized(self) -> bool:
        return self.ggml_type not in ("F32", "F16")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise SdcError(
            f"GGUF files need the gguf package ({e}); install it with: pip install 'sdcompress[gguf]'."
        ) from None
    return gguf


def arch_for_family(family: Any) -> str:
    """The GGUF architecture string for a `Family` (students share their teacher's topology)."""
    return "sdxl" if family.is_sdxl else "sd1"


def kept_by_reference(name: str, shape: tuple[int, ...]) -> bool:
    """True for the tensors ComfyUI-GGUF's reference conversion never quantizes."""
    if len(shape) < 2 or math.prod(shape) <= SMALL:
        return True
    return name in _KEEP_NAMES or any(part in name for part in _KEEP_PARTS)


def _target_type(gguf: Any, fmt: QuantFormat) -> Any:
    """The GGML type for `fmt`, checked against what the installed package can quantize."""
    fmt = QuantFormat.parse(fmt, "--format")
    if fmt not in _TYPES:
        raise SdcError(f"--format {fmt} is not a GGUF format; use one of {', '.join(map(str, _TYPES))}.")
    qtype = gguf.GGMLQuantizationType[_TYPES[fmt][0]]
    import numpy as np

    block = gguf.GGML_QUANT_SIZES[qtype][0]
    try:  # a probe, so an older package fails before anything is written
        gguf.quants.quantize(np.zeros((1, block), dtype=np.float32), qtype)
    except (NotImplementedError, AttributeError, KeyError) as e:
        raise SdcError(
            f"the installed gguf package cannot write {qtype.name} ({e}); upgrade it: pip install -U gguf."
        ) from None
    return qtype


def _encode(
    gguf: Any, name: str, t: torch.Tensor, qtype: Any, kept: bool
) -> tuple[np.ndarray, Any, tuple[int, ...] | None]:
    """One tensor as stored: (array, GGML type, true shape when the array is reshaped, else None).

    Kept 1-D and small tensors are F32 (lossless for any float source), other kept ones F16, as the
    reference conversion writes them. A quantized tensor whose values do not split into whole blocks
    stays F16 (the reference's fallback).
    """
    import numpy as np
    import torch

    if not t.dtype.is_floating_point:
        raise SdcError(f"{name} holds {t.dtype} values; a GGUF U-Net holds floating-point weights only.")
    shape = tuple(t.shape)
    values = t.detach().to("cpu", torch.float32).contiguous().numpy()
    if len(shape) < 2 or values.size <= SMALL:
        return values, gguf.GGMLQuantizationType.F32, None
    f16 = gguf.GGMLQuantizationType.F16
    if kept or qtype == f16:
        return values.astype(np.float16), f16, None
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    orig = None
    if shape[-1] % block:
        if values.size % block:
            return values.astype(np.float16), f16, None
        row = ROW if values.size % ROW == 0 else block
        values, orig = values.reshape(values.size // row, row), shape
    return gguf.quants.quantize(values, qtype), qtype, orig


def write_gguf(
    path: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    arch: str,
    fmt: QuantFormat,
    keep: Callable[[str, torch.Tensor], bool],
) -> list[LayerRecord]:
    """Write a U-Net GGUF to `path` (the caller renames it into place) and return how each tensor was stored.

    `tensors` are the U-Net's tensors under their original names without `model.diffusion_model.`,
    read one at a time; `keep(name, t)` True stores a tensor unquantized on top of the reference
    conversion's own rules (`kept_by_reference`). The quantized data passes through an anonymous
    file in `path`'s folder, so that folder needs room for the output twice until this returns.
    """
    gguf = _gguf()
    if arch not in GGUF_ARCHS:
        raise SdcError(f"GGUF architecture {arch!r} is not one ComfyUI-GGUF loads as a U-Net ({GGUF_ARCHS}).")
    fmt = QuantFormat.parse(fmt, "--format")
    qtype = _target_type(gguf, fmt)
    path = Path(path)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(int(gguf.LlamaFileType[_TYPES[fmt][1]]))
    records: list[LayerRecord] = []
    spans: list[tuple[int, int, Any, tuple[int, ...]]] = []  # offset, bytes, numpy dtype, array shape
    with tempfile.TemporaryFile(dir=path.parent, prefix=".gguf-data-") as spill:
        for name, t in tensors:
            shape = tuple(t.shape)
            kept = kept_by_reference(name, shape) or bool(keep(name, t))
            data, stored, orig = _encode(gguf, name, t, qtype, kept)
            if orig is not None:
                writer.add_array(ORIG_SHAPE_KEY + name, list(orig))
            try:
                writer.add_tensor_info(
                    name, data.shape, data.dtype, data.nbytes, raw_dtype=_raw(gguf, stored)
                )
            except ValueError as e:  # a duplicate name
                raise SdcError(f"cannot write {name} to the GGUF file: {e}.") from None
            spans.append((spill.tell(), data.nbytes, data.dtype, data.shape))
            data.tofile(spill)
            records.append(LayerRecord(name, stored.name, shape, data.nbytes))
        spill.flush()
        try:
            writer.write_header_to_file(path)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for offset, nbytes, dtype, shape in spans:
                writer.write_tensor_data(_read_back(spill, offset, nbytes, dtype, shape))
        finally:
            writer.close()
    return records


def _raw(gguf: Any, stored: Any) -> Any:
    """`raw_dtype` for the writer: None for F32/F16 (it reads them from the array), the type otherwise."""
    return None if stored in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else stored


def _read_back(spill: BinaryIO, offset: int, nbytes: int, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    import numpy as np

    data = os.pread(spill.fileno(), nbytes, offset)
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def is_gguf(path: Path) -> bool:
    """True when `path` is a file that starts with the GGUF magic (no package needed)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _reader(gguf: Any, path: Path) -> Any:
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise SdcError(f"{path} is not a readable GGUF file ({e}).") from None


def _string_field(reader: Any, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    return bytes(field.parts[field.data[-1]]).decode("utf-8")


def gguf_arch(path: Path) -> str:
    """The architecture string in a GGUF file's header (`sd1`, `sdxl`, or whatever another tool wrote)."""
    arch = _string_field(_reader(_gguf(), Path(path)), "general.architecture")
    if arch is None:
        raise SdcError(
            f"{path} names no architecture (general.architecture); only ComfyUI-GGUF-style U-Net files are read."
        )
    return arch


def _true_shape(reader: Any, tensor: Any) -> tuple[int, ...]:
    field = reader.get_field(ORIG_SHAPE_KEY + tensor.name)
    if field is None:  # GGUF lists dimensions fastest-first
        return tuple(int(d) for d in reversed(tensor.shape))
    return tuple(int(field.parts[i][0]) for i in field.data)


def read_gguf(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The U-Net tensors of a GGUF file, dequantized to float32 in their true shapes, one at a time.

    Names are as stored, less a `model.diffusion_model.` prefix when the file has one (ComfyUI-GGUF
    reads such files the same way, ignoring tensors outside the prefix).
    """
    import torch

    gguf = _gguf()
    reader = _reader(gguf, Path(path))
    prefixed = any(t.name.startswith(UNET_PREFIX) for t in reader.tensors)
    for tensor in reader.tensors:
        if prefixed and not tensor.name.startswith(UNET_PREFIX):
            continue
        shape = _true_shape(reader, tensor)
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise SdcError(
                f"{path}: {tensor.name} is stored as {tensor.tensor_type.name}, which the gguf package cannot read."
            ) from None
        if not values.flags.writeable:
            values = values.copy()
        yield tensor.name.removeprefix(UNET_PREFIX), torch.from_numpy(values).reshape(shape).float()


def gguf_metadata(path: Path) -> dict[str, str]:
    """The header entry `info`, `merge` and `quantize` read to know a file is quantized (describe.py),
    derived from a GGUF U-Net's tensor types: its commonest quantized type, that type's bits per
    weight (block scales included), and the share of the U-Net's values stored quantized. Empty for a
    file with no quantized tensor (F16/F32 only), which is no more quantized than an fp16 file.
    """
    from sdcompress.quantize.describe import META_KEY, Quantization

    gguf = _gguf()
    reader = _reader(gguf, Path(path))
    total, by_type = 0, {}
    for tensor in reader.tensors:
        n = int(tensor.n_elements)
        total += n
        if tensor.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            by_type[tensor.tensor_type] = by_type.get(tensor.tensor_type, 0) + n
    if not by_type:
        return {}
    main = max(by_type, key=by_type.__getitem__)
    block, size = gguf.GGML_QUANT_SIZES[main]
    q = Quantization(f"gguf-{main.name.lower()}", size * 8 / block, sum(by_type.values()) / total)
    return {META_KEY: q.to_json()}
