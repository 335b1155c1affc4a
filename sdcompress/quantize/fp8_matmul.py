"""Linear layers whose fp8 weights are multiplied in fp8 (`torch._scaled_mm`), where torch has it.

On GPUs with fp8 tensor cores (compute capability 8.9 and up: Ada, Hopper, Blackwell) an fp8
matmul runs at up to twice the fp16 rate (NVIDIA's peak figures; not measured here); ComfyUI's
`fp8_e4m3fn_fast` weight type does the same. The
other way to run an fp8 file, casting each layer's weights up for its forward (`cast_up`), saves
memory but no time. Neither diffusers nor peft has an fp8-matmul layer (diffusers' layerwise
casting casts up; torchao's float8 training layers quantize weights themselves rather than take
a file's codes and scales), hence this small one.

The activations are quantized to e4m3fn per tensor on the fly (scale = amax / 448), the weight
keeps the file's codes and its `scale_weight` (1 for a plain fp8 file). torch keeps `_scaled_mm`
private and its constraints are per device (inner dimensions multiples of 16, an e4m3fn operand,
the second operand column-major), so a layer is swapped only when it fits them; the rest of the
U-Net is cast up as before.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
ALIGN = 16


def available(device: torch.device) -> bool:
    """Whether torch runs an fp8 matmul on `device` (a 16x16 probe; CUDA also needs capability 8.9+)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return False
    try:
        a = torch.zeros(ALIGN, ALIGN, device=device).to(E4M3)
        one = torch.ones((), device=device)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float16)
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return False
    return True


def fits(layer: torch.nn.Module) -> bool:
    w = getattr(layer, "weight", None)
    return (
        isinstance(layer, torch.nn.Linear)
        and w is not None
        and w.dtype == E4M3
        and w.shape[0] % ALIGN == 0
        and w.shape[1] % ALIGN == 0
    )


class Fp8Linear(torch.nn.Module):
    """`y = x W^T s + b` with x quantized per tensor and W the file's fp8 codes, scale s."""

    def __init__(self, linear: torch.nn.Linear, scale: torch.Tensor | None, compute: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute = compute
        # A frozen parameter, so parameter counts and weight bytes see it (swap after `cast_up_per_layer`:
        # it would hook a layer with fp8 parameters to cast them up).
        self.weight = torch.nn.Parameter(linear.weight.data, requires_grad=False)
        w_scale = scale if scale is not None else torch.ones(())
        self.register_buffer(
            "w_scale", w_scale.to(device=linear.weight.device, dtype=torch.float32).reshape(())
        )
        bias = linear.bias
        self.bias = None if bias is None else torch.nn.Parameter(bias.data.to(compute), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        # Floored at fp16's smallest normal: an all-zero or tiny input still divides to finite values.
        x_scale = (x2.abs().amax().float() / E4M3_MAX).clamp(min=2**-14)
        xq = (x2 / x_scale.to(x2.dtype)).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)
        y = torch._scaled_mm(
            xq, self.weight.t(), scale_a=x_scale, scale_b=self.w_scale, out_dtype=self.compute
        )
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


def swap_linears(
    module: torch.nn.Module, compute: torch.dtype, scales: Mapping[str, torch.Tensor] | None = None
) -> int:
    """Replace every Linear that `fits` with an `Fp8Linear`; returns how many. `scales` as `cast_up`'s.

    Run after `cast_up_per_layer`: the Linears it hooked are replaced, the rest keep their hooks.
    """
    swapped = 0
    for prefix, parent in list(module.named_modules()):
        for name, child in list(parent.named_children()):
            if fits(child):
                full = f"{prefix}.{name}.weight" if prefix else f"{name}.weight"
                setattr(parent, name, Fp8Linear(child, (scales or {}).get(full), compute))
                swapped += 1
    return swapped
