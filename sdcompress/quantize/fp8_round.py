"""Saturating round-to-nearest-even into fp8, computed on the source's bit pattern.

Why not `tensor.to(torch.float8_e4m3fn)`: torch converts one element at a time through a
scalar routine (about 200M values/s on two CPU cores, the whole cost of `quantize --format fp8`
on an SDXL file) and turns values past the format's range into NaN, so the caller also needs a
min/max pass. Rounding the mantissa of an fp16/bf16/fp32 value to fp8's is integer arithmetic
on its bits, which torch runs vectorised: about 2.5x the speed, with the saturation built in.
The result is bit-identical to `t.clamp(-max, max).to(dtype)` for every input: the tests check
every one of the 65,536 fp16 and bf16 patterns and random fp32 values against torch's own cast.

Three parts per element, combined without masks (`torch.where` is several times slower here):
values in fp8's normal range round their mantissa by integer addition (a carry into the exponent
is the correct rounding), values below it are scaled up and rounded to an integer in the source's
own float type (the fp8 subnormal codes are exactly those integers), NaN stays NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Elements per slice: the working buffers (four 16- or 32-bit arrays) stay inside the L2 cache,
# which is what makes the ~15 passes per slice cheap; measured best of 16K..1M on this project's CI CPU.
SLICE = 1 << 18


@dataclass(frozen=True)
class _Float:
    bits: torch.dtype  # the integer type of the same width
    exponent: int
    mantissa: int

    @property
    def bias(self) -> int:
        return (1 << (self.exponent - 1)) - 1

    @property
    def infinity(self) -> int:  # bit pattern of +inf (magnitudes above it are NaN)
        return ((1 << self.exponent) - 1) << self.mantissa


SOURCES = {
    torch.float16: _Float(torch.int16, 5, 10),
    torch.bfloat16: _Float(torch.int16, 8, 7),
    torch.float32: _Float(torch.int32, 8, 23),
}
# (exponent bits, mantissa bits, largest finite code): e4m3fn has no infinity and one NaN per sign.
TARGETS = {
    torch.float8_e4m3fn: (4, 3, 0x7E),
    torch.float8_e5m2: (5, 2, 0x7B),
}
NAN = 0x7F


def supported(source: torch.dtype, target: torch.dtype) -> bool:
    return source in SOURCES and target in TARGETS


def round_to_fp8(t: torch.Tensor, target: torch.dtype) -> torch.Tensor:
    """`t` (fp16, bf16 or fp32, any shape, CPU) rounded to `target`, saturating at its largest value."""
    src = SOURCES[t.dtype]
    exp_bits, man_bits, top = TARGETS[target]
    t_bias = (1 << (exp_bits - 1)) - 1
    shift = src.mantissa - man_bits
    rebias = (src.bias - t_bias) << man_bits
    # Below fp8's smallest normal (2**(1 - bias)), the code is round(|x| * 2**(bias - 1 + mantissa)).
    up = float(2 ** (t_bias - 1 + man_bits))
    magic = float(2**src.mantissa)  # adding it rounds a value below it to an integer, RNE
    magic_bits = (src.bias + src.mantissa) << src.mantissa
    sign_shift = torch.iinfo(src.bits).bits - 8

    flat = t.detach().contiguous().reshape(-1)
    bits = flat.view(src.bits)
    out = torch.empty(flat.numel(), dtype=torch.uint8)
    n = min(SLICE, flat.numel())
    mag, code, spare = (torch.empty(n, dtype=src.bits) for _ in range(3))  # 3 x 16/32 bits x SLICE
    small = torch.empty(n, dtype=t.dtype)
    magic_t = torch.tensor(magic, dtype=t.dtype)
    fused = up <= torch.finfo(t.dtype).max
    for start in range(0, flat.numel(), SLICE):
        b = bits[start : start + SLICE]
        k = b.numel()
        m, c, s, f = mag[:k], code[:k], spare[:k], small[:k]
        torch.bitwise_and(b, torch.iinfo(src.bits).max, out=m)  # |x| as bits
        # Subnormal codes: scale up, round to an integer by the magic add, read the integer off the bits.
        if fused:
            torch.add(magic_t, m.view(t.dtype), alpha=up, out=f)  # exact product, one rounding
        else:  # `up` (2**16 for e5m2) is past fp16's range as an alpha; as a multiplier it is fine
            torch.mul(m.view(t.dtype), up, out=f).add_(magic)
        fi = f.view(src.bits)
        fi.sub_(magic_bits)
        # Normal codes: round the mantissa (ties to even), re-bias the exponent, saturate. Finite and
        # infinite inputs cannot overflow (|x| <= inf's pattern, and the re-bias is subtracted before
        # the shift); a NaN may wrap, and its code is set below anyway.
        torch.bitwise_right_shift(m, shift, out=s)
        torch.add(m, s.bitwise_and_(1), out=c)
        c.add_((1 << (shift - 1)) - 1 - (rebias << shift)).bitwise_right_shift_(shift)
        # Pick without a mask: for |x| at or above the smallest normal, the normal code is at least
        # the smallest normal code and at most the (growing) subnormal formula; below it, the true
        # code (the subnormal formula) is at most the smallest normal code. So min(max(c, 1 << man), f).
        c.clamp_(min=1 << man_bits, max=top)
        torch.minimum(c, fi, out=c)
        if m.max() > src.infinity:  # NaN (one reduction instead of four passes for a rare case)
            c.masked_fill_(m > src.infinity, NAN)
        torch.bitwise_right_shift(b, sign_shift, out=s)
        c.bitwise_or_(s.bitwise_and_(0x80))
        out[start : start + k].copy_(c)
    return out.view(target).view(t.shape)
