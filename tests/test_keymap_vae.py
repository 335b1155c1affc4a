"""VAE keys: our mapping against diffusers' own single-file converter, both directions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from sdcompress.checkpoint.keymap.vae import (
    infer_vae_config,
    normalize_vae_keys,
    vae_from_diffusers,
    vae_key_from_diffusers,
    vae_key_to_diffusers,
    vae_to_diffusers,
)
from sdcompress.checkpoint.safetensors_io import read_state_dict, write_safetensors
from sdcompress.checkpoint.tensors import LazyTensor, StateDict, lazy_state_dict

TINY = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
}
# Topology of the published SD 1/2 and SDXL VAE config.
SD = {
    **TINY,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def _tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY)
    with torch.no_grad():  # norms start at 1/0: randomise them so a swap would show
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return vae


def _meta_vae(config: dict) -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL(**config)


def _reference(single: StateDict, config: dict) -> dict[str, torch.Tensor]:
    """diffusers' own forward converter, fed a full single file as it expects."""
    checkpoint = {f"first_stage_model.{k}": v.load() for k, v in single.items()}
    checkpoint["model.diffusion_model.dummy"] = torch.zeros(1)  # other components are ignored
    return convert_ldm_vae_checkpoint(checkpoint, config)


@pytest.mark.parametrize("config", [TINY, SD], ids=["tiny", "sd"])
def test_round_trip_and_agreement_with_diffusers(config: dict) -> None:
    vae = _tiny_vae() if config is TINY else _meta_vae(config)
    diffusers_sd = lazy_state_dict(vae.state_dict())
    single = vae_from_diffusers(diffusers_sd)
    assert all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in single)
    assert single["encoder.mid.attn_1.q.weight"].shape[2:] == (1, 1)
    assert single["decoder.mid.attn_1.proj_out.weight"].shape[2:] == (1, 1)

    back = vae_to_diffusers(single)
    assert list(back) == list(diffusers_sd)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in diffusers_sd.items()}

    reference = _reference(single, config)
    assert set(reference) == set(back)
    assert {k: tuple(v.shape) for k, v in reference.items()} == {k: v.shape for k, v in back.items()}
    vae.load_state_dict({k: v.load() for k, v in back.items()}, strict=True)
    if config is TINY:
        for k, v in back.items():
            assert torch.equal(v.load(), diffusers_sd[k].load()), k
            assert torch.equal(v.load(), reference[k]), k


def test_decoder_levels_are_reversed() -> None:
    single = vae_from_diffusers(lazy_state_dict(_meta_vae(SD).state_dict()))
    assert "decoder.up.3.upsample.conv.weight" in single  # diffusers up_blocks.0
    assert "decoder.up.0.upsample.conv.weight" not in single  # the last level does not upsample
    assert single["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert (
        vae_key_to_diffusers("decoder.up.3.block.2.conv1.weight", 4)
        == "decoder.up_blocks.0.resnets.2.conv1.weight"
    )
    assert (
        vae_key_to_diffusers("decoder.up.1.upsample.conv.bias", 2)
        == "decoder.up_blocks.0.upsamplers.0.conv.bias"
    )
    assert vae_key_from_diffusers("encoder.mid_block.attentions.0.to_out.0.weight", 4) == (
        "encoder.mid.attn_1.proj_out.weight"
    )


def test_tiny_vae_decodes_identically_after_round_trip() -> None:
    vae = _tiny_vae().eval()
    sd = vae_to_diffusers(vae_from_diffusers(lazy_state_dict(vae.state_dict())))
    copy = AutoencoderKL(**TINY).eval()
    copy.load_state_dict({k: v.load() for k, v in sd.items()}, strict=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(vae.decode(latents).sample, copy.decode(latents).sample)


def test_byte_ranges_survive_mapping(tmp_path: Path) -> None:
    path = tmp_path / "vae.safetensors"
    write_safetensors(path, lazy_state_dict(_tiny_vae().state_dict()))
    single = vae_from_diffusers(read_state_dict(path))
    assert all(t.raw is not None for t in single.values())
    out = tmp_path / "single.safetensors"
    write_safetensors(out, single)
    back = vae_to_diffusers(read_state_dict(out))
    assert all(t.raw is not None for t in back.values())
    original = read_state_dict(path)
    assert all(torch.equal(back[k].load(), original[k].load()) for k in original)


def test_legacy_diffusers_attention_names() -> None:
    w = LazyTensor.of(torch.zeros(64, 64))
    legacy = {
        "decoder.mid_block.attentions.0.query.weight": w,
        "decoder.mid_block.attentions.0.proj_attn.weight": w,
    }
    single = vae_from_diffusers(legacy)
    assert set(single) == {"decoder.mid.attn_1.q.weight", "decoder.mid.attn_1.proj_out.weight"}
    assert single["decoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    modern = normalize_vae_keys(legacy | {"decoder.conv_in.weight": w})
    assert list(modern) == [
        "decoder.mid_block.attentions.0.to_q.weight",
        "decoder.mid_block.attentions.0.to_out.0.weight",
        "decoder.conv_in.weight",
    ]


@pytest.mark.parametrize(
    "key",
    ["loss.logvar", "encoder.down.0.block.0.norm3.weight", "decoder.mid.attn_1.qkv.weight", "encoder.foo"],
)
def test_unknown_keys_are_named(key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        vae_to_diffusers({key: LazyTensor.of(torch.zeros(1))})


@pytest.mark.parametrize("config", [TINY, SD], ids=["tiny", "sd"])
def test_infer_config(config: dict) -> None:
    sd = lazy_state_dict(_meta_vae(config).state_dict())
    assert infer_vae_config(sd) == config
    rebuilt = _meta_vae(infer_vae_config(sd))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in sd.items()}


def test_infer_config_without_mid_attention_or_quant_convs() -> None:
    config = {**TINY, "mid_block_add_attention": False, "use_quant_conv": False, "use_post_quant_conv": False}
    sd = lazy_state_dict(_meta_vae(config).state_dict())
    assert infer_vae_config(sd) == config
    assert vae_to_diffusers(vae_from_diffusers(sd)).keys() == sd.keys()
