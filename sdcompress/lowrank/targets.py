"""Which modules of a model a LoRA adapts, and every name the ecosystem gives them.

Targets are chosen by key names and shapes, never by class names (kohya's
selection by class name broke when transformers renamed CLIPAttention). The
rules are regular expressions over diffusers state-dict keys, so they hold for
any depth and any pruned layout:

- U-Net "attention" set (kohya's default): every linear / 1x1 conv inside a
  Transformer2DModel: proj_in, proj_out, attn1/attn2 to_q/k/v/to_out.0,
  ff.net.0.proj, ff.net.2;
- U-Net "conv" set (with a conv rank): resnet conv1/conv2/conv_shortcut and
  time_emb_proj, down- and upsampler convs;
- text encoders: self_attn q/k/v/out_proj and mlp fc1/fc2 of every layer.

`Naming` turns a target into its kohya name (diffusers paths for SD 1/2,
original SGM paths for the SDXL U-Net, as kohya and every consumer expect) and
back, using the model's own key set and the project's U-Net key map.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sdcompress.checkpoint.keymap.unet import layout_from_diffusers_keys, to_single_file_names

if TYPE_CHECKING:
    from sdcompress.checkpoint.model import Model

UNET = "unet"
TE = "text_encoder"
TE2 = "text_encoder_2"
COMPONENTS = (UNET, TE, TE2)

_BLOCK = r"(?:(?:down_blocks|up_blocks)\.\d+|mid_block)"
_ATTN_RX = re.compile(
    rf"^{_BLOCK}\.attentions\.\d+\."
    r"(?:proj_in|proj_out|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.(?:0\.proj|2)))"
    r"\.weight$"
)
_CONV_RX = re.compile(
    rf"^(?:{_BLOCK}\.resnets\.\d+\.(?:conv1|conv2|conv_shortcut|time_emb_proj)"
    r"|(?:down_blocks|up_blocks)\.\d+\.(?:downsamplers|upsamplers)\.0\.conv)\.weight$"
)
_TE_RX = re.compile(
    r"^(?:text_model\.)?encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])\.weight$"
)


@dataclass(frozen=True, order=True)
class Target:
    """A module a LoRA can change: the component and its module path (weight key minus `.weight`)."""

    component: str
    path: str

    @property
    def weight_key(self) -> str:
        return self.path + ".weight"

    @property
    def block(self) -> str:
        """The report's grouping: e.g. `unet.down_blocks.1`, `unet.mid_block`, `text_encoder`."""
        if self.component != UNET:
            return self.component
        parts = self.path.split(".")
        return "unet." + (parts[0] if parts[0] == "mid_block" else ".".join(parts[:2]))


def is_target(component: str, key: str, shape: tuple[int, ...], conv: bool) -> bool:
    """True when `key` (a weight of `component`) is one a LoRA adapts; `conv` adds the resnet/sampler set."""
    if len(shape) not in (2, 4):
        return False
    if component == UNET:
        if _ATTN_RX.match(key):
            return True
        return conv and bool(_CONV_RX.match(key))
    if component in (TE, TE2):
        return bool(_TE_RX.match(key))
    return False


def is_conv_kernel(shape: tuple[int, ...]) -> bool:
    """A spatial kernel (3x3 ...): it takes the conv rank; linears and 1x1 convs take the linear rank."""
    return len(shape) == 4 and (shape[2] > 1 or shape[3] > 1)


def canonical_te_path(path: str) -> str:
    """transformers 5 saves CLIPTextModel without `text_model.`; LoRA names always carry it."""
    return (
        path if path.startswith("text_model.") or path.startswith("text_projection") else "text_model." + path
    )


def kohya_prefix(component: str, sdxl: bool) -> str:
    if component == UNET:
        return "lora_unet"
    if component == TE:
        return "lora_te1" if sdxl else "lora_te"
    return "lora_te2"


class Naming:
    """Names of a model's modules in every LoRA layout, built from the model's own keys.

    `keys` maps each component to its diffusers state-dict keys. The SGM names
    for an SDXL U-Net come from the project's key map, derived from the key set,
    so pruned layouts name their modules the way loaders infer them.
    """

    def __init__(self, keys: Mapping[str, Iterable[str]], *, sdxl: bool):
        self.sdxl = sdxl
        self.modules: dict[str, set[str]] = {}
        self._sgm: dict[str, str] = {}
        self._by_kohya: dict[str, Target] = {}
        self._by_path: dict[tuple[str, str], Target] = {}
        for component, ks in keys.items():
            ks = list(ks)
            paths = {k.removesuffix(".weight") for k in ks if k.endswith(".weight")}
            self.modules[component] = paths
            if component == UNET:
                try:
                    sgm = to_single_file_names(ks, layout_from_diffusers_keys(ks))
                except (KeyError, ValueError, IndexError):  # not a full U-Net key set (tests, partial files)
                    sgm = {}
                self._sgm = {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in sgm.items()}
            for path in paths:
                t = Target(component, path)
                self._index(t)

    def _index(self, t: Target) -> None:
        names = {self.dotted(t)}
        if t.component == UNET and t.path in self._sgm:
            names.add(self._sgm[t.path])
            self._by_path[("sgm", self._sgm[t.path])] = t
        self._by_path[(t.component, self.dotted(t))] = t
        for prefix in {kohya_prefix(t.component, self.sdxl), *(["lora_te"] if t.component == TE else [])}:
            for name in names:
                self._by_kohya[f"{prefix}_{name.replace('.', '_')}"] = t

    @staticmethod
    def dotted(t: Target) -> str:
        return canonical_te_path(t.path) if t.component != UNET else t.path

    def kohya(self, t: Target) -> str:
        """kohya name: diffusers path for SD 1/2 and the text encoders, SGM path for the SDXL U-Net."""
        path = self.dotted(t)
        if t.component == UNET and self.sdxl:
            path = self._sgm.get(t.path, path)
        return f"{kohya_prefix(t.component, self.sdxl)}_{path.replace('.', '_')}"

    def peft(self, t: Target) -> str:
        return f"{t.component}.{self.dotted(t)}"

    def from_kohya(self, name: str) -> Target | None:
        return self._by_kohya.get(name)

    def from_dotted(self, component: str, path: str) -> Target | None:
        if component == "sgm":
            return self._by_path.get(("sgm", path))
        if component != UNET:
            path = canonical_te_path(path)
        return self._by_path.get((component, path))


def naming_for(model: Model) -> Naming:
    """The module names of a loaded model, in every LoRA layout."""
    return Naming({c: list(sd) for c, sd in model.components.items()}, sdxl=model.family.is_sdxl)
