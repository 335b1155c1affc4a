"""GGUF U-Nets (sdcompress/quantize/gguf.py): each type's error bound, the reshape ComfyUI-GGUF reads, the keep rules.

What ComfyUI-GGUF itself does with these files is checked by benchmarks/gguf_comfyui.py against a
fetched copy of its loader (docs/gguf.md records the run); here the `gguf` package alone is the
referee: its reader reopens every file and its field types are the ones that loader demands.
"""

from __future__ import annotations

import sys

import pytest
import torch

from sdcompress.choices import QuantFormat
from sdcompress.errors import SdcError
from sdcompress.quantize.gguf import (
    ORIG_SHAPE_KEY,
    arch_for_family,
    gguf_arch,
    gguf_metadata,
    is_gguf,
    kept_by_reference,
    read_gguf,
    write_gguf,
)

gguf = pytest.importorskip("gguf")

GGUF_FORMATS = [f for f in QuantFormat if f.is_gguf]

# Largest error of one value, from each type's rounding rule: (levels a step is 1/levels of, the
# fraction of a step a value may be off, the largest code, offset or not). A step is max |x| / levels
# of its 32-value block for the symmetric types, (max - min) / levels for those with an offset. Q8_0
# and the offset types round to the nearest step (half a step); Q4_0 and Q5_0 give -amax the extreme
# code, so +amax clips one step short. The scale is stored in fp16 (relative error 2^-11, multiplied
# by the code) and the offset types' minimum too.
BOUNDS = {
    QuantFormat.GGUF_Q8_0: (127, 0.5, 127, False),
    QuantFormat.GGUF_Q5_1: (31, 0.5, 31, True),
    QuantFormat.GGUF_Q5_0: (16, 1.0, 16, False),
    QuantFormat.GGUF_Q4_1: (15, 0.5, 15, True),
    QuantFormat.GGUF_Q4_0: (8, 1.0, 8, False),
}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g).half()

    return {
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": rnd(64, 96),  # rows of whole blocks
        "input_blocks.1.0.in_layers.2.weight": rnd(64, 32, 3, 3),  # 3x3 conv: rows of 256
        "input_blocks.1.1.proj_in.weight": rnd(64, 64, 1, 1),  # 1x1 conv: rows of 256
        "middle_block.0.in_layers.2.weight": rnd(40, 36, 3, 3),  # 12960 values: rows of 32
        "odd.weight": rnd(33, 35),  # no whole blocks at all: F16
        "input_blocks.1.1.norm.weight": rnd(64),  # 1-D: F32
        "input_blocks.1.1.tiny.weight": rnd(16, 64),  # 1024 values: F32
    }


def _write(tmp_path, fmt, tensors=None, keep=lambda n, t: False, arch="sd1"):
    tensors = _tensors() if tensors is None else tensors
    path = tmp_path / "unet.gguf"
    records = write_gguf(path, iter(tensors.items()), arch=arch, fmt=fmt, keep=keep)
    return path, tensors, {r.name: r for r in records}


@pytest.mark.parametrize("fmt", GGUF_FORMATS, ids=str)
def test_round_trip_error_within_each_types_bound(tmp_path, fmt):
    path, tensors, records = _write(tmp_path, fmt)
    back = dict(read_gguf(path))
    assert list(back) == list(tensors)
    qname = fmt.value.removeprefix("gguf-").upper()
    for name, t in tensors.items():
        assert back[name].dtype == torch.float32 and back[name].shape == t.shape, name
        assert records[name].shape == tuple(t.shape)
    assert records["odd.weight"].ggml_type == "F16"
    assert records["input_blocks.1.1.norm.weight"].ggml_type == "F32"
    assert records["input_blocks.1.1.tiny.weight"].ggml_type == "F32"
    big = [
        n
        for n in tensors
        if n not in ("odd.weight", "input_blocks.1.1.norm.weight", "input_blocks.1.1.tiny.weight")
    ]
    assert {records[n].ggml_type for n in big} == {qname}
    if fmt == QuantFormat.GGUF_F16:
        for name, t in tensors.items():
            assert torch.equal(back[name], t.float()), name
        return
    levels, frac, qmax, offset = BOUNDS[fmt]
    for name in big:
        x = (
            tensors[name].float().flatten().reshape(-1, 32)
        )  # blocks are 32 consecutive values, reshaped or not
        err = (back[name].flatten().reshape(-1, 32) - x).abs()
        step = ((x.amax(1) - x.amin(1)) if offset else x.abs().amax(1)) / levels
        limit = 1.001 * (step * (frac + qmax * 2**-11) + (x.abs().amax(1) * 2**-11 if offset else 0))
        assert (err.amax(1) <= limit).all(), name
        assert err.amax() > 0  # really quantized
    for name in ("odd.weight", "input_blocks.1.1.norm.weight", "input_blocks.1.1.tiny.weight"):
        assert torch.equal(back[name], tensors[name].float()), name


def test_error_falls_with_bits(tmp_path):
    t = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    errs = {}
    for fmt in GGUF_FORMATS:
        path, _, _ = _write(tmp_path, fmt, {"w.weight": t})
        errs[fmt] = ((dict(read_gguf(path))["w.weight"] - t).norm() / t.norm()).item()
    order = [QuantFormat.GGUF_F16, QuantFormat.GGUF_Q8_0, QuantFormat.GGUF_Q5_1, QuantFormat.GGUF_Q4_1]
    assert [errs[f] for f in order] == sorted(errs[f] for f in order)
    assert errs[QuantFormat.GGUF_Q8_0] < 0.01 < errs[QuantFormat.GGUF_Q4_0] < 0.15


def test_reshaped_tensors_carry_orig_shape_as_comfyui_gguf_reads_it(tmp_path):
    path, tensors, _ = _write(tmp_path, QuantFormat.GGUF_Q4_0)
    reader = gguf.GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    expect = {  # name -> (true shape, stored rows x row length)
        "input_blocks.1.0.in_layers.2.weight": ((64, 32, 3, 3), (72, 256)),
        "input_blocks.1.1.proj_in.weight": ((64, 64, 1, 1), (16, 256)),
        "middle_block.0.in_layers.2.weight": ((40, 36, 3, 3), (405, 32)),
    }
    for name, (true, rows) in expect.items():
        field = reader.get_field(ORIG_SHAPE_KEY + name)
        # ComfyUI-GGUF's loader refuses anything but an ARRAY of INT32 here
        assert list(field.types) == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
        assert tuple(int(field.parts[i][0]) for i in field.data) == true
        assert tuple(int(d) for d in reversed(stored[name].shape)) == rows
    reshaped = {f for f in reader.fields if f.startswith(ORIG_SHAPE_KEY)}
    assert reshaped == {ORIG_SHAPE_KEY + n for n in expect}
    assert tuple(int(d) for d in reversed(stored["odd.weight"].shape)) == (33, 35)


def test_reference_keep_rules_and_the_callers_keep(tmp_path):
    g = torch.Generator().manual_seed(2)
    names = [
        "time_embed.0.weight",
        "label_emb.0.0.weight",
        "input_blocks.0.0.weight",
        "out.2.weight",
        "input_blocks.4.1.proj_out.weight",
        "input_blocks.4.1.transformer_blocks.0.ff.net.2.weight",
    ]
    tensors = {n: torch.randn(64, 64, generator=g).half() for n in names}
    tensors["input_blocks.4.1.proj_out.bias"] = torch.randn(2048, generator=g).half()
    asked = []

    def keep(name, t):
        asked.append(name)
        return name.endswith("proj_out.weight")

    path, _, records = _write(tmp_path, QuantFormat.GGUF_Q8_0, tensors, keep=keep)
    types = {n: r.ggml_type for n, r in records.items()}
    assert types == {
        "time_embed.0.weight": "F16",
        "label_emb.0.0.weight": "F16",
        "input_blocks.0.0.weight": "F16",  # conv_in
        "out.2.weight": "F16",  # conv_out
        "input_blocks.4.1.proj_out.weight": "F16",  # the caller's keep
        "input_blocks.4.1.transformer_blocks.0.ff.net.2.weight": "Q8_0",
        "input_blocks.4.1.proj_out.bias": "F32",  # 1-D, however large
    }
    assert (
        not records["out.2.weight"].quantized
        and records["input_blocks.4.1.transformer_blocks.0.ff.net.2.weight"].quantized
    )
    assert "input_blocks.4.1.proj_out.weight" in asked
    back = dict(read_gguf(path))
    for n, t in tensors.items():
        if types[n] != "Q8_0":
            assert torch.equal(back[n], t.float()), n
    assert kept_by_reference("model.conv_in.weight", (64, 64)) and kept_by_reference("x", (32, 32))
    assert not kept_by_reference("input_blocks.1.0.in_layers.2.weight", (64, 64, 3, 3))


def test_header_and_the_gguf_readers_view(tmp_path):
    path, tensors, records = _write(tmp_path, QuantFormat.GGUF_Q5_1, arch="sdxl")
    assert is_gguf(path) and gguf_arch(path) == "sdxl"
    reader = gguf.GGUFReader(path)
    assert [t.name for t in reader.tensors] == list(tensors)
    assert [t.tensor_type.name for t in reader.tensors] == [r.ggml_type for r in records.values()]
    assert int(reader.get_field("general.file_type").parts[-1][0]) == gguf.LlamaFileType.MOSTLY_Q5_1
    assert sum(r.nbytes for r in records.values()) == sum(int(t.n_bytes) for t in reader.tensors)
    assert list(tmp_path.iterdir()) == [path]  # the spilled data went with the call


def test_tiny_unet_round_trips_under_its_single_file_names(tmp_path):
    from sdcompress.checkpoint.keymap.unet import unet_to_single_file
    from sdcompress.checkpoint.resolve import load_model

    assert arch_for_family(load_model("tiny-sdxl").family) == "sdxl"
    model = load_model("tiny-sd")
    assert arch_for_family(model.family) == "sd1"
    unet = unet_to_single_file(model.components["unet"], model.unet_layout)
    path = tmp_path / "tiny-sd.gguf"
    tensors = ((k, v.load()) for k, v in unet.items())
    records = write_gguf(path, tensors, arch="sd1", fmt=QuantFormat.GGUF_Q8_0, keep=lambda n, t: False)
    assert gguf_arch(path) == "sd1" and [r.name for r in records] == list(unet)
    assert records[[r.name for r in records].index("input_blocks.1.0.in_layers.2.weight")].quantized  # a conv
    for key, t in read_gguf(path):
        src = unet[key].load().float()
        assert t.shape == src.shape
        assert (t - src).abs().max() <= src.abs().max() / 127, key


def test_metadata_names_the_format_bits_and_share(tmp_path):
    import json

    from sdcompress.quantize.describe import META_KEY

    tensors = {"a.weight": torch.randn(96, 64), "b.weight": torch.randn(32, 64), "c.bias": torch.randn(64)}
    path, _, _ = _write(tmp_path, QuantFormat.GGUF_Q4_0, tensors, keep=lambda n, t: n == "b.weight")
    meta = json.loads(gguf_metadata(path)[META_KEY])
    assert meta == {"format": "gguf-q4_0", "bits": 4.5, "quantized_fraction": 96 * 64 / (128 * 64 + 64)}
    path, _, _ = _write(tmp_path, QuantFormat.GGUF_F16, tensors)
    assert gguf_metadata(path) == {}  # nothing quantized


def test_prefixed_names_are_read_without_the_prefix(tmp_path):
    t = torch.randn(64, 64)
    path, _, _ = _write(
        tmp_path, QuantFormat.GGUF_F16, {"model.diffusion_model.out.0.weight": t, "cond.w": t}
    )
    assert [n for n, _ in read_gguf(path)] == ["out.0.weight"]


def test_bad_input_is_one_sentence_and_writes_nothing(tmp_path, monkeypatch):
    t = {"w.weight": torch.randn(64, 64)}
    out = tmp_path / "x.gguf"
    cases = [
        dict(arch="flux", fmt=QuantFormat.GGUF_Q8_0),
        dict(arch="sd1", fmt=QuantFormat.FP8),
        dict(arch="sd1", fmt="gguf-q3_k"),
    ]
    for kw in cases:
        with pytest.raises(SdcError):
            write_gguf(out, t.items(), keep=lambda n, x: False, **kw)
        assert not out.exists()
    with pytest.raises(SdcError, match="int64"):
        write_gguf(
            out, {"ids": torch.arange(4096)}.items(), arch="sd1", fmt="gguf-q8_0", keep=lambda n, x: False
        )
    with pytest.raises(SdcError, match="Duplicated"):
        write_gguf(
            out,
            [("w", torch.ones(64, 64)), ("w", torch.ones(64, 64))],
            arch="sd1",
            fmt="gguf-q8_0",
            keep=lambda n, x: False,
        )

    # a package without a quantizer for the type: refused before the first tensor
    real = gguf.quants.quantize

    def no_q5(data, qtype):
        if qtype == gguf.GGMLQuantizationType.Q5_1:
            raise NotImplementedError("Quantization for Q5_1 is not yet implemented")
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "quantize", no_q5)
    with pytest.raises(SdcError, match="cannot write Q5_1"):
        write_gguf(out, t.items(), arch="sd1", fmt="gguf-q5_1", keep=lambda n, x: False)
    assert not out.exists()
    monkeypatch.undo()

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 5)
    assert is_gguf(bad) and not is_gguf(tmp_path / "missing.gguf")
    with pytest.raises(SdcError, match="not a readable GGUF"):
        list(read_gguf(bad))
    with pytest.raises(SdcError, match="not a readable GGUF"):
        gguf_arch(bad)

    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(SdcError, match=r"sdcompress\[gguf\]"):
        write_gguf(out, t.items(), arch="sd1", fmt="gguf-q8_0", keep=lambda n, x: False)
