"""Run a model whose weights stay in fp8 in memory: each layer's weights are cast up for its own forward.

This is what ComfyUI and Forge do with fp8 files where no fp8 matmul is used, and what `bench`
measures on quantized files. diffusers' `enable_layerwise_casting` does the same but casts
every supported layer to one storage dtype, which would round the layers a file keeps at
higher precision; here only the tensors that are fp8 in the file stay fp8. A scaled-fp8
weight is held as its fp8 codes and multiplied by its scale as it is cast up (ComfyUI's
scaled fp8 ops also apply the scale at run time), not held as the full-precision product.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sdcompress.checkpoint.tensors import StateDict
from sdcompress.quantize.describe import FP8_NAMES


def fp8_codes(sd: StateDict) -> tuple[StateDict, dict[str, torch.Tensor]]:
    """The state dict with each scaled-fp8 weight (`fp8.ScaledWeight`) as its fp8 codes, and the
    scales by the same names: what `cast_up_per_layer` needs to keep such weights in fp8."""
    from sdcompress.quantize.fp8 import ScaledWeight

    codes, scales = dict(sd), {}
    for k, lt in sd.items():
        if isinstance(lt, ScaledWeight) and lt.codes is not None and lt.scale is not None:
            codes[k] = lt.codes
            scales[k] = lt.scale.load().float()
    return codes, scales


def cast_up_per_layer(
    module: torch.nn.Module, compute: torch.dtype, scales: Mapping[str, torch.Tensor] | None = None
) -> int:
    """Keep fp8 parameters as they are, cast the rest to `compute`; returns how many layers cast up.

    `scales` (parameter name -> float32 scale, from `fp8_codes`): those fp8 weights are cast up
    as codes x scale, in float32 and then to `compute`, the product the file's reader computes.
    """
    layers = 0
    for prefix, sub in module.named_modules():
        own = dict(sub.named_parameters(recurse=False))
        fp8 = [n for n, p in own.items() if p.dtype in FP8_NAMES]
        for n, p in own.items():
            if n not in fp8 and p.dtype.is_floating_point and p.dtype != compute:
                p.data = p.data.to(compute)
        if fp8:
            found = {n: (scales or {}).get(f"{prefix}.{n}" if prefix else n) for n in fp8}
            mine = {n: s.to(own[n].device) for n, s in found.items() if s is not None}
            sub.register_forward_pre_hook(_up(fp8, compute, mine))
            sub.register_forward_hook(_down(fp8))
            layers += 1
    return layers


def _up(names: list[str], compute: torch.dtype, scales: dict[str, torch.Tensor]):  # noqa: ANN202 - a torch hook
    def hook(mod: torch.nn.Module, _args: object) -> None:
        mod._fp8_stored = {n: getattr(mod, n).data for n in names}
        for n in names:
            stored = mod._fp8_stored[n]
            up = (stored.float() * scales[n]).to(compute) if n in scales else stored.to(compute)
            getattr(mod, n).data = up

    return hook


def _down(names: list[str]):  # noqa: ANN202 - a torch hook
    def hook(mod: torch.nn.Module, _args: object, _out: object) -> None:
        for n in names:
            getattr(mod, n).data = mod._fp8_stored[n]
        del mod._fp8_stored

    return hook
