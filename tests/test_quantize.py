"""quantize: fp8 / scaled fp8 files as loaders read them, the keep-list, allocation, LoRAs first, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from sdcompress.checkpoint.keymap import unet as unet_map
from sdcompress.checkpoint.resolve import load_model
from sdcompress.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from sdcompress.checkpoint.tensors import lazy_state_dict
from sdcompress.checkpoint.tiny import tiny_model
from sdcompress.checkpoint.writers import save_single_file
from sdcompress.errors import SdcError
from sdcompress.quantize import fp8
from sdcompress.quantize.keep import KeepList
from sdcompress.quantize.roundtrip import roundtrip, snr_db
from sdcompress.quantize.sensitivity import allocate
from sdcompress.services.merge import LoraRef, MergeRequest, run_merge
from sdcompress.services.quantize import QuantizeRequest, quantize

P = "model.diffusion_model."
LINEAR = (
    "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight"  # 256x32 (attention is 32x32: small, kept)
)
CONV = "input_blocks.1.0.in_layers.2.weight"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quant")
    save_single_file(tiny_model("tiny-sd"), tmp / "src.safetensors")
    return tmp / "src.safetensors"


@pytest.fixture(scope="module")
def written(src):
    out = {}
    for fmt in ("fp8", "fp8-scaled"):
        path = src.parent / f"{fmt}.safetensors"
        out[fmt] = quantize(QuantizeRequest(str(src), str(path), fmt, report=False))
    return out


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 - safe_open is no dict


def test_fp8_casts_the_big_weights_and_keeps_the_rest(src, written):
    q, meta = _tensors(src.parent / "fp8.safetensors")
    s, _ = _tensors(src)
    assert q[P + LINEAR].dtype == torch.float8_e4m3fn and q[P + CONV].dtype == torch.float8_e4m3fn
    torch.testing.assert_close(q[P + LINEAR].float(), s[P + LINEAR].float().to(torch.float8_e4m3fn).float())
    for kept in (
        "time_embed.0.weight",
        "input_blocks.0.0.weight",
        "out.2.weight",
        "input_blocks.1.0.in_layers.2.bias",
    ):
        assert torch.equal(q[P + kept], s[P + kept]), kept
    vae = [k for k in s if k.startswith("first_stage_model.")]
    assert vae and all(torch.equal(q[k], s[k]) for k in vae)
    text = [k for k in s if k.startswith("cond_stage_model.")]
    assert all(q[k].dtype == s[k].dtype for k in text)  # only with --text-encoders
    assert json.loads(meta["sdcompress.quantization"])["format"] == "fp8"
    r = written["fp8"]
    assert 0.5 < r.quantized_fraction < 1 and r.conv_fraction > 0.5 and r.bytes_written < 0.6 * r.source_bytes


def test_fp8_scaled_is_comfyui_layout_and_reads_back_with_its_scales(src, written):
    q, _ = _tensors(src.parent / "fp8-scaled.safetensors")
    marker = q[P + "scaled_fp8"]
    assert marker.dtype == torch.float8_e4m3fn and marker.numel() == 2  # no fp8 matmul, so no scale_input
    scales = [k for k in q if k.endswith(".scale_weight")]
    assert scales and all(q[k[: -len(".scale_weight")] + ".weight"].dim() == 2 for k in scales)
    assert P + CONV.replace(".weight", ".scale_weight") not in q  # ComfyUI would not apply it to a conv
    assert q[P + CONV].dtype == torch.float8_e4m3fn
    layer = P + LINEAR[: -len(".weight")]
    assert q[layer + ".scale_weight"].shape == () and q[layer + ".scale_weight"].dtype == torch.float32
    # the resolver multiplies scales out: what ComfyUI's scaled ops compute
    back = load_model(src.parent / "fp8-scaled.safetensors").components["unet"]
    name = unet_map.from_single_file_names([LINEAR], load_model(src).unet_layout)[LINEAR]
    want = q[P + LINEAR].float() * q[layer + ".scale_weight"]
    torch.testing.assert_close(back[name].load().float(), want, rtol=1e-3, atol=0)
    # full-size weights are ~0.02: a plain e4m3 cast puts many in its subnormal range, a scale does not
    w = torch.randn(320, 768, generator=torch.Generator().manual_seed(0)) * 0.02
    assert snr_db(w, roundtrip("fp8-scaled", w)) > snr_db(w, roundtrip("fp8", w)) + 1.5  # measured: +1.9 dB


def test_scaled_fp8_saturates_instead_of_nan():
    t = torch.tensor([[1000.0, -1e6, 0.5]])
    assert torch.isfinite(fp8.cast(t, torch.float8_e4m3fn).float()).all()
    q, s = fp8.scaled(torch.zeros(3, 3))
    assert float(s) == 1.0 and not q.float().any()


def test_info_and_convert_understand_quantized_files(src, written, tmp_path, cli):
    r = cli("info", src.parent / "fp8-scaled.safetensors", "--json")
    assert r.code == 0, r
    q = json.loads(r.stdout)["quantization"]
    assert q["format"] == "fp8-scaled" and q["bits"] == 8 and 0.5 < q["quantized_fraction"] < 1
    assert json.loads(cli("info", src, "--json").stdout)["quantization"] is None
    out = tmp_path / "back.safetensors"
    r = cli("convert", src.parent / "fp8.safetensors", "-o", out)
    assert r.code == 0, r
    back, _ = _tensors(out)
    q8, _ = _tensors(src.parent / "fp8.safetensors")
    assert back[P + LINEAR].dtype == torch.float16  # dequantized: the round trip adds no error
    assert torch.equal(back[P + LINEAR], q8[P + LINEAR].to(torch.float16))


def test_keep_pattern_and_text_encoders(src, tmp_path):
    out = tmp_path / "k.safetensors"
    quantize(
        QuantizeRequest(str(src), str(out), "fp8-e5m2", keep=["ff.net"], text_encoders=True, report=False)
    )
    q, _ = _tensors(out)
    s, _ = _tensors(src)
    assert torch.equal(q[P + LINEAR], s[P + LINEAR])
    assert q[P + CONV].dtype == torch.float8_e5m2
    te = [k for k, v in q.items() if k.startswith("cond_stage_model.") and v.dtype == torch.float8_e5m2]
    assert te and not any("embedding" in k for k in te)
    assert KeepList(("output_blocks.*.proj_out*",)).reason(
        "output_blocks.3.1.proj_out.weight", (8, 8, 1, 1), torch.float16
    )


def test_allocation_keeps_the_most_sensitive_until_the_budget():
    scores = {"a": 0.5, "b": 0.1, "c": 0.3}
    saving = {"a": 100, "b": 50, "c": 60}
    alloc = allocate(scores, saving, 1000, budget=1110, max_error=None)
    assert alloc.kept == ["a"] and alloc.estimated_size == 1100  # c no longer fits, b does not either (1150)
    alloc = allocate(scores, saving, 1000, budget=None, max_error=0.2)
    assert alloc.kept == ["a", "c"] and alloc.estimated_error <= 0.2
    with pytest.raises(SdcError, match="smaller than the file"):
        allocate(scores, saving, 1000, budget=900, max_error=None)


def test_allocation_spends_the_budget_where_it_removes_most_error():
    """One large layer slightly more sensitive than two small ones: keeping the two small ones
    removes more error for the same bytes (errors add as squares)."""
    scores = {"big": 0.5, "s1": 0.4, "s2": 0.4}
    saving = {"big": 100, "s1": 10, "s2": 10}
    alloc = allocate(scores, saving, 1000, budget=1100, max_error=None)
    assert sorted(alloc.kept) == ["s1", "s2"] and alloc.estimated_error == pytest.approx(0.5)


@pytest.mark.slow
def test_budget_keeps_measured_layers_and_lowers_error(src, tmp_path):
    plain = quantize(QuantizeRequest(str(src), str(tmp_path / "p.safetensors"), "fp8", report=False))
    budget = plain.bytes_written + 1_000_000
    r = quantize(
        QuantizeRequest(str(src), str(tmp_path / "b.safetensors"), "fp8", budget=str(budget), fast=True)
    )
    assert (
        r.kept_by_allocation
        and r.bytes_written <= budget + 4096
        and r.quantized_fraction < plain.quantized_fraction
    )
    q, _ = _tensors(tmp_path / "b.safetensors")
    assert all(q[P + n].dtype == torch.float32 for n in r.kept_by_allocation)  # tiny-sd is fp32
    assert r.output_error is not None and 0 < r.output_error.relative < 0.2 and r.output_error.cosine > 0.98
    assert any(x.snr_db is not None and x.snr_db > 20 for x in r.layers)
    assert any(x.sensitivity and x.sensitivity > 0 for x in r.layers)  # the --fast scores, per layer


def _lora(path, sdxl_width=False):
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj"
    width = 2048 if sdxl_width else 32
    t = {f"{name}.lora_down.weight": torch.randn(4, width, generator=g) * 0.5,
         f"{name}.lora_up.weight": torch.randn(256, 4, generator=g) * 0.5, f"{name}.alpha": torch.tensor(4.0)}  # fmt: skip
    if sdxl_width:
        t["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 1280)
        t["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(5120, 4)
    write_safetensors(path, lazy_state_dict(t))
    return path


def test_lora_is_baked_before_the_cast_and_merge_refuses_fp8(src, written, tmp_path):
    lora = _lora(tmp_path / "l.safetensors")
    out = tmp_path / "l8.safetensors"
    r = quantize(QuantizeRequest(str(src), str(out), "fp8", loras=[LoraRef(str(lora), 1.0)], report=False))
    assert any("baked" in n for n in r.notes)
    q, _ = _tensors(out)
    plain, _ = _tensors(src.parent / "fp8.safetensors")
    s, _ = _tensors(src)
    merged = tmp_path / "m.safetensors"
    run_merge(MergeRequest([str(src)], str(merged), loras=[LoraRef(str(lora), 1.0)]))
    m, _ = _tensors(merged)
    want = m[P + LINEAR].float() - s[P + LINEAR].float()
    got = q[P + LINEAR].float() - plain[P + LINEAR].float()
    assert want.norm() > 0 and float((got - want).norm() / want.norm()) < 0.15  # the delta survives
    with pytest.raises(SdcError, match="already quantized.*bake the LoRA"):
        run_merge(MergeRequest([str(src.parent / "fp8.safetensors")], str(tmp_path / "x.safetensors"),
                               loras=[LoraRef(str(lora), 1.0)]))  # fmt: skip
    assert not (tmp_path / "x.safetensors").exists()


def test_bad_input_is_one_sentence_and_writes_nothing(src, tmp_path, cli):
    r = cli("quantize", src, "-o", tmp_path / "a.safetensors", "--format", "fp4")
    assert r.code == 2 and "fp4" in r.stderr
    r = cli("quantize", src, "-o", tmp_path / "a.safetensors", "--format", "fp8", "--budget", "1MB", "--fast")
    assert r.code == 2 and "--budget" in r.stderr and "Traceback" not in r.stderr
    folder = tmp_path / "folder"
    save_single_file(tiny_model("tiny-sd"), tmp_path / "one.safetensors")
    r = cli("convert", tmp_path / "one.safetensors", "-o", folder)
    r = cli("quantize", folder, "-o", folder / "q.safetensors", "--format", "fp8")
    assert r.code == 2 and "inside the input" in r.stderr
    xl = _lora(tmp_path / "xl.safetensors", sdxl_width=True)
    r = cli("quantize", src, "-o", tmp_path / "b.safetensors", "--format", "fp8", "--lora", xl, "--no-report")
    assert r.code == 2 and "SDXL" in r.stderr, r
    r = cli("quantize", src, "-o", tmp_path / "c.gguf", "--format", "fp8")
    assert r.code == 2 and ".safetensors" in r.stderr
    r = cli(
        "quantize", src.parent / "fp8.safetensors", "-o", tmp_path / "d.safetensors", "--format", "fp8-scaled"
    )
    assert r.code == 2 and "already quantized" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "one.safetensors", "xl.safetensors"]
    assert SafetensorsFile(src).keys()  # the input is untouched and readable


@pytest.mark.slow
def test_bench_cast_up_per_layer_equals_the_dequantized_model(src, written):
    from sdcompress.checkpoint.instantiate import build_module
    from sdcompress.prune.importance import predict
    from sdcompress.quantize.cast_up import cast_up_per_layer
    from sdcompress.quantize.report import fixed_inputs, unet_module

    model = load_model(src.parent / "fp8.safetensors")
    lean = build_module(model, "unet", dtype=None)
    assert cast_up_per_layer(lean, torch.float32) > 10
    assert any(p.dtype == torch.float8_e4m3fn for p in lean.parameters())
    inputs = fixed_inputs(model, samples=1, latent=8)
    torch.testing.assert_close(predict(lean, inputs, 1)[0], predict(unet_module(model), inputs, 1)[0])
    assert any(p.dtype == torch.float8_e4m3fn for p in lean.parameters())  # restored after the forward


@pytest.mark.slow
def test_diffusers_from_single_file_loads_plain_fp8(src, written, tmp_path, cli):
    import diffusers

    folder = tmp_path / "folder"
    assert cli("convert", src, "-o", folder).code == 0  # the config folder, offline
    path = src.parent / "fp8.safetensors"
    unet = diffusers.UNet2DConditionModel.from_single_file(
        str(path), config=str(folder), subfolder="unet", local_files_only=True
    )
    ours = load_model(path).components["unet"]
    for k, v in unet.state_dict().items():
        assert torch.equal(v.float(), ours[k].load().float()), k


@pytest.mark.slow
def test_max_error_scores_layers_by_the_unet_output(src, tmp_path):
    others = ["input_blocks", "middle_block", *(f"output_blocks.{i}" for i in range(1, 10))]
    r = quantize(
        QuantizeRequest(
            str(src), str(tmp_path / "e.safetensors"), "fp8", keep=others, max_error=1e-9, report=False
        )
    )
    assert any("U-Net output error" in n for n in r.notes)
    # output_blocks.0 alone is left to score; an error target of 1e-9 keeps all of it
    assert r.kept_by_allocation and all(n.startswith("output_blocks.0.") for n in r.kept_by_allocation)
    q, _ = _tensors(tmp_path / "e.safetensors")
    assert not any(v.dtype == torch.float8_e4m3fn for k, v in q.items() if k.startswith(P))
