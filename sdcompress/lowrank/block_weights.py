"""Per-block merge weights: `--block-weights "down=0.2,mid=0.5,up=0.8,te=0"`.

Merging the U-Net's stages with different weights (keep the composition of one
model, the detail of another) is the block merge people do in supermerger. The
names here follow the U-Net's own stages rather than supermerger's IN00..OUT11
numbering, which counts layers differently in SD 1 and SDXL and has no name for
the time embedding; a stage name means the same thing for every family:

- `down`, `mid`, `up`: all of that stage; `down.N` / `up.N`: `down_blocks.N` /
  `up_blocks.N` (the diffusers spellings `down_blocks.N`, `mid_block`,
  `up_blocks.N` are accepted too);
- `other`: U-Net tensors outside the stages (conv_in, time and add embeddings,
  conv_norm_out, conv_out); `unet`: the whole U-Net;
- `te`: every text encoder, `te1` / `te2`: the first / second; `vae`: the VAE.

The most specific name wins (`down.1` over `down` over `unet`); tensors no name
covers keep `--alpha`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sdcompress.arch.count import stage_of
from sdcompress.errors import SdcError

_NAME = re.compile(r"^(?:unet|down|mid|up|other|te|te1|te2|vae|down\.\d+|up\.\d+)$")
_DIFFUSERS = re.compile(r"^(down|up)_blocks\.(\d+)$")
_TEXT = {"text_encoder": ("te1", "te"), "text_encoder_2": ("te2", "te")}


def _canonical(name: str) -> str:
    name = name.strip().lower()
    if name == "mid_block":
        return "mid"
    m = _DIFFUSERS.match(name)
    return f"{m.group(1)}.{m.group(2)}" if m else name


def names_for(component: str, key: str) -> tuple[str, ...]:
    """The block names that cover one tensor, most specific first."""
    if component == "unet":
        stage = stage_of(key)
        if stage == "other":
            return ("other", "unet")
        short = _canonical(stage)
        return (short, short.split(".")[0], "unet") if "." in short else (short, "unet")
    if component == "vae":
        return ("vae",)
    return _TEXT.get(component, ())


@dataclass(frozen=True)
class BlockWeights:
    weights: dict[str, float]

    @classmethod
    def parse(cls, text: str) -> BlockWeights:
        """'NAME=VALUE,NAME=VALUE'; names as in the module docstring."""
        weights: dict[str, float] = {}
        for item in (x for x in text.split(",") if x.strip()):
            raw, sep, value = item.partition("=")
            name = _canonical(raw)
            if not sep or not _NAME.match(name):
                raise SdcError(
                    f"--block-weights item {item.strip()!r} is not NAME=VALUE with NAME one of unet, down, "
                    "down.N, mid, up, up.N, other, te, te1, te2, vae; e.g. down=0.2,mid=0.5,up=0.8."
                )
            try:
                weight = float(value)
            except ValueError:
                raise SdcError(
                    f"--block-weights value {value.strip()!r} for {name} is not a number."
                ) from None
            if name in weights:
                raise SdcError(f"--block-weights names {name} twice; give each block once.")
            weights[name] = weight
        if not weights:
            raise SdcError("--block-weights is empty; give NAME=VALUE pairs such as down=0.2,mid=0.5,up=0.8.")
        return cls(weights)

    def alpha_for(self, component: str, key: str) -> float | None:
        """The weight of the most specific name covering the tensor; None: use --alpha."""
        return next((self.weights[n] for n in names_for(component, key) if n in self.weights), None)

    def check_covers(self, components: Mapping[str, Iterable[str]]) -> None:
        """Every name must cover some tensor of the model, so a typo (`up.9`, `te2` on SD 1) is caught."""
        covered = {n for c, keys in components.items() for k in keys for n in names_for(c, k)}
        missing = [n for n in self.weights if n not in covered]
        if missing:
            raise SdcError(
                f"--block-weights names {', '.join(missing)}, which this model does not have; "
                f"its blocks are {', '.join(sorted(covered))}."
            )

    def describe(self) -> str:
        return ", ".join(f"{n}={w:g}" for n, w in self.weights.items())
