"""Textual inversion as a task on the shared loop: new token vectors train, nothing else does.

The token (and its companions `token_1` ... for N vectors, diffusers' names) is
added to each tokenizer and each text encoder's token-embedding matrix grows by
N rows. Those rows are NOT what trains. Each encoder gets a small `NewTokenRows`
module holding the N vectors as its only parameter, and a forward hook on the
encoder's token embedding puts them in place of the rows' lookups. So:

- every other row of the matrix (and every other weight) has no gradient and
  is never in the optimizer, so it stays bit-identical: AdamW's decoupled weight
  decay shrinks every element of a parameter it is given, gradient or not, so
  masking the gradient of the whole matrix would still decay (and move) the old
  rows; restoring them after each step would work but costs a copy of the
  matrix per step and hides the mistake instead of preventing it;
- weight decay, clipping and EMA see only the new vectors;
- checkpoints hold kilobytes (the vectors), not the 150 MB matrix.

The engine wraps each `NewTokenRows` (DDP, mixed precision) and the hook calls
the wrapped module, so gradients are synchronised across processes.

Init words: each word of `--init-words` gives one vector, the mean of its BPE
pieces' embeddings (most words are one piece); with `--vectors N` larger than
the number of words, the words are used again in turn (`a cat`, N=3: a, cat,
a). Fewer vectors than words is refused by the spec's check.

Captions: a caption that names the token is used as written; an image without
a caption gets a template (`object`: "a photo of a {token}" and the like,
`style`: "a painting in the style of {token}" ...), and a caption that does not
name the token gets the template in front (`a photo of a <t>, on a table`);
with `--template none` every caption must name the token (checked before the
first step). The template is drawn with the step's generator, so a resumed run
draws the same ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdcompress.checkpoint.embedding_files import Embedding, check_new_token
from sdcompress.choices import CaptionTemplate
from sdcompress.errors import SdcError
from sdcompress.training.conditioning import Conditioning, encode_prompts
from sdcompress.training.config import EmbeddingSpec
from sdcompress.training.finetune_task import Saver, seed_global_rng
from sdcompress.training.task import DiffusionParts, DiffusionTask, LossConfig, TrainingSummary, run_unet

# Our own wording of the two kinds of prompt the textual-inversion paper trains with: what the thing is
# (an object) or how it looks (a style). `{}` is the token.
TEMPLATES: dict[str, tuple[str, ...]] = {
    CaptionTemplate.OBJECT: (
        "a photo of a {}",
        "a close-up photo of the {}",
        "a cropped picture of a {}",
        "a bright photo of the {}",
        "a dim photo of a {}",
        "a blurry photo of the {}",
        "a sharp photo of a {}",
        "a photo of one {}",
        "a photo of my {}",
        "a small {} in a photo",
        "a large {} in a picture",
        "the {} seen from the side",
        "a good picture of a {}",
        "a snapshot of the {}",
        "an image showing a {}",
        "a rendering of the {}",
    ),
    CaptionTemplate.STYLE: (
        "a painting in the style of {}",
        "a picture in the style of {}",
        "artwork in the style of {}",
        "an illustration in the style of {}",
        "a drawing in the style of {}",
        "a small painting in the style of {}",
        "a large picture in the style of {}",
        "a dark painting in the style of {}",
        "a bright illustration in the style of {}",
        "a landscape in the style of {}",
        "a portrait in the style of {}",
        "a still life in the style of {}",
        "a sketch in the style of {}",
        "a scene painted in the style of {}",
    ),
}


class NewTokenRows(torch.nn.Module):
    """The N trainable vectors of one text encoder, put in place of the new tokens' embedding lookups."""

    def __init__(self, first_id: int, init: torch.Tensor) -> None:
        super().__init__()
        self.first_id = first_id
        self.weight = torch.nn.Parameter(init.detach().clone().float())

    def forward(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        new = input_ids >= self.first_id
        rows = (input_ids - self.first_id).clamp(0, self.weight.shape[0] - 1)
        return torch.where(new.unsqueeze(-1), self.weight[rows].to(embeds.dtype), embeds)


def init_vectors(tokenizer, matrix: torch.Tensor, words: list[str], count: int) -> torch.Tensor:
    """`count` vectors from the init words: one per word (the mean of its pieces), repeated in turn."""
    vectors = []
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if not ids:
            raise SdcError(f"--init-words {word!r} gives no token; use plain words such as 'a cat'.")
        vectors.append(matrix[ids].float().mean(dim=0))
    return torch.stack([vectors[i % len(vectors)] for i in range(count)])


def expand_token(caption: str, token: str, names: list[str]) -> str:
    """The token in a caption replaced by all N token names, as diffusers' pipelines do with prompts."""
    return caption.replace(token, " ".join(names)) if len(names) > 1 else caption


class EmbeddingTask(DiffusionTask):
    """Train the vectors of a new token in every text encoder; U-Net, VAE and encoders stay frozen."""

    name = "embedding"

    def __init__(
        self,
        parts: DiffusionParts,
        loss: LossConfig,
        spec: EmbeddingSpec,
        *,
        saver: Saver | None = None,
    ) -> None:
        spec.validate()
        super().__init__(parts, loss, train_text_encoders=False)
        parts.unet.requires_grad_(False)
        self.spec = spec
        self.saver = saver
        self.count = spec.vector_count
        self.names: list[str] = []
        self.rows: list[NewTokenRows] = []
        self.mean_norms: list[float] = []
        self.old_vocab: list[int] = []
        for index, (tokenizer, encoder) in enumerate(zip(parts.tokenizers, parts.text_encoders, strict=True)):
            where = "the tokenizer" if len(parts.tokenizers) == 1 else f"tokenizer {index + 1}"
            self.names = check_new_token(tokenizer, spec.token, self.count, where)
            self.rows.append(self._add_token(tokenizer, encoder))
        self.wrapped: list[torch.nn.Module] = list(self.rows)
        for index, encoder in enumerate(parts.text_encoders):
            encoder.get_input_embeddings().register_forward_hook(self._hook(index))

    def _add_token(self, tokenizer, encoder) -> NewTokenRows:
        matrix = encoder.get_input_embeddings().weight
        old = matrix.shape[0]
        if len(tokenizer) != old:
            raise SdcError(
                f"the tokenizer has {len(tokenizer)} entries but its text encoder {old} embedding rows; "
                "the new token's id would not be its row."
            )
        init = init_vectors(tokenizer, matrix.detach(), self.spec.words, self.count)
        self.mean_norms.append(float(matrix.detach().float().norm(dim=1).mean()))
        self.old_vocab.append(old)
        tokenizer.add_tokens(self.names)
        ids = tokenizer.convert_tokens_to_ids(self.names)
        if ids != list(range(old, old + self.count)):
            raise SdcError(f"the tokenizer gave the new tokens ids {ids}, not the rows after its vocabulary.")
        # mean_resizing=False: the new rows get their values just below (transformers would otherwise
        # sample them from the vocabulary's covariance, a slow step for a 49408 x 1280 matrix).
        encoder.resize_token_embeddings(old + self.count, mean_resizing=False)
        encoder.requires_grad_(False)
        with torch.no_grad():
            encoder.get_input_embeddings().weight[old:] = init.to(matrix.dtype)
        return NewTokenRows(old, init)

    def _hook(self, index: int):
        def hook(_module, args, output):
            return self.wrapped[index](args[0], output)

        return hook

    # -- TrainTask ---------------------------------------------------------

    def check_dataset(self, dataset) -> None:
        if getattr(getattr(dataset, "index", None), "conditioning", None) is not None:
            raise SdcError(
                "a prepared dataset holds fixed text embeddings, which cannot contain the new token; "
                "train the embedding from the image folder."
            )
        if self.spec.template == CaptionTemplate.NONE:
            records = getattr(dataset, "records", [])
            lacking = [r for r in records if not r.caption or self.spec.token not in r.caption]
            if lacking:
                raise SdcError(
                    f"{len(lacking)} of {len(records)} captions do not name {self.spec.token} (first: "
                    f"{lacking[0].source}); add the token to them or use --template object or style."
                )

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {f"{'text_encoder_2' if i else 'text_encoder'}_vectors": m for i, m in enumerate(self.rows)}

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": [m.weight for m in self.rows], "lr": lr}]

    def enable_gradient_checkpointing(self) -> None:
        self.parts.unet.enable_gradient_checkpointing()
        for encoder in self.parts.text_encoders:
            # non-reentrant: the encoder's own weights are frozen, so reentrant checkpointing would see no
            # input that needs a gradient and drop the path back to the new vectors.
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def bind(
        self, prepared: dict[str, torch.nn.Module], device: torch.device, weight_dtype: torch.dtype
    ) -> None:
        self.wrapped = list(prepared.values())
        self.move_frozen(device, weight_dtype)
        self.parts.unet.to(device, weight_dtype)
        for encoder in self.parts.text_encoders:
            # fp32 like diffusers' textual-inversion script: the gradient reaching the new vectors goes back
            # through the whole encoder (and CPU autocast refuses its layer norms with half weights).
            encoder.to(device, torch.float32)
            encoder.train()  # dropout-free CLIP; train mode only matters for gradient checkpointing

    def caption(self, caption: str, generator: torch.Generator) -> str:
        token = self.spec.token
        if token not in caption and self.spec.template != CaptionTemplate.NONE:
            choices = TEMPLATES[self.spec.template]
            pick = int(torch.randint(len(choices), (1,), generator=generator, device=generator.device))
            template = choices[pick].format(token)
            caption = f"{template}, {caption}" if caption else template
        return expand_token(caption, token, self.names)

    def encode(self, batch: dict[str, Any]) -> Conditioning:
        # Gradients flow through the frozen encoders to the new vectors.
        return encode_prompts(self.parts.text_encoders, self.parts.tokenizers, batch["captions"], self.device)

    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        seed_global_rng(generator)
        batch = dict(batch, captions=[self.caption(c, generator) for c in batch["captions"]])
        prepared = self.prepare(batch, generator)
        diffusion = self.task_loss(run_unet(self.parts.unet, prepared), prepared)
        if not self.spec.norm_reg:
            return {"loss": diffusion}
        norm = self.norm_penalty()
        return {"loss": diffusion + self.spec.norm_reg * norm, "diffusion": diffusion, "norm": norm}

    def norm_penalty(self) -> torch.Tensor:
        """Mean squared distance of each new vector's norm from the vocabulary's mean norm (per encoder)."""
        terms = [
            (m.weight.norm(dim=1) - mean).pow(2).mean()
            for m, mean in zip(self.rows, self.mean_norms, strict=True)
        ]
        return torch.stack(terms).mean()

    def validation_pipeline(self):
        return self.parts.pipeline()

    def embedding(self, metadata: dict[str, str] | None = None) -> Embedding:
        """The trained vectors (fp32, CPU) as an `Embedding`."""
        vectors = [m.weight.detach().float().cpu().clone() for m in self.rows]
        return Embedding(self.spec.token, vectors, metadata=dict(metadata or {}))

    def save(self, output_dir: Path, summary: TrainingSummary) -> None:
        if self.saver is None:
            raise RuntimeError("EmbeddingTask was built without a saver")
        self.saver(self, output_dir, summary)
