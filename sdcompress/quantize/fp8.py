"""fp8 single files: plain casts (`fp8`, `fp8-e5m2`) and ComfyUI's scaled layout (`fp8-scaled`).

Everything here is lazy: a quantized tensor is a `LazyTensor` whose loader reads the
source tensor and casts it, so the project's one safetensors writer streams a whole
checkpoint with one tensor in memory.

The scaled layout is the one ComfyUI has read since 2025 (checked against its code, see
docs/quantize.md): a `model.diffusion_model.scaled_fp8` marker whose dtype names the fp8
type (two elements: no fp8 matmul, so no `scale_input`), and a float32 `scale_weight` per
Linear. ComfyUI applies that scale in its Linear op only, so a convolution stored with a
scale would be read without it: convolutions are stored as a plain cast, with no scale.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sdcompress.checkpoint.tensors import LazyTensor, StateDict
from sdcompress.choices import QuantFormat
from sdcompress.quantize import fp8_round

MARKER = "scaled_fp8"
SCALE = ".scale_weight"
INPUT_SCALE = ".scale_input"
DTYPES = {
    QuantFormat.FP8: torch.float8_e4m3fn,
    QuantFormat.FP8_SCALED: torch.float8_e4m3fn,
    QuantFormat.FP8_E5M2: torch.float8_e5m2,
}
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class LayerRecord:
    """One tensor as written: the same record the GGUF writer returns."""

    name: str
    stored: str  # "float8_e4m3fn", "float16", ...
    shape: tuple[int, ...]


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round to fp8, saturating: a plain `.to()` turns values past the format's range into NaN.

    CPU fp16/bf16/fp32 tensors go through `fp8_round` (the same bits as clamp-then-`.to()`, at
    about 2.5x its speed); anything else is clamped in float32 and cast by torch.
    """
    if t.device.type == "cpu" and fp8_round.supported(t.dtype, dtype):
        return fp8_round.round_to_fp8(t, dtype)
    top = torch.finfo(dtype).max
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        t = t.float()
    return t.clamp(-top, top).to(dtype)


def scale_of(t: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """The per-tensor scale that maps the largest |value| to fp8's largest (0-d float32, as ComfyUI keeps it)."""
    amax = t.abs().max().float()  # |x| and max are exact in the source dtype: no float32 copy
    top = torch.finfo(dtype).max
    return torch.where(amax > 0, amax / top, torch.ones(())).to(torch.float32).reshape(())


def scaled(
    t: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 codes of `t / scale` and the scale (`scale_of(t)` unless one computed from `t` is given)."""
    s = scale_of(t, dtype) if scale is None else scale
    return cast(t.float() / s, dtype), s


class _LayerScale:
    """One Linear's scale, computed once from whichever of its two tensors (codes, scale) loads first.

    Both come from the same source weight; without this the writer would read and reduce it twice.
    A lock, because the writer's load threads may load the two at once.
    """

    def __init__(self, source: LazyTensor, dtype: torch.dtype) -> None:
        self.source, self.dtype = source, dtype
        self.value: torch.Tensor | None = None
        self.lock = threading.Lock()

    def of(self, t: torch.Tensor | None = None) -> torch.Tensor:
        with self.lock:
            if self.value is None:
                self.value = scale_of(self.source.load() if t is None else t, self.dtype)
            return self.value

    def codes(self) -> torch.Tensor:
        t = self.source.load()
        return scaled(t, self.dtype, self.of(t))[0]


def takes_scale(shape: tuple[int, ...]) -> bool:
    """A Linear weight (2-D): the only kind ComfyUI's scaled ops apply `scale_weight` to."""
    return len(shape) == 2


def quantized_state_dict(
    sd: StateDict,
    fmt: QuantFormat,
    keep: Callable[[str, LazyTensor], bool],
    *,
    prefix: str = "",
    scales: bool | None = None,
) -> tuple[StateDict, list[LayerRecord]]:
    """`sd` (original names, `prefix` prepended) with every tensor `keep` refuses cast to fp8.

    With `scales` (default: `fmt` is fp8-scaled), Linear weights get a `scale_weight` and the
    marker is added; convolutions and the text encoders (`scales=False`) are plain casts.
    """
    dtype = DTYPES[fmt]
    use_scales = fmt == QuantFormat.FP8_SCALED if scales is None else scales
    out: StateDict = {}
    records = []
    for name, lt in sd.items():
        if keep(name, lt):
            out[prefix + name] = lt
            records.append(LayerRecord(name, str(lt.dtype).removeprefix("torch."), lt.shape))
            continue
        if use_scales and takes_scale(lt.shape) and name.endswith(".weight"):
            layer = prefix + name[: -len(".weight")]
            layer_scale = _LayerScale(lt, dtype)
            out[prefix + name] = LazyTensor(lt.shape, dtype, layer_scale.codes)
            out[layer + SCALE] = LazyTensor((), torch.float32, layer_scale.of)
        else:
            out[prefix + name] = LazyTensor(lt.shape, dtype, lambda lt=lt: cast(lt.load(), dtype))
        records.append(LayerRecord(name, str(dtype).removeprefix("torch."), lt.shape))
    if use_scales:
        out[prefix + MARKER] = LazyTensor.of(torch.zeros(2, dtype=dtype))
    return out, records


@dataclass(frozen=True)
class ScaledWeight(LazyTensor):
    """A scaled-fp8 weight read back: it loads as codes x scale, and keeps the two, so a consumer
    that holds weights in fp8 (bench, through `cast_up_per_layer`) can keep the codes and apply the
    scale per layer instead of holding the product at full precision. Reshapes and casts of it are
    plain `LazyTensor`s (the product)."""

    codes: LazyTensor | None = field(default=None, repr=False, compare=False)
    scale: LazyTensor | None = field(default=None, repr=False, compare=False)


def fold_scales(sd: StateDict, compute: torch.dtype | None = None) -> StateDict:
    """Read a scaled-fp8 state dict back: marker and input scales dropped, each scaled weight lazily
    multiplied out in float32 (exactly what a loader computing in fp32 uses; fp16 would round it).

    Unscaled fp8 tensors stay fp8 (commands cast them where they need another dtype).
    """
    markers = [k for k in sd if k == MARKER or k.endswith("." + MARKER)]
    if not markers:
        return sd
    compute = compute or torch.float32
    out: StateDict = {}
    for k, lt in sd.items():
        if k in markers or k.endswith((SCALE, INPUT_SCALE)):
            continue
        scale_key = k[: -len(".weight")] + SCALE if k.endswith(".weight") else None
        if scale_key in sd:
            s = sd[scale_key]
            out[k] = ScaledWeight(
                lt.shape,
                compute,
                lambda lt=lt, s=s: (lt.load().float() * s.load().float()).to(compute),
                codes=lt,
                scale=s,
            )
        else:
            out[k] = lt
    return out


def is_scaled(keys: list[str]) -> bool:
    return any(k == MARKER or k.endswith("." + MARKER) for k in keys)


def quantized_view(sd: StateDict, metadata: dict[str, str]) -> tuple[StateDict, dict[str, str]]:
    """How the resolver reads a file: a scaled-fp8 one folded (and described, when its header is
    silent, before the folding hides which tensors were fp8); anything else as it is."""
    if not is_scaled(list(sd)):
        return sd, metadata
    from sdcompress.quantize.describe import META_KEY, from_dtypes

    meta = dict(metadata)
    if META_KEY not in meta:
        unet = {
            k: v
            for k, v in sd.items()
            if k.startswith(("model.diffusion_model.", "input_blocks.", "middle_block.", "output_blocks."))
        }
        found = from_dtypes(unet, scaled=True)
        if found is not None:
            meta[META_KEY] = found.to_json()
    return fold_scales(sd), meta
