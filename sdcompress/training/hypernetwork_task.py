"""Hypernetwork training as a task on the shared loop: the U-Net and text encoders stay frozen.

The hypernetwork's MLPs sit in front of the key and value projections of the
attention layers (forward pre-hooks, `training.hypernetwork.attach`); the
diffusion loss and everything else is `UNetTrainingTask`'s. The engine
checkpoints the trainable module (the hypernetwork) with the optimizer, so a
resumed run is exact.
"""

from __future__ import annotations

from typing import Any

import torch

from sdcompress.errors import SdcError
from sdcompress.training.finetune_task import UNetTrainingTask
from sdcompress.training.hypernetwork import Hypernetwork, attach
from sdcompress.training.hypernetwork_spec import HypernetworkSpec
from sdcompress.training.task import DiffusionParts, LossConfig


class HypernetworkTask(UNetTrainingTask):
    """Train an A1111 hypernetwork on a frozen pipeline."""

    name = "hypernetwork"

    def __init__(
        self, parts: DiffusionParts, loss: LossConfig, spec: HypernetworkSpec, **kwargs: Any
    ) -> None:
        spec.validate()
        super().__init__(parts, loss, **kwargs)
        parts.unet.requires_grad_(False)
        for encoder in parts.text_encoders:
            encoder.requires_grad_(False)
        context = int(parts.unet.config.cross_attention_dim)
        # the initial weights come from the global RNG: seeded so two runs with the same --seed start alike
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(kwargs.get("seed", 0))
            self.network = Hypernetwork(spec.widths(context), spec)
        self.hooks = attach(parts.unet, self.network)

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"hypernetwork": self.network}

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        self.network.train()
        return [{"params": list(self.network.parameters()), "lr": lr}]

    def bind(
        self, prepared: dict[str, torch.nn.Module], device: torch.device, weight_dtype: torch.dtype
    ) -> None:
        # The hooks call the MLPs themselves, not accelerate's DDP wrapper, whose gradient sync needs its own
        # forward: refused on several processes rather than training diverging copies.
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise SdcError(
                "hypernetwork train runs on one process; start it without `accelerate launch` "
                "(or with --num_processes 1)."
            )
        self.move_frozen(device, weight_dtype)
        self.parts.unet.to(device, weight_dtype)
        self.network.to(device)
        self.unet = self.parts.unet

    def adapted_layers(self) -> int:
        return len(self.hooks) // 2
