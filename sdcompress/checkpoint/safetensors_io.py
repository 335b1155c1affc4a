"""Reading and writing safetensors files one tensor at a time.

The `safetensors` package is the reference for the format, but its
`save_file` turns every tensor into a Python `bytes` object before writing, so
saving a 7 GB checkpoint costs 7 GB of RAM, and it cannot copy a tensor's bytes
from one file to another without decoding them. Conversion is a rename, and a
rename should cost what `cp` costs. So this module reads the header itself,
reads each tensor with one `pread`, and writes the header first and then the
tensors in order, copying unchanged tensors file-to-file with
`os.copy_file_range`. Files it writes are ordinary safetensors files (tested
against `safetensors.safe_open`).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from sdcompress.checkpoint.atomic import atomic_file
from sdcompress.checkpoint.tensors import LazyTensor, RawRange, StateDict, dtype_size
from sdcompress.errors import SdcError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000
_ALIGN = 8


class SafetensorsFile:
    """The header of a safetensors file, with lazy tensors that read on demand."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = str(path)
        p = Path(self.path)
        if not p.is_file():
            raise SdcError(f"{self.path} does not exist or is not a file.")
        size = p.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SdcError(f"{self.path} is not a safetensors file (it is only {size} bytes long).")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > _MAX_HEADER or 8 + hlen > size:
                raise SdcError(
                    f"{self.path} is not a valid safetensors file (bad header length); "
                    "it may be truncated or another format."
                )
            try:
                header = json.loads(f.read(hlen))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise SdcError(
                    f"{self.path} is not a valid safetensors file (its header is not JSON)."
                ) from None
        if not isinstance(header, dict):
            raise SdcError(f"{self.path} is not a valid safetensors file (its header is not a table).")
        self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
        self.data_start = 8 + hlen
        self.size = size
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise SdcError(f"{self.path} has a malformed header entry for {name!r}.") from None
            if dtype_name not in DTYPES:
                raise SdcError(
                    f"{self.path} holds {name!r} in dtype {dtype_name}, which sdcompress cannot read."
                )
            if self.data_start + end > size:
                raise SdcError(
                    f"{self.path} is truncated: tensor {name!r} ends past the end of the file; "
                    "download or copy it again."
                )
            expected = dtype_size(DTYPES[dtype_name])
            for d in shape:
                expected *= d
            if end - begin != expected:
                raise SdcError(f"{self.path} is corrupt: tensor {name!r} has the wrong byte length.")
            self.entries[name] = (dtype_name, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def lazy(self, name: str) -> LazyTensor:
        dtype_name, shape, begin, end = self.entries[name]
        dtype = DTYPES[dtype_name]
        offset = self.data_start + begin
        nbytes = end - begin
        path = self.path

        def load() -> torch.Tensor:
            return read_tensor(path, offset, nbytes, dtype, shape)

        return LazyTensor(shape, dtype, load, (RawRange(path, offset, nbytes),))

    def state_dict(self) -> StateDict:
        return {name: self.lazy(name) for name in self.entries}


def read_tensor(
    path: str, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    buf = bytearray(nbytes)
    with open(path, "rb", buffering=0) as f:
        view = memoryview(buf)
        got = 0
        while got < nbytes:
            n = os.preadv(f.fileno(), [view[got:]], offset + got)
            if n <= 0:
                raise SdcError(f"{path} ended early while reading a tensor; the file is truncated.")
            got += n
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def read_state_dict(path: str | os.PathLike[str]) -> StateDict:
    return SafetensorsFile(path).state_dict()


def _header_bytes(sd: Mapping[str, LazyTensor], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, t in sd.items():
        if t.dtype not in DTYPE_NAMES:
            raise SdcError(f"cannot write {name!r}: dtype {t.dtype} has no safetensors name.")
        header[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _ALIGN)
    return struct.pack("<Q", len(raw)) + raw


def _copy_range(src: RawRange, dst_fd: int) -> None:
    with open(src.path, "rb", buffering=0) as f:
        left, off = src.nbytes, src.offset
        while left:
            try:
                n = os.copy_file_range(f.fileno(), dst_fd, left, off)
            except OSError:
                n = 0
            if n <= 0:  # not supported across these file systems: plain copy of the rest
                f.seek(off)
                while left:
                    chunk = f.read(min(left, 64 << 20))
                    if not chunk:
                        raise SdcError(
                            f"{src.path} ended early while copying a tensor; the file is truncated."
                        )
                    os.write(dst_fd, chunk)
                    left -= len(chunk)
                    off += len(chunk)
                return
            left -= n
            off += n


def _write_tensor(t: torch.Tensor, dst_fd: int) -> None:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return
    data = memoryview(t.reshape(-1).view(torch.uint8).numpy())  # reshape first: 0-d tensors (logit_scale)
    while data:
        n = os.write(dst_fd, data)
        data = data[n:]


def write_safetensors(
    path: str | os.PathLike[str],
    sd: Mapping[str, LazyTensor],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
    on_tensor: Callable[[str, LazyTensor], None] | None = None,
) -> None:
    """Write `sd` to `path` atomically, loading at most one tensor at a time.

    Tensors whose bytes are already in a file (`raw`) and unchanged are copied by
    the kernel; the rest are loaded, checked against the declared shape and
    dtype, and written.
    """
    header = _header_bytes(sd, metadata)
    with atomic_file(path, overwrite=overwrite) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, header)
            for name, lt in sd.items():
                if lt.raw is not None and sum(r.nbytes for r in lt.raw) == lt.nbytes:
                    for r in lt.raw:
                        _copy_range(r, fd)
                else:
                    t = lt.load()
                    if tuple(t.shape) != lt.shape or t.dtype != lt.dtype:
                        raise RuntimeError(
                            f"tensor {name!r} loaded as {tuple(t.shape)} {t.dtype}, declared {lt.shape} {lt.dtype}"
                        )
                    _write_tensor(t, fd)
                    del t
                if on_tensor is not None:
                    on_tensor(name, lt)
        finally:
            os.close(fd)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    return SafetensorsFile(path).metadata
