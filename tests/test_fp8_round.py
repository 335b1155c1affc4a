"""Our fp8 rounding is bit-identical to torch's saturating cast for every input it takes."""

from __future__ import annotations

import pytest
import torch

from sdcompress.quantize import fp8_round
from sdcompress.quantize.fp8 import cast

TARGETS = [torch.float8_e4m3fn, torch.float8_e5m2]


def torch_cast(t: torch.Tensor, target: torch.dtype) -> torch.Tensor:
    top = torch.finfo(target).max
    return t.clamp(-top, top).to(target)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal codes, and NaN where the other has NaN (fp8 has several NaN codes)."""
    nan = a.float().isnan()
    return torch.equal(nan, b.float().isnan()) and torch.equal(
        a.view(torch.uint8)[~nan], b.view(torch.uint8)[~nan]
    )


@pytest.mark.parametrize("source", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("target", TARGETS)
def test_every_16_bit_pattern(source, target, monkeypatch):
    monkeypatch.setattr(fp8_round, "SLICE", 10_000)  # slices that end mid-tensor, and a short last one
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(source)
    assert same(fp8_round.round_to_fp8(every, target), torch_cast(every, target))


@pytest.mark.parametrize("target", TARGETS)
def test_float32_values_and_bit_patterns(target):
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e-5, 1e-3, 2**-9, 0.03, 1.0, 300.0, 6e4, 1e6])
    values = (torch.randn(len(scales), 20_000, generator=g) * scales[:, None]).reshape(-1)
    edges = [
        0.0,
        -0.0,
        448.0,
        464.0,
        480.0,
        57344.0,
        61440.0,
        2**-9,
        1.5 * 2**-9,
        2**-16,
        float("inf"),
        float("nan"),
    ]
    patterns = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int32).view(
        torch.float32
    )
    x = torch.cat([values, torch.tensor(edges), -torch.tensor(edges), patterns])
    assert same(fp8_round.round_to_fp8(x, target), torch_cast(x, target))


def test_shapes_and_the_cast_entry_point():
    x = torch.randn(3, 4, 5).half()
    y = cast(x, torch.float8_e4m3fn)
    assert y.shape == x.shape and y.dtype == torch.float8_e4m3fn
    assert cast(torch.tensor(1000.0).half(), torch.float8_e4m3fn).float().item() == 448.0  # saturates, 0-d
    assert cast(torch.empty(0, 3).half(), torch.float8_e4m3fn).shape == (0, 3)
    wide = torch.randn(8).double()  # no bit path for float64: torch's own cast, saturating too
    assert torch.equal(cast(wide * 1e4, torch.float8_e4m3fn).float().abs().max(), torch.tensor(448.0))
