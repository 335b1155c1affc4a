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

from sdcompress.arch.families import Family
from sdcompress.arch.presets import hub_repo
from sdcompress.hub.lineage import Lineage

RUN_TAGS = {"distill": "distillation", "finetune": "finetuned", "lora": "lora"}
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
    repo = hub_repo(teacher)
    if repo is not None:
        return repo
    if _HUB_ID.match(teacher) and not Path(teacher).expanduser().exists():
        return teacher
    return None


def default_license(family: Family | None) -> str:
    """A derivative inherits the license of its family's weights (`Family.license`)."""
    return "other" if family is None else family.license


def card_tags(facts: CardFacts) -> list[str]:
    tags = ["sdcompress", "text-to-image", "diffusers"]
    if facts.family is not None and facts.family.hub_tag:
        tags.append(facts.family.hub_tag)
    lineage = facts.lineage
    recorded = lineage.prune.get("preset") if lineage.prune else None
    preset = facts.preset or (recorded if isinstance(recorded, str) else None)
    if lineage.prune is not None or preset:
        tags.append("pruned")
    if preset:
        tags.append(preset)
    kind = lineage.run_kind
    if kind:
        tags.append(RUN_TAGS.get(kind, kind))
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


def _before_after(value: Any) -> tuple[Any, Any] | None:
    """(teacher, student) from `{"teacher": a, "student": b}` (what prune writes) or `{"before", "after"}`."""
    if not isinstance(value, dict):
        return None
    before = value.get("teacher", value.get("before"))
    after = value.get("student", value.get("after"))
    return None if before is None or after is None else (before, after)


def _change(before: Any, after: Any) -> str:
    text = f"{_count(before)} → {_count(after)}"
    b, a = (x.get("unet") if isinstance(x, dict) else x for x in (before, after))
    if isinstance(b, int | float) and isinstance(a, int | float) and b:
        text += f" ({(a - b) / b:+.1%})"
    return text


def _removed(prune: dict[str, Any]) -> str | None:
    removed = prune.get("removed", prune.get("removed_blocks"))
    if isinstance(removed, int):
        return f"{removed} transformer blocks"
    if not isinstance(removed, list) or not removed:
        n = prune.get("drop_transformer_blocks")
        return f"{n} transformer blocks" if n else None
    names = [r.get("block", "?") if isinstance(r, dict) else str(r) for r in removed]
    shown = ", ".join(f"`{n}`" for n in names[:12])
    return f"{len(names)}: {shown}" + (f" and {len(names) - 12} more" if len(names) > 12 else "")


def _prune_section(prune: dict[str, Any]) -> list[str]:
    rows = []
    if prune.get("teacher"):
        rows.append(("teacher", f"`{prune['teacher']}`"))
    if prune.get("preset"):
        rows.append(("preset", f"`{prune['preset']}`"))
    if prune.get("select") not in (None, "none"):
        rows.append(("block selection", str(prune["select"])))
    if (removed := _removed(prune)) is not None:
        rows.append(("removed blocks", removed))
    params = _before_after(prune.get("parameters"))
    if params is None and "parameters_before" in prune and "parameters_after" in prune:
        params = (prune["parameters_before"], prune["parameters_after"])
    for label, pair in (
        ("U-Net parameters", params),
        ("transformer blocks", _before_after(prune.get("transformer_blocks"))),
        ("U-Net FLOPs per step", _before_after(prune.get("flops_per_step"))),
    ):
        if pair is not None:
            rows.append((f"{label} (teacher → student)", _change(*pair)))
    if isinstance(prune.get("init_mse"), int | float):
        rows.append(("output MSE vs teacher before training", f"{prune['init_mse']:.4g}"))
    if not rows:
        return []
    lines = ["### Pruning", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    stages = prune.get("stages")
    if isinstance(stages, list) and stages and all(isinstance(x, dict) for x in stages):
        lines += ["| U-Net stage | teacher | student |", "|---|---:|---:|"]
        lines += [
            f"| {x.get('stage')} | {_count(x.get('teacher'))} | {_count(x.get('student'))} |" for x in stages
        ]
        lines.append("")
    return lines


def _loss_table(curve: list[dict[str, float]]) -> list[str]:
    if not curve:
        return []
    terms = ["loss"] + sorted({k for e in curve for k in e if k not in ("step", "loss", "lr")})
    stride = max(1, len(curve) // LOSS_ROWS)
    shown = curve[::stride]
    if shown[-1] is not curve[-1]:
        shown.append(curve[-1])
    losses = [e["loss"] for e in curve]
    lines = [
        f"Loss curve ({len(curve)} logged steps; first {losses[0]:.4g}, last {losses[-1]:.4g}, "
        f"lowest {min(losses):.4g}):",
        "",
        "| step | " + " | ".join(terms) + " |",
        "|---:|" + "---:|" * len(terms),
    ]
    for e in shown:
        cells = [f"{e[t]:.4g}" if isinstance(e.get(t), int | float) else "" for t in terms]
        lines.append(f"| {e['step']} | " + " | ".join(cells) + " |")
    return lines + [""]


RUN_TITLES = {"distill": "Distillation", "finetune": "Fine-tuning", "lora": "LoRA training"}
# Shown elsewhere in the card, or too bulky for it (the record itself travels with the upload).
_RUN_SHOWN = {
    "tool", "version", "command", "kind", "task", "teacher", "base_model", "student", "steps", "max_steps",
    "epoch", "data", "options", "loss_curve", "loss_history", "feature_pairs", "files", "family",
    "teacher_family", "preset", "teacher_unet_parameters", "student_unet_parameters", "stages",
    "inference",
}  # fmt: skip


def _sampling(run: dict[str, Any]) -> dict[str, Any] | None:
    """How a few-step student is sampled (its run record's `inference`: steps, timesteps, sampler, guidance)."""
    inference = run.get("inference")
    return inference if isinstance(inference, dict) and inference.get("steps") else None


def _sampling_line(inference: dict[str, Any]) -> str:
    timesteps = inference.get("timesteps")
    at = f" (timesteps {', '.join(map(str, timesteps))})" if isinstance(timesteps, list) else ""
    sampler = inference.get("sampler") or "the saved scheduler"
    guidance = inference.get("guidance_scale")
    return f"- sampling: {inference['steps']} steps{at}, {sampler}, guidance_scale {guidance}"


def _stages_section(stages: Any) -> list[str]:
    """A staged distillation's lineage: each stage's teacher and the student it trained (read leniently)."""
    rows = [s for s in stages if isinstance(s, dict)] if isinstance(stages, list) else []
    if not rows:
        return []
    lines = ["Stages:", "", "| stage | teacher | steps | pruned before | student |", "|---|---|---|---|---|"]
    for number, stage in enumerate(rows, 1):
        layout = stage.get("student_layout") if isinstance(stage.get("student_layout"), dict) else {}
        student = ", ".join(
            text
            for text in (
                layout.get("preset") and f"{layout['preset']}",
                layout.get("transformer_blocks") is not None
                and f"{layout['transformer_blocks']} transformer blocks",
                layout.get("unet_parameters") and f"{_count(layout['unet_parameters'])} U-Net parameters",
            )
            if text
        )
        prune = json.dumps(stage["prune"], sort_keys=True) if stage.get("prune") else ""
        lines.append(
            f"| {stage.get('stage', number)} | `{stage.get('teacher', '?')}` | {stage.get('steps', '')} "
            f"| {prune} | {student} |"
        )
    return lines + [""]


def _run_section(run: dict[str, Any], curve: list[dict[str, float]], kind: str | None) -> list[str]:
    lines = [f"### {RUN_TITLES.get(kind or '', 'Training')}", ""]
    if run.get("teacher"):
        lines.append(f"- teacher: `{run['teacher']}`")
    if run.get("base_model"):
        lines.append(f"- base model: `{run['base_model']}`")
    if "teacher_unet_parameters" in run and "student_unet_parameters" in run:
        pair = (run["teacher_unet_parameters"], run["student_unet_parameters"])
        lines.append(f"- U-Net parameters (teacher → student): {_change(*pair)}")
    steps = run.get("steps", run.get("max_steps"))
    if steps is not None:
        lines.append(
            f"- steps: {steps}" + (f" (epoch {run['epoch']})" if run.get("epoch") is not None else "")
        )
    if _sampling(run):
        lines.append(_sampling_line(_sampling(run)))
    if isinstance(run.get("data"), dict | str):
        data = (
            run["data"]
            if isinstance(run["data"], str)
            else json.dumps(run["data"], sort_keys=True, default=str)
        )
        lines.append(f"- data: `{data}`")
    lines.append("")
    lines += _stages_section(run.get("stages"))
    settings = {k: v for k, v in run.items() if k not in _RUN_SHOWN and v is not None}
    options = run.get("options") if isinstance(run.get("options"), dict) else {}
    for title, block in (("Training options", options), ("Settings", settings)):
        if block:
            text = json.dumps(block, indent=2, sort_keys=True, default=str)
            lines += [f"{title}:", "", "```json", text, "```", ""]
    return lines + _loss_table(curve)


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
        few = _sampling(facts.lineage.run or {})
        if few:  # a few-step student: the steps and guidance it was trained for
            code[-1] = (
                'image = pipe("a photo of an astronaut riding a horse", '
                f"num_inference_steps={few['steps']}, guidance_scale={few.get('guidance_scale', 0)}).images[0]"
            )
    return ["## Usage", "", "```python", *code, "```", ""]


def _cell(value: Any, spec: str) -> str:
    if isinstance(value, bool) or value is None:
        return "-"
    return format(value, spec) if isinstance(value, int | float) else str(value)


def _eval_section(evaluation: dict[str, Any]) -> list[str]:
    """`sdcompress eval`'s table: agreement with the teacher, CLIP score and FID per model."""
    settings = evaluation.get("settings") if isinstance(evaluation.get("settings"), dict) else {}
    models = [m for m in evaluation.get("models", []) if isinstance(m, dict)]
    # eval records each model's own sampling (a few-step student's differs from the teacher's): shown
    # beside its name then, the command's flags otherwise
    per_model = any(isinstance(m.get("steps"), int) for m in models)
    keys = ("seed", "dtype") if per_model else ("steps", "guidance", "scheduler", "seed", "dtype")
    how = ", ".join(f"{k} {settings[k]}" for k in keys if k in settings)
    lines = [
        "## Evaluation",
        "",
        f"`sdcompress eval` on {evaluation.get('prompts', '?')} prompts ({settings.get('prompts', '?')}; {how}). "
        "Agreement compares each model's images with the teacher's for the same prompt and seed.",
        "",
        "| model | latent MSE | PSNR (dB) | SSIM | CLIP score | FID |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in models:
        a = m.get("agreement") if isinstance(m.get("agreement"), dict) else {}
        name = f"`{m.get('ref', '?')}`" + (" (teacher)" if m.get("teacher") else "")
        if isinstance(m.get("steps"), int):
            name += f", {m['steps']} steps, guidance {m.get('guidance')}, {m.get('scheduler')}"
        cells = [
            _cell(a.get("latent_mse"), ".4g"),
            _cell(a.get("psnr"), ".2f"),
            _cell(a.get("ssim"), ".4f"),
            _cell(m.get("clip_score"), ".4f"),
            _cell(m.get("fid"), ".2f"),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


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
            lines += _run_section(lineage.run, lineage.loss_curve(), lineage.run_kind)
    if lineage.evaluation:
        lines += _eval_section(lineage.evaluation)
    lines += _usage(facts)
    lines += ["## Files", "", "| file | bytes |", "|---|---:|"]
    lines += [f"| `{p}` | {size:,} |" for p, size in facts.files]
    return "\n".join(lines) + "\n"


def build_card(facts: CardFacts) -> ModelCard:
    """The card as huggingface_hub's `ModelCard` (metadata + markdown body)."""
    data = card_data(facts)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(facts)}")
