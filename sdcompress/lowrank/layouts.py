"""LoRA files: the layouts people share, read into one form and written back out.

Reading accepts kohya (`lora_unet_*`, `lora_te*_`), PEFT / diffusers
(`unet.<path>.lora_A.weight`), diffusers' older attention-processor layout
(`unet.<path>.processor.to_q_lora.down.weight`, which diffusers still loads),
ComfyUI's `diffusion_model.<SGM path>`, and the LyCORIS tensors found under
kohya names (LoCon `lora_mid`, LoHa `hada_*`, LoKr `lokr_*`, full `.diff`,
norm `w_norm`/`b_norm`). Every module becomes an `Adapter` that knows how
to compute its fp32 delta; `resolve` ties adapters to a model's modules and
refuses names that match nothing, because a LoRA that silently does nothing is
the failure users report most.

Writing produces kohya (down/up/alpha plus `ss_*`, `modelspec.*` and
`sshs_model_hash`) or PEFT (lora_A/lora_B, alpha in `lora_adapter_metadata`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from sdcompress.checkpoint.finite import finite_checked
from sdcompress.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from sdcompress.checkpoint.tensors import LazyTensor, StateDict
from sdcompress.errors import SdcError
from sdcompress.lowrank.merge_math import lora_delta, weight_decompose
from sdcompress.lowrank.targets import COMPONENTS, TE, TE2, UNET, Naming, Target, is_conv_kernel

KOHYA = "kohya"
PEFT = "peft"
FORMATS = (KOHYA, PEFT)

_SUFFIXES = (
    "lora_A.weight", "lora_B.weight", "lora_down.weight", "lora_up.weight", "lora_mid.weight",
    "lora.down.weight", "lora.up.weight", "lora_linear_layer.down.weight", "lora_linear_layer.up.weight",
    "alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "diff", "diff_b", "w_norm", "b_norm", "dora_scale", "lora_magnitude_vector", "lora_magnitude_vector.weight",
)  # fmt: skip
_SUFFIX_RX = re.compile(r"^(?P<module>.+?)\.(?P<suffix>" + "|".join(re.escape(s) for s in _SUFFIXES) + r")$")
_CANON = {
    "lora_A.weight": "down", "lora_down.weight": "down", "lora.down.weight": "down",
    "lora_linear_layer.down.weight": "down", "lora_B.weight": "up", "lora_up.weight": "up",
    "lora.up.weight": "up", "lora_linear_layer.up.weight": "up", "lora_mid.weight": "mid",
    "lora_magnitude_vector": "magnitude", "lora_magnitude_vector.weight": "magnitude",
}  # fmt: skip
# diffusers' attention-processor layout names the projection after the processor attribute
# (`attn1.processor.to_q_lora`); diffusers' own converter maps it to the module (`attn1.to_q`, or
# `self_attn.q_proj` in a text encoder), and so do we.
_ATTN_PROC_RX = re.compile(
    r"^(?P<path>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$"
)
_ATTN_PROC_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_ATTN_PROC_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
ATTN_PROCS = "diffusers-attn-procs"
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_DOTTED_PREFIXES = {"unet.": UNET, "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
_SGM_PREFIXES = ("diffusion_model.", "model.diffusion_model.", "lora_unet.")
METADATA_KEY = "lora_adapter_metadata"


@dataclass
class Adapter:
    """One module's update as stored in a file; `delta()` gives it in fp32 at the target's shape."""

    name: str  # the module name as written in the file
    tensors: dict[str, LazyTensor] = field(default_factory=dict)  # canonical suffix -> tensor
    alpha: float | None = None

    @property
    def decomposed(self) -> bool:
        """A DoRA (weight-decomposed) update: kohya/LyCORIS `dora_scale` or PEFT `lora_magnitude_vector`."""
        return "dora_scale" in self.tensors or "magnitude" in self.tensors

    @property
    def kind(self) -> str:
        """The kind of the weight update itself; a DoRA's is LoRA (or LoHa / LoKr) plus `decomposed`."""
        t = self.tensors
        if any(k.startswith("hada_") for k in t):
            return "loha"
        if any(k.startswith("lokr_") for k in t):
            return "lokr"
        if "diff" in t or "diff_b" in t:
            return "diff"
        if "w_norm" in t or "b_norm" in t:
            return "norm"
        return "lora"

    @property
    def label(self) -> str:
        """The kind as users know it, for messages: LoRA, LoCon (Tucker), LoHa, LoKr, full-diff, norm."""
        if self.decomposed:
            return "DoRA" if self.kind == "lora" else f"{self.kind_label} DoRA"
        return self.kind_label

    @property
    def kind_label(self) -> str:
        if self.kind == "lora":
            return "LoCon (Tucker)" if "mid" in self.tensors else "LoRA"
        names = {"loha": "LoHa", "lokr": "LoKr", "diff": "full-diff", "norm": "norm"}
        return names[self.kind]

    @property
    def rank(self) -> int:
        return self.tensors["down"].shape[0] if "down" in self.tensors else 0

    def check(self, path: str) -> None:
        kind, t = self.kind, self.tensors
        need = {
            "lora": [("down",), ("up",)],
            "loha": [("hada_w1_a",), ("hada_w1_b",), ("hada_w2_a",), ("hada_w2_b",)],
            "lokr": [("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")],
            "diff": [("diff", "diff_b")],
            "norm": [("w_norm",)],
        }[kind]
        for options in need:
            if not any(o in t for o in options):
                raise SdcError(f"{path} is incomplete: module {self.name} has no {options[0]} tensor.")

    def flat_shape(self) -> tuple[int, int] | None:
        """(out, in*kh*kw) of the update, from the tensor shapes alone; None when there is no weight update.

        Checked against the target before anything is computed, so a LoRA made
        for another model is one clear sentence rather than a reshape error.
        """
        t = {k: v.shape for k, v in self.tensors.items()}
        kind = self.kind
        if kind == "lora":
            inner = math.prod(t["down"][1:])
            if "mid" in t:
                inner = t["down"][1] * math.prod(t["mid"][2:])
            return t["up"][0], inner
        if kind in ("diff", "norm"):
            w = t.get("diff", t.get("w_norm"))
            return (w[0], math.prod(w[1:])) if w is not None else None
        if kind == "loha":
            return _factor_shape(t["hada_w1_a"], t["hada_w1_b"], t.get("hada_t1"))
        if kind == "lokr":
            w1 = t["lokr_w1"] if "lokr_w1" in t else (t["lokr_w1_a"][0], t["lokr_w1_b"][1])
            if "lokr_w2" in t:
                w2 = (t["lokr_w2"][0], math.prod(t["lokr_w2"][1:]))
            else:
                w2 = _factor_shape(t["lokr_w2_a"], t["lokr_w2_b"], t.get("lokr_t2"))
            return w1[0] * w2[0], w1[1] * w2[1]
        return None

    def bias_shape(self) -> tuple[int, ...] | None:
        """Shape of the bias update (full diff `diff_b`, norm `b_norm`), None without one."""
        for k in ("diff_b", "b_norm"):
            if k in self.tensors:
                return self.tensors[k].shape
        return None

    def delta(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The weight update (scale alpha/rank included, multiplier not) at `shape`, fp32."""
        t = {k: v.load().float() for k, v in self.tensors.items() if k not in ("diff_b", "b_norm")}
        kind = self.kind
        if kind == "lora":
            return lora_delta(t["up"], t["down"], self._scale(t["down"].shape[0]), t.get("mid")).reshape(
                shape
            )
        if kind == "diff":
            return t["diff"].reshape(shape)
        if kind == "norm":  # LyCORIS, A1111 and ComfyUI add w_norm as it is: no alpha, no rank
            return t["w_norm"].reshape(shape)
        if kind == "loha":
            w1 = _factor(t["hada_w1_a"], t["hada_w1_b"], t.get("hada_t1"))
            w2 = _factor(t["hada_w2_a"], t["hada_w2_b"], t.get("hada_t2"))
            return (w1.reshape(shape) * w2.reshape(shape)) * self._scale(t["hada_w1_b"].shape[0])
        # LoKr: kron(w1, w2); the scale applies only when a factor is itself low-rank
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else _factor(t["lokr_w2_a"], t["lokr_w2_b"], t.get("lokr_t2"))
        dim = (
            t["lokr_w2_b"].shape[0]
            if "lokr_w2_b" in t
            else t["lokr_w1_b"].shape[0]
            if "lokr_w1_b" in t
            else 0
        )
        scale = self.alpha / dim if self.alpha is not None and dim else 1.0
        w1 = w1.reshape(*w1.shape, *[1] * (w2.ndim - w1.ndim))
        # kron views its inputs: a Tucker rebuild (an einsum) comes back with permuted strides
        return torch.kron(w1.contiguous(), w2.contiguous()).reshape(shape) * scale

    def apply(self, weight: torch.Tensor, multiplier: float) -> torch.Tensor:
        """`weight` (fp32) with this update applied at `multiplier`: added, or weight-decomposed for DoRA."""
        delta = self.delta(tuple(weight.shape))
        if not self.decomposed:
            return weight + delta * multiplier
        scale, on_output = self.magnitude(tuple(weight.shape))
        return weight_decompose(weight, delta, scale, on_output=on_output, multiplier=multiplier)

    def magnitude(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, bool]:
        """The DoRA magnitude, flat, and whether it is per output channel (else per input channel).

        PEFT's `lora_magnitude_vector` is per output channel. A `dora_scale` is
        per output channel when its first dimension is the layer's output size
        ([out, 1(, 1, 1)], LyCORIS's default) and per input channel otherwise
        ([1, in(, 1, 1)], older LyCORIS files): the test ComfyUI applies too.
        """
        if "magnitude" in self.tensors:
            m, on_output = self.tensors["magnitude"].load().float().reshape(-1), True
        else:
            d = self.tensors["dora_scale"].load().float()
            on_output = d.shape[0] == shape[0]
            m = d.reshape(-1)
        if m.numel() != (shape[0] if on_output else shape[1]):
            raise SdcError(
                f"DoRA module {self.name} has {m.numel()} magnitudes for a {list(shape)} weight; "
                "use a DoRA made for this model."
            )
        return m, on_output

    def bias_delta(self) -> torch.Tensor | None:
        for k in ("diff_b", "b_norm"):
            if k in self.tensors:
                return self.tensors[k].load().float()
        return None

    def _scale(self, rank: int) -> float:
        return self.alpha / rank if self.alpha is not None and rank else 1.0


def _factor_shape(a: tuple[int, ...], b: tuple[int, ...], tucker: tuple[int, ...] | None) -> tuple[int, int]:
    """(out, in*kh*kw) of `_factor(a, b, tucker)` from the shapes alone."""
    if tucker is None:
        return a[0], math.prod(b[1:])
    return a[1], b[1] * math.prod(tucker[2:])


def _factor(a: torch.Tensor, b: torch.Tensor, tucker: torch.Tensor | None) -> torch.Tensor:
    """a @ b, or with a Tucker core t: W[p, r, ...] = sum_ij t[i, j, ...] b[j, r] a[i, p]."""
    if tucker is None:
        return a @ b.reshape(b.shape[0], -1)
    return torch.einsum("ij...,jr,ip->pr...", tucker, b, a)


@dataclass
class LoraFile:
    """A parsed LoRA: adapters by module name, the file's metadata and its layout."""

    path: str
    # "kohya", "peft", "sgm" (diffusion_model.*), "lycoris" (kohya names, LyCORIS tensors) or ATTN_PROCS
    layout: str
    adapters: dict[str, Adapter]
    metadata: dict[str, str]

    @property
    def base_model_version(self) -> str | None:
        return self.metadata.get("ss_base_model_version")

    def looks_sdxl(self) -> bool | None:
        """True/False when the file says (metadata or te1/te2 names), None when it does not."""
        v = self.base_model_version or self.metadata.get("modelspec.architecture", "")
        if v:
            return "xl" in v
        names = self.adapters
        if any(n.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for n in names):
            return True
        if any(n.startswith("lora_te_") for n in names):
            return False
        if any("input_blocks" in n or "output_blocks" in n for n in names) and any(
            n.startswith("lora_unet_") for n in names
        ):
            return True
        return None


def lora_key(key: str) -> tuple[str, str] | None:
    """(module, suffix) of a LoRA tensor name in any layout we read, None for anything else."""
    m = _SUFFIX_RX.match(_from_attn_proc(key))
    return (m.group("module"), m.group("suffix")) if m else None


def is_lora_state(keys: Iterable[str]) -> bool:
    """True when every key is a LoRA tensor name (and there is one): how `convert` recognises a LoRA file."""
    keys = list(keys)
    return bool(keys) and all(lora_key(k) is not None for k in keys)


def _from_attn_proc(key: str) -> str:
    """`<path>.processor.to_q_lora.down.weight` -> `<path>.to_q.lora.down.weight` (diffusers' mapping).

    Files saved by `unet.save_attn_procs` carry no component prefix: they are U-Net files.
    """
    m = _ATTN_PROC_RX.match(key)
    if not m:
        return key
    path = m.group("path")
    if not path.startswith(tuple(_DOTTED_PREFIXES)):
        path = "unet." + path
    names = _ATTN_PROC_UNET if path.startswith("unet.") else _ATTN_PROC_TEXT
    return f"{path}.{names[m.group('proj')]}.lora.{m.group('part')}.weight"


def read_lora(path: str | Path, *, allow_nonfinite: bool = False) -> LoraFile:
    """Parse any supported LoRA file; unknown tensor names are an error, not a silent skip.

    Unless `allow_nonfinite`, each tensor is checked for NaN/inf when it is
    loaded (alphas right away), and the error names the tensor.
    """
    f = SafetensorsFile(path)
    sd = f.state_dict()
    adapters: dict[str, Adapter] = {}
    unknown = []
    for key, lt in sd.items():
        parsed = lora_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        module, suffix = parsed
        a = adapters.setdefault(module, Adapter(module))
        if not allow_nonfinite:
            lt = finite_checked(lt, f"{f.path}: tensor {key!r}")
        if suffix == "alpha":
            a.alpha = float(lt.load().float().reshape(-1)[0])
        else:
            a.tensors[_CANON.get(suffix, suffix)] = lt
    if unknown:
        raise SdcError(
            f"{f.path} has tensors that are not LoRA weights (e.g. {unknown[0]!r}); is it a LoRA file?"
        )
    if not adapters:
        raise SdcError(f"{f.path} holds no LoRA weights.")
    layout = _detect_layout(adapters)
    if layout == PEFT:
        _apply_peft_alphas(adapters, f.metadata)
        if any(_ATTN_PROC_RX.match(k) for k in sd):
            layout = ATTN_PROCS
    for a in adapters.values():
        a.check(f.path)
    return LoraFile(f.path, layout, adapters, f.metadata)


def _detect_layout(adapters: Mapping[str, Adapter]) -> str:
    names = list(adapters)
    if all(n.startswith(_KOHYA_PREFIXES) for n in names):
        return "lycoris" if any(a.kind != "lora" or "mid" in a.tensors for a in adapters.values()) else KOHYA
    if all(n.startswith(tuple(_DOTTED_PREFIXES)) for n in names):
        return PEFT
    if all(n.startswith(_SGM_PREFIXES) for n in names):
        return "sgm"
    odd = next(n for n in names if not n.startswith((*_KOHYA_PREFIXES, *_DOTTED_PREFIXES, *_SGM_PREFIXES)))
    raise SdcError(
        f"cannot tell which model the LoRA module {odd!r} belongs to; sdcompress reads kohya and PEFT names."
    )


def _apply_peft_alphas(adapters: Mapping[str, Adapter], metadata: Mapping[str, str]) -> None:
    """PEFT files keep alpha in a LoraConfig JSON per component; without it alpha = rank."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        return
    for name, a in adapters.items():
        component, _, path = name.partition(".")
        if a.alpha is not None:
            continue
        alpha = cfg.get(f"{component}.lora_alpha")
        for pattern, value in (cfg.get(f"{component}.alpha_pattern") or {}).items():
            if path == pattern or path.endswith("." + pattern):
                alpha = value
        if alpha is not None:
            a.alpha = float(alpha)


def resolve(lora: LoraFile, naming: Naming) -> dict[Target, Adapter]:
    """Tie each adapter to a model module; any adapter that matches nothing is an error."""
    out: dict[Target, Adapter] = {}
    missing = []
    for name, a in lora.adapters.items():
        t = _target_of(name, naming)
        if t is None:
            missing.append(name)
        else:
            out[t] = a
    if missing:
        family = lora.base_model_version or lora.metadata.get("modelspec.architecture")
        hint = f" (the file says it is for {family})" if family else ""
        n = len(lora.adapters)
        what = (
            f"none of its {n} modules match the model"
            if not out
            else f"{len(missing)} of its {n} modules do not match the model"
        )
        raise SdcError(
            f"{lora.path}: {what} (first: {missing[0]!r}){hint}; use a LoRA made for this model family."
        )
    return out


def _target_of(name: str, naming: Naming) -> Target | None:
    if name.startswith(_KOHYA_PREFIXES):
        return naming.from_kohya(name)
    for prefix, component in _DOTTED_PREFIXES.items():
        if name.startswith(prefix):
            return naming.from_dotted(component, name[len(prefix) :])
    for prefix in _SGM_PREFIXES:
        if name.startswith(prefix):
            return naming.from_dotted("sgm", name[len(prefix) :]) or naming.from_dotted(
                UNET, name[len(prefix) :]
            )
    return None


# ----- writing -----------------------------------------------------------------------------------


@dataclass
class LoraModule:
    """A low-rank update ready to write: delta = up @ down * alpha / rank (convs composed)."""

    target: Target
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    alpha: float
    magnitude: torch.Tensor | None = None  # DoRA: [out], one norm per output channel (peft's, LyCORIS's)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def shape_factors(
    up: torch.Tensor, down: torch.Tensor, weight_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrix factors [out, r] / [r, in*k*k] in the shapes a conv or linear LoRA stores."""
    r = down.shape[0]
    if len(weight_shape) == 4:
        return up.reshape(weight_shape[0], r, 1, 1), down.reshape(r, *weight_shape[1:])
    return up.reshape(weight_shape[0], r), down.reshape(r, weight_shape[1])


def _lazy(t: torch.Tensor, dtype: torch.dtype) -> LazyTensor:
    t = t.detach().to(dtype).contiguous()
    return LazyTensor.of(t)


def kohya_state_dict(modules: list[LoraModule], naming: Naming, dtype: torch.dtype) -> StateDict:
    sd: StateDict = {}
    for m in sorted(modules, key=lambda m: (COMPONENTS.index(m.target.component), naming.kohya(m.target))):
        name = naming.kohya(m.target)
        sd[f"{name}.alpha"] = _lazy(torch.tensor(float(m.alpha)), dtype)
        sd[f"{name}.lora_down.weight"] = _lazy(m.down, dtype)
        sd[f"{name}.lora_up.weight"] = _lazy(m.up, dtype)
        if m.magnitude is not None:  # LyCORIS's DoRA, on the output axis: [out, 1] or [out, 1, 1, 1]
            sd[f"{name}.dora_scale"] = _lazy(m.magnitude.reshape(-1, *[1] * (m.down.dim() - 1)), dtype)
    return sd


def peft_state_dict(
    modules: list[LoraModule], naming: Naming, dtype: torch.dtype
) -> tuple[StateDict, dict[str, str]]:
    """PEFT layout plus the `lora_adapter_metadata` LoraConfig per component (ranks and alphas per module).

    Patterns and target modules name the path without `text_model.`, a suffix of
    both the old and the transformers-5 CLIP module names, so PEFT matches either.
    """
    sd: StateDict = {}
    config: dict[str, object] = {}
    for component in COMPONENTS:
        mods = sorted((m for m in modules if m.target.component == component), key=lambda m: m.target.path)
        if not mods:
            continue
        ranks = [m.rank for m in mods]
        r = max(set(ranks), key=ranks.count)
        alphas = [m.alpha for m in mods]
        alpha = max(set(alphas), key=alphas.count)
        pattern_name = {m.target: naming.dotted(m.target).removeprefix("text_model.") for m in mods}
        config[f"{component}.r"] = r
        config[f"{component}.lora_alpha"] = alpha
        config[f"{component}.target_modules"] = sorted(pattern_name.values())
        config[f"{component}.rank_pattern"] = {pattern_name[m.target]: m.rank for m in mods if m.rank != r}
        config[f"{component}.alpha_pattern"] = {
            pattern_name[m.target]: m.alpha for m in mods if m.alpha != alpha
        }
        config[f"{component}.init_lora_weights"] = True
        if any(m.magnitude is not None for m in mods):
            config[f"{component}.use_dora"] = True
        for m in mods:
            name = naming.peft(m.target)
            sd[f"{name}.lora_A.weight"] = _lazy(m.down, dtype)
            sd[f"{name}.lora_B.weight"] = _lazy(m.up, dtype)
            if m.magnitude is not None:  # peft's shapes: [out] for a linear, [1, out, 1, 1] for a conv
                # `.weight` (the parameter's own name; peft saves it without): transformers 5 loads a text
                # encoder's magnitude only under that name, and peft's loader accepts both spellings.
                shape = (1, -1, 1, 1) if m.down.dim() == 4 else (-1,)
                sd[f"{name}.lora_magnitude_vector.weight"] = _lazy(m.magnitude.reshape(shape), dtype)
    return sd, {"format": "pt", METADATA_KEY: json.dumps(config, sort_keys=True)}


def kohya_metadata(
    *,
    family: object,
    title: str,
    rank: int,
    conv_rank: int | None,
    alpha: float,
    prediction_type: str,
    resolution: int,
    conv_alpha: float | None = None,
) -> dict[str, str]:
    """`ss_*` and `modelspec.*` keys; `family` is an `arch.families.Family`.

    The network keys here are the declared ones; `write_lora` replaces them by
    what the written modules carry (a clamped or dynamic rank, one alpha).
    """
    conv_args = (
        {"conv_dim": str(conv_rank), "conv_alpha": _num(conv_rank if conv_alpha is None else conv_alpha)}
        if conv_rank
        else {}
    )
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": _num(alpha),
        "ss_network_args": json.dumps(conv_args),
        **family_metadata(family, title=title, prediction_type=prediction_type, resolution=resolution),
    }


def family_metadata(family: object, *, title: str, prediction_type: str, resolution: int) -> dict[str, str]:
    """The keys loaders read to tell a LoRA's model family (A1111 hides an SDXL LoRA labelled SD 1 on SDXL)."""
    arch = getattr(family, "modelspec_architecture", "stable-diffusion-v1")
    version = getattr(family, "base_model_version", "sd_v1")
    return {
        "ss_base_model_version": version,
        "ss_v2": str(version.startswith("sd_v2")),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if "xl" in arch
        else "diffusers",
        "modelspec.title": title,
        "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": prediction_type,
    }


# Keys that describe one file, not the model family or the training: never carried to a derived file.
_PER_FILE_KEYS = (
    "sshs_model_hash",
    "sshs_legacy_hash",
    "modelspec.hash_sha256",
    "modelspec.title",
    "modelspec.date",
)


def derived_metadata(
    sources: Sequence[Mapping[str, str]], *, title: str, family: object, prediction_type: str | None = None
) -> dict[str, str]:
    """Metadata of a LoRA made from other LoRAs (merge, resize, layout conversion).

    As kohya's resize does, the sources' `ss_*` / `modelspec.*` keys are kept
    (those every source agrees on, when there are several); family keys the
    sources lack (a PEFT file has none) come from `family`, so A1111 and
    ComfyUI still see which model the LoRA is for. `write_lora` sets the
    network keys (dim, alpha, conv args) from the modules it writes.
    """
    kept: dict[str, str] | None = None
    for meta in sources:
        mine = {
            k: v for k, v in meta.items() if k.startswith(("ss_", "modelspec.")) and k not in _PER_FILE_KEYS
        }
        kept = mine if kept is None else {k: v for k, v in kept.items() if mine.get(k) == v}
    kept = kept or {}
    resolution = getattr(family, "resolution", 512)
    fallback = family_metadata(
        family,
        title=title,
        prediction_type=prediction_type or getattr(family, "prediction_type", "epsilon"),
        resolution=resolution,
    )
    out = {"ss_network_module": "networks.lora", **fallback, **kept}
    out["modelspec.title"], out["modelspec.date"] = title, datetime.date.today().isoformat()
    return out


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def data_hash(sd: Mapping[str, LazyTensor]) -> str:
    """sha256 of the data section of the file `write_safetensors` makes from `sd` (kohya's sshs_model_hash).

    The writer lays tensors out in order with no padding between them, so
    hashing their bytes in order equals hashing the file after its header.
    """
    h = hashlib.sha256()
    for lt in sd.values():
        t = lt.load().contiguous()
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def parse_formats(value: str) -> tuple[str, ...]:
    """The layouts `--format` asks for: `kohya`, `peft`, or both as `kohya,peft` (`both` is the old spelling)."""
    names = [
        n.strip().lower() for n in ("kohya,peft" if value.strip().lower() == "both" else value).split(",")
    ]
    bad = [n for n in names if n not in FORMATS]
    if bad or not names:
        raise SdcError(f"--format {value} is not kohya, peft or kohya,peft; choose one of those.")
    return tuple(f for f in FORMATS if f in names)


def one_alpha(modules: list[LoraModule]) -> list[LoraModule]:
    """The same update with one alpha for every module: each module's alpha / common is folded into `up`.

    diffusers (0.42) turns per-module kohya alphas into a PEFT `alpha_pattern`
    whose keys name no module, so every module whose alpha differs from the
    most common one is scaled wrongly; with one alpha there is no pattern, and
    kohya, A1111, ComfyUI and diffusers all compute up @ down * alpha / rank alike.
    """
    counts: dict[float, int] = {}
    for m in modules:
        counts[m.alpha] = counts.get(m.alpha, 0) + 1
    if len(counts) <= 1:
        return modules
    common = max(counts, key=lambda a: (counts[a], a))
    return [
        m if m.alpha == common else replace(m, up=m.up.float() * (m.alpha / common), alpha=common)
        for m in modules
    ]


def network_metadata(modules: list[LoraModule], metadata: Mapping[str, str]) -> dict[str, str]:
    """`ss_network_dim` / `_alpha` and the conv args of `ss_network_args`, as the written modules carry them.

    One rank for all: that rank; ranks that vary: "Dynamic", as kohya's dynamic resize writes.
    A DoRA names LyCORIS's network and its `dora_wd` argument, as LyCORIS-trained DoRAs do.
    """

    def one(values: set) -> str:
        return _num(values.pop()) if len(values) == 1 else "Dynamic"

    linear = [m for m in modules if not is_conv_kernel(tuple(m.down.shape))]
    conv = [m for m in modules if is_conv_kernel(tuple(m.down.shape))]
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        args = {}
    args = {
        k: v
        for k, v in (args if isinstance(args, dict) else {}).items()
        if k not in ("conv_dim", "conv_alpha")
    }
    if conv:
        args |= {"conv_dim": one({m.rank for m in conv}), "conv_alpha": one({m.alpha for m in conv})}
    dora = {}
    if any(m.magnitude is not None for m in modules):
        # how LyCORIS's kohya network is told to train a DoRA (and how its readers tell one)
        args |= {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}
        dora = {"ss_network_module": "lycoris.kohya"}
    main = linear or conv
    return {
        **dora,
        "ss_network_dim": one({m.rank for m in main}),
        "ss_network_alpha": one({m.alpha for m in main}),
        "ss_network_args": json.dumps(args),
    }


_TE_QKV_RX = re.compile(r"\.self_attn\.[qkv]_proj$")


def with_out_proj_anchors(modules: list[LoraModule], naming: Naming) -> list[LoraModule]:
    """Add a zero `self_attn.out_proj` module to each text encoder whose attention LoRA has none.

    diffusers (0.42) guesses the layout of a kohya text-encoder LoRA from the
    presence of an `out_proj` module (its `to_out_lora` name). Without one, the
    q/k/v modules are dropped silently when an MLP module is present, and the
    load fails ("Could not automatically infer state dict type") when none is.
    An extraction leaves unchanged layers out, so this happens whenever a
    fine-tune did not touch out_proj. A zero update changes nothing in any
    loader and makes diffusers place every module.
    """
    extra = []
    for component in (TE, TE2):
        mods = [m for m in modules if m.target.component == component]
        if any(m.target.path.endswith(".self_attn.out_proj") for m in mods):
            continue
        qkv = next((m for m in mods if _TE_QKV_RX.search(m.target.path)), None)
        if qkv is None:
            continue
        target = Target(component, _TE_QKV_RX.sub(".self_attn.out_proj", qkv.target.path))
        if target.path in naming.modules.get(component, ()):  # q/k/v and out_proj share their shape
            zeros = dict(up=torch.zeros_like(qkv.up), down=torch.zeros_like(qkv.down), magnitude=None)
            extra.append(replace(qkv, target=target, **zeros))
    return modules + extra


def write_lora(
    path: str | Path,
    modules: list[LoraModule],
    naming: Naming,
    *,
    fmt: str,
    dtype: torch.dtype,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    on_tensor: Callable[[str, LazyTensor], None] | None = None,
) -> int:
    """Write `modules` in layout `fmt`; returns the file size in bytes.

    kohya files get one alpha (`one_alpha`), network metadata computed from
    the modules, and out_proj anchors for diffusers (`with_out_proj_anchors`).
    """
    if fmt == KOHYA:
        modules = one_alpha(modules)
        meta = {**(metadata or {}), **network_metadata(modules, metadata or {})}
        sd = kohya_state_dict(with_out_proj_anchors(modules, naming), naming, dtype)
        meta["sshs_model_hash"] = data_hash(sd)
    elif fmt == PEFT:
        sd, meta = peft_state_dict(modules, naming, dtype)
        meta = {**(metadata or {}), **meta}
    else:
        raise SdcError(f"unknown LoRA format {fmt!r}; choose kohya or peft.")
    write_safetensors(path, sd, meta, overwrite=overwrite, on_tensor=on_tensor)
    return Path(path).stat().st_size
