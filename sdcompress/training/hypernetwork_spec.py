"""The shape of an A1111 hypernetwork as options (`hypernetwork train`), kept free of torch.

`--help` builds its options from this dataclass without importing torch;
`training.hypernetwork` builds the modules and the file from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdcompress.choices import Choice
from sdcompress.errors import SdcError
from sdcompress.training.config import coerce_choices, option

HYPERNETWORK = "Hypernetwork"  # the help panel of the options below


class Activation(Choice):
    """The activations both A1111 and ComfyUI build (ComfyUI's list is the shorter one)."""

    LINEAR = "linear"
    RELU = "relu"
    LEAKYRELU = "leakyrelu"
    ELU = "elu"
    SWISH = "swish"  # Hardswish in A1111 and ComfyUI
    TANH = "tanh"
    SIGMOID = "sigmoid"
    SOFTSIGN = "softsign"
    MISH = "mish"


class WeightInit(Choice):
    NORMAL = "normal"
    XAVIER_UNIFORM = "xavier-uniform"
    XAVIER_NORMAL = "xavier-normal"
    KAIMING_UNIFORM = "kaiming-uniform"
    KAIMING_NORMAL = "kaiming-normal"


# the spelling A1111 stores in `weight_initialization`
A1111_INIT = {
    "normal": "Normal",
    "xavier-uniform": "XavierUniform",
    "xavier-normal": "XavierNormal",
    "kaiming-uniform": "KaimingUniform",
    "kaiming-normal": "KaimingNormal",
}


def _numbers(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise SdcError(f"{flag} {text!r} is not a comma-separated list of numbers, e.g. 1,2,1.") from None


@dataclass(frozen=True)
class HypernetworkSpec:
    """The network's shape, as A1111's "Create hypernetwork" tab offers it."""

    layers: str = field(
        default="1,2,1",
        metadata=option(
            "--layers", "Layer structure: width multipliers, first and last 1 (A1111's 1,2,1).", HYPERNETWORK
        ),
    )
    activation: Activation = field(
        default=Activation.LINEAR,
        metadata=option(
            "--activation", f"Activation: {', '.join(Activation)}.", HYPERNETWORK, choices=Activation
        ),
    )
    layer_norm: bool = field(
        default=False, metadata=option("--layer-norm", "Layer norm after each layer.", HYPERNETWORK)
    )
    dropout: float = field(
        default=0.0,
        metadata=option(
            "--dropout", "Dropout after the hidden layers (A1111's use_dropout uses 0.3).", HYPERNETWORK
        ),
    )
    last_layer_dropout: bool = field(
        default=False,
        metadata=option("--last-layer-dropout", "Dropout after the last hidden layer too.", HYPERNETWORK),
    )
    activate_output: bool = field(
        default=False,
        metadata=option("--activate-output", "Activation after the output layer too.", HYPERNETWORK),
    )
    weight_init: WeightInit = field(
        default=WeightInit.NORMAL,
        metadata=option(
            "--weight-init", f"Initialisation: {', '.join(WeightInit)}.", HYPERNETWORK, choices=WeightInit
        ),
    )
    sizes: str | None = field(
        default=None,
        metadata=option(
            "--sizes",
            "Context widths to train (e.g. 768,320,640,1280; default: the text encoder's width only).",
            HYPERNETWORK,
        ),
    )

    def __post_init__(self) -> None:
        coerce_choices(self)

    @property
    def layer_structure(self) -> list[float]:
        return _numbers(self.layers, "--layers")

    @property
    def dropout_structure(self) -> list[float]:
        """A1111's per-layer dropout list: none after the input and output, `dropout` after hidden layers."""
        n = len(self.layer_structure)
        if not self.dropout:
            return [0.0] * n
        return [0.0] + [self.dropout] * (n - 3) + [self.dropout if self.last_layer_dropout else 0.0, 0.0]

    def widths(self, default: int) -> list[int]:
        if self.sizes is None:
            return [default]
        values = _numbers(self.sizes, "--sizes")
        if not values or any(v < 1 or not float(v).is_integer() for v in values):
            raise SdcError(f"--sizes {self.sizes!r} must list positive whole widths, e.g. 768,320,640,1280.")
        return sorted({int(v) for v in values})

    def validate(self) -> None:
        ls = self.layer_structure
        if len(ls) < 2 or ls[0] != 1 or ls[-1] != 1 or any(x <= 0 for x in ls):
            raise SdcError(
                f"--layers {self.layers!r} must start and end with 1 and have positive widths, e.g. 1,2,1."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise SdcError(f"--dropout must be in [0, 1), got {self.dropout}.")
