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


def test_fp8_matmul_linears_track_the_dequantized_model(files):
    """`--fp8-compute matmul`: the fitting Linears multiply fp8 codes (torch._scaled_mm, which torch
    also runs on the CPU); the output stays within fp8 activation rounding of the dequantized model."""
    from sdcompress.prune.importance import predict
    from sdcompress.quantize.fp8_matmul import Fp8Linear
    from sdcompress.quantize.report import OutputError, fixed_inputs, unet_module
    from sdcompress.services.bench import _Subject, _unet

    model = load_model(files["fp8-scaled"])
    subject = _Subject.__new__(_Subject)
    subject.fp8_matmul, subject.fp8_matmul_layers = True, None
    fast = _unet(model, torch.device("cpu"), torch.float32, subject)
    swapped = [m for m in fast.modules() if isinstance(m, Fp8Linear)]
    assert subject.fp8_matmul_layers == len(swapped) > 0
    assert all(m.weight.dtype == torch.float8_e4m3fn and m.w_scale.item() != 1.0 for m in swapped)
    inputs = fixed_inputs(model, samples=1, latent=8)
    err = OutputError.between(predict(fast, inputs, 1), predict(unet_module(model), inputs, 1))
    assert 0 < err.relative < 0.1 and err.cosine > 0.99


def test_fp8_compute_is_honoured_or_refused(files, cli):
    def note_of(mode: str) -> tuple[str, int | None]:
        req = BenchRequest([str(files["fp8-scaled"])], batch_sizes=(1,), steps=1, warmup=0, device="cpu",
                           dtype="fp32", fp8_compute=mode)  # fmt: skip
        res = bench(req)
        return next(n for n in res.notes if "fp8" in n), res.models[0].fp8_matmul_layers

    note, layers = note_of("matmul")
    assert "Linear layers multiply in fp8" in note and layers and f"{layers} Linear" in note
    note, layers = note_of("auto")  # a CPU: torch's fp8 matmul there is no faster than casting up
    assert "no fp8 matmul: none on cpu" in note and layers is None
    note, _ = note_of("cast-up")
    assert "no fp8 matmul: asked for" in note
    r = cli("bench", str(files["src"]), "--fp8-compute", "matmul", "--batch-sizes", "1", "--steps", "1")
    assert r.code == 2 and "applies to fp8 files" in r.stderr
    r = cli("bench", str(files["src"]), "--fp8-compute", "fast")
    assert r.code == 2
