"""`embedding train`: textual inversion on the shared engine, for SD 1.x, SD 2.x and SDXL (both encoders).

The output folder holds the embedding twice, in the two layouts people load:
`<name>.safetensors` for A1111 / ComfyUI (`emb_params`, or `clip_l` + `clip_g`
for SDXL; the token is the file name there, so `name` defaults to the token
without its brackets) and `learned_embeds.safetensors` (+ `learned_embeds_2`
for SDXL) for diffusers' `load_textual_inversion`, plus `sdcompress_run.json`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from sdcompress.checkpoint.atomic import check_output
from sdcompress.checkpoint.embedding_files import write_a1111, write_diffusers_files
from sdcompress.hub.lineage import write_run_record
from sdcompress.services.finetune import (
    TrainingRunResult,
    base_record,
    build_parts,
    fit_data,
    load_trainable,
    run_training,
)
from sdcompress.training.config import EmbeddingSpec
from sdcompress.training.data import DataConfig
from sdcompress.training.embedding_task import EmbeddingTask
from sdcompress.training.engine import ProgressCallback, TrainConfig
from sdcompress.training.task import LossConfig, TrainingSummary


@dataclass(frozen=True)
class EmbeddingTrainRequest:
    model: str
    output: Path
    data: DataConfig
    train: TrainConfig
    embedding: EmbeddingSpec = EmbeddingSpec()
    loss: LossConfig = LossConfig()
    name: str | None = None  # stem of the A1111 file (default: the token without < > and spaces)
    save_dtype: str | None = None  # default fp32: the vectors are kilobytes
    allow_pickle: bool = False


def default_name(token: str) -> str:
    """A file stem from the token: `<my-thing>` -> `my-thing` (A1111 and ComfyUI prompt by the file name)."""
    return re.sub(r"[^\w.-]+", "", token) or "embedding"


def embedding_train(
    request: EmbeddingTrainRequest, progress: ProgressCallback | None = None
) -> TrainingRunResult:
    """Run (or resume) textual inversion and write the embedding files."""
    from sdcompress.choices import resolve_dtype

    inputs = [request.model, request.data.data_dir, request.train.work_dir]
    output = check_output(request.output, overwrite=request.train.overwrite_policy, inputs=inputs, kind="dir")
    request.train.validate()
    request.embedding.validate()
    model = load_trainable(request.model, request.allow_pickle)
    data = fit_data(request.data, model)
    dtype = resolve_dtype(request.save_dtype)
    spec = request.embedding
    stem = request.name or default_name(spec.token or "")
    written: list[Path] = []

    def save(task: EmbeddingTask, out: Path, summary: TrainingSummary) -> None:
        meta = {"sdcompress.base_model": request.model, "sdcompress.family": model.family.name,
                "sdcompress.steps": str(summary.steps)}  # fmt: skip
        emb = task.embedding(meta)
        files = [write_a1111(out / f"{stem}.safetensors", emb, dtype=dtype, overwrite=True)]
        files += write_diffusers_files(out, emb, dtype=dtype)
        record = base_record("embedding train", model, request.model, summary)
        record |= {
            "embedding": {**asdict(spec), "vectors": task.count, "token_names": task.names},
            "files": [f.name for f in files],
        }
        write_run_record(out, record)
        written[:] = [output / f.name for f in files]

    task = EmbeddingTask(build_parts(model), request.loss, spec, saver=save)
    result = run_training(task, replace(request.train, output_dir=output), data, progress)
    result.files = list(written)
    return result
