"""bench holds a scaled-fp8 file's weights as fp8 codes and applies the scales per layer.

The resolver reads a scaled-fp8 file as codes x scale at full precision (what `convert` and
the quality report need); bench measured that product, so an fp8-scaled file showed the
memory of the source while its note said the weights stayed fp8.
"""

from __future__ import annotations

import pytest
import torch

from sdcompress.checkpoint.resolve import load_model
from sdcompress.checkpoint.tiny import tiny_model
from sdcompress.checkpoint.writers import save_single_file
from sdcompress.services.bench import BenchRequest, bench
from sdcompress.services.quantize import QuantizeRequest, quantize


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench-scaled")
    src = tmp / "src.safetensors"
    save_single_file(tiny_model("tiny-sd"), src)
    scaled = tmp / "fp8-scaled.safetensors"
    quantize(QuantizeRequest(str(src), str(scaled), "fp8-scaled", report=False))
    return {"src": src, "fp8-scaled": scaled}


def test_bench_keeps_scaled_fp8_weights_in_fp8(files):
    req = BenchRequest(
        [str(files["fp8-scaled"])], batch_sizes=(1,), steps=1, warmup=0, device="cpu", dtype="fp32"
    )
    res = bench(req)
    m = res.models[0]
    # fp8 codes (1 byte) for almost every weight; before: 0.9x of float32 (the scaled Linears
    # held as float32 products)
    assert m.weights_bytes < 0.4 * 4 * m.parameters
    assert m.results[0].steps_per_s > 0
    note = next(n for n in res.notes if n.startswith(str(files["fp8-scaled"])))
    assert "times their scales" in note and "no fp8 matmul" in note


def test_scaled_fp8_cast_up_equals_the_dequantized_model(files):
    from sdcompress.prune.importance import predict
    from sdcompress.quantize.report import fixed_inputs, unet_module
    from sdcompress.services.bench import _unet

    model = load_model(files["fp8-scaled"])
    lean = _unet(model, torch.device("cpu"), torch.float32)
    stored = [p for p in lean.parameters() if p.dtype == torch.float8_e4m3fn]
    assert sum(p.numel() for p in stored) > 0.9 * sum(p.numel() for p in lean.parameters())
    inputs = fixed_inputs(model, samples=1, latent=8)
    # the reader's product (codes x scale in float32): the same values, bit for bit
    assert torch.equal(predict(lean, inputs, 1)[0], predict(unet_module(model), inputs, 1)[0])
    assert all(p.dtype == torch.float8_e4m3fn for p in stored)  # restored after the forward
