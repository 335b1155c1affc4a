"""VAE key mapping between the single file (LDM, without `first_stage_model.`) and diffusers.

One rule per kind of key, whatever the number of levels: the number of
decoder levels is read from the keys, because the decoder's level numbering
is reversed between the formats (`decoder.up.(L-1-i)` is `up_blocks.i`).
diffusers' own converter reads the level count from a config and knows only
the forward direction; here both directions are the same small rule, so a
2-level tiny VAE and the 4-level SD VAE go through the same code.

The mid-block attention projections are 1x1 convolutions in the single file
([C, C, 1, 1]) and linear layers in diffusers ([C, C]); they are reshaped
lazily, which keeps their byte ranges.
"""

from __future__ import annotations

import re

from sdcompress.checkpoint.tensors import StateDict

_RESNET_LEAVES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2"}
_SINGLE_RESNET = {**_RESNET_LEAVES, "nin_shortcut": "conv_shortcut"}
_DIFFUSERS_RESNET = {v: k for k, v in _SINGLE_RESNET.items()}

_SINGLE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_DIFFUSERS_ATTN = {v: k for k, v in _SINGLE_ATTN.items()}
# Names of diffusers' pre-0.14 attention block, still found in old VAE folders.
_DIFFUSERS_ATTN.update({"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"})
_ATTN_PROJECTIONS = {"q", "k", "v", "proj_out"}

_TOP_LEVEL = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.norm_out": "encoder.conv_norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.norm_out": "decoder.conv_norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
_TOP_LEVEL_BACK = {v: k for k, v in _TOP_LEVEL.items()}

_PARAM = r"(?P<param>weight|bias)"
_S_TOP = re.compile(rf"(?P<module>.+)\.{_PARAM}")
_S_DOWN_RES = re.compile(rf"encoder\.down\.(?P<i>\d+)\.block\.(?P<j>\d+)\.(?P<leaf>\w+)\.{_PARAM}")
_S_DOWN_SAMPLE = re.compile(rf"encoder\.down\.(?P<i>\d+)\.downsample\.conv\.{_PARAM}")
_S_UP_RES = re.compile(rf"decoder\.up\.(?P<i>\d+)\.block\.(?P<j>\d+)\.(?P<leaf>\w+)\.{_PARAM}")
_S_UP_SAMPLE = re.compile(rf"decoder\.up\.(?P<i>\d+)\.upsample\.conv\.{_PARAM}")
_S_MID_RES = re.compile(rf"(?P<part>encoder|decoder)\.mid\.block_(?P<k>[12])\.(?P<leaf>\w+)\.{_PARAM}")
_S_MID_ATTN = re.compile(rf"(?P<part>encoder|decoder)\.mid\.attn_1\.(?P<leaf>\w+)\.{_PARAM}")

_D_DOWN_RES = re.compile(rf"encoder\.down_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.(?P<leaf>\w+)\.{_PARAM}")
_D_DOWN_SAMPLE = re.compile(rf"encoder\.down_blocks\.(?P<i>\d+)\.downsamplers\.0\.conv\.{_PARAM}")
_D_UP_RES = re.compile(rf"decoder\.up_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.(?P<leaf>\w+)\.{_PARAM}")
_D_UP_SAMPLE = re.compile(rf"decoder\.up_blocks\.(?P<i>\d+)\.upsamplers\.0\.conv\.{_PARAM}")
_D_MID_RES = re.compile(
    rf"(?P<part>encoder|decoder)\.mid_block\.resnets\.(?P<k>[01])\.(?P<leaf>\w+)\.{_PARAM}"
)
_D_MID_ATTN = re.compile(
    rf"(?P<part>encoder|decoder)\.mid_block\.attentions\.0\.(?P<leaf>to_out\.0|\w+)\.{_PARAM}"
)


def _levels(keys: list[str], pattern: str) -> int:
    """Number of decoder levels: one more than the highest level index among the keys."""
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _leaf(table: dict[str, str], leaf: str, key: str) -> str:
    if leaf not in table:
        raise ValueError(f"unknown VAE key {key!r}")
    return table[leaf]


def vae_key_to_diffusers(key: str, levels: int) -> str:
    """Diffusers name of one single-file VAE key; `levels` is the number of decoder levels."""
    if m := _S_DOWN_RES.fullmatch(key):
        leaf = _leaf(_SINGLE_RESNET, m["leaf"], key)
        return f"encoder.down_blocks.{m['i']}.resnets.{m['j']}.{leaf}.{m['param']}"
    if m := _S_DOWN_SAMPLE.fullmatch(key):
        return f"encoder.down_blocks.{m['i']}.downsamplers.0.conv.{m['param']}"
    if m := _S_UP_RES.fullmatch(key):
        leaf = _leaf(_SINGLE_RESNET, m["leaf"], key)
        return f"decoder.up_blocks.{levels - 1 - int(m['i'])}.resnets.{m['j']}.{leaf}.{m['param']}"
    if m := _S_UP_SAMPLE.fullmatch(key):
        return f"decoder.up_blocks.{levels - 1 - int(m['i'])}.upsamplers.0.conv.{m['param']}"
    if m := _S_MID_RES.fullmatch(key):
        leaf = _leaf(_SINGLE_RESNET, m["leaf"], key)
        return f"{m['part']}.mid_block.resnets.{int(m['k']) - 1}.{leaf}.{m['param']}"
    if m := _S_MID_ATTN.fullmatch(key):
        leaf = _leaf(_SINGLE_ATTN, m["leaf"], key)
        return f"{m['part']}.mid_block.attentions.0.{leaf}.{m['param']}"
    if (m := _S_TOP.fullmatch(key)) and m["module"] in _TOP_LEVEL:
        return f"{_TOP_LEVEL[m['module']]}.{m['param']}"
    raise ValueError(f"unknown VAE key {key!r}")


def vae_key_from_diffusers(key: str, levels: int) -> str:
    """Single-file name of one diffusers VAE key; `levels` is the number of decoder levels."""
    if m := _D_DOWN_RES.fullmatch(key):
        leaf = _leaf(_DIFFUSERS_RESNET, m["leaf"], key)
        return f"encoder.down.{m['i']}.block.{m['j']}.{leaf}.{m['param']}"
    if m := _D_DOWN_SAMPLE.fullmatch(key):
        return f"encoder.down.{m['i']}.downsample.conv.{m['param']}"
    if m := _D_UP_RES.fullmatch(key):
        leaf = _leaf(_DIFFUSERS_RESNET, m["leaf"], key)
        return f"decoder.up.{levels - 1 - int(m['i'])}.block.{m['j']}.{leaf}.{m['param']}"
    if m := _D_UP_SAMPLE.fullmatch(key):
        return f"decoder.up.{levels - 1 - int(m['i'])}.upsample.conv.{m['param']}"
    if m := _D_MID_RES.fullmatch(key):
        leaf = _leaf(_DIFFUSERS_RESNET, m["leaf"], key)
        return f"{m['part']}.mid.block_{int(m['k']) + 1}.{leaf}.{m['param']}"
    if m := _D_MID_ATTN.fullmatch(key):
        leaf = _leaf(_DIFFUSERS_ATTN, m["leaf"], key)
        return f"{m['part']}.mid.attn_1.{leaf}.{m['param']}"
    if (m := _S_TOP.fullmatch(key)) and m["module"] in _TOP_LEVEL_BACK:
        return f"{_TOP_LEVEL_BACK[m['module']]}.{m['param']}"
    raise ValueError(f"unknown VAE key {key!r}")


def _is_attn_projection_weight(single_key: str) -> bool:
    parts = single_key.split(".")
    return len(parts) == 5 and parts[2] == "attn_1" and parts[3] in _ATTN_PROJECTIONS and parts[4] == "weight"


def vae_to_diffusers(sd: StateDict) -> StateDict:
    """Single-file VAE keys (no `first_stage_model.` prefix) -> diffusers `AutoencoderKL` keys.

    Raises ValueError naming the first key that is not part of an LDM VAE; the caller decides
    whether that is an error or an extra to keep aside.
    """
    keys = list(sd)
    levels = _levels(keys, r"decoder\.up\.(\d+)\.")
    out: StateDict = {}
    for key, tensor in sd.items():
        new = vae_key_to_diffusers(key, levels)
        if _is_attn_projection_weight(key) and len(tensor.shape) > 2:
            tensor = tensor.reshaped(tensor.shape[:2])
        out[new] = tensor
    return out


def vae_from_diffusers(sd: StateDict) -> StateDict:
    """Diffusers `AutoencoderKL` keys -> single-file VAE keys (no prefix); the exact inverse.

    Old diffusers attention names (`query`, `key`, `value`, `proj_attn`) are accepted too.
    """
    keys = list(sd)
    levels = _levels(keys, r"decoder\.up_blocks\.(\d+)\.")
    out: StateDict = {}
    for key, tensor in sd.items():
        new = vae_key_from_diffusers(key, levels)
        if new in out:
            raise ValueError(f"VAE key {key!r} duplicates another name for {new!r}")
        if _is_attn_projection_weight(new) and len(tensor.shape) == 2:
            tensor = tensor.reshaped((*tensor.shape, 1, 1))
        out[new] = tensor
    return out


_LEGACY = re.compile(
    r"(?P<head>(?:encoder|decoder)\.mid_block\.attentions\.0\.)(?P<leaf>query|key|value|proj_attn)\."
)
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def normalize_vae_keys(sd: StateDict) -> StateDict:
    """Rename diffusers' pre-0.14 attention names (`query`, `key`, `value`, `proj_attn`) to today's.

    Old VAE folders (e.g. early SD 1.x snapshots) still hold them; diffusers renames them when it
    loads, a plain `load_state_dict` does not. Shapes are the same ([C, C]) in both spellings.
    """
    return {
        _LEGACY.sub(lambda m: f"{m['head']}{_LEGACY_NAMES[m['leaf']]}.", key, count=1): tensor
        for key, tensor in sd.items()
    }


def _count(keys: list[str], pattern: str) -> int:
    return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def _shape(sd: StateDict, key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"VAE state dict has no {key!r}")
    return sd[key].shape


def infer_vae_config(sd: StateDict) -> dict:
    """`AutoencoderKL` config fields read from diffusers keys and shapes.

    Covers the topology (channels, levels, resnets per level). `norm_num_groups` and `act_fn`
    cannot be seen in shapes and take the SD values (32, "silu"). Family fields (scaling_factor,
    sample_size, force_upcast) are the caller's. `mid_block_add_attention`, `use_quant_conv` and
    `use_post_quant_conv` appear only when False, so an SD VAE gives exactly the published
    config's topology fields.
    """
    keys = list(sd)
    levels = _count(keys, r"encoder\.down_blocks\.(\d+)\.")
    if levels == 0:
        raise ValueError("VAE state dict has no encoder.down_blocks")
    block_out = [_shape(sd, f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels)]
    config: dict = {
        "in_channels": _shape(sd, "encoder.conv_in.weight")[1],
        "out_channels": _shape(sd, "decoder.conv_out.weight")[0],
        "latent_channels": _shape(sd, "decoder.conv_in.weight")[1],
        "block_out_channels": block_out,
        "layers_per_block": _count(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "norm_num_groups": 32,
        "act_fn": "silu",
    }
    if not any(".mid_block.attentions." in k for k in keys):
        config["mid_block_add_attention"] = False
    if "quant_conv.weight" not in sd:
        config["use_quant_conv"] = False
    if "post_quant_conv.weight" not in sd:
        config["use_post_quant_conv"] = False
    return config
