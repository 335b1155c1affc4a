"""Which steps, guidance and scheduler each model in an eval is rendered with.

A comparison of a teacher at its usual 25-50 steps with few-step students (LCM, DMD2) at 4 only means
something if each model is sampled as it is used. Per setting, the first of these that gives one wins:

1. the user's per-model override, `MODEL@steps=4,guidance=0,scheduler=tcd` (any subset of the keys);
2. what the model says itself (`checkpoint.sampling`): its run record's `inference` block (a DMD2
   student: its trained steps, guidance 0, its own scheduler), else 4 steps and its own scheduler for a
   model shipped with LCMScheduler (an LCM student; its guidance-scale embedding takes `--guidance`);
3. the command's `--steps`, `--guidance` and `--scheduler`.

So the global flags set the teacher and every model that says nothing about itself, and a model that
does is never silently given the teacher's settings: `eval` notes where a model's own settings won.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sdcompress.checkpoint.sampling import FROM_RECORD, FROM_SCHEDULER, OwnSampling
from sdcompress.choices import Sampler
from sdcompress.errors import SdcError

FROM_FLAGS = "flags"
FROM_OVERRIDE = "override"
KEYS = ("steps", "guidance", "scheduler")
_SETTINGS = re.compile(r"[A-Za-z_]+=[^,=@]*(,[A-Za-z_]+=[^,=@]*)*")


@dataclass(frozen=True)
class ModelSpec:
    """A model as typed on the command line: its reference and the settings given after `@`."""

    text: str
    ref: str
    steps: int | None = None
    guidance: float | None = None
    scheduler: Sampler | None = None

    @property
    def overridden(self) -> bool:
        return any(v is not None for v in (self.steps, self.guidance, self.scheduler))


def parse_model_spec(text: str) -> ModelSpec:
    """`REF` or `REF@key=value,...`; an existing path containing `@` is taken as the path it is."""
    ref, at, tail = text.rpartition("@")
    if not at or Path(text).expanduser().exists() or not _SETTINGS.fullmatch(tail):
        return ModelSpec(text=text, ref=text)
    if not ref:
        raise SdcError(f"{text} names settings but no model; write MODEL@{tail}.")
    values: dict[str, str] = {}
    for item in tail.split(","):
        key, _, value = item.partition("=")
        key = key.lower()
        if key not in KEYS:
            raise SdcError(
                f"{text}: unknown setting {key!r}; use {', '.join(KEYS)} (e.g. {ref}@steps=4,guidance=0)."
            )
        if key in values:
            raise SdcError(f"{text} gives {key} twice; give it once.")
        values[key] = value.strip()
    return ModelSpec(
        text=text,
        ref=ref,
        steps=_steps(values["steps"], text) if "steps" in values else None,
        guidance=_guidance(values["guidance"], text) if "guidance" in values else None,
        scheduler=Sampler.parse(values["scheduler"], f"{text}: scheduler") if "scheduler" in values else None,
    )


def _steps(value: str, text: str) -> int:
    try:
        steps = int(value)
    except ValueError:
        steps = 0
    if steps < 1:
        raise SdcError(f"{text}: steps must be a whole number of at least 1, not {value!r}.")
    return steps


def _guidance(value: str, text: str) -> float:
    try:
        guidance = float(value)
    except ValueError:
        guidance = float("nan")
    if not guidance >= 0 or guidance == float("inf"):
        raise SdcError(f"{text}: guidance must be a number of at least 0, not {value!r}.")
    return guidance


@dataclass(frozen=True)
class Sampling:
    """The settings a model is rendered with, and where each came from."""

    steps: int
    guidance: float
    scheduler: Sampler  # MODEL: the scheduler the model's pipeline ships with
    sources: dict[str, str]  # setting -> FROM_OVERRIDE, FROM_RECORD, FROM_SCHEDULER or FROM_FLAGS


def resolve_sampling(
    spec: ModelSpec,
    own: OwnSampling,
    pipeline_scheduler: str | None,
    *,
    steps: int,
    guidance: float,
    scheduler: Sampler,
) -> Sampling:
    """Override, else the model's own, else the flags, setting by setting (see the module docstring).

    `pipeline_scheduler` is the scheduler class the model would be rendered with (for a U-Net-only
    student: the teacher's), so a record naming another known scheduler gets that one instead.
    """
    own_scheduler = _own_scheduler(own, pipeline_scheduler) if own.source else None
    picked = {
        "steps": _first((spec.steps, FROM_OVERRIDE), (own.steps, own.source), (steps, FROM_FLAGS)),
        "guidance": _first(
            (spec.guidance, FROM_OVERRIDE), (own.guidance, own.source), (guidance, FROM_FLAGS)
        ),
        "scheduler": _first(
            (spec.scheduler, FROM_OVERRIDE), (own_scheduler, own.source), (scheduler, FROM_FLAGS)
        ),
    }
    return Sampling(
        steps=picked["steps"][0],
        guidance=picked["guidance"][0],
        scheduler=picked["scheduler"][0],
        sources={k: v[1] for k, v in picked.items()},
    )


def _first(*options: tuple[object, str | None]) -> tuple:
    return next((value, source) for value, source in options if value is not None)


def _own_scheduler(own: OwnSampling, pipeline_scheduler: str | None) -> Sampler:
    """The model's own scheduler, unless its record names another one eval knows."""
    from sdcompress.evaluation.generation import SCHEDULER_CLASSES

    if own.sampler and own.sampler != pipeline_scheduler:
        named = [s for s, cls in SCHEDULER_CLASSES.items() if cls == own.sampler]
        if named:
            return named[0]
    return Sampler.MODEL


def describe(sampling: Sampling, scheduler_class: str) -> str:
    """`4 steps, guidance 0, LCMScheduler`: how a model was rendered, for labels and notes."""
    return f"{sampling.steps} steps, guidance {sampling.guidance:g}, {scheduler_class}"


def own_settings_note(text: str, ref: str, sampling: Sampling, scheduler_class: str) -> str | None:
    """The note that says which of a model's own settings took the place of the flags (None: none did)."""
    values = {
        "steps": str(sampling.steps),
        "guidance": f"{sampling.guidance:g}",
        "scheduler": scheduler_class,
    }
    own = [k for k in KEYS if sampling.sources[k] in (FROM_RECORD, FROM_SCHEDULER)]
    if not own:
        return None
    taken = ", ".join(f"{k} {values[k]}" for k in own)
    if FROM_RECORD in sampling.sources.values():
        taken += " from its run record"
    else:
        taken += " (a few-step model, by the scheduler it ships with)"
    flags = ", ".join(f"--{k}" for k in own)
    return (
        f"{text}: {taken}, not {flags} (those apply to models that say nothing about "
        f"their sampling; {ref}@{own[0]}=... overrides)."
    )
