"""`eval`: render the same prompts and seeds with every model, then say how close each is to the teacher.

Images live in OUTPUT/images, one folder per (model fingerprint, settings),
so a rerun with one more model renders only that model and an interrupted
run resumes where it stopped. The teacher is always rendered (it is the
reference for agreement) and listed first. Each model is rendered with its own
steps, guidance and scheduler where it has them (`evaluation.sampling`: a
few-step student as its run record says, a per-model `@` override), else with
the request's; they are part of the image folder's key. CLIP score and FID are optional and
need their networks' weights (`evaluation.weights`); agreement needs nothing
beyond the models. The result is written to OUTPUT/eval.json, beside the
grid and (with `bench` figures) the speed/quality plot.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdcompress.checkpoint.atomic import atomic_file, check_inputs
from sdcompress.choices import DType, EvalMetric, Sampler, parse_choices, resolve_dtype
from sdcompress.devices import resolve_device
from sdcompress.errors import SdcError
from sdcompress.evaluation.protocol import DEFAULT_CLIP_MODEL, FID_RESOLUTION
from sdcompress.evaluation.sampling import (
    ModelSpec,
    Sampling,
    describe,
    own_settings_note,
    parse_model_spec,
    resolve_sampling,
)

RESULT_FILE = "eval.json"
GRID_FILE = "grid.png"
PLOT_FILE = "speed-quality.png"
IMAGES_DIR = "images"


@dataclass
class EvalRequest:
    models: list[str]  # REF or REF@steps=N,guidance=G,scheduler=S (`evaluation.sampling`)
    prompts: str  # a text file (one prompt a line) or coco:N
    output: Path
    teacher: str | None = None  # REF, or REF@... as a model
    coco_captions: Path | None = None
    # The teacher's and every model's that says nothing about its own sampling (`evaluation.sampling`).
    steps: int = 25
    guidance: float = 7.5
    scheduler: Sampler = Sampler.MODEL
    resolution: int | None = None  # default: each model's family resolution
    seed: int = 0  # prompt i gets seed + i
    batch_size: int = 4
    device: str = "auto"
    dtype: DType | None = None  # default: fp16 on CUDA, fp32 on a CPU
    metrics: tuple[EvalMetric, ...] = (EvalMetric.AGREEMENT,)
    clip_model: str = DEFAULT_CLIP_MODEL
    fid_model: str | None = None
    fid_reference: Path | None = None
    fid_resolution: int = FID_RESOLUTION
    grid_prompts: int = 8
    bench: Path | None = None
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        parse_choices(self)
        self.metrics = tuple(EvalMetric.parse(m, "--metrics") for m in self.metrics)
        if not self.models and self.teacher is None:
            raise SdcError("give at least one model to evaluate.")
        if self.steps < 1 or self.batch_size < 1:
            raise SdcError("--steps and --batch-size must be at least 1.")
        self.models = [str(m) for m in self.models]  # paths welcome from Python; specs are text
        self.teacher = str(self.teacher) if self.teacher is not None else None
        for text in [*self.models, *([self.teacher] if self.teacher else [])]:
            parse_model_spec(text)  # a bad @setting is refused before anything is loaded
        if EvalMetric.AGREEMENT in self.metrics and self.teacher is None:
            raise SdcError("teacher agreement needs --teacher; give it, or leave agreement out of --metrics.")
        if EvalMetric.FID in self.metrics and (self.fid_model is None or self.fid_reference is None):
            raise SdcError(
                "--metrics fid needs --fid-reference (a folder of real images) and --fid-model "
                "(inception-2015-12-05.pt); see docs/eval.md."
            )


@dataclass
class ModelEval:
    ref: str
    family: str
    preset: str | None
    teacher: bool
    cache_key: str
    images: str  # the folder holding this model's images
    resolution: int
    generated: int  # images rendered by this run
    cached: int  # images found from an earlier run
    agreement: dict[str, Any] | None = None
    clip_score: float | None = None
    fid: float | None = None
    seconds_per_image: float | None = None  # from --bench
    # pipeline seconds per image (text encoding, denoising, decoding) over every image rendered into
    # `images`, by this run or an earlier one with the same settings
    render_seconds_per_image: float | None = None
    steps: int | None = None
    guidance: float | None = None
    scheduler: str | None = None  # the diffusers scheduler class rendered with
    timesteps: list[int] | None = None  # what that scheduler visits in `steps` steps
    sampling_from: dict[str, str] | None = None  # setting -> override, run record, scheduler or flags
    spec: str | None = None  # the model as typed, with its @settings


@dataclass
class EvalResult:
    output: str
    prompts: int
    settings: dict[str, Any]
    models: list[ModelEval]
    grid: str | None = None
    plot: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))


def _json_safe(value: Any) -> Any:
    """Infinities as the string "inf" (strict JSON has no infinity)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


Progress = Callable[[str], None]


def _check_output(output: Path, request: EvalRequest) -> None:
    """An eval folder is reused (that is how it resumes); anything else in the way is an error."""
    refs = [
        parse_model_spec(m).ref for m in [*request.models, *([request.teacher] if request.teacher else [])]
    ]
    check_inputs(output, refs)
    if output.exists() and not output.is_dir():
        raise SdcError(f"{output} is a file; give a folder for the eval output.")
    if output.is_dir() and any(output.iterdir()):
        ours = (output / IMAGES_DIR).is_dir() or (output / RESULT_FILE).is_file()
        if not ours:
            raise SdcError(f"{output} holds files eval did not write; choose an empty or new folder.")


@dataclass(frozen=True)
class BenchTime:
    seconds_per_image: float
    image_steps: int | None  # the steps bench counted an image at (None: an older bench file)


def seconds_per_image(bench_path: Path) -> dict[str, BenchTime]:
    """Seconds per image per model ref from `bench --json` output, at the smallest measured batch."""
    try:
        data = json.loads(bench_path.read_text(encoding="utf-8"))
        out: dict[str, BenchTime] = {}
        for model in data["models"]:
            timed = [r for r in model["results"] if r.get("seconds_per_image") is not None]
            if timed:
                best = min(timed, key=lambda r: r["batch_size"])
                steps = model.get("image_steps")
                out[model["ref"]] = BenchTime(
                    float(best["seconds_per_image"]), int(steps) if isinstance(steps, int) and steps else None
                )
    except FileNotFoundError:
        raise SdcError(
            f"--bench {bench_path} does not exist; write it with `sdcompress bench --json`."
        ) from None
    except (ValueError, KeyError, TypeError):
        raise SdcError(
            f"--bench {bench_path} is not the JSON `sdcompress bench --json` writes; regenerate it."
        ) from None
    return out


def evaluate(request: EvalRequest, on_progress: Progress | None = None) -> EvalResult:
    """Render, score, draw and record; see the module docstring."""
    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.evaluation.generation import candidate
    from sdcompress.evaluation.prompts import load_prompts

    report = on_progress or (lambda message: None)
    output = Path(request.output).expanduser()
    _check_output(output, request)
    prompts = load_prompts(request.prompts, request.coco_captions)
    bench = seconds_per_image(request.bench) if request.bench else None
    device = resolve_device(request.device)
    dtype = resolve_dtype(request.dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
    specs = [parse_model_spec(t) for t in ([request.teacher] if request.teacher else [])] + [
        parse_model_spec(m) for m in request.models if m != request.teacher
    ]
    teacher = load_model(specs[0].ref, allow_pickle=request.allow_pickle) if request.teacher else None
    candidates = [candidate(spec.ref, teacher, request.allow_pickle) for spec in specs]
    plans = [_plan(spec, c, request) for spec, c in zip(specs, candidates, strict=True)]
    pairs = [(p, request.seed + i) for i, p in enumerate(prompts)]
    output.mkdir(parents=True, exist_ok=True)
    rendered = [
        _render(c, plan, i == 0 and teacher is not None, request, pairs, device, dtype, output, report)
        for i, (c, plan) in enumerate(zip(candidates, plans, strict=True))
    ]
    evals = [r[0] for r in rendered]
    caches = [r[1] for r in rendered]
    from sdcompress.evaluation.scoring import score_all

    notes = [n for e, plan in zip(evals, plans, strict=True) if (n := _sampling_note(e, plan))]
    notes += score_all(request, evals, caches, pairs, device, report)
    if bench is not None:
        notes += _bench_times(evals, bench)
    result = EvalResult(
        output=str(output),
        prompts=len(prompts),
        settings={
            "steps": request.steps,
            "guidance": request.guidance,
            "scheduler": str(request.scheduler),
            "seed": request.seed,
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
            "metrics": [str(m) for m in request.metrics],
            "prompts": request.prompts,
        },
        models=evals,
        notes=notes,
    )
    from sdcompress.evaluation.report import write_grid, write_plot

    result.grid = str(write_grid(output / GRID_FILE, caches, evals, pairs[: request.grid_prompts]))
    plot = write_plot(output / PLOT_FILE, evals) if bench is not None else None
    result.plot = str(plot) if plot else None
    with atomic_file(output / RESULT_FILE, overwrite=True) as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return result


@dataclass(frozen=True)
class _Plan:
    """How one model is rendered: its settings, where each came from, and its scheduler's timesteps."""

    spec: ModelSpec
    sampling: Sampling
    scheduler_class: str
    timesteps: list[int]


def _plan(spec: ModelSpec, cand: Any, request: EvalRequest) -> _Plan:
    from sdcompress.evaluation.generation import planned_timesteps

    config = dict(cand.model.configs["scheduler"])  # every resolved model has one (the family's at least)
    sampling = resolve_sampling(
        spec,
        cand.own,
        config.get("_class_name"),
        steps=request.steps,
        guidance=request.guidance,
        scheduler=request.scheduler,
    )
    scheduler_class, timesteps = planned_timesteps(config, sampling.scheduler, sampling.steps, spec.text)
    return _Plan(spec, sampling, scheduler_class, timesteps)


def _sampling_note(e: ModelEval, plan: _Plan) -> str | None:
    """Where a model's own settings won over the flags; and why LCMScheduler images agree less."""
    label = plan.spec.text
    notes = [own_settings_note(label, plan.spec.ref, plan.sampling, plan.scheduler_class) or ""]
    if plan.scheduler_class == "LCMScheduler" and not e.teacher:
        notes.append(
            f"{label}: LCMScheduler adds fresh noise between steps, so agreement with the teacher "
            f"measures that noise too; {plan.spec.ref}@scheduler=tcd visits the same timesteps "
            "without it (deterministic; not the sampler a DMD2 student was trained with)."
        )
    return " ".join(n for n in notes if n) or None


def _bench_times(evals: list[ModelEval], bench: dict[str, BenchTime]) -> list[str]:
    """Bench's seconds per image beside each model; notes for models bench did not time as rendered."""
    notes = []
    for e in evals:
        timed = bench.get(e.ref)
        if timed is None:
            continue
        e.seconds_per_image = timed.seconds_per_image
        if timed.image_steps is not None and timed.image_steps != e.steps:
            notes.append(
                f"--bench timed {e.ref} at {timed.image_steps} steps an image; it was rendered at {e.steps}."
            )
    missing = [e.ref for e in evals if e.seconds_per_image is None]
    if missing:
        notes.append(f"--bench has no seconds per image for {', '.join(missing)}; they are not plotted.")
    return notes


def _render(
    cand: Any,
    plan: _Plan,
    is_teacher: bool,
    request: EvalRequest,
    pairs: list[tuple[str, int]],
    device: torch.device,
    dtype: torch.dtype,
    output: Path,
    report: Progress,
) -> tuple[ModelEval, Any]:
    from sdcompress.evaluation.generation import build_pipeline, fill_cache
    from sdcompress.evaluation.generation_cache import GenerationSettings, ModelCache

    resolution = request.resolution or cand.model.family.resolution
    sampling = plan.sampling
    settings = GenerationSettings(
        steps=sampling.steps,
        guidance=sampling.guidance,
        scheduler=str(sampling.scheduler),
        resolution=resolution,
        dtype=str(dtype).removeprefix("torch."),
        device_type=device.type,
    )
    label = plan.spec.text
    cache = ModelCache(output / IMAGES_DIR, cand.fingerprint, settings, label)
    todo = len(cache.missing(pairs))
    done = [0]

    def progress(n: int) -> None:
        done[0] += n
        report(f"{label}: {done[0]}/{todo} images rendered")

    if todo:
        how = describe(sampling, plan.scheduler_class)
        report(f"{label}: rendering {todo} of {len(pairs)} images ({len(pairs) - todo} cached), {how}")
    generated, seconds = fill_cache(
        cache,
        lambda: build_pipeline(cand.model, sampling.scheduler, dtype, device),
        pairs,
        request.batch_size,
        progress,
    )
    if generated:
        cache.add_timing(seconds, generated)
    model_eval = ModelEval(
        ref=cand.ref,
        family=cand.model.family.name,
        preset=cand.model.preset,
        teacher=is_teacher,
        cache_key=cache.key,
        images=str(cache.folder),
        resolution=resolution,
        generated=generated,
        cached=len(pairs) - generated,
        render_seconds_per_image=cache.seconds_per_image(),
        steps=sampling.steps,
        guidance=sampling.guidance,
        scheduler=plan.scheduler_class,
        timesteps=plan.timesteps,
        sampling_from=dict(sampling.sources),
        spec=label,
    )
    return model_eval, cache
