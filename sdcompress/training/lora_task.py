"""LoRA / DoRA / LoHa / LoKr training as a task on the shared loop, with peft adapters.

peft injects the adapters (`LoraConfig`, `LoHaConfig`, `LoKrConfig`) into the
U-Net and optionally the text encoders; only adapter weights train. Targets are
chosen by module path and weight shape with the project's own rules
(`lowrank.targets`), never by class name, and handed to peft as exact module
paths, so a pruned student's modules are found the same way.

After training, `export_adapters` turns peft's per-module tensors into the
project's LoRA representation: `LoraModule` (up/down/alpha) for LoRA, which the
one LoRA writer writes as kohya or PEFT; LoHa / LoKr tensors keep LyCORIS's
names (`hada_w1_a`, `lokr_w1`, ...), which `merge` and ComfyUI read.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from sdcompress.errors import SdcError
from sdcompress.lowrank.layouts import LoraModule
from sdcompress.lowrank.targets import TE, TE2, UNET, Target, is_target
from sdcompress.training.config import AdapterSpec, AdapterType, TargetSet
from sdcompress.training.finetune_task import UNetTrainingTask
from sdcompress.training.task import DiffusionParts, LossConfig

ADAPTER = "default"
ADAPTER_TYPES = tuple(AdapterType)
TARGET_SETS = tuple(TargetSet)
_ATTENTION_RX = re.compile(r"\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0)$")
_FF_RX = re.compile(r"\.ff\.net\.(?:0\.proj|2)$")
_ADAPTER_PARAM_RX = re.compile(
    r"\.(?:lora_[AB]|lora_magnitude_vector|hada_\w+|lokr_\w+)\." + ADAPTER + r"(?:\.|$)"
)


# ---------------------------------------------------------------------------- targets


def _weight_shape(module: torch.nn.Module) -> tuple[int, ...] | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
        return None
    return tuple(weight.shape)


def select_targets(module: torch.nn.Module, component: str, targets: str) -> list[str]:
    """Module paths of `module` that the target set adapts (the U-Net sets; every attention/MLP linear of a text encoder)."""
    chosen = []
    for path, sub in module.named_modules():
        shape = _weight_shape(sub)
        if shape is None:
            continue
        key = path + ".weight"
        if component != UNET:
            if is_target(component, key, shape, conv=False):
                chosen.append(path)
            continue
        if targets == "attention":
            ok = bool(_ATTENTION_RX.search(path)) and is_target(UNET, key, shape, conv=False)
        elif targets == "attention+ff":
            ok = bool(_ATTENTION_RX.search(path) or _FF_RX.search(path)) and is_target(
                UNET, key, shape, False
            )
        else:
            ok = is_target(UNET, key, shape, conv=targets == "all")
        if ok:
            chosen.append(path)
    return chosen


def check_rank(module: torch.nn.Module, paths: list[str], rank: int, component: str) -> None:
    """A rank above a layer's smaller side cannot add anything; refuse it, naming the layer."""
    for path in paths:
        shape = _weight_shape(module.get_submodule(path))
        limit = min(shape[0], math.prod(shape[1:]))
        if rank > limit:
            raise SdcError(
                f"--rank {rank} is larger than layer {component}.{path} {tuple(shape)} allows; "
                f"use --rank {limit} or less."
            )


def peft_config(spec: AdapterSpec, paths: list[str], module: torch.nn.Module):
    """peft's config for the adapter type, targeting exactly `paths`."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    common = dict(r=spec.rank, target_modules=paths)
    if spec.type in ("lora", "dora"):
        return LoraConfig(
            lora_alpha=spec.lora_alpha,
            lora_dropout=spec.dropout,
            init_lora_weights="gaussian",
            use_dora=spec.type == "dora",
            **common,
        )
    if spec.type == "loha":
        return LoHaConfig(alpha=spec.lora_alpha, rank_dropout=spec.dropout, **common)
    return LoKrConfig(alpha=spec.lora_alpha, rank_dropout=spec.dropout, **common)


def add_adapters(module: torch.nn.Module, component: str, spec: AdapterSpec) -> list[str]:
    """Freeze `module` and inject peft adapters on the spec's targets; returns the adapted module paths."""
    from peft import inject_adapter_in_model

    paths = select_targets(module, component, spec.targets)
    if not paths:
        raise SdcError(
            f"--targets {spec.targets} matches no module of the {component}; "
            "choose another target set (all-linear or all)."
        )
    check_rank(module, paths, spec.rank, component)
    module.requires_grad_(False)
    inject_adapter_in_model(peft_config(spec, paths, module), module, adapter_name=ADAPTER)
    for name, param in module.named_parameters():
        param.requires_grad_(_is_adapter_param(name))
    return paths


def _is_adapter_param(name: str) -> bool:
    return _ADAPTER_PARAM_RX.search(name) is not None


# ---------------------------------------------------------------------------- export


@dataclass
class LycorisModule:
    """A LoHa or LoKr update under LyCORIS tensor names (`hada_w1_a`, `lokr_w1`, ...) with its alpha."""

    target: Target
    tensors: dict[str, torch.Tensor]
    alpha: float


def export_adapters(
    module: torch.nn.Module, component: str, paths: list[str], spec: AdapterSpec
) -> list[LoraModule] | list[LycorisModule]:
    """The trained adapters of `module` in the project's LoRA representation (fp32, CPU)."""
    out = []
    for path in paths:
        layer = module.get_submodule(path)
        target = Target(component, path)
        if spec.type in ("lora", "dora"):
            out.append(_lora_module(layer, target))
        elif spec.type == "loha":
            out.append(_loha_module(layer, target))
        else:
            out.append(_lokr_module(layer, target))
    return out


def _t(param: torch.Tensor) -> torch.Tensor:
    return param.detach().float().cpu().contiguous()


def _lora_module(layer, target: Target) -> LoraModule:
    down, up = _t(layer.lora_A[ADAPTER].weight), _t(layer.lora_B[ADAPTER].weight)
    # DoRA: peft's magnitude is one number per output channel ([out] for a linear, [1, out, 1, 1] for a conv)
    dora = layer.lora_magnitude_vector
    magnitude = _t(dora[ADAPTER].weight).reshape(-1) if ADAPTER in dora else None
    # peft scales by lora_alpha / r, kohya by alpha / rank: the same number with the same alpha.
    return LoraModule(
        target=target, up=up, down=down, alpha=float(layer.lora_alpha[ADAPTER]), magnitude=magnitude
    )


def _loha_module(layer, target: Target) -> LycorisModule:
    # peft's LoHa: delta = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r, w*_a [out, r], w*_b [r, in*k*k]:
    # LyCORIS's formula and names, so the tensors are written as they are.
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    tensors = {n: _t(getattr(layer, n)[ADAPTER]) for n in names if ADAPTER in getattr(layer, n)}
    return LycorisModule(target, tensors, float(layer.alpha[ADAPTER]))


def _lokr_module(layer, target: Target) -> LycorisModule:
    names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    tensors = {n: _t(getattr(layer, n)[ADAPTER]) for n in names if ADAPTER in getattr(layer, n)}
    alpha = float(layer.alpha[ADAPTER])
    if "lokr_w1_b" not in tensors and "lokr_w2_b" not in tensors:
        # peft scales LoKr by alpha / r always; LyCORIS readers (ComfyUI, sdcompress merge) apply alpha / dim
        # only when a factor is low-rank and 1 otherwise, so with both factors full the scale goes into w2.
        tensors["lokr_w2"] = tensors["lokr_w2"] * float(layer.scaling[ADAPTER])
    return LycorisModule(target, tensors, alpha)


# ---------------------------------------------------------------------------- the task


class LoraTrainTask(UNetTrainingTask):
    """Train peft adapters on the U-Net (and the text encoders with `spec.text_encoder`)."""

    name = "lora"

    def __init__(self, parts: DiffusionParts, loss: LossConfig, spec: AdapterSpec, **kwargs: Any) -> None:
        spec.validate()
        super().__init__(parts, loss, train_text_encoders=spec.text_encoder, **kwargs)
        self.spec = spec
        # peft draws the initial adapter weights from the global RNG; seeding it here makes two runs with
        # the same --seed start from the same adapters (without it no resume test could compare runs).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(kwargs.get("seed", 0))
            self.paths: dict[str, list[str]] = {UNET: add_adapters(parts.unet, UNET, spec)}
            if spec.text_encoder:
                for component, encoder in zip((TE, TE2), parts.text_encoders, strict=False):
                    self.paths[component] = add_adapters(encoder, component, spec)

    def bind(
        self, prepared: dict[str, torch.nn.Module], device: torch.device, weight_dtype: torch.dtype
    ) -> None:
        super().bind(prepared, device, weight_dtype)
        if weight_dtype != torch.float32:
            # Frozen base weights in the half dtype (the memory win of LoRA), adapters stay fp32 for the optimizer.
            from diffusers.training_utils import cast_training_params

            for module in [self.parts.unet] + (self.parts.text_encoders if self.spec.text_encoder else []):
                module.to(dtype=weight_dtype)
                cast_training_params(module, dtype=torch.float32)

    def modules(self) -> dict[str, torch.nn.Module]:
        named = {UNET: self.parts.unet}
        for component, encoder in zip((TE, TE2), self.parts.text_encoders, strict=False):
            named[component] = encoder
        return {c: m for c, m in named.items() if c in self.paths}

    def export(self) -> list:
        out: list = []
        for component, module in self.modules().items():
            out.extend(export_adapters(module, component, self.paths[component], self.spec))
        return out

    def adapted_count(self) -> int:
        return sum(len(p) for p in self.paths.values())
