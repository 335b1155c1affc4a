"""How far a quantized U-Net is from its source: per-layer weight SNR and the output's error.

The output is compared on fixed inputs (the calibration prompts prune's scoring uses, fixed
seeds, timesteps spread over the schedule), so two runs and two formats are comparable:
relative L2 error and cosine of the U-Net's prediction against the source's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sdcompress.checkpoint.model import Model
from sdcompress.checkpoint.tensors import StateDict
from sdcompress.prune.importance import PROMPTS, Calibration, PromptEmbeddings, calibration, encode, predict
from sdcompress.quantize.roundtrip import snr_db

SEED = 1234
REPORT_SAMPLES = 4
REPORT_LATENT = 16  # 128 px (SD 1.x) / 128 px at the SDXL VAE's 8x: cheap on a CPU, same weights


@dataclass
class OutputError:
    relative: float  # ||quantized - source|| / ||source|| over every output value
    cosine: float

    @classmethod
    def between(cls, outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> OutputError:
        o = torch.cat([x.reshape(-1) for x in outs]).double()
        r = torch.cat([x.reshape(-1) for x in refs]).double()
        rel = float((o - r).norm() / r.norm()) if r.norm() > 0 else float((o - r).norm())
        cos = float(torch.nn.functional.cosine_similarity(o, r, dim=0))
        return cls(rel, cos)


@dataclass
class LayerReport:
    name: str  # original (LDM/SGM) name
    stored: str
    snr_db: float | None  # None: kept unquantized
    sensitivity: float | None = None  # output error with this layer alone quantized (when scored)


def embeddings(model: Model, n: int, device: torch.device, dtype: torch.dtype) -> PromptEmbeddings:
    """The fixed prompts through the model's text encoders; seeded stand-ins for a U-Net alone."""
    if any(s.component in model.components for s in model.family.text_encoders):
        return encode(model, PROMPTS[:n], device, dtype)
    gen = torch.Generator().manual_seed(SEED)
    cfg = model.configs["unet"]
    width = cfg["cross_attention_dim"]
    hidden = torch.randn(n, 77, width, generator=gen).to(device, dtype)
    pooled = None
    if model.family.is_sdxl:
        dim = cfg.get("projection_class_embeddings_input_dim", 2816) - 6 * cfg.get(
            "addition_time_embed_dim", 256
        )
        pooled = torch.randn(n, dim, generator=gen).to(device, dtype)
    return PromptEmbeddings(hidden, pooled)


def fixed_inputs(
    model: Model, *, samples: int = REPORT_SAMPLES, latent: int = REPORT_LATENT, device: str = "cpu"
) -> Calibration:
    dev = torch.device(device)
    embeds = embeddings(model, samples, dev, torch.float32)
    return calibration(
        model, embeds, samples=samples, latent=latent, seed=SEED, device=dev, dtype=torch.float32
    )


def unet_module(model: Model, unet: StateDict | None = None, device: str = "cpu") -> torch.nn.Module:
    """The U-Net in float32 (fp8 codes are cast up as they load), optionally with other weights."""
    from sdcompress.checkpoint.instantiate import load_weights, module_from_config

    module = module_from_config("unet", model.configs["unet"])
    load_weights(
        module, unet if unet is not None else model.components["unet"], dtype=torch.float32, device=device
    )
    return module.eval()


def output_error(
    source: Model, quantized_unet: StateDict, inputs: Calibration, reference: list[torch.Tensor] | None = None
) -> OutputError:
    """The dequantized U-Net's prediction against the source's on the same fixed inputs."""
    if reference is None:
        reference = predict(unet_module(source), inputs, 2)
    outs = predict(unet_module(source, quantized_unet), inputs, 2)
    return OutputError.between(outs, reference)


def layer_snrs(
    source_sf: StateDict, quantized: Callable[[str], bool], roundtrip: Callable[[torch.Tensor], torch.Tensor]
) -> list[LayerReport]:
    """Each quantized tensor's SNR (one tensor in memory at a time); kept tensors are listed as kept."""
    out = []
    for name, lt in source_sf.items():
        if not quantized(name):
            out.append(LayerReport(name, str(lt.dtype).removeprefix("torch."), None))
            continue
        ref = lt.load().float()
        out.append(LayerReport(name, "", snr_db(ref, roundtrip(ref))))
    return out
