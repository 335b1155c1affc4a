"""`sdcompress quantize --format gguf-*` end to end on tiny-sd, and `convert` reading the GGUF back."""

from __future__ import annotations

import pytest
import torch

from sdcompress.quantize.gguf import gguf_arch, is_gguf, read_gguf

gguf = pytest.importorskip("gguf")


@pytest.mark.slow  # ~14 s: the CLI, then convert's full pipeline
def test_quantize_gguf_q8_0_then_convert_dequantizes_it(cli, tmp_path):
    from sdcompress.checkpoint.keymap.unet import unet_to_single_file
    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.quantize.describe import of_model

    out = tmp_path / "unet-q8.gguf"
    r = cli("quantize", "tiny-sd", "-o", out, "--format", "gguf-q8_0", "--no-report")
    assert r.code == 0, r
    assert is_gguf(out) and gguf_arch(out) == "sd1"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no spill or partial file left

    src = load_model("tiny-sd")
    source = unet_to_single_file(src.components["unet"], src.unet_layout)
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert set(types) == set(source)
    assert types["input_blocks.0.0.weight"] == "F16" and types["time_embed.0.weight"] == "F16"
    assert types["input_blocks.1.0.in_layers.2.weight"] == "Q8_0"  # convolutions are quantized too
    said = " ".join((r.stdout + r.stderr).split())
    assert "leaves unquantized" not in said and "Linear layers only (nf4, int8)" in said
    ours = dict(read_gguf(out))
    for name, t in source.items():
        x = t.load().float()
        assert (ours[name] - x).abs().max() <= x.abs().max() / 127, name

    r = cli("info", out)
    assert r.code == 0 and "gguf-q8_0, 8.5 bits" in " ".join(r.stdout.split()), r
    r = cli("quantize", out, "-o", tmp_path / "again.gguf", "--format", "gguf-q4_0")
    assert r.code == 2 and "already quantized (gguf-q8_0)" in r.stderr, r

    converted = tmp_path / "back.safetensors"
    r = cli("convert", out, "-o", converted)
    assert r.code == 0, r
    back = load_model(converted)
    assert of_model(back) is None  # dequantized: fp16 again, no quantization recorded
    unet = unet_to_single_file(back.components["unet"], back.unet_layout)
    assert set(unet) == set(ours)
    for name, t in unet.items():
        # convert writes fp16 by default: our dequantization, rounded once
        assert torch.equal(t.load(), ours[name].half()), name


def test_nf4_without_a_gpu_is_one_sentence(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "nf4"
    r = cli("quantize", "tiny-sd", "-o", out, "--format", "nf4")
    assert r.code == 2, r
    assert "nf4 needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []
