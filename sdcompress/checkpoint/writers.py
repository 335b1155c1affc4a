"""Writing a `Model` as a diffusers folder or as one single file.

Both writers stream through `write_safetensors` (one tensor in memory at a
time, unchanged tensors copied by the kernel) and publish atomically. Configs
come from the model, never from the network; tokenizers come from the source
folder, `--tokenizer`, or the CLIP vocabulary bundled with sdcompress.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdcompress import __version__
from sdcompress.arch.families import Config
from sdcompress.checkpoint.atomic import Overwrite, atomic_dir
from sdcompress.checkpoint.conventions import EXTRAS_FILE, MARKERS
from sdcompress.checkpoint.keymap import text as text_map
from sdcompress.checkpoint.keymap import unet as unet_map
from sdcompress.checkpoint.keymap import vae as vae_map
from sdcompress.checkpoint.model import Model
from sdcompress.checkpoint.safetensors_io import write_safetensors
from sdcompress.checkpoint.tensors import LazyTensor, StateDict
from sdcompress.checkpoint.tokenizer import write_clip_tokenizer

Progress = Callable[[str, LazyTensor], None]

_DIFFUSERS_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}
_WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors"}


def cast(sd: StateDict, dtype: torch.dtype | None) -> StateDict:
    """Change floating-point tensors to `dtype`; integer and bool tensors stay as they are."""
    if dtype is None:
        return sd
    return {k: v.to_dtype(dtype) if v.dtype.is_floating_point else v for k, v in sd.items()}


def component_dtype(model: Model, name: str, dtype: torch.dtype | None, vae_dtype: torch.dtype | None) -> Any:
    """The SDXL VAE overflows in fp16: it keeps its own dtype unless `vae_dtype` is given."""
    if name == "vae":
        if vae_dtype is not None:
            return vae_dtype
        if model.family.is_sdxl and dtype == torch.float16:
            return None
    return dtype


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _component_config(name: str, config: Config) -> Config:
    if name in _DIFFUSERS_CLASSES:
        cfg = {k: v for k, v in config.items() if not k.startswith("_")}
        return {"_class_name": _DIFFUSERS_CLASSES[name], "_diffusers_version": _diffusers_version(), **cfg}
    from transformers import CLIPTextConfig

    cfg = CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    out = cfg.to_dict()
    out["architectures"] = config.get("architectures", ["CLIPTextModel"])
    return out


def _write_json(path: Path, data: Config) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _model_index(model: Model) -> Config:
    fam = model.family
    index: Config = {"_class_name": fam.pipeline_class, "_diffusers_version": _diffusers_version()}
    for name in ("unet", "vae"):
        if name in model.components:
            index[name] = ["diffusers", _DIFFUSERS_CLASSES[name]]
    tokenizer_for = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
    for spec in fam.text_encoders:
        if spec.component in model.components:
            arch = model.configs[spec.component].get("architectures", ["CLIPTextModel"])[0]
            index[spec.component] = ["transformers", arch]
            index[tokenizer_for[spec.component]] = ["transformers", "CLIPTokenizer"]
    optional = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2") if fam.is_sdxl else ()
    for name in optional:
        index.setdefault(name, [None, None])
    index["scheduler"] = ["diffusers", model.configs["scheduler"]["_class_name"]]
    if fam.is_sdxl:
        index.update(
            image_encoder=[None, None], feature_extractor=[None, None], force_zeros_for_empty_prompt=True
        )
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None])
    index.update(fam.pipeline_extra)
    return index


def _write_tokenizers(model: Model, dst: Path) -> list[str]:
    notes = []
    for spec in model.family.text_encoders:
        name = "tokenizer" if spec.component == "text_encoder" else "tokenizer_2"
        if spec.component not in model.components:
            continue
        src = model.tokenizer_dirs.get(name)
        if src is not None:
            shutil.copytree(src, dst / name)
        else:
            write_clip_tokenizer(dst / name, pad_token=spec.pad_token)
            notes.append(f"{name}: built-in CLIP vocabulary (pad {spec.pad_token!r})")
    return notes


def _weight_bytes(
    model: Model, dtype: torch.dtype | None, vae_dtype: torch.dtype | None, unet_only: bool
) -> int:
    """What the weight files of a diffusers folder take (configs and tokenizers are a rounding error)."""
    whole = not (unet_only or model.unet_only)
    total = sum(t.nbytes for t in model.extras.values()) if whole else 0
    for name in model.components if whole else ["unet"]:
        sd = cast(model.components[name], component_dtype(model, name, dtype, vae_dtype))
        total += sum(t.nbytes for t in sd.values())
    return total


def save_diffusers(
    model: Model,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    vae_dtype: torch.dtype | None = None,
    overwrite: bool | Overwrite = False,
    unet_only: bool = False,
    on_tensor: Progress | None = None,
    extra_files: dict[str, str] | None = None,
    before_publish: Callable[[Path], None] | None = None,
) -> list[str]:
    """Write a diffusers folder (a whole pipeline, or with `unet_only` a lone U-Net folder).

    `before_publish(folder)` may add files (a single-file copy, say) to the folder before it is
    renamed into place, so they appear together with the rest or not at all.
    """
    notes: list[str] = []
    with atomic_dir(out, overwrite=overwrite, size=_weight_bytes(model, dtype, vae_dtype, unet_only)) as tmp:
        if unet_only or model.unet_only:
            _write_json(tmp / "config.json", _component_config("unet", model.configs["unet"]))
            write_safetensors(
                tmp / _WEIGHT_FILES["unet"],
                cast(model.components["unet"], dtype),
                {"format": "pt"},
                on_tensor=on_tensor,
            )
        else:
            for name, sd in model.components.items():
                folder = tmp / name
                _write_json(folder / "config.json", _component_config(name, model.configs[name]))
                weights = folder / _WEIGHT_FILES.get(name, "model.safetensors")
                sd = cast(sd, component_dtype(model, name, dtype, vae_dtype))
                write_safetensors(weights, sd, {"format": "pt"}, on_tensor=on_tensor)
            _write_json(tmp / "scheduler" / "scheduler_config.json", model.configs["scheduler"])
            _write_json(tmp / "model_index.json", _model_index(model))
            notes += _write_tokenizers(model, tmp)
            if model.extras:
                write_safetensors(tmp / EXTRAS_FILE, model.extras, {"format": "pt"})
                notes.append(
                    f"kept {len(model.extras)} single-file tensors with no diffusers home in {EXTRAS_FILE}"
                )
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if before_publish is not None:
            before_publish(tmp)
    return notes


def single_file_state_dict(
    model: Model,
    *,
    dtype: torch.dtype | None = None,
    vae_dtype: torch.dtype | None = None,
    unet_only: bool = False,
) -> tuple[StateDict, list[str]]:
    """The model in original (LDM/SGM) names, as A1111, ComfyUI and Forge load it."""
    notes: list[str] = []
    unet_only = unet_only or model.unet_only
    layout = model.unet_layout
    unet = unet_map.unet_to_single_file(cast(model.components["unet"], dtype), layout)
    prefix = "" if unet_only else unet_map.SINGLE_FILE_PREFIX
    sd: StateDict = {prefix + k: v for k, v in unet.items()}
    if unet_only:
        return sd, notes
    if "vae" in model.components:
        vae = cast(model.components["vae"], component_dtype(model, "vae", dtype, vae_dtype))
        sd.update({"first_stage_model." + k: v for k, v in vae_map.vae_from_diffusers(vae).items()})
    extras = dict(model.extras)
    for spec in model.family.text_encoders:
        if spec.component not in model.components:
            continue
        te = cast(model.components[spec.component], dtype)
        p = spec.single_file_prefix
        if spec.openclip:
            leftovers = {k[len(p) :]: extras.pop(k) for k in list(extras) if k.startswith(p)}
            leftovers = cast(leftovers, dtype)
            te_sf, filled = text_map.openclip_from_diffusers(
                te,
                leftovers or None,
                fill_missing=spec.num_layers_in_file is not None,
                num_layers=spec.num_layers_in_file,
            )
            if filled:
                notes.append(
                    f"{spec.component}: filled {len(filled)} OpenCLIP tensors diffusers does not keep "
                    "(last layer copied from the one before, identity text projection), as kohya does"
                )
        else:
            te_sf = text_map.clip_from_diffusers(te)
        sd.update({p + k: v for k, v in te_sf.items()})
    if model.prediction_type == "v_prediction" and "v_pred" not in extras:
        extras["v_pred"] = LazyTensor.of(torch.tensor([]))
    sd.update(cast({k: v for k, v in extras.items() if k not in MARKERS}, dtype))
    sd.update({k: v for k, v in extras.items() if k in MARKERS})
    return sd, notes


def single_file_metadata(model: Model) -> dict[str, str]:
    fam = model.family
    meta = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": fam.modelspec_architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if fam.is_sdxl
        else "diffusers",
        "modelspec.resolution": f"{fam.resolution}x{fam.resolution}",
        "modelspec.prediction_type": "v" if model.prediction_type == "v_prediction" else "epsilon",
        "sdcompress.version": __version__,
        "sdcompress.unet_config": json.dumps(
            {k: v for k, v in model.configs["unet"].items() if not k.startswith("_")}, sort_keys=True
        ),
    }
    return meta


def save_single_file(
    model: Model,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    vae_dtype: torch.dtype | None = None,
    overwrite: bool | Overwrite = False,
    unet_only: bool = False,
    on_tensor: Progress | None = None,
) -> list[str]:
    sd, notes = single_file_state_dict(model, dtype=dtype, vae_dtype=vae_dtype, unet_only=unet_only)
    write_safetensors(out, sd, single_file_metadata(model), overwrite=overwrite, on_tensor=on_tensor)
    return notes
