"""What the U-Net is conditioned on: prompt embeddings and SDXL's micro-conditioning.

SD 1.x / 2.x: the last hidden state of one CLIP text encoder. SDXL: the
penultimate hidden states of both encoders, concatenated, plus the pooled
projection of the second encoder and six `add_time_ids` per sample
(original size, crop top-left, target size), as the SDXL pipeline builds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """Prompt embeddings for one batch, plus SDXL's pooled embedding (None for SD 1.x / 2.x)."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, dtype: torch.dtype) -> Conditioning:
        pooled = None if self.pooled is None else self.pooled.to(dtype)
        return Conditioning(self.hidden_states.to(dtype), pooled)


def tokenize(tokenizer, captions: list[str], device: torch.device) -> torch.Tensor:
    """Token ids padded and truncated to the tokenizer's length (77 for CLIP)."""
    ids = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device)


def encode_prompts(
    text_encoders: list, tokenizers: list, captions: list[str], device: torch.device
) -> Conditioning:
    """Run the text encoder(s) once for a batch of captions; gradients flow if the encoders train."""
    if len(text_encoders) == 1:
        ids = tokenize(tokenizers[0], captions, device)
        return Conditioning(text_encoders[0](ids)[0])
    states, pooled = [], None
    for encoder, tokenizer in zip(text_encoders, tokenizers, strict=True):
        out = encoder(tokenize(tokenizer, captions, device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's pooled (projected) embedding, as the SDXL pipeline uses it
    return Conditioning(torch.cat(states, dim=-1), pooled)


def add_time_ids(
    original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor, target_sizes: torch.Tensor
) -> torch.Tensor:
    """SDXL micro-conditioning per sample: (orig h, orig w, crop top, crop left, target h, target w)."""
    return torch.cat([original_sizes, crop_top_lefts, target_sizes], dim=1).float()


def unet_added_conditions(cond: Conditioning, batch: dict, device: torch.device, dtype: torch.dtype):
    """The `added_cond_kwargs` an SDXL U-Net needs, or None for SD 1.x / 2.x."""
    if cond.pooled is None:
        return None
    time_ids = add_time_ids(batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"])
    return {"text_embeds": cond.pooled.to(device, dtype), "time_ids": time_ids.to(device, dtype)}
