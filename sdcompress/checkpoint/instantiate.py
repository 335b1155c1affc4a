"""Turning lazy weights into live diffusers / transformers modules and pipelines.

Modules are built on the meta device from their config and then given the
weights with `load_state_dict(assign=True)`, so building never allocates a
randomly initialised copy first and a missing or unexpected key is an error.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from sdcompress.arch.families import Config
from sdcompress.checkpoint.keymap import text as text_map
from sdcompress.checkpoint.model import Model
from sdcompress.checkpoint.tensors import StateDict
from sdcompress.checkpoint.tokenizer import write_clip_tokenizer


def module_from_config(component: str, config: Config) -> torch.nn.Module:
    """A module with this config on the meta device (no memory)."""
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        if component == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel(**cfg)
        if component == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL(**cfg)
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        arch = cfg.pop("architectures", ["CLIPTextModel"])[0]
        cfg.pop("model_type", None)
        cls = CLIPTextModelWithProjection if arch == "CLIPTextModelWithProjection" else CLIPTextModel
        return cls(CLIPTextConfig(**cfg))


def load_weights(
    module: torch.nn.Module, sd: StateDict, *, dtype: torch.dtype | None, device: str, text: bool = False
) -> None:
    if text:
        sd = text_map.to_module_layout(sd, module.state_dict())
    tensors = {}
    for k, lt in sd.items():
        t = lt.load()
        if dtype is not None and t.dtype.is_floating_point:
            t = t.to(dtype)
        tensors[k] = t.to(device)
    expected = set(module.state_dict())
    # transformers keeps some buffers (position_ids) out of checkpoints: build them, never read them.
    missing = expected - set(tensors)
    unexpected = set(tensors) - expected
    if unexpected:
        raise KeyError(f"weights not in the module: {sorted(unexpected)[:3]}")
    module.load_state_dict(tensors, strict=False, assign=True)
    for name in missing:
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        if leaf in dict(sub.named_buffers(recurse=False)):
            buf = getattr(sub, leaf)
            if leaf == "position_ids":
                sub.register_buffer(
                    leaf, torch.arange(buf.shape[-1], device=device).expand(buf.shape), persistent=False
                )
            else:
                raise KeyError(f"buffer {name} is missing from the weights")
        else:
            raise KeyError(f"weight {name} is missing from the checkpoint")
    # non-persistent buffers (transformers 5 keeps CLIP's position_ids out of state_dict) stay on meta otherwise
    for name, buf in list(module.named_buffers()):
        if buf.is_meta and name.endswith("position_ids"):
            owner, _, leaf = name.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            sub.register_buffer(
                leaf, torch.arange(buf.shape[-1], device=device).expand(buf.shape), persistent=False
            )


def build_module(
    model: Model, component: str, *, dtype: torch.dtype | None = None, device: str = "cpu"
) -> torch.nn.Module:
    module = module_from_config(component, model.configs[component])
    load_weights(
        module, model.components[component], dtype=dtype, device=device, text=component.startswith("text")
    )
    module.eval()
    return module


def tokenizer_dir(model: Model, name: str) -> Path:
    """The model's tokenizer folder, or the built-in CLIP vocabulary written to a temporary folder."""
    if name in model.tokenizer_dirs:
        return model.tokenizer_dirs[name]
    spec = next(
        s for s in model.family.text_encoders if (s.component == "text_encoder") == (name == "tokenizer")
    )
    root = tempfile.mkdtemp(prefix="sdcompress-tok-")
    # 1.5 MB per call: removed when the process ends, or a test run leaves hundreds of them behind
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    path = Path(root) / name
    write_clip_tokenizer(path, pad_token=spec.pad_token)
    model.tokenizer_dirs[name] = path
    return path


def build_pipeline(model: Model, *, dtype: torch.dtype | None = None, device: str = "cpu") -> Any:
    """A diffusers pipeline of the model's family with all of its components."""
    import diffusers
    from transformers import CLIPTokenizer

    parts: dict[str, Any] = {}
    for name in model.components:
        parts[name] = build_module(model, name, dtype=dtype, device=device)
    for spec in model.family.text_encoders:
        tok = "tokenizer" if spec.component == "text_encoder" else "tokenizer_2"
        if spec.component in parts:
            parts[tok] = CLIPTokenizer.from_pretrained(tokenizer_dir(model, tok))
    sched_cfg = dict(model.configs["scheduler"])
    parts["scheduler"] = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    cls = getattr(diffusers, model.family.pipeline_class)
    if model.family.is_sdxl:
        parts.setdefault("text_encoder", None)
        parts.setdefault("tokenizer", None)
    else:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return cls(**parts)
