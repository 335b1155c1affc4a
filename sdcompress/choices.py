"""The fixed sets of values that options take, defined once.

Each set is a `str` Enum: Typer lists its values in `--help` and refuses
others with a usage error, and the service requests use the same type for
their fields and check them in `__post_init__`, so a Python caller gets the
same one-sentence error as a shell user. Members compare equal to their
values (`DType.FP16 == "fp16"`), so records and JSON output stay plain text.

This module is imported when the CLI starts, so it must not import torch:
`resolve_dtype` imports it only when called.
"""

from __future__ import annotations

import dataclasses
import types
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, Union, get_args, get_origin, get_type_hints

from sdcompress.errors import SdcError

if TYPE_CHECKING:
    import torch


class Choice(StrEnum):
    """A StrEnum read case-insensitively, with one error sentence for values it does not know."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def _missing_(cls, value: object) -> Self | None:
        text = str(value).strip().lower()
        return next((m for m in cls if m.value == text), None)

    @classmethod
    def values(cls) -> str:
        return ", ".join(m.value for m in cls)

    @classmethod
    def parse(cls, value: Any, flag: str) -> Self:
        """`value` as a member of this set; anything else is an `SdcError` naming `flag` and the choices."""
        try:
            return cls(value)
        except ValueError:
            raise SdcError(f"{flag} {value!r} is not one of {cls.values()}.") from None

    @classmethod
    def parse_optional(cls, value: Any, flag: str) -> Self | None:
        return None if value is None else cls.parse(value, flag)

    @classmethod
    def cli(cls, value: str) -> Self:
        """Typer `parser=` for sets with aliases (Typer's own Enum check knows only the values)."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{value!r} is not one of {cls.values()}.") from None


class Fp8Compute(Choice):
    """How `bench` runs an fp8 file's weights: multiplied in fp8 where torch can, or cast up per layer."""

    AUTO = "auto"  # fp8 matmuls on a CUDA device that has them, else cast up
    MATMUL = "matmul"
    CAST_UP = "cast-up"


class DType(Choice):
    """The dtype tensors are written in."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @classmethod
    def _missing_(cls, value: object) -> DType | None:
        # torch's own names ("bfloat16", "torch.float16") and the usual short forms.
        text = str(value).strip().lower().removeprefix("torch.")
        return super()._missing_(_DTYPE_ALIASES.get(text, text))

    def torch(self) -> torch.dtype:
        import torch

        return getattr(torch, _TORCH_NAMES[self])


_DTYPE_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "full": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
}
_TORCH_NAMES = {DType.FP32: "float32", DType.FP16: "float16", DType.BF16: "bfloat16"}


def resolve_dtype(value: Any, flag: str = "--dtype") -> torch.dtype | None:
    """The torch dtype for a `DType`, one of its values or aliases (`bfloat16`, `half`...), or None."""
    dtype = DType.parse_optional(value, flag)
    return None if dtype is None else dtype.torch()


def dtype_name(dtype: torch.dtype | None) -> DType | None:
    """The `DType` of a torch dtype (None for None); a dtype outside the set is an error."""
    return DType.parse_optional(dtype, "dtype")


class PredictionType(Choice):
    """What the U-Net predicts; written into scheduler_config.json, so nothing else is accepted.

    `sample` (x0) is what some step-distilled teachers predict; every diffusers scheduler reads it.
    """

    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"
    SAMPLE = "sample"


class QuantFormat(Choice):
    """`quantize --format`: what the quantized weights are stored as, and so which loaders read the file.

    `fp8*` are single files (ComfyUI, Forge, A1111, diffusers `from_single_file`); `gguf-*` are
    U-Net-only files for ComfyUI-GGUF; `nf4` and `int8` are diffusers folders through diffusers'
    own quantization configs (bitsandbytes, torchao).
    """

    FP8 = "fp8"
    FP8_E5M2 = "fp8-e5m2"
    FP8_SCALED = "fp8-scaled"
    GGUF_Q8_0 = "gguf-q8_0"
    GGUF_Q5_1 = "gguf-q5_1"
    GGUF_Q5_0 = "gguf-q5_0"
    GGUF_Q4_1 = "gguf-q4_1"
    GGUF_Q4_0 = "gguf-q4_0"
    GGUF_F16 = "gguf-f16"
    NF4 = "nf4"
    INT8 = "int8"

    @property
    def is_gguf(self) -> bool:
        return self.value.startswith("gguf-")

    @property
    def is_fp8(self) -> bool:
        return self.value.startswith("fp8")

    @property
    def is_diffusers(self) -> bool:
        return self in (QuantFormat.NF4, QuantFormat.INT8)


class ModelFormat(Choice):
    """The two ways a whole model is stored."""

    SINGLE_FILE = "single-file"
    DIFFUSERS = "diffusers"


class LoraFormat(Choice):
    """The LoRA layouts sdcompress writes: kohya (A1111 / ComfyUI / diffusers) or PEFT."""

    KOHYA = "kohya"
    PEFT = "peft"


class LoraOutputs(Choice):
    """`--format` of extract-lora and lora train: one LoRA layout, or both files (`both` is an alias)."""

    KOHYA = "kohya"
    PEFT = "peft"
    KOHYA_PEFT = "kohya,peft"

    @classmethod
    def _missing_(cls, value: object) -> LoraOutputs | None:
        text = str(value).strip().lower().replace(" ", "")
        return cls.KOHYA_PEFT if text in ("both", "peft,kohya") else super()._missing_(text)


class ConvertFormat(Choice):
    """`convert --format`: a model layout for models, a LoRA layout for LoRA files, an embedding layout for
    embeddings (a1111, or diffusers for `load_textual_inversion`)."""

    SINGLE_FILE = "single-file"
    DIFFUSERS = "diffusers"
    KOHYA = "kohya"
    PEFT = "peft"
    A1111 = "a1111"  # an embedding file for A1111 / ComfyUI (for embeddings `diffusers` is diffusers' layout)


class CaptionTemplate(Choice):
    """`embedding train --template`: the prompts an image without a caption (or without the token) gets."""

    OBJECT = "object"
    STYLE = "style"
    NONE = "none"


class SelectMethod(Choice):
    """How `prune` chooses the transformer blocks a student keeps."""

    IMPORTANCE = "importance"
    UNIFORM = "uniform"
    LAST = "last"


class MidBlock(Choice):
    """What `prune` does with the mid block: keep it, keep one resnet (as SSD-1B), or drop it."""

    KEEP = "keep"
    RESNET = "resnet"
    NONE = "none"


class RankMode(Choice):
    """How `extract-lora` picks each layer's rank."""

    FIXED = "fixed"
    RATIO = "ratio"
    ENERGY = "energy"
    THRESHOLD = "threshold"


class MergeMethod(Choice):
    """Checkpoint merge methods (their arithmetic and parameters live in `lowrank.merge_math`)."""

    WEIGHTED_SUM = "weighted-sum"
    ADD_DIFFERENCE = "add-difference"
    TIES = "ties"
    DARE = "dare"


class Sampler(Choice):
    """`eval --scheduler`: the diffusers scheduler images are generated with (`model`: the model's own)."""

    MODEL = "model"
    PNDM = "pndm"
    DDIM = "ddim"
    EULER = "euler"
    DPM = "dpm++"
    LCM = "lcm"
    TCD = "tcd"  # on a few-step student's LCM config, deterministic (gamma 0): scorable seed by seed


class EvalMetric(Choice):
    """`eval --metrics`: `agreement` (latent MSE, PSNR, SSIM against the teacher) needs no extra weights."""

    AGREEMENT = "agreement"
    CLIP = "clip"
    FID = "fid"


def _choice_of(hint: Any) -> type[Choice] | None:
    """The Choice in a field's type (`DType`, `DType | None`), if any."""
    options = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    return next((t for t in options if isinstance(t, type) and issubclass(t, Choice)), None)


def parse_choices(request: Any) -> None:
    """Check every Choice-typed field of a request dataclass and store it as the member.

    Called from `__post_init__`, so a Python caller passing `"bfloat16"` or a
    bad value gets the same member or the same one-sentence error
    (`--select 'x' is not one of ...`) as the command line; the flag is the
    field's name in dashes.
    """
    hints = get_type_hints(type(request))
    for f in dataclasses.fields(request):
        choice = _choice_of(hints.get(f.name))
        if choice is not None:
            flag = "--" + f.name.replace("_", "-")
            setattr(request, f.name, choice.parse_optional(getattr(request, f.name), flag))


def output_kind(path: str | Path) -> ModelFormat:
    """How a model written to `path` is stored: a `.safetensors` path is one file, anything else a folder."""
    return ModelFormat.SINGLE_FILE if str(path).lower().endswith(".safetensors") else ModelFormat.DIFFUSERS
