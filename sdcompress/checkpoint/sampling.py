"""How a model is meant to be sampled, from what it carries: its training run's record, else its scheduler.

A few-step student is not used like its teacher. `distill --objective dmd2` records the student's
steps, timesteps and guidance in the `inference` block of `sdcompress_run.json`; a model shipped with
LCMScheduler (an LCM student, ours or a published one) is used at 4 steps. `bench` times an image at
these settings and `eval` renders at them, so both read them here, the one place that knows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdcompress.hub.lineage import RUN_RECORD

# Steps an image takes when nothing else is known: diffusers' pipeline default, and for a model shipped
# with LCMScheduler (a few-step student) the 4 steps LCM models are used at.
PIPELINE_STEPS = 50
FEW_STEP_SCHEDULERS = {"LCMScheduler": 4}

FROM_RECORD = "run record"
FROM_SCHEDULER = "scheduler"


@dataclass(frozen=True)
class OwnSampling:
    """What a model says about its own sampling; None where it says nothing."""

    steps: int | None = None
    guidance: float | None = None  # <= 1: sampled without classifier-free guidance (a DMD2 student)
    sampler: str | None = None  # the diffusers scheduler class its record names
    timesteps: tuple[int, ...] | None = None
    source: str | None = None  # FROM_RECORD, FROM_SCHEDULER, or None when the model says nothing

    @property
    def unguided(self) -> bool:
        """Guidance is in its weights: pipelines run one U-Net batch per step, not the CFG pair."""
        return self.guidance is not None and self.guidance <= 1


def recorded_inference(path: Path | None) -> dict[str, Any]:
    """`inference` of the `sdcompress_run.json` beside a model we trained (empty when there is none).

    Read leniently, as every record is: a missing, broken or hand-edited record is no record.
    """
    if path is None or not (Path(path) / RUN_RECORD).is_file():
        return {}
    try:
        record = json.loads((Path(path) / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    inference = record.get("inference") if isinstance(record, dict) else None
    return inference if isinstance(inference, dict) else {}


def own_sampling(path: Path | None, scheduler_class: str | None) -> OwnSampling:
    """The record's settings when it has any usable ones, else the few-step default of its scheduler."""
    inference = recorded_inference(path)
    steps = inference.get("steps")
    steps = steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else None
    guidance = inference.get("guidance_scale")
    guidance = (
        float(guidance) if isinstance(guidance, int | float) and not isinstance(guidance, bool) else None
    )
    if steps is not None or guidance is not None:
        sampler = inference.get("sampler")
        timesteps = inference.get("timesteps")
        valid = isinstance(timesteps, list) and all(isinstance(t, int) for t in timesteps)
        return OwnSampling(
            steps=steps or FEW_STEP_SCHEDULERS.get(scheduler_class or ""),
            guidance=guidance,
            sampler=sampler if isinstance(sampler, str) else None,
            timesteps=tuple(timesteps) if valid else None,
            source=FROM_RECORD,
        )
    if scheduler_class in FEW_STEP_SCHEDULERS:
        return OwnSampling(steps=FEW_STEP_SCHEDULERS[scheduler_class], source=FROM_SCHEDULER)
    return OwnSampling()
