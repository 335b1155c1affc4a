"""Text-encoder keys: our mapping against diffusers' own single-file converters and transformers' modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdcompress.checkpoint.keymap.text import (
    clip_from_diffusers,
    clip_to_diffusers,
    infer_text_encoder_config,
    openclip_from_diffusers,
    openclip_to_diffusers,
    to_module_layout,
)
from sdcompress.checkpoint.safetensors_io import read_state_dict, write_safetensors
from sdcompress.checkpoint.tensors import LazyTensor, StateDict, lazy_state_dict

IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "layer_norm_eps": 1e-5}
TINY_CLIP = {
    "architectures": ["CLIPTextModel"],
    "vocab_size": 1000,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 1,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
    **IDS,
}
TINY_BIGG = {
    **TINY_CLIP,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_act": "gelu",
    "projection_dim": 16,
}
CLIP_L = {
    **TINY_CLIP,
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
}
# SD 2's ViT-H as diffusers holds it: 23 of OpenCLIP's 24 layers. (The published config says
# projection_dim 512, which a model without a projection never uses; inference reports hidden_size.)
VIT_H = {
    **CLIP_L,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "projection_dim": 1024,
}
BIGG = {
    **VIT_H,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
}


def _model(config: dict, meta: bool = False) -> torch.nn.Module:
    kwargs = {k: v for k, v in config.items() if k != "architectures"}
    cls = (
        CLIPTextModelWithProjection
        if config["architectures"] == ["CLIPTextModelWithProjection"]
        else CLIPTextModel
    )
    if meta:
        with torch.device("meta"):
            return cls(CLIPTextConfig(**kwargs))
    torch.manual_seed(0)
    model = cls(CLIPTextConfig(**kwargs))
    with torch.no_grad():  # layer norms start at 1/0: randomise every tensor so a swap shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _load(sd: StateDict) -> dict[str, torch.Tensor]:
    return {k: v.load() for k, v in sd.items()}


def _shapes(sd) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _assert_equal(ours: StateDict, theirs: dict[str, torch.Tensor]) -> None:
    assert _shapes(ours) == _shapes(theirs)
    for k, v in ours.items():
        t = v.load()
        if not t.is_meta:
            assert torch.equal(t, theirs[k]), k


def openclip_spec(config: dict, layers: int, projection: bool = True) -> dict[str, tuple[int, ...]]:
    """Names and shapes of an OpenCLIP text tower as open_clip's `CLIP.state_dict()` writes them."""
    w, ff = config["hidden_size"], config["intermediate_size"]
    spec = {"positional_embedding": (config["max_position_embeddings"], w)}
    if projection:
        spec["text_projection"] = (w, config["projection_dim"])
    spec["logit_scale"] = ()
    spec["token_embedding.weight"] = (config["vocab_size"], w)
    for n in range(layers):
        b = f"transformer.resblocks.{n}."
        spec |= {
            b + "ln_1.weight": (w,),
            b + "ln_1.bias": (w,),
            b + "attn.in_proj_weight": (3 * w, w),
            b + "attn.in_proj_bias": (3 * w,),
            b + "attn.out_proj.weight": (w, w),
            b + "attn.out_proj.bias": (w,),
            b + "ln_2.weight": (w,),
            b + "ln_2.bias": (w,),
            b + "mlp.c_fc.weight": (ff, w),
            b + "mlp.c_fc.bias": (ff,),
            b + "mlp.c_proj.weight": (w, ff),
            b + "mlp.c_proj.bias": (w,),
        }
    return spec | {"ln_final.weight": (w,), "ln_final.bias": (w,)}


def _openclip(spec: dict[str, tuple[int, ...]], meta: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if meta:
        return {k: torch.empty(s, device="meta") for k, s in spec.items()}
    return {k: torch.randn(s, generator=gen) for k, s in spec.items()}


# ---------------------------------------------------------------- OpenAI CLIP (HF layout)


@pytest.mark.parametrize("config", [TINY_CLIP, TINY_BIGG, CLIP_L], ids=["tiny", "tiny-projection", "clip-l"])
@pytest.mark.parametrize("prefix", ["cond_stage_model.transformer.", "conditioner.embedders.0.transformer."])
def test_clip_agrees_with_diffusers_and_loads(config: dict, prefix: str) -> None:
    meta = config is CLIP_L
    model = _model(config, meta=meta)
    module_sd = lazy_state_dict(model.state_dict())
    single = clip_from_diffusers(module_sd)
    assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in single)
    checkpoint = {prefix + k: v.load() for k, v in single.items()}
    checkpoint[prefix + "text_model.embeddings.position_ids"] = torch.arange(77.0)[None]  # old files
    reference = convert_ldm_clip_checkpoint(checkpoint)
    reference.pop("text_model.embeddings.position_ids")

    ours = clip_to_diffusers({k.removeprefix(prefix): LazyTensor.of(v) for k, v in checkpoint.items()})
    _assert_equal(ours, reference)
    loadable = to_module_layout(ours, model.state_dict().keys())
    model.load_state_dict(_load(loadable), strict=True)
    if not meta:
        _assert_equal(loadable, model.state_dict())
    assert infer_text_encoder_config(ours, openclip=config["hidden_act"] == "gelu") == config


def test_clip_without_text_model_segment() -> None:
    # transformers >= 5.6 builds CLIPTextModel without `text_model.`; older ones keep it: strip it
    # here so the segment-less layout is tested whichever transformers is installed.
    wrapped = lazy_state_dict(_model(TINY_CLIP).state_dict())
    module_sd = {k.removeprefix("text_model."): v for k, v in wrapped.items()}
    assert not any(k.startswith("text_model.") for k in module_sd)
    old_single = {k: v for k, v in module_sd.items()} | {
        "embeddings.position_ids": LazyTensor.of(torch.zeros(1, 77))
    }
    ours = clip_to_diffusers(old_single)
    assert set(ours) == {"text_model." + k for k in module_sd}
    assert clip_from_diffusers(ours) == ours
    assert to_module_layout(ours, module_sd) == module_sd


@pytest.mark.parametrize(
    "bad",
    [
        {"logit_scale": ()},
        {"text_model.visual.proj": (1,)},
        {"encoder.layers.0.mlp.fc1.weight": (2, 2), "text_model.encoder.layers.0.mlp.fc1.weight": (2, 2)},
    ],
)
def test_clip_rejects_unknown_keys(bad: dict) -> None:
    with pytest.raises(ValueError, match="key"):
        clip_to_diffusers({k: LazyTensor.of(torch.zeros(s)) for k, s in bad.items()})


# ---------------------------------------------------------------- OpenCLIP


def test_openclip_bigg_tiny_round_trip_is_bit_identical(tmp_path: Path) -> None:
    spec = openclip_spec(TINY_BIGG, layers=2)
    path = tmp_path / "te.safetensors"
    write_safetensors(path, lazy_state_dict(_openclip(spec, meta=False)))
    single = read_state_dict(path)

    out, leftovers = openclip_to_diffusers(single)
    assert set(leftovers) == {"logit_scale"}
    assert all(t.raw is not None for k, t in out.items() if k != "text_projection.weight")
    reference = convert_open_clip_checkpoint(
        None,
        {"conditioner.embedders.1.model." + k: v.load() for k, v in single.items()},
        "conditioner.embedders.1.model.",
    )
    _assert_equal(out, reference)

    model = _model(TINY_BIGG)
    model.load_state_dict(_load(to_module_layout(out, model.state_dict().keys())), strict=True)
    assert infer_text_encoder_config(out, openclip=True) == TINY_BIGG

    back, filled = openclip_from_diffusers(out, leftovers, fill_missing=True)
    assert filled == []
    assert set(back) == set(single)
    assert all(torch.equal(back[k].load(), single[k].load()) for k in single)
    assert back["transformer.resblocks.1.attn.in_proj_weight"].raw is not None  # q, k, v ranges kept


def test_openclip_from_module_layout_agrees_with_diffusers() -> None:
    model = _model(TINY_BIGG)
    module_sd = lazy_state_dict(model.state_dict())
    single, filled = openclip_from_diffusers(module_sd, fill_missing=False)
    assert filled == []
    assert _shapes(single) == {
        k: s for k, s in openclip_spec(TINY_BIGG, layers=2).items() if k != "logit_scale"
    }
    reference = convert_open_clip_checkpoint(
        None,
        {"conditioner.embedders.0.model." + k: v.load() for k, v in single.items()},
        "conditioner.embedders.0.model.",
    )
    _assert_equal(module_sd, reference)


def test_openclip_sd2_tiny_leftovers_and_fill() -> None:
    tiny_sd2 = {**TINY_BIGG, "architectures": ["CLIPTextModel"], "projection_dim": 32}
    spec = openclip_spec(tiny_sd2, layers=3)
    single = lazy_state_dict(_openclip(spec, meta=False))
    out, leftovers = openclip_to_diffusers(single, num_layers=2, with_projection=False)
    assert set(leftovers) == {"logit_scale", "text_projection"} | {
        k for k in spec if k.startswith("transformer.resblocks.2.")
    }
    model = _model(tiny_sd2)
    model.load_state_dict(_load(to_module_layout(out, model.state_dict().keys())), strict=True)
    assert infer_text_encoder_config(out, openclip=True) == tiny_sd2

    # diffusers' converter (SD 2 prefix) converts everything but layer 23; ours agrees on all we keep.
    reference = convert_open_clip_checkpoint(
        None, {"cond_stage_model.model." + k: v.load() for k, v in single.items()}, "cond_stage_model.model."
    )
    _assert_equal(out, {k: reference[k] for k in out})

    back, filled = openclip_from_diffusers(out, leftovers, fill_missing=True, num_layers=3)
    assert filled == [] and set(back) == set(single)
    assert all(torch.equal(back[k].load(), single[k].load()) for k in single)

    filled_sd, filled = openclip_from_diffusers(out, fill_missing=True, num_layers=3)
    assert set(filled) == set(leftovers)
    assert _shapes(filled_sd) == spec
    for k in spec:
        if k.startswith("transformer.resblocks.2."):
            twin = k.replace("resblocks.2.", "resblocks.1.")
            assert torch.equal(filled_sd[k].load(), single[twin].load())
    assert torch.equal(filled_sd["text_projection"].load(), torch.eye(32))
    assert filled_sd["logit_scale"].load().item() == pytest.approx(4.6052, abs=1e-4)

    bare, filled = openclip_from_diffusers(out, fill_missing=False, num_layers=3)
    assert filled == [] and set(bare) == set(single) - set(leftovers)


def test_openclip_vit_h_full_size_matches_diffusers() -> None:
    spec = openclip_spec(VIT_H, layers=24, projection=True)
    spec["text_projection"] = (1024, 1024)
    single = lazy_state_dict(_openclip(spec, meta=True))
    out, leftovers = openclip_to_diffusers(single, num_layers=23, with_projection=False)
    assert len(leftovers) == 12 + 2
    reference = convert_open_clip_checkpoint(
        None, {"cond_stage_model.model." + k: v.load() for k, v in single.items()}, "cond_stage_model.model."
    )
    _assert_equal(out, reference)
    model = _model(VIT_H, meta=True)
    model.load_state_dict(_load(to_module_layout(out, model.state_dict().keys())), strict=True)
    assert infer_text_encoder_config(out, openclip=True) == VIT_H

    back, filled = openclip_from_diffusers(out, leftovers, fill_missing=True, num_layers=24)
    assert filled == [] and _shapes(back) == spec
    _, filled = openclip_from_diffusers(out, fill_missing=True, num_layers=24)
    assert len(filled) == 14 and "text_projection" in filled


def test_openclip_bigg_full_size_matches_diffusers() -> None:
    spec = openclip_spec(BIGG, layers=32)
    single = lazy_state_dict(_openclip(spec, meta=True))
    out, leftovers = openclip_to_diffusers(single)
    assert set(leftovers) == {"logit_scale"}
    reference = convert_open_clip_checkpoint(
        None,
        {"conditioner.embedders.1.model." + k: v.load() for k, v in single.items()},
        "conditioner.embedders.1.model.",
    )
    _assert_equal(out, reference)
    model = _model(BIGG, meta=True)
    assert set(out) == set(model.state_dict())
    model.load_state_dict(_load(out), strict=True)
    assert infer_text_encoder_config(out, openclip=True) == BIGG
    back, filled = openclip_from_diffusers(out, leftovers, fill_missing=False)
    assert filled == [] and _shapes(back) == spec


@pytest.mark.parametrize("key", ["visual.proj", "transformer.resblocks.0.attn.qkv.weight", "ln_final.scale"])
def test_openclip_rejects_unknown_keys(key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        openclip_to_diffusers({key: LazyTensor.of(torch.zeros(3, 2))})


def test_openclip_reverse_needs_all_of_q_k_v() -> None:
    sd = {"text_model.encoder.layers.0.self_attn.q_proj.weight": LazyTensor.of(torch.zeros(2, 2))}
    with pytest.raises(ValueError, match="k_proj"):
        openclip_from_diffusers(sd, fill_missing=False)
