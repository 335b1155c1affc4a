"""What a format does to one weight: quantize and dequantize in memory, for scoring and reports.

The writers store codes; allocation and the reports need the values a loader will compute
from them, per tensor, without writing a file. fp8 rounds through torch's own fp8 dtypes;
GGUF through the `gguf` package's numpy quantizers (the same code ComfyUI-GGUF's files are
made with), imported only when a GGUF format is asked for.
"""

from __future__ import annotations

import torch

from sdcompress.choices import QuantFormat
from sdcompress.errors import SdcError
from sdcompress.quantize import fp8

GGUF_BITS = {
    QuantFormat.GGUF_Q8_0: 8.5,
    QuantFormat.GGUF_Q5_1: 6.0,
    QuantFormat.GGUF_Q5_0: 5.5,
    QuantFormat.GGUF_Q4_1: 5.0,
    QuantFormat.GGUF_Q4_0: 4.5,
    QuantFormat.GGUF_F16: 16.0,
}


def bits(fmt: QuantFormat) -> float:
    """Bits per quantized weight as stored (GGUF blocks carry their scales)."""
    return GGUF_BITS.get(fmt, 8.0)


def quantized_bytes(fmt: QuantFormat, shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    extra = 4 if fmt == QuantFormat.FP8_SCALED and fp8.takes_scale(shape) else 0
    return int(n * bits(fmt) / 8) + extra


def _gguf_type(fmt: QuantFormat):  # noqa: ANN202 - a gguf enum, and gguf is optional
    try:
        import gguf
    except ImportError:
        raise SdcError(f"--format {fmt} needs the gguf package; install sdcompress[gguf].") from None
    return gguf, getattr(gguf.GGMLQuantizationType, fmt.value.removeprefix("gguf-").upper())


def roundtrip(fmt: QuantFormat, t: torch.Tensor) -> torch.Tensor:
    """`t` (float32) as the loader will see it after `fmt` stored it."""
    fmt = QuantFormat.parse(fmt, "--format")
    t = t.float()
    if fmt.is_fp8:
        dtype = fp8.DTYPES[fmt]
        if fmt == QuantFormat.FP8_SCALED and fp8.takes_scale(tuple(t.shape)):
            q, s = fp8.scaled(t, dtype)
            return q.float() * s
        return fp8.cast(t, dtype).float()
    if fmt.is_gguf:
        gguf, qtype = _gguf_type(fmt)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if t.numel() % block:  # the writer stores such a tensor in F16
            return t.half().float()
        flat = t.reshape(-1, block).numpy()
        back = gguf.quants.dequantize(gguf.quants.quantize(flat, qtype), qtype)
        return torch.from_numpy(back.copy()).reshape(t.shape).float()
    raise SdcError(
        f"--format {fmt} is written by diffusers' own quantizers; per-layer scoring is not available."
    )


def snr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-noise ratio of a weight's quantization, in dB (inf when exact)."""
    ref = ref.float()
    noise = float(((approx.float() - ref) ** 2).sum())
    signal = float((ref**2).sum())
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item()
