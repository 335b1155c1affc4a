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

import errno
import json
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from sdcompress.checkpoint.atomic import Overwrite, atomic_file
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
Entry = tuple[str, tuple[int, ...], int, int]


class SafetensorsFile:
    """The header of a safetensors file, with lazy tensors that read on demand.

    The header is validated whole before anything uses it (see `parse_header`), so a
    malformed or hostile file is one `SdcError`, never a crash further down.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = str(path)
        p = Path(self.path)
        try:
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
                raw = f.read(hlen)
        except OSError as e:  # a symlink loop, a permission problem, a device that fails to read
            raise SdcError(f"cannot read {self.path}: {e.strerror or e}.") from None
        self.metadata, self.entries = parse_header(raw, size - 8 - hlen, self.path)
        self.data_start = 8 + hlen
        self.size = size

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


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _load_json(raw: bytes, path: str) -> object:
    """The header as JSON: strict (no NaN, no duplicate keys), and deep nesting is an error, not a crash."""
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except RecursionError:
        raise SdcError(f"{path} is not a valid safetensors file (its header is nested too deeply).") from None
    except (UnicodeDecodeError, ValueError):
        raise SdcError(f"{path} is not a valid safetensors file (its header is not JSON).") from None


def _is_int(x: object) -> bool:
    return type(x) is int  # bool is an int subclass and float offsets are not offsets


def _entry(name: str, info: object, data_len: int, path: str) -> Entry:
    """One tensor's (dtype, shape, begin, end), every field checked against the format."""
    bad = f"{path} is not a valid safetensors file (the header entry for {name!r} is malformed"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise SdcError(f"{bad}: it needs dtype, shape and data_offsets).")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype_name, str):
        raise SdcError(f"{bad}: its dtype is not a name).")
    if dtype_name not in DTYPES:
        raise SdcError(f"{path} holds {name!r} in dtype {dtype_name}, which sdcompress cannot read.")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise SdcError(f"{bad}: its shape is not a list of non-negative integers).")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise SdcError(f"{bad}: its data_offsets are not two integers).")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise SdcError(f"{bad}: its data_offsets are out of order).")
    if end > data_len:
        raise SdcError(
            f"{path} is truncated: tensor {name!r} ends past the end of the file; download or copy it again."
        )
    expected = dtype_size(DTYPES[dtype_name])
    for d in shape:
        expected *= d
    if end - begin != expected:
        raise SdcError(f"{path} is corrupt: tensor {name!r} has the wrong byte length.")
    return dtype_name, tuple(shape), begin, end


def parse_header(raw: bytes, data_len: int, path: str) -> tuple[dict[str, str], dict[str, Entry]]:
    """Validate a header whole: its JSON, `__metadata__` (str -> str), and every tensor entry.

    `data_len` is the size of the data section after the header. Offsets must be
    integers inside it and tensors must not overlap; shape times dtype size must equal the
    byte length. The safetensors library checks the same when it opens a file; we read
    files ourselves (see the module docstring), so we must check them ourselves.
    """
    header = _load_json(raw, path)
    if not isinstance(header, dict):
        raise SdcError(f"{path} is not a valid safetensors file (its header is not a table).")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SdcError(
            f"{path} is not a valid safetensors file (its __metadata__ is not a table of strings)."
        )
    entries = {name: _entry(name, info, data_len, path) for name, info in header.items()}
    previous_end, previous = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < previous_end:
            raise SdcError(f"{path} is corrupt: tensors {previous!r} and {name!r} overlap.")
        if end > begin:
            previous_end, previous = end, name
    return dict(metadata), entries


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
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                    raise  # a real write failure, not "cannot copy between these files"
                n = 0
            if n <= 0:  # not supported across these file systems: plain copy of the rest
                f.seek(off)
                while left:
                    chunk = f.read(min(left, 64 << 20))
                    if not chunk:
                        raise SdcError(
                            f"{src.path} ended early while copying a tensor; the file is truncated."
                        )
                    _write_all(dst_fd, memoryview(chunk))
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
    _write_all(dst_fd, memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # reshape: 0-d tensors


def _write_all(fd: int, data: memoryview) -> None:
    """os.write may write less than asked (a signal, a nearly full disk): loop until all is out."""
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _is_copy(lt: LazyTensor) -> bool:
    """Bytes already in a file, unchanged: the kernel copies them, nothing is loaded."""
    return lt.raw is not None and sum(r.nbytes for r in lt.raw) == lt.nbytes


def _in_order(
    sd: Mapping[str, LazyTensor], workers: int
) -> Iterator[tuple[str, LazyTensor, torch.Tensor | None]]:
    """`sd`'s tensors in order, loaded (None for file-to-file copies).

    With `workers`, up to `workers + 1` loads run ahead in threads while the caller writes, each
    thread with one torch thread: the loads are parallel across tensors instead of inside each.
    Inside, a load of many elementwise passes (an fp8 rounding is ~15) meets torch's thread
    barrier after every pass, and one descheduled thread on a busy machine stalls them all
    (measured on 2 cores at load 3: 15-51M values/s with two intra-op threads, 196M with one).
    """
    if workers <= 0:
        for name, lt in sd.items():
            yield name, lt, None if _is_copy(lt) else lt.load()
        return
    pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))
    ahead: deque[tuple[str, LazyTensor, Future[torch.Tensor] | None]] = deque()
    items = iter(sd.items())
    try:
        while True:
            while len(ahead) <= workers and (item := next(items, None)) is not None:
                name, lt = item
                ahead.append((name, lt, None if _is_copy(lt) else pool.submit(lt.load)))
            if not ahead:
                return
            name, lt, loading = ahead.popleft()
            yield name, lt, None if loading is None else loading.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def write_safetensors(
    path: str | os.PathLike[str],
    sd: Mapping[str, LazyTensor],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool | Overwrite = False,
    on_tensor: Callable[[str, LazyTensor], None] | None = None,
    load_workers: int = 0,
) -> None:
    """Write `sd` to `path` atomically, loading at most one tensor at a time (`load_workers + 2`
    with load threads, for loads that cost more CPU than their write: see `_in_order`).

    Tensors whose bytes are already in a file (`raw`) and unchanged are copied by
    the kernel; the rest are loaded, checked against the declared shape and
    dtype, and written.
    """
    header = _header_bytes(sd, metadata)
    size = len(header) + sum(t.nbytes for t in sd.values())
    with atomic_file(path, overwrite=overwrite, size=size) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            _write_all(fd, memoryview(header))
            for name, lt, t in _in_order(sd, load_workers):
                if t is None:
                    for r in lt.raw or ():
                        _copy_range(r, fd)
                else:
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
