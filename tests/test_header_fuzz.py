"""Malformed safetensors headers end in one sentence and exit 2, never a traceback (issue 16.2).

A seeded fuzz over a small file's header: every truncation point of the
header, byte-level mutations, and typed mutations of each field (floats for
offsets, lists for dtypes, `__metadata__` as a list, deep nesting, overlaps,
huge numbers). Each mutant goes through the real CLI (`info` and `convert`,
in-process) and may only end with exit 0 or exit 2, no traceback, and no output
left behind. Fast lane: it runs in seconds.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdcompress.checkpoint.safetensors_io import SafetensorsFile
from sdcompress.errors import SdcError

SEED = 1606
BYTE_MUTANTS = 700
TYPED_MUTANTS = 500

WEIRD_VALUES = [
    0.5,
    16.0,
    -1,
    True,
    None,
    "F32",
    ["F32"],
    {"F32": 1},
    [0.0, 16.0],
    [0, 16, 32],
    [16, 0],
    [True, False],
    2**64,
    -(2**63),
    10**30,
    [],
    [[2]],
    [2, -3],
    [2.0, 2],
    "NaN",
    "",
    {},
]
TOKENS = [
    b'"',
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"-",
    b"1e9",
    b"0.5",
    b"true",
    b"null",
    b"\\",
    b"\x00",
    b"\xff",
]


def _small_file(path: Path) -> bytes:
    save_file(
        {
            "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "b": torch.ones(4, dtype=torch.float16),
            "c": torch.tensor(7, dtype=torch.int64),
            "d": torch.empty(0, 3, dtype=torch.bfloat16),
            "e": torch.tensor([True, False]),
        },
        str(path),
        metadata={"format": "pt", "note": "fuzz"},
    )
    return path.read_bytes()


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + body


def _byte_mutant(rng: random.Random, data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header, body = bytearray(data[8 : 8 + n]), data[8 + n :]
    op = rng.randrange(5)
    i = rng.randrange(len(header))
    if op == 0:
        header[i] = rng.randrange(256)
    elif op == 1:
        header[i : i + 1] = rng.choice(TOKENS)
    elif op == 2:
        header[i:i] = rng.choice(TOKENS)
    elif op == 3:
        del header[i : i + rng.randint(1, 8)]
    else:  # digits are offsets and shapes: the most interesting bytes
        digits = [j for j, ch in enumerate(header) if chr(ch).isdigit()]
        header[rng.choice(digits)] = ord(str(rng.randrange(10)))
    if rng.random() < 0.2:  # sometimes the length prefix no longer matches
        return struct.pack("<Q", n) + bytes(header) + body
    return _join(bytes(header), body)


def _typed_mutant(rng: random.Random, data: bytes) -> bytes:
    header, body = _split(data)
    names = [k for k in header if k != "__metadata__"]
    op = rng.randrange(6)
    if op == 0:
        entry = header[rng.choice(names)]
        entry[rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(WEIRD_VALUES)
    elif op == 1:
        header["__metadata__"] = rng.choice([["x"], {"k": 1}, {"k": None}, "text", 3, {"k": ["v"]}])
    elif op == 2:
        depth = rng.choice([50, 5000, 200_000])
        header[rng.choice(names)] = json.loads("[" * 50 + "]" * 50) if depth == 50 else None
        raw = json.dumps(header).replace("null", "[" * depth + "]" * depth, 1).encode()
        return _join(raw, body)
    elif op == 3:  # two tensors over the same bytes, or one past the end
        a, b = rng.sample(names, 2)
        header[a]["data_offsets"] = list(header[b]["data_offsets"])
        if rng.random() < 0.5:
            header[a]["data_offsets"][1] += len(body)
    elif op == 4:
        del header[rng.choice(names)][rng.choice(["dtype", "shape", "data_offsets"])]
    else:
        header[rng.choice(names)]["dtype"] = rng.choice(["F4", "C64", "U64", "f32", "F8_E4M3", "I8"])
    return _join(json.dumps(header).encode(), body)


def _mutants(data: bytes) -> list[tuple[str, bytes]]:
    rng = random.Random(SEED)
    (n,) = struct.unpack("<Q", data[:8])
    out = [(f"truncated at {i}", data[:i]) for i in range(8 + n + 1)]
    out += [(f"byte mutant {i}", _byte_mutant(rng, data)) for i in range(BYTE_MUTANTS)]
    out += [(f"typed mutant {i}", _typed_mutant(rng, data)) for i in range(TYPED_MUTANTS)]
    return out


def _check(result, what: str) -> None:
    assert result.code in (0, 2), (what, result)
    text = result.stdout + result.stderr
    assert "Traceback" not in text, (what, result)
    if result.code == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), (what, result)


@pytest.fixture
def fast_cli(cli, monkeypatch):
    """The `cli` fixture with Typer's click command built once, not on each of ~2,500 calls.

    Typer rebuilds the whole command tree from the function signatures on every call (0.1-0.5 s);
    everything after that (parsing, the command, the error mapping in `main`) runs as usual.
    """
    import typer.main

    build, built = typer.main.get_command, {}
    monkeypatch.setattr(
        typer.main, "get_command", lambda app: built.get(id(app)) or built.setdefault(id(app), build(app))
    )
    return cli


def test_every_mutant_is_exit_0_or_2(fast_cli, tmp_path):
    cli = fast_cli
    data = _small_file(tmp_path / "orig.safetensors")
    mutants = _mutants(data)
    assert len(mutants) >= 1000
    work = tmp_path / "work"
    work.mkdir()
    src = work / "m.safetensors"
    codes: dict[int, int] = {}
    for i, (what, blob) in enumerate(mutants):
        src.write_bytes(blob)
        r = cli("info", src)
        _check(r, what)
        codes[r.code] = codes.get(r.code, 0) + 1
        if i % 2 == 0 or what.startswith("truncated"):  # convert reads the same header: half suffice
            out = work / ("out.safetensors" if i % 4 else "out")
            _check(cli("convert", src, "-o", out), what)
        assert sorted(p.name for p in work.iterdir()) == ["m.safetensors"], what  # nothing left behind
    assert codes.get(2, 0) > 0


def test_the_reported_files(tmp_path):
    """The exact malformed files from the report, each one sentence from the reader."""
    data = _small_file(tmp_path / "orig.safetensors")
    header, body = _split(data)
    cases = {
        "float offsets": lambda h: h["a"].update(data_offsets=[float(x) for x in h["a"]["data_offsets"]]),
        "dtype as a list": lambda h: h["a"].update(dtype=["F32"]),
        "metadata as a list": lambda h: h.update(__metadata__=["format", "pt"]),
        "bool offsets": lambda h: h["e"].update(data_offsets=[False, True]),
        "overlap": lambda h: h["b"].update(data_offsets=h["a"]["data_offsets"][:1] + [h["a"]["data_offsets"][0] + 8]),
        "negative shape": lambda h: h["a"].update(shape=[-2, -3]),
    }  # fmt: skip
    for what, change in cases.items():
        h = json.loads(json.dumps(header))
        change(h)
        path = tmp_path / f"{what}.safetensors"
        path.write_bytes(_join(json.dumps(h).encode(), body))
        with pytest.raises(SdcError):
            SafetensorsFile(path)
    deep = tmp_path / "deep.safetensors"
    deep.write_bytes(_join(b"[" * 100_000 + b"]" * 100_000, b""))
    with pytest.raises(SdcError, match="nested too deeply"):
        SafetensorsFile(deep)
