"""VAE key mapping between the single file (LDM, without `first_stage_model.`) and diffusers.

One table, used both ways as the U-Net's is (`keymap.unet`): `module_table`
lists every diffusers module path with its single-file path and its kind,
and each kind renames its few leaves (`conv_shortcut` <-> `nin_shortcut`,
`to_q` <-> `q`...). The table is built from the number of levels, read from
the keys, because the decoder's level numbering is reversed between the
formats (`decoder.up.(L-1-i)` is `up_blocks.i`). diffusers' own converter
reads the level count from a config and knows only the forward direction;
here a 2-level tiny VAE and the 4-level SD VAE go through the same table.

The mid-block attention projections are 1x1 convolutions in the single file
([C, C, 1, 1]) and linear layers in diffusers ([C, C]); they are reshaped
lazily, which keeps their byte ranges.
"""

from __future__ import annotations

import re

from sdcompress.checkpoint.tensors import StateDict

# diffusers leaf -> single-file leaf, per kind of module
_LEAVES = {
    "resnet": {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"},
    "attention": {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"},
}  # fmt: skip
_LEAVES_BACK = {kind: {v: k for k, v in leaves.items()} for kind, leaves in _LEAVES.items()}
_ATTN_PROJECTIONS = {"q", "k", "v", "proj_out"}
_PARAMS = ("weight", "bias")

# diffusers module -> single-file module, for modules that are not inside a level
_FIXED = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}


def module_table(levels: int) -> dict[str, tuple[str, str]]:
    """diffusers module path -> (single-file module path, kind) for a VAE with `levels` levels.

    Kinds: `resnets` (a level's resnet list: the rest starts with the index),
    `resnet`, `attention` (leaves renamed), `plain` (a conv or norm). The
    decoder's levels run the other way in the single file.
    """
    table: dict[str, tuple[str, str]] = {d: (s, "plain") for d, s in _FIXED.items()}
    for i in range(levels):
        table[f"encoder.down_blocks.{i}.resnets"] = (f"encoder.down.{i}.block", "resnets")
        table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", "plain")
        r = levels - 1 - i
        table[f"decoder.up_blocks.{i}.resnets"] = (f"decoder.up.{r}.block", "resnets")
        table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{r}.upsample.conv", "plain")
    for part in ("encoder", "decoder"):
        table[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", "resnet")
        table[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", "resnet")
        table[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", "attention")
    return table


def _levels(keys: list[str], pattern: str) -> int:
    """Number of decoder levels: one more than the highest level index among the keys."""
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _split(key: str, table: dict[str, tuple[str, str]]) -> tuple[str, str]:
    """(module, rest) for the longest module path of `table` that `key` starts with."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:n])
        if module in table:
            return module, ".".join(parts[n:])
    raise ValueError(f"unknown VAE key {key!r}")


def _rename_rest(rest: str, kind: str, leaves: dict[str, dict[str, str]], key: str) -> str:
    """The part of a key after its module, in the other format; anything unexpected names the key."""
    index = ""
    if kind == "resnets":
        head, _, rest = rest.partition(".")
        if not head.isdigit():
            raise ValueError(f"unknown VAE key {key!r}")
        index, kind = head + ".", "resnet"
    leaf, _, param = rest.rpartition(".")
    if param not in _PARAMS:
        raise ValueError(f"unknown VAE key {key!r}")
    if kind == "plain":
        if leaf:
            raise ValueError(f"unknown VAE key {key!r}")
        return param
    if leaf not in leaves[kind]:
        raise ValueError(f"unknown VAE key {key!r}")
    return f"{index}{leaves[kind][leaf]}.{param}"


def _rename(key: str, table: dict[str, tuple[str, str]], leaves: dict[str, dict[str, str]]) -> str:
    module, rest = _split(key, table)
    target, kind = table[module]
    return f"{target}.{_rename_rest(rest, kind, leaves, key)}"


def _single_file_table(levels: int) -> dict[str, tuple[str, str]]:
    return {s: (d, kind) for d, (s, kind) in module_table(levels).items()}


def vae_key_to_diffusers(key: str, levels: int) -> str:
    """Diffusers name of one single-file VAE key; `levels` is the number of decoder levels."""
    return _rename(key, _single_file_table(levels), _LEAVES_BACK)


def vae_key_from_diffusers(key: str, levels: int) -> str:
    """Single-file name of one diffusers VAE key; `levels` is the number of decoder levels."""
    return _rename(key, module_table(levels), _LEAVES)


def _is_attn_projection_weight(single_key: str) -> bool:
    parts = single_key.split(".")
    return len(parts) == 5 and parts[2] == "attn_1" and parts[3] in _ATTN_PROJECTIONS and parts[4] == "weight"


def vae_to_diffusers(sd: StateDict) -> StateDict:
    """Single-file VAE keys (no `first_stage_model.` prefix) -> diffusers `AutoencoderKL` keys.

    Raises ValueError naming the first key that is not part of an LDM VAE; the caller decides
    whether that is an error or an extra to keep aside.
    """
    table = _single_file_table(_levels(list(sd), r"decoder\.up\.(\d+)\."))
    out: StateDict = {}
    for key, tensor in sd.items():
        new = _rename(key, table, _LEAVES_BACK)
        if _is_attn_projection_weight(key) and len(tensor.shape) > 2:
            tensor = tensor.reshaped(tensor.shape[:2])
        out[new] = tensor
    return out


def vae_from_diffusers(sd: StateDict) -> StateDict:
    """Diffusers `AutoencoderKL` keys -> single-file VAE keys (no prefix); the exact inverse.

    Old diffusers attention names (`query`, `key`, `value`, `proj_attn`) are accepted too.
    """
    modern = normalize_vae_keys(sd)
    if len(modern) != len(sd):
        twice = next(k for k in sd if k not in modern)
        raise ValueError(f"VAE key {twice!r} duplicates another name for the same weight")
    table = module_table(_levels(list(modern), r"decoder\.up_blocks\.(\d+)\."))
    out: StateDict = {}
    for key, tensor in modern.items():
        new = _rename(key, table, _LEAVES)
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
