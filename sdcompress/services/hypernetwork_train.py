"""`hypernetwork train`: an AUTOMATIC1111 hypernetwork on a frozen pipeline, on the shared engine.

The output folder holds `<name>.pt` (A1111's format, which A1111 and ComfyUI
load from their hypernetworks folder) and `sdcompress_run.json`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from sdcompress.checkpoint.atomic import check_output
from sdcompress.hub.lineage import write_run_record
from sdcompress.services.finetune import (
    TrainingRunResult,
    base_record,
    build_parts,
    fit_data,
    load_trainable,
    run_training,
)
from sdcompress.training.data import DataConfig
from sdcompress.training.engine import ProgressCallback, TrainConfig
from sdcompress.training.hypernetwork import a1111_state, write_a1111
from sdcompress.training.hypernetwork_spec import HypernetworkSpec
from sdcompress.training.hypernetwork_task import HypernetworkTask
from sdcompress.training.task import LossConfig, TrainingSummary


@dataclass(frozen=True)
class HypernetworkTrainRequest:
    model: str
    output: Path
    data: DataConfig
    train: TrainConfig
    spec: HypernetworkSpec = HypernetworkSpec()
    loss: LossConfig = LossConfig()
    name: str | None = None  # file stem (default: the output folder's name)
    save_dtype: str = "fp32"
    allow_pickle: bool = False


def hypernetwork_train(
    request: HypernetworkTrainRequest, progress: ProgressCallback | None = None
) -> TrainingRunResult:
    """Run (or resume) hypernetwork training and write the A1111 file."""
    from sdcompress.choices import resolve_dtype

    inputs = [request.model, request.data.data_dir, request.train.work_dir]
    output = check_output(request.output, overwrite=request.train.overwrite_policy, inputs=inputs, kind="dir")
    request.train.validate()
    request.spec.validate()
    save_dtype = resolve_dtype(request.save_dtype)
    model = load_trainable(request.model, request.allow_pickle)
    data = fit_data(request.data, model)
    stem = request.name or output.name
    written: list[Path] = []

    def save(task: HypernetworkTask, out: Path, summary: TrainingSummary) -> None:
        state = a1111_state(
            task.network, name=stem, step=summary.steps, checkpoint_name=request.model, dtype=save_dtype
        )
        write_a1111(out / f"{stem}.pt", state)
        record = base_record("hypernetwork train", model, request.model, summary)
        record |= {
            "hypernetwork": asdict(request.spec),
            "widths": task.network.widths(),
            "adapted_attention_layers": task.adapted_layers(),
            "files": [f"{stem}.pt"],
        }
        write_run_record(out, record)
        written[:] = [output / f"{stem}.pt"]

    task = HypernetworkTask(
        build_parts(model), request.loss, request.spec, seed=request.train.seed, saver=save
    )
    result = run_training(task, replace(request.train, output_dir=output), data, progress)
    result.files = list(written)
    return result


__all__ = ["HypernetworkTrainRequest", "hypernetwork_train"]
