"""The model card (README.md) sdcompress writes for an upload.

The metadata block is huggingface_hub's own `ModelCardData`, so the Hub reads
`base_model`, `license`, `library_name` and `pipeline_tag` as it does for any
diffusers model; the body records the lineage sdcompress knows (teacher,
preset or removed blocks, parameter counts before and after, training options
and loss curve, sample grid) and how to load the files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from sdcompress.arch.families import FAMILIES, Family
from sdcompress.hub.lineage import Lineage

# Licenses of the weights the families are published under; a derivative inherits them.
FAMILY_LICENSES = {
    "sd1": "creativeml-openrail-m",
    "sd2": "openrail++",
    "sdxl": "openrail++",
    "sdxl-refiner": "openrail++",
}
FAMILY_TAGS = {
    "sd1": "stable-diffusion",
    "sd2": "stable-diffusion",
    "sdxl": "stable-diffusion-xl",
    "sdxl-refiner": "stable-diffusion-xl",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LOSS_ROWS = 10


@dataclass
class CardFacts:
    """Everything the card states, gathered by the push service."""

    repo_id: str
    kind: str  # "pipeline" | "unet" | "single-file" | "lora"
    family: Family | None
    preset: str | None
    parameters: dict[str, int]
    files: list[tuple[str, int]]
    lineage: Lineage
    license: str | None = None
    base_model: str | None = None
    weight_name: str | None = None  # the file to load, for single files and LoRAs
    lora: dict[str, Any] = field(default_factory=dict)  # layout, rank, modules


def base_model_id(teacher: str | None) -> str | None:
    """A Hub model id for the teacher, when it has one (local paths have none)."""
    if not teacher:
        return None
    from sdcompress.checkpoint.resolve import HUB_ALIASES

    key = teacher.lower()
    if key in HUB_ALIASES:
        return HUB_ALIASES[key]
    family = FAMILIES.get(key)
    if family is not None:
        return family.hub_id
    if _HUB_ID.match(teacher) and not Path(teacher).expanduser().exists():
        return teacher
    return None


def default_license(family: Family | None) -> str:
    if family is None:
        return "other"
    if family.tiny:
        return "apache-2.0"  # tiny models are random weights made by sdcompress itself
    return FAMILY_LICENSES.get(family.topology, "other")


def card_tags(facts: CardFacts) -> list[str]:
    tags = ["sdcompress", "text-to-image", "diffusers"]
    if facts.family is not None and not facts.family.tiny and facts.family.topology in FAMILY_TAGS:
        tags.append(FAMILY_TAGS[facts.family.topology])
    lineage = facts.lineage
    recorded = lineage.prune.get("preset") if lineage.prune else None
    preset = facts.preset or (recorded if isinstance(recorded, str) else None)
    if lineage.prune is not None or preset:
        tags.append("pruned")
    if preset:
        tags.append(preset)
    kind = lineage.run_kind
    if kind == "distill" or (lineage.run is not None and lineage.prune is not None and kind is None):
        tags.append("distillation")
    elif kind:
        tags.append(kind)
    if facts.kind == "lora":
        tags.append("lora")
    return list(dict.fromkeys(tags))


def card_data(facts: CardFacts) -> ModelCardData:
    base = facts.base_model or base_model_id(facts.lineage.teacher)
    if base is None and facts.family is not None and not facts.family.tiny and facts.kind == "lora":
        base = facts.family.hub_id
    return ModelCardData(
        base_model=base,
        license=facts.license or default_license(facts.family),
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=card_tags(facts),
    )


def _count(n: Any) -> str:
    if isinstance(n, dict):
        n = n.get("unet", sum(v for v in n.values() if isinstance(v, int)))
    return f"{n:,}" if isinstance(n, int) else str(n)


def _prune_section(prune: dict[str, Any]) -> list[str]:
    lines = ["### Pruning", ""]
    rows = []
    if prune.get("teacher"):
        rows.append(("teacher", f"`{prune['teacher']}`"))
    if prune.get("preset"):
        rows.append(("preset", f"`{prune['preset']}`"))
    removed = prune.get("removed_blocks", prune.get("drop_transformer_blocks"))
    if removed is not None:
        shown = ", ".join(f"`{b}`" for b in removed) if isinstance(removed, list) else str(removed)
        rows.append(("removed blocks", shown))
    params = prune.get("parameters") if isinstance(prune.get("parameters"), dict) else {}
    before = params.get("before", prune.get("parameters_before"))
    after = params.get("after", prune.get("parameters_after"))
    if before is not None:
        rows.append(("U-Net parameters before", _count(before)))
    if after is not None:
        rows.append(("U-Net parameters after", _count(after)))
    if not rows:
        return []
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    return lines


def _loss_table(points: list[tuple[int, float]]) -> list[str]:
    if not points:
        return []
    stride = max(1, len(points) // LOSS_ROWS)
    shown = points[::stride]
    if shown[-1] != points[-1]:
        shown.append(points[-1])
    low = min(p[1] for p in points)
    lines = [
        f"Loss curve ({len(points)} logged steps; first {points[0][1]:.4g}, last {points[-1][1]:.4g}, "
        f"lowest {low:.4g}):",
        "",
        "| step | loss |",
        "|---:|---:|",
    ]
    return lines + [f"| {s} | {v:.4g} |" for s, v in shown] + [""]


def _run_section(run: dict[str, Any], points: list[tuple[int, float]]) -> list[str]:
    title = str(run.get("kind") or run.get("task") or "training").capitalize()
    lines = [f"### {title}", ""]
    if run.get("teacher"):
        lines.append(f"- teacher: `{run['teacher']}`")
    steps = run.get("steps", run.get("max_steps"))
    if steps is not None:
        lines.append(f"- steps: {steps}")
    if isinstance(run.get("data"), dict | str):
        data = run["data"] if isinstance(run["data"], str) else json.dumps(run["data"], sort_keys=True)
        lines.append(f"- data: `{data}`")
    lines.append("")
    options = run.get("options")
    if isinstance(options, dict) and options:
        lines += [
            "Training options:",
            "",
            "```json",
            json.dumps(options, indent=2, sort_keys=True),
            "```",
            "",
        ]
    return lines + _loss_table(points)


def _usage(facts: CardFacts) -> list[str]:
    repo = facts.repo_id
    if facts.kind == "lora":
        pipe = (
            "StableDiffusionXLPipeline"
            if facts.family and facts.family.is_sdxl
            else "StableDiffusionPipeline"
        )
        base = card_data(facts).base_model or "BASE_MODEL"
        code = [
            "import torch",
            f"from diffusers import {pipe}",
            "",
            f'pipe = {pipe}.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")',
            f'pipe.load_lora_weights("{repo}", weight_name="{facts.weight_name}")',
        ]
    elif facts.kind == "single-file":
        pipe = (
            "StableDiffusionXLPipeline"
            if facts.family and facts.family.is_sdxl
            else "StableDiffusionPipeline"
        )
        code = [
            "import torch",
            f"from diffusers import {pipe}",
            "",
            f"pipe = {pipe}.from_single_file(",
            f'    "https://huggingface.co/{repo}/blob/main/{facts.weight_name}", torch_dtype=torch.float16',
            ').to("cuda")',
        ]
    elif facts.kind == "unet":
        code = [
            "from diffusers import UNet2DConditionModel",
            "",
            f'unet = UNet2DConditionModel.from_pretrained("{repo}")',
        ]
    else:
        code = [
            "import torch",
            "from diffusers import DiffusionPipeline",
            "",
            f'pipe = DiffusionPipeline.from_pretrained("{repo}", torch_dtype=torch.float16).to("cuda")',
            'image = pipe("a photo of an astronaut riding a horse").images[0]',
        ]
    return ["## Usage", "", "```python", *code, "```", ""]


def _summary(facts: CardFacts) -> str:
    what = {
        "pipeline": "A diffusers pipeline",
        "unet": "A diffusers U-Net",
        "single-file": "A single-file checkpoint",
        "lora": "A LoRA",
    }[facts.kind]
    family = f" for {facts.family.title}" if facts.family is not None else ""
    preset = f" in the {facts.preset} layout" if facts.preset else ""
    teacher = facts.lineage.teacher
    origin = f", derived from `{teacher}`" if teacher else ""
    return f"{what}{family}{preset}{origin}, made with sdcompress."


def card_body(facts: CardFacts) -> str:
    name = facts.repo_id.split("/")[-1]
    lines = [f"# {name}", "", _summary(facts), ""]
    lineage = facts.lineage
    if lineage.sample_grid:
        lines += [f"![samples]({lineage.sample_grid})", ""]
    if facts.parameters:
        lines += ["## Parameters", "", "| component | parameters |", "|---|---:|"]
        lines += [f"| {c} | {n:,} |" for c, n in facts.parameters.items()]
        lines.append("")
    if facts.lora:
        lines += ["## LoRA", ""] + [f"- {k}: {v}" for k, v in facts.lora.items()] + [""]
    if lineage.prune or lineage.run:
        lines += ["## Lineage", ""]
        if lineage.prune:
            lines += _prune_section(lineage.prune)
        if lineage.run:
            lines += _run_section(lineage.run, lineage.loss_curve())
    lines += _usage(facts)
    lines += ["## Files", "", "| file | bytes |", "|---|---:|"]
    lines += [f"| `{p}` | {size:,} |" for p, size in facts.files]
    return "\n".join(lines) + "\n"


def build_card(facts: CardFacts) -> ModelCard:
    """The card as huggingface_hub's `ModelCard` (metadata + markdown body)."""
    data = card_data(facts)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(facts)}")
