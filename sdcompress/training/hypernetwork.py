"""Hypernetworks as AUTOMATIC1111 defines them: per context width, two small residual MLPs.

A hypernetwork holds, for each width it is enabled for (768 for SD 1.x's text
encoder, 320/640/1280 for the U-Net's own widths), one MLP for the key input
and one for the value input of every attention layer whose key/value input
has that width: `x + mlp(x)`. The layers of each MLP follow a
`layer_structure` of width multipliers starting and ending with 1 (`1,2,1`),
with A1111's optional activation, layer norm and dropout in A1111's order, so
the `linear.N` indices of our modules are the ones A1111's and ComfyUI's
loaders expect.

The file is A1111's: a torch pickle of plain types only (integer keys per
width holding a (key, value) pair of state dicts, plus the metadata keys A1111
writes), which ComfyUI loads with `weights_only=True`. No library ships this
module or format (diffusers and peft know no hypernetworks), hence our own.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from sdcompress.errors import SdcError
from sdcompress.training.hypernetwork_spec import A1111_INIT, HypernetworkSpec

_ACTIVATIONS: dict[str, type[torch.nn.Module]] = {
    "linear": torch.nn.Identity,
    "relu": torch.nn.ReLU,
    "leakyrelu": torch.nn.LeakyReLU,
    "elu": torch.nn.ELU,
    "swish": torch.nn.Hardswish,
    "tanh": torch.nn.Tanh,
    "sigmoid": torch.nn.Sigmoid,
    "softsign": torch.nn.Softsign,
    "mish": torch.nn.Mish,
}


class HypernetworkModule(torch.nn.Module):
    """One residual MLP (A1111's HypernetworkModule): x + linear(x), `linear` a Sequential in A1111's order."""

    def __init__(self, dim: int, spec: HypernetworkSpec) -> None:
        super().__init__()
        ls, drops = spec.layer_structure, spec.dropout_structure
        layers: list[torch.nn.Module] = []
        for i in range(len(ls) - 1):
            layers.append(torch.nn.Linear(int(dim * ls[i]), int(dim * ls[i + 1])))
            last = i >= len(ls) - 2
            if spec.activation != "linear" and (not last or spec.activate_output):
                layers.append(_ACTIVATIONS[spec.activation]())
            if spec.layer_norm:
                layers.append(torch.nn.LayerNorm(int(dim * ls[i + 1])))
            if drops[i + 1] > 0:
                layers.append(torch.nn.Dropout(p=drops[i + 1]))
        self.linear = torch.nn.Sequential(*layers)
        self._init(str(spec.weight_init), str(spec.activation))

    def _init(self, how: str, activation: str) -> None:
        """A1111's initialisation: layer norms and "normal" get N(0, 0.01) weights, biases start at zero."""
        init = torch.nn.init
        nonlinearity = "leaky_relu" if activation == "leakyrelu" else "relu"
        for layer in self.linear:
            if not isinstance(layer, torch.nn.Linear | torch.nn.LayerNorm):
                continue
            w = layer.weight.data
            if how == "normal" or isinstance(layer, torch.nn.LayerNorm):
                init.normal_(w, mean=0.0, std=0.01)
            elif how == "xavier-uniform":
                init.xavier_uniform_(w)
            elif how == "xavier-normal":
                init.xavier_normal_(w)
            elif how == "kaiming-uniform":
                init.kaiming_uniform_(w, nonlinearity=nonlinearity)
            else:
                init.kaiming_normal_(w, nonlinearity=nonlinearity)
            init.zeros_(layer.bias.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.linear[0].weight.dtype
        return (x.to(dtype) + self.linear(x.to(dtype))).to(x.dtype)


class Hypernetwork(torch.nn.Module):
    """A (key, value) pair of `HypernetworkModule`s per context width."""

    def __init__(self, widths: Iterable[int], spec: HypernetworkSpec) -> None:
        super().__init__()
        self.spec = spec
        self.pairs = torch.nn.ModuleDict(
            {
                str(w): torch.nn.ModuleList([HypernetworkModule(w, spec), HypernetworkModule(w, spec)])
                for w in widths
            }
        )

    def widths(self) -> list[int]:
        return [int(w) for w in self.pairs]

    def key(self, width: int) -> HypernetworkModule:
        return self.pairs[str(width)][0]

    def value(self, width: int) -> HypernetworkModule:
        return self.pairs[str(width)][1]


def attach(unet: torch.nn.Module, network: Hypernetwork) -> list[Any]:
    """Route the key and value inputs of every attention layer of a width the network has through it.

    Attention layers are found by their `to_k` / `to_v` linears (self- and
    cross-attention alike: A1111 keys the MLPs by input width only, so a
    width that is also a U-Net channel width changes self-attention too).
    Returns the hook handles; no matching layer is an error.
    """
    handles = []
    widths = set(network.widths())
    for _, module in unet.named_modules():
        to_k, to_v = getattr(module, "to_k", None), getattr(module, "to_v", None)
        if not isinstance(to_k, torch.nn.Linear) or not isinstance(to_v, torch.nn.Linear):
            continue
        width = to_k.in_features
        if width not in widths:
            continue
        for proj, mlp in ((to_k, network.key(width)), (to_v, network.value(width))):
            handles.append(
                proj.register_forward_pre_hook(lambda _m, args, mlp=mlp: (mlp(args[0]), *args[1:]))
            )
    if not handles:
        raise SdcError(
            f"no attention layer of the U-Net takes inputs of width {sorted(widths)}; "
            "choose --sizes among the model's context and channel widths."
        )
    return handles


def a1111_state(
    network: Hypernetwork, *, name: str, step: int, checkpoint_name: str | None, dtype: torch.dtype
) -> dict[Any, Any]:
    """The dict A1111's `Hypernetwork.save` writes, of plain types only (ComfyUI loads it weights-only)."""
    spec = network.spec
    state: dict[Any, Any] = {}
    for width in network.widths():
        state[width] = tuple(
            {k: v.detach().to("cpu", dtype).clone() for k, v in m.state_dict().items()}
            for m in (network.key(width), network.value(width))
        )
    state |= {
        "step": step,
        "name": name,
        "layer_structure": spec.layer_structure,
        "activation_func": str(spec.activation),
        "is_layer_norm": spec.layer_norm,
        "weight_initialization": A1111_INIT[str(spec.weight_init)],
        "sd_checkpoint": None,
        "sd_checkpoint_name": checkpoint_name,
        "activate_output": spec.activate_output,
        "use_dropout": bool(spec.dropout),
        "dropout_structure": spec.dropout_structure,
        "last_layer_dropout": spec.last_layer_dropout,
        "optional_info": "trained with sdcompress hypernetwork train",
    }
    return state


def write_a1111(path: Path, state: dict[Any, Any]) -> None:
    """`torch.save` of the plain dict: the format A1111 and ComfyUI read (`.pt`)."""
    torch.save(state, path)


def is_hypernetwork_file(path: str | Path) -> bool:
    """True for an A1111 hypernetwork (`.pt` holding `layer_structure` and per-width pairs)."""
    p = Path(path)
    if p.suffix != ".pt" or not p.is_file():
        return False
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:  # not a weights-only pickle at all: not ours to judge here
        return False
    return isinstance(state, dict) and "layer_structure" in state and any(isinstance(k, int) for k in state)
