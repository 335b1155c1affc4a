"""The LoRA writer against the loaders' own rules, without building a pipeline (fast lane).

- diffusers: `lora_state_dict` + `convert_state_dict_to_diffusers` are the
  steps `load_lora_weights` runs on a text encoder; before the out_proj anchor
  they dropped q/k/v (with an MLP module) or raised (without one).
- A1111 (extensions-builtin/Lora/network.py, `NetworkOnDisk.detect_version`):
  `ss_base_model_version` starting with "sdxl_" is SDXL, `ss_v2 == "True"`
  SD 2, any other metadata SD 1; a LoRA whose version differs from the loaded
  model's is hidden.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import offline_weight_name

from sdcompress.arch.families import get_family
from sdcompress.checkpoint.safetensors_io import SafetensorsFile
from sdcompress.errors import SdcError
from sdcompress.lowrank.layouts import (
    LoraModule,
    derived_metadata,
    kohya_metadata,
    one_alpha,
    parse_formats,
    read_lora,
    write_lora,
)
from sdcompress.lowrank.targets import Naming, Target


def _a1111_version(meta: dict[str, str]) -> str:
    if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(meta.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if meta else "Unknown"


def _naming(layers: int = 2, width: int = 8) -> Naming:
    te = [
        f"text_model.encoder.layers.{i}.{p}.weight"
        for i in range(layers)
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1")
    ]
    return Naming({"text_encoder": te}, sdxl=False)


def _module(path: str, rank: int, alpha: float, seed: int, width: int = 8) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(
        Target("text_encoder", path),
        torch.randn(width, rank, generator=g),
        torch.randn(rank, width, generator=g),
        alpha,
    )


@pytest.mark.parametrize("with_mlp", [True, False])
def test_diffusers_places_text_encoder_attention_without_an_out_proj_module(tmp_path, with_mlp):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    mods = [_module("text_model.encoder.layers.0.self_attn.q_proj", 2, 2.0, 0)]
    if with_mlp:
        mods.append(_module("text_model.encoder.layers.1.mlp.fc1", 2, 2.0, 1))
    out = tmp_path / "te.safetensors"
    write_lora(out, mods, _naming(), fmt="kohya", dtype=torch.float32)
    sd, _alphas = StableDiffusionPipeline.lora_state_dict(str(out), **offline_weight_name(out))
    te = {k.removeprefix("text_encoder."): v for k, v in sd.items() if k.startswith("text_encoder.")}
    peft = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te))  # what load_lora_weights does
    assert "text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in peft
    assert all(".lora_A." in k or ".lora_B." in k for k in peft)
    # the anchor is a zero update: sdcompress (and every loader) sees no change from it
    lora = read_lora(out)
    anchor = lora.adapters["lora_te_text_model_encoder_layers_0_self_attn_out_proj"]
    assert torch.count_nonzero(anchor.delta((8, 8))) == 0


def test_one_alpha_keeps_every_update_and_metadata_says_dynamic(tmp_path):
    mods = [
        _module("text_model.encoder.layers.0.self_attn.q_proj", 2, 2.0, 0),
        _module("text_model.encoder.layers.0.self_attn.k_proj", 2, 2.0, 1),
        _module("text_model.encoder.layers.0.self_attn.out_proj", 3, 3.0, 2),
    ]
    assert {m.alpha for m in one_alpha(mods)} == {2.0}
    out = tmp_path / "dyn.safetensors"
    write_lora(out, mods, _naming(), fmt="kohya", dtype=torch.float32, metadata={"ss_network_dim": "4"})
    lora = read_lora(out)
    assert {a.alpha for a in lora.adapters.values()} == {2.0}
    for m in mods:
        a = lora.adapters["lora_te_" + m.target.path.replace(".", "_")]
        torch.testing.assert_close(a.delta((8, 8)), m.up @ m.down * (m.alpha / m.rank))
    meta = SafetensorsFile(out).metadata
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "2"


def test_conv_alpha_in_metadata_is_the_alpha_the_conv_modules_carry(tmp_path):
    """lora train --rank 4 --alpha 2 --targets all: conv_alpha is 2 (it said 4)."""
    fam = get_family("sd1")
    meta = kohya_metadata(
        family=fam,
        title="t",
        rank=4,
        conv_rank=4,
        alpha=2,
        conv_alpha=2,
        prediction_type="epsilon",
        resolution=512,
    )
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2"}
    naming = Naming({"unet": ["down_blocks.0.resnets.0.conv1.weight", "x.proj.weight"]}, sdxl=False)
    g = torch.Generator().manual_seed(0)
    conv = LoraModule(
        Target("unet", "down_blocks.0.resnets.0.conv1"),
        torch.randn(8, 4, 1, 1, generator=g),
        torch.randn(4, 8, 3, 3, generator=g),
        2.0,
    )
    lin = LoraModule(
        Target("unet", "x.proj"), torch.randn(8, 4, generator=g), torch.randn(4, 8, generator=g), 2.0
    )
    out = tmp_path / "conv.safetensors"
    write_lora(
        out, [conv, lin], naming, fmt="kohya", dtype=torch.float32, metadata={**meta, "ss_network_args": "{}"}
    )
    written = SafetensorsFile(out).metadata
    assert json.loads(written["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2"}
    assert written["ss_network_dim"] == "4" and written["ss_network_alpha"] == "2"


def test_derived_metadata_keeps_the_family_and_fills_it_when_missing():
    sdxl = kohya_metadata(
        family=get_family("sdxl"),
        title="a",
        rank=8,
        conv_rank=None,
        alpha=8,
        prediction_type="epsilon",
        resolution=1024,
    )
    kept = derived_metadata(
        [sdxl | {"sshs_model_hash": "x", "ss_output_name": "a"}], title="b", family=get_family("sd1")
    )
    assert _a1111_version(kept) == "SDXL" and kept["modelspec.architecture"].startswith("stable-diffusion-xl")
    assert kept["modelspec.title"] == "b" and "sshs_model_hash" not in kept and kept["ss_output_name"] == "a"
    filled = derived_metadata([{"lora_adapter_metadata": "{}"}], title="c", family=get_family("sdxl"))
    assert _a1111_version(filled) == "SDXL" and filled["ss_network_module"] == "networks.lora"
    # several sources: what they all say is kept
    sd1 = kohya_metadata(
        family=get_family("sd1"),
        title="d",
        rank=8,
        conv_rank=None,
        alpha=8,
        prediction_type="epsilon",
        resolution=512,
    )
    both = derived_metadata(
        [sd1 | {"ss_seed": "1"}, sd1 | {"ss_seed": "2"}], title="e", family=get_family("sd1")
    )
    assert _a1111_version(both) == "SD1" and "ss_seed" not in both


def test_parse_formats():
    assert parse_formats("kohya") == ("kohya",)
    assert parse_formats("peft,kohya") == parse_formats("both") == ("kohya", "peft")
    with pytest.raises(SdcError, match="--format"):
        parse_formats("kohya,lycoris")


def test_extract_lora_writes_both_layouts_with_the_same_update(cli, tmp_path):
    from _lowrank_fixtures import write_pair

    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.services.merge import bake_loras

    bp, tp, base, _ = write_pair(tmp_path, "tiny-sd", text=False)
    out = tmp_path / "l.safetensors"
    r = cli("extract-lora", bp, tp, "-o", out, "--rank", "2", "--format", "kohya,peft", "--dtype", "fp32")
    assert r.code == 0, r
    peft = tmp_path / "l.peft.safetensors"
    assert read_lora(out).layout == "kohya" and read_lora(peft).layout == "peft"
    model = load_model(bp)
    a, _ = bake_loras(model, [(read_lora(out), 1.0)])
    b, _ = bake_loras(model, [(read_lora(peft), 1.0)])
    for key, lt in a.components["unet"].items():
        torch.testing.assert_close(lt.load(), b.components["unet"][key].load())
    assert cli("extract-lora", bp, tp, "-o", tmp_path / "m.safetensors", "--format", "kohya,x").code == 2


def _sdxl_lora(path, seed: int, rank: int) -> None:
    """A small kohya LoRA with SGM names for SDXL attention modules and the family metadata a trainer writes."""
    from sdcompress.checkpoint.tiny import tiny_model

    model = tiny_model("tiny-sdxl")
    naming = Naming({c: list(sd) for c, sd in model.components.items()}, sdxl=True)
    g = torch.Generator().manual_seed(seed)
    mods = []
    for component, key, lt in [
        (c, k, t) for c in ("unet", "text_encoder_2") for k, t in model.components[c].items()
    ]:
        if key.endswith(("attn1.to_q.weight", "attn2.to_v.weight", "mlp.fc1.weight")):
            out_dim, in_dim = lt.shape
            mods.append(
                LoraModule(
                    Target(component, key.removesuffix(".weight")),
                    torch.randn(out_dim, rank, generator=g),
                    torch.randn(rank, in_dim, generator=g),
                    float(rank),
                )
            )
    meta = kohya_metadata(
        family=get_family("sdxl"), title="x", rank=rank, conv_rank=None, alpha=rank, prediction_type="epsilon",
        resolution=1024,
    )  # fmt: skip
    write_lora(path, mods, naming, fmt="kohya", dtype=torch.float16, metadata=meta)


def test_merged_resized_and_converted_sdxl_loras_stay_sdxl_for_a1111(tmp_path):
    from sdcompress.services.lora_convert import convert_lora
    from sdcompress.services.merge import LoraRef, MergeRequest, run_merge

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _sdxl_lora(a, 0, 4)
    _sdxl_lora(b, 1, 2)
    outputs = {
        "merged": MergeRequest(models=[], output=str(tmp_path / "m.safetensors"), loras=[LoraRef(str(a), 1.0), LoraRef(str(b), 0.5)]),
        "resized": MergeRequest(models=[], output=str(tmp_path / "r.safetensors"), loras=[LoraRef(str(a), 1.0)], rank=2),
    }  # fmt: skip
    for what, request in outputs.items():
        run_merge(request)
        meta = SafetensorsFile(request.output).metadata
        assert _a1111_version(meta) == "SDXL", what
        assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora", what
    resized = SafetensorsFile(tmp_path / "r.safetensors").metadata
    assert resized["ss_network_dim"] == "2" and resized["ss_network_alpha"] == "2"
    merged = SafetensorsFile(tmp_path / "m.safetensors").metadata
    assert merged["ss_network_dim"] == "6"  # ranks 4 + 2 concatenated
    # kohya -> PEFT (no family keys survive in a PEFT file from elsewhere) -> kohya
    convert_lora(a, tmp_path / "p.safetensors", "peft")
    peft = tmp_path / "p.safetensors"
    bare = tmp_path / "bare.safetensors"
    from safetensors.torch import load_file, save_file

    save_file(load_file(peft), bare, metadata={"format": "pt"})  # a PEFT file as diffusers' trainers write it
    convert_lora(bare, tmp_path / "k.safetensors", "kohya")
    meta = SafetensorsFile(tmp_path / "k.safetensors").metadata
    assert _a1111_version(meta) == "SDXL" and meta["modelspec.architecture"].startswith("stable-diffusion-xl")
