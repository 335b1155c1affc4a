"""CLIP score: the cosine similarity of an image's and its prompt's CLIP embeddings, averaged.

Reported as the raw cosine (BK-SDM's 0.2958 for SD 1.4 on COCO 30K), not the
x100 and clamp-at-0 that torchmetrics' `CLIPScore` applies. The model is any
transformers `CLIPModel` folder or hub id; the papers use OpenCLIP ViT-g/14
trained on LAION-2B (`DEFAULT_CLIP_MODEL`), which the Hub also carries in
transformers' format. transformers is part of the fixed stack, so CLIP needs
no extra; only its weights, which must be given or reachable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sdcompress.evaluation.protocol import DEFAULT_CLIP_MODEL
from sdcompress.evaluation.weights import unavailable

__all__ = ["DEFAULT_CLIP_MODEL", "ClipScorer"]


@dataclass
class ClipScorer:
    model: Any
    processor: Any
    device: torch.device

    @classmethod
    def load(cls, ref: str, device: torch.device) -> ClipScorer:
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(ref)
            processor = CLIPProcessor.from_pretrained(ref)
        except (OSError, ValueError) as e:
            raise unavailable("CLIP", ref, "--clip-model") from e
        return cls(model=model.to(device).eval(), processor=processor, device=device)

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per-pair cosine similarity of uint8 images (N, 3, H, W) and their prompts -> (N,)."""
        pixels = self.processor.image_processor(
            images=list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt"
        )["pixel_values"].to(self.device)
        max_length = self.model.config.text_config.max_position_embeddings
        text = self.processor.tokenizer(
            prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(self.device)
        image_embeds = _as_tensor(self.model.get_image_features(pixel_values=pixels))
        text_embeds = _as_tensor(self.model.get_text_features(**text))
        image_embeds = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
        text_embeds = torch.nn.functional.normalize(text_embeds.float(), dim=-1)
        return (image_embeds * text_embeds).sum(-1).cpu()

    def score(self, images: torch.Tensor, prompts: list[str], batch_size: int = 32) -> float:
        """Mean CLIP score over all pairs, computed in batches."""
        total = torch.zeros(())
        for start in range(0, len(prompts), batch_size):
            end = start + batch_size
            total += self.scores(images[start:end], prompts[start:end]).sum()
        return float(total / len(prompts))


def _as_tensor(output: Any) -> torch.Tensor:
    """transformers 5 returns a model output from `get_*_features`; older versions a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output
