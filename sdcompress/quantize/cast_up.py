"""Run a model whose weights stay in fp8 in memory: each layer's weights are cast up for its own forward.

This is what ComfyUI and Forge do with fp8 files where no fp8 matmul is used, and what `bench`
measures on quantized files. diffusers' `enable_layerwise_casting` does the same but casts
every supported layer to one storage dtype, which would round the layers a file keeps at
higher precision; here only the tensors that are fp8 in the file stay fp8.
"""

from __future__ import annotations

import torch

from sdcompress.quantize.describe import FP8_NAMES


def cast_up_per_layer(module: torch.nn.Module, compute: torch.dtype) -> int:
    """Keep fp8 parameters as they are, cast the rest to `compute`; returns how many layers cast up."""
    layers = 0
    for sub in module.modules():
        own = dict(sub.named_parameters(recurse=False))
        fp8 = [n for n, p in own.items() if p.dtype in FP8_NAMES]
        for n, p in own.items():
            if n not in fp8 and p.dtype.is_floating_point and p.dtype != compute:
                p.data = p.data.to(compute)
        if fp8:
            sub.register_forward_pre_hook(_up(fp8, compute))
            sub.register_forward_hook(_down(fp8))
            layers += 1
    return layers


def _up(names: list[str], compute: torch.dtype):  # noqa: ANN202 - a torch hook
    def hook(mod: torch.nn.Module, _args: object) -> None:
        mod._fp8_stored = {n: getattr(mod, n).data for n in names}
        for n in names:
            getattr(mod, n).data = mod._fp8_stored[n].to(compute)

    return hook


def _down(names: list[str]):  # noqa: ANN202 - a torch hook
    def hook(mod: torch.nn.Module, _args: object, _out: object) -> None:
        for n in names:
            getattr(mod, n).data = mod._fp8_stored[n]
        del mod._fp8_stored

    return hook
