"""Text-encoder key mapping: HF CLIP and OpenCLIP single-file keys <-> diffusers folders.

Keys here carry no checkpoint prefix (`cond_stage_model.transformer.`,
`conditioner.embedders.1.model.`, ...): the caller strips and adds those.

The diffusers side is always written in the `text_model.` form
(`text_model.encoder.layers.0...`, plus `text_projection.weight` for
`CLIPTextModelWithProjection`). That is what published folders hold, what
A1111 and diffusers' `from_single_file` read inside a single file, and what
`from_pretrained` accepts with every transformers version. transformers 5.x
saves a plain `CLIPTextModel` without the segment and its module's own
`state_dict()` has none either; both spellings are accepted as input, and
`to_module_layout` adapts a state dict to a module for `load_state_dict`.

OpenCLIP (SD 2's ViT-H, SDXL's bigG) stores attention as one fused
`in_proj_weight`; it is split into q/k/v by rows and fused back by
concatenation, both without reading values. Tensors with no diffusers home
(`logit_scale`, SD 2's 24th layer and `text_projection`) come back as
leftovers under their original names, so a caller can store them and a round
trip stays bit-identical.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch

from sdcompress.checkpoint.tensors import LazyTensor, StateDict, concat_rows

TEXT_MODEL = "text_model."
PROJECTION = "text_projection.weight"
_HF_SECTIONS = ("embeddings.", "encoder.layers.", "final_layer_norm.")
_POSITION_IDS = "embeddings.position_ids"

# Token ids and activation of the published SD / SDXL text-encoder configs. bos 0 / eos 2 are the
# values of the original openai and laion configs that diffusers folders carry; with eos_token_id 2
# transformers pools at the highest id (49407, end of text), exactly as those models do.
_SD_TOKEN_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}

# OpenCLIP names inside one resblock -> diffusers names inside `encoder.layers.N`.
_OC_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_HF_LAYER = {v: k for k, v in _OC_LAYER.items()}
_OC_TOP = {
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_HF_TOP = {v: k for k, v in _OC_TOP.items()}
_OC_PROJECTION = "text_projection"
# OpenCLIP tensors that a diffusers text encoder has no place for.
_OC_NO_HOME = ("logit_scale", "attn_mask")
# Value written for a missing `logit_scale`: ln(100), where OpenCLIP training clamps it and where
# the published ViT-H and bigG checkpoints sit. Only CLIP's image-text loss reads it.
_LOGIT_SCALE = math.log(100.0)

_OC_RESBLOCK = re.compile(r"transformer\.resblocks\.(?P<n>\d+)\.(?P<rest>.+)")
_OC_IN_PROJ = re.compile(r"attn\.in_proj_(?P<param>weight|bias)")
_OC_PARAM = re.compile(r"(?P<module>.+)\.(?P<param>weight|bias)")
_HF_LAYER_KEY = re.compile(r"text_model\.encoder\.layers\.(?P<n>\d+)\.(?P<module>.+)\.(?P<param>weight|bias)")
_QKV = ("q", "k", "v")


def _canonical(key: str) -> str:
    """`text_model.` form of an HF CLIP text key given with or without the segment."""
    if key == PROJECTION or key.startswith(TEXT_MODEL):
        return key
    if key.startswith(_HF_SECTIONS):
        return TEXT_MODEL + key
    raise ValueError(f"unknown CLIP text-encoder key {key!r}")


def _normalise(sd: StateDict) -> StateDict:
    out: StateDict = {}
    for key, tensor in sd.items():
        new = _canonical(key)
        if new.removeprefix(TEXT_MODEL) == _POSITION_IDS:
            continue  # a buffer (arange) that old files store, often as float; the model rebuilds it
        if not (new == PROJECTION or new.removeprefix(TEXT_MODEL).startswith(_HF_SECTIONS)):
            raise ValueError(f"unknown CLIP text-encoder key {key!r}")
        if new in out:
            raise ValueError(f"CLIP text-encoder key {key!r} appears both with and without 'text_model.'")
        out[new] = tensor
    return out


def clip_to_diffusers(sd: StateDict) -> StateDict:
    """HF CLIP text keys of a single file (with or without `text_model.`) -> diffusers keys.

    `embeddings.position_ids` is dropped (a derived buffer, safe to lose); every other key keeps
    its tensor. Raises ValueError naming a key that is not part of a CLIP text model.
    """
    return _normalise(sd)


def clip_from_diffusers(sd: StateDict) -> StateDict:
    """Diffusers CLIP text keys (either spelling) -> single-file keys, always with `text_model.`.

    A1111 and diffusers' `from_single_file` find the text encoder only in that form.
    """
    return _normalise(sd)


def to_module_layout(sd: StateDict, module_keys: Iterable[str]) -> StateDict:
    """Add or strip `text_model.` so the keys match a module's `state_dict()` keys.

    transformers >= 5.6 builds `CLIPTextModel` without the `text_model` wrapper while
    `CLIPTextModelWithProjection` keeps it; `load_state_dict(strict=True)` needs the module's own
    spelling.
    """
    wrapped = any(k.startswith(TEXT_MODEL) for k in module_keys)
    canonical = _normalise(sd)
    if wrapped:
        return canonical
    return {k.removeprefix(TEXT_MODEL): v for k, v in canonical.items()}


def _split_qkv(tensor: LazyTensor) -> list[LazyTensor]:
    width, rest = divmod(tensor.shape[0], 3)
    if rest:
        raise ValueError(f"fused attention projection of shape {tensor.shape} does not split in three")
    return [tensor.rows(i * width, (i + 1) * width) for i in range(3)]


def _resblock_to_diffusers(n: int, rest: str, tensor: LazyTensor, key: str) -> dict[str, LazyTensor]:
    base = f"text_model.encoder.layers.{n}"
    if m := _OC_IN_PROJ.fullmatch(rest):
        parts = _split_qkv(tensor)
        return {f"{base}.self_attn.{p}_proj.{m['param']}": t for p, t in zip(_QKV, parts, strict=True)}
    m = _OC_PARAM.fullmatch(rest)
    if m is None or m["module"] not in _OC_LAYER:
        raise ValueError(f"unknown OpenCLIP text-encoder key {key!r}")
    return {f"{base}.{_OC_LAYER[m['module']]}.{m['param']}": tensor}


def openclip_to_diffusers(
    sd: StateDict, *, num_layers: int | None = None, with_projection: bool = True
) -> tuple[StateDict, StateDict]:
    """OpenCLIP text keys (no prefix) -> (diffusers keys, leftovers under their original names).

    `num_layers` keeps the first N resblocks (SD 2 uses 23 of its 24); later ones are leftovers.
    `with_projection=False` (a `CLIPTextModel` target) makes `text_projection` a leftover too;
    otherwise it is transposed into `text_projection.weight`. `logit_scale` (and an `attn_mask`
    buffer, if stored) always go to the leftovers. Raises ValueError naming an unknown key.
    """
    out: StateDict = {}
    leftovers: StateDict = {}
    for key, tensor in sd.items():
        if key in _OC_TOP:
            out[_OC_TOP[key]] = tensor
        elif key == _OC_PROJECTION:
            if with_projection:
                out[PROJECTION] = tensor.transposed()
            else:
                leftovers[key] = tensor
        elif key in _OC_NO_HOME:
            leftovers[key] = tensor
        elif m := _OC_RESBLOCK.fullmatch(key):
            n = int(m["n"])
            if num_layers is not None and n >= num_layers:
                leftovers[key] = tensor
            else:
                out.update(_resblock_to_diffusers(n, m["rest"], tensor, key))
        else:
            raise ValueError(f"unknown OpenCLIP text-encoder key {key!r}")
    return out, leftovers


def _layer_from_diffusers(key: str, tensor: LazyTensor, sd: StateDict) -> tuple[str, LazyTensor] | None:
    """OpenCLIP name and tensor of one diffusers layer key; None for k/v (fused with q)."""
    m = _HF_LAYER_KEY.fullmatch(key)
    if m is None:
        raise ValueError(f"unknown CLIP text-encoder key {key!r}")
    n, module, param = m["n"], m["module"], m["param"]
    base = f"transformer.resblocks.{n}"
    if module in ("self_attn.k_proj", "self_attn.v_proj"):
        return None
    if module == "self_attn.q_proj":
        names = [f"text_model.encoder.layers.{n}.self_attn.{p}_proj.{param}" for p in _QKV]
        missing = [name for name in names if name not in sd]
        if missing:
            raise ValueError(f"CLIP text-encoder state dict has {key!r} but not {missing[0]!r}")
        return f"{base}.attn.in_proj_{param}", concat_rows([sd[name] for name in names])
    if module not in _HF_LAYER:
        raise ValueError(f"unknown CLIP text-encoder key {key!r}")
    return f"{base}.{_HF_LAYER[module]}.{param}", tensor


def _layer_count(single: StateDict) -> int:
    found = [int(m["n"]) for k in single if (m := _OC_RESBLOCK.fullmatch(k))]
    return max(found) + 1 if found else 0


def _fill(single: StateDict, num_layers: int | None) -> list[str]:
    """Add stand-ins for what a loadable OpenCLIP single file needs; return their names.

    As kohya does for SD 2: the missing last resblocks are copies of the last one there is (SD 2
    reads the penultimate layer's output, so they never change an image); `text_projection` is
    the identity (SD 2 never uses the pooled output); `logit_scale` is ln(100).
    """
    filled: list[str] = []
    present = _layer_count(single)
    if num_layers is not None and present and present < num_layers:
        last = f"transformer.resblocks.{present - 1}."
        template = {k[len(last) :]: v for k, v in single.items() if k.startswith(last)}
        for n in range(present, num_layers):
            for rest, tensor in template.items():
                name = f"transformer.resblocks.{n}.{rest}"
                single[name] = tensor
                filled.append(name)
    norm = single.get("ln_final.weight")
    if norm is None:
        return filled
    if _OC_PROJECTION not in single:
        eye = torch.eye(norm.shape[0], dtype=norm.dtype)
        single[_OC_PROJECTION] = LazyTensor.of(eye)
        filled.append(_OC_PROJECTION)
    if "logit_scale" not in single:
        single["logit_scale"] = LazyTensor.of(torch.tensor(_LOGIT_SCALE, dtype=norm.dtype))
        filled.append("logit_scale")
    return filled


def openclip_from_diffusers(
    sd: StateDict,
    leftovers: StateDict | None = None,
    *,
    fill_missing: bool,
    num_layers: int | None = None,
) -> tuple[StateDict, list[str]]:
    """Diffusers CLIP text keys (either spelling) -> OpenCLIP single-file keys (no prefix).

    Returns the state dict and the names that were filled with stand-ins (empty when nothing
    was), so the caller can say so. `leftovers` (from `openclip_to_diffusers`) are put back
    under their names wherever the diffusers state dict does not produce that name. Then, with
    `fill_missing=True`, what is still missing is filled as kohya does: resblocks up to
    `num_layers` (24 for SD 2) copied from the last one, an identity `text_projection` and
    `logit_scale`. With `fill_missing=False` nothing is invented.
    """
    canonical = _normalise(sd)
    single: StateDict = {}
    for key, tensor in canonical.items():
        if key in _HF_TOP:
            single[_HF_TOP[key]] = tensor
        elif key == PROJECTION:
            single[_OC_PROJECTION] = tensor.transposed()
        elif (mapped := _layer_from_diffusers(key, tensor, canonical)) is not None:
            single[mapped[0]] = mapped[1]
    for key, tensor in (leftovers or {}).items():
        single.setdefault(key, tensor)
    filled = _fill(single, num_layers) if fill_missing else []
    return single, filled


def _layers(sd: StateDict) -> int:
    found = {int(m["n"]) for k in sd if (m := _HF_LAYER_KEY.fullmatch(k))}
    if found != set(range(len(found))):
        raise ValueError(f"CLIP text-encoder layers are not numbered 0..{len(found) - 1}")
    return len(found)


def infer_text_encoder_config(sd: StateDict, *, openclip: bool) -> dict:
    """`CLIPTextConfig` keyword arguments read from diffusers keys and shapes.

    Heads are not visible in shapes: every SD text encoder uses 64-wide heads, so heads are
    hidden_size // 64 (at least 1). `openclip` selects the activation (OpenCLIP "gelu", OpenAI
    CLIP "quick_gelu"). Without a `text_projection.weight`, `projection_dim` is hidden_size.
    """
    canonical = _normalise(sd)

    def shape(key: str) -> tuple[int, ...]:
        if key not in canonical:
            raise ValueError(f"CLIP text-encoder state dict has no {key!r}")
        return canonical[key].shape

    vocab_size, hidden = shape("text_model.embeddings.token_embedding.weight")
    has_projection = PROJECTION in canonical
    return {
        "architectures": ["CLIPTextModelWithProjection" if has_projection else "CLIPTextModel"],
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": shape("text_model.encoder.layers.0.mlp.fc1.weight")[0],
        "num_hidden_layers": _layers(canonical),
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": shape("text_model.embeddings.position_embedding.weight")[0],
        "hidden_act": "gelu" if openclip else "quick_gelu",
        "projection_dim": shape(PROJECTION)[0] if has_projection else hidden,
        "layer_norm_eps": 1e-5,
        **_SD_TOKEN_IDS,
    }
