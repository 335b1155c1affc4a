"""What a U-Net is, read off its key set and tensor shapes.

Never from one sentinel key: levels, resnets per level, the depth of every
attention stack and the mid-block kind come from the key structure
(`keymap.unet.layout_from_*`), widths and projection kind from shapes. The
few facts shapes cannot tell (head counts, sample size) follow the family's
rule, so the config of any pruned student is recovered exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdcompress.arch.families import FAMILIES, Config, Family
from sdcompress.arch.layout import UNetLayout, config_from_layout
from sdcompress.arch.shapes import Shaped
from sdcompress.errors import SdcError


def _first(sd: Mapping[str, Shaped], suffix: str) -> Shaped | None:
    for k, v in sd.items():
        if k.endswith(suffix):
            return v
    return None


def unet_features(sd: Mapping[str, Shaped], layout: UNetLayout) -> dict[str, Any]:
    """The shape-visible facts of a diffusers-named U-Net state dict."""
    try:
        channels = [sd[f"down_blocks.{x}.resnets.0.conv1.weight"].shape[0] for x in range(layout.levels)]
        conv_in = sd["conv_in.weight"].shape
        conv_out = sd["conv_out.weight"].shape
    except KeyError as e:
        raise SdcError(f"the U-Net weights are incomplete: {e.args[0]} is missing.") from None
    to_k = _first(sd, "attn2.to_k.weight")
    proj_in = _first(sd, "proj_in.weight")
    add = sd.get("add_embedding.linear_1.weight")
    return {
        "block_out_channels": channels,
        "in_channels": conv_in[1],
        "out_channels": conv_out[0],
        "cross_attention_dim": to_k.shape[1] if to_k is not None else None,
        "use_linear_projection": proj_in is not None and len(proj_in.shape) == 2,
        "projection_class_embeddings_input_dim": add.shape[1] if add is not None else None,
    }


def _family_matches(family: Family, feats: dict[str, Any], *, widths: bool = True) -> bool:
    u = family.unet
    return (
        (not widths or u["block_out_channels"][0] == feats["block_out_channels"][0])
        and u["cross_attention_dim"] == feats["cross_attention_dim"]
        and u["use_linear_projection"] == feats["use_linear_projection"]
        and u.get("projection_class_embeddings_input_dim") == feats["projection_class_embeddings_input_dim"]
    )


def detect_family(feats: dict[str, Any], *, v_prediction: bool | None = None) -> Family:
    """The family whose conditioning (cross-attention width, projection kind, added embeddings) matches.

    U-Net widths break ties (a student may be narrower than its teacher, so
    they are preferred, not required). SD 2 at 512 (epsilon) and 768-v share
    every shape; the v-prediction marker (or a folder's scheduler) decides.
    """
    matches = [f for f in FAMILIES.values() if _family_matches(f, feats)]
    if not matches:
        matches = [f for f in FAMILIES.values() if _family_matches(f, feats, widths=False)]
    if not matches:
        raise SdcError(
            "this checkpoint matches no known family (SD 1.x, SD 2.x, SDXL, SDXL refiner): "
            f"U-Net width {feats['block_out_channels'][0]}, cross-attention width {feats['cross_attention_dim']}."
        )
    if len(matches) > 1:
        want = "sd2-v" if v_prediction else "sd2"
        matches = [f for f in matches if f.name == want] or matches[:1]
    return matches[0]


def _heads(family: Family, channels: list[int], linear: bool) -> Any:
    if not linear:  # SD 1.x names the head count "attention_head_dim": 8 heads at every level
        return family.unet["attention_head_dim"]
    return [max(1, c // 64) for c in channels]


def infer_unet_config(
    sd: Mapping[str, Shaped], layout: UNetLayout, *, v_prediction: bool | None = None
) -> tuple[Config, Family]:
    """A diffusers config for this U-Net (in the canonical spelling) and its family."""
    feats = unet_features(sd, layout)
    family = detect_family(feats, v_prediction=v_prediction)
    base = dict(family.unet)
    base.update(
        in_channels=feats["in_channels"],
        out_channels=feats["out_channels"],
        attention_head_dim=_heads(family, feats["block_out_channels"], feats["use_linear_projection"]),
    )
    cfg = config_from_layout(base, layout, channels=feats["block_out_channels"])
    return cfg, family


def structural_view(cfg: Config) -> dict[str, Any]:
    """A config reduced to what defines the module, for comparing two spellings of one U-Net."""
    from sdcompress.arch.layout import layout_from_config

    n = len(cfg["block_out_channels"])
    heads = cfg.get("attention_head_dim", 8)
    return {
        "layout": layout_from_config(cfg),
        "block_out_channels": list(cfg["block_out_channels"]),
        "attention_head_dim": [heads] * n if isinstance(heads, int) else list(heads),
        **{
            k: cfg.get(k)
            for k in (
                "in_channels",
                "out_channels",
                "cross_attention_dim",
                "use_linear_projection",
                "addition_embed_type",
                "addition_time_embed_dim",
                "projection_class_embeddings_input_dim",
                "norm_num_groups",
                "sample_size",
                "upcast_attention",
            )
        },
    }
