"""`lora train`: peft LoRA / DoRA / LoHa / LoKr adapters on any pipeline (pruned students included), DreamBooth too.

The run is the shared engine with a `LoraTrainTask`. The output folder holds
the adapters in the kohya layout (`<name>.safetensors`, `ss_*` metadata
recording the training options, what A1111 / ComfyUI / diffusers read), the
PEFT layout (`pytorch_lora_weights.safetensors`) with `format="peft"` or both
(`"kohya,peft"`), and `sdcompress_run.json`. Plain LoRA and DoRA (LyCORIS's
`dora_scale` / peft's `lora_magnitude_vector` beside the pair) go through the
project's one LoRA writer; LoHa / LoKr tensors keep their LyCORIS names under
kohya module names, streamed by the one safetensors writer. LoHa / LoKr have
no PEFT file: no loader reads LyCORIS tensors under PEFT names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from sdcompress.checkpoint.atomic import check_output
from sdcompress.checkpoint.model import Model
from sdcompress.checkpoint.safetensors_io import write_safetensors
from sdcompress.checkpoint.tensors import LazyTensor, StateDict
from sdcompress.errors import SdcError
from sdcompress.hub.lineage import write_run_record
from sdcompress.lowrank.layouts import (
    KOHYA,
    PEFT,
    LoraModule,
    data_hash,
    kohya_metadata,
    parse_formats,
    write_lora,
)
from sdcompress.lowrank.targets import COMPONENTS, Naming, naming_for
from sdcompress.services.finetune import (
    TrainingRunResult,
    base_record,
    build_parts,
    fit_data,
    load_trainable,
    prior_config,
    run_training,
)
from sdcompress.training.config import DreamBooth
from sdcompress.training.data import DataConfig
from sdcompress.training.engine import ProgressCallback, TrainConfig
from sdcompress.training.finetune_task import count_images, generate_class_images
from sdcompress.training.lora_task import AdapterSpec, LoraTrainTask, LycorisModule
from sdcompress.training.task import DiffusionParts, LossConfig, TrainingSummary

PEFT_FILE = "pytorch_lora_weights.safetensors"


DEFAULT_CLASS_IMAGES = 100  # what diffusers' DreamBooth scripts generate by default


@dataclass(frozen=True)
class LoraTrainRequest:
    model: str
    output: Path
    data: DataConfig
    train: TrainConfig
    adapter: AdapterSpec = AdapterSpec()
    loss: LossConfig = LossConfig()
    text_encoder_lr: float | None = None
    dreambooth: DreamBooth = DreamBooth()
    format: str = "kohya"  # kohya, peft or kohya,peft ("both" is accepted too)
    name: str | None = None  # file stem of the kohya file (default: the output folder's name)
    save_dtype: str = "fp16"
    allow_pickle: bool = False


def _check(request: LoraTrainRequest) -> None:
    request.adapter.validate()
    if PEFT in parse_formats(request.format) and request.adapter.type not in ("lora", "dora"):
        raise SdcError(
            f"--format peft cannot hold a {request.adapter.type} adapter (no loader reads LyCORIS tensors under "
            "PEFT names); use --format kohya, which ComfyUI, A1111/Forge, LyCORIS and sdcompress merge read."
        )
    if request.text_encoder_lr is not None and request.text_encoder_lr <= 0:
        raise SdcError("--text-encoder-lr must be positive; fix the option and run again.")
    db = request.dreambooth
    if db.prior_loss_weight < 0:
        raise SdcError("--prior-loss-weight must be 0 or more.")
    if db.num_class_images is not None and db.num_class_images < 1:
        raise SdcError(f"--num-class-images must be at least 1, got {db.num_class_images}.")
    if db.class_inference_steps < 1:
        raise SdcError(f"--class-inference-steps must be at least 1, got {db.class_inference_steps}.")
    folder = db.class_folder(request.output)
    if folder.exists() and not folder.is_dir():
        raise SdcError(f"--class-data {folder} is not a folder; give a folder of class images.")
    if db.class_data is not None and db.class_prompt is None:
        have, wanted = count_images(folder), db.num_class_images or 1
        if have < wanted:
            raise SdcError(
                f"--class-data {folder} holds {have} images, fewer than {wanted}; add --class-prompt so the "
                "base model generates the missing ones, or give a folder with more images."
            )


def ensure_class_images(
    request: LoraTrainRequest, parts: DiffusionParts, resolution: int
) -> tuple[Path, int]:
    """The class folder, filled by the base model up to the wanted count; returns it and how many were made.

    Runs before the adapters are injected, so the images are the base model's.
    Under `accelerate launch` the main process generates while the others wait,
    then find the folder full.
    """
    from accelerate import PartialState

    db = request.dreambooth
    folder = db.class_folder(request.output)
    wanted = db.num_class_images or DEFAULT_CLASS_IMAGES
    if db.class_prompt is None or count_images(folder) >= wanted:
        return folder, 0
    state = PartialState(cpu=request.train.cpu)
    made: list[Path] = []
    with state.main_process_first():
        # fp32 on purpose: the frozen parts are fp32 here, and an fp16 SDXL VAE overflows without its upcast.
        pipe = parts.pipeline().to(state.device)
        made = generate_class_images(
            pipe,
            folder,
            db.class_prompt,
            wanted,
            seed=request.train.seed,
            resolution=resolution,
            steps=db.class_inference_steps,
        )
        del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder, len(made)


def training_metadata(
    request: LoraTrainRequest, model: Model, summary: TrainingSummary, data: DataConfig
) -> dict:
    """kohya's `ss_*` keys recording how the LoRA was trained, plus `modelspec.*`."""
    spec, train = request.adapter, request.train
    conv = spec.targets == "all"
    meta = kohya_metadata(
        family=model.family,
        title=request.name or request.output.name,
        rank=spec.rank,
        conv_rank=spec.rank if conv else None,
        alpha=spec.lora_alpha,
        conv_alpha=spec.lora_alpha,
        prediction_type=request.loss.noise.prediction_type or model.prediction_type,
        resolution=data.resolution,
    )
    if spec.type not in ("lora", "dora"):  # a DoRA's network keys come from the writer (network_metadata)
        args = {
            "algo": spec.type,
            **({"conv_dim": str(spec.rank), "conv_alpha": str(spec.lora_alpha)} if conv else {}),
        }
        meta |= {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}
    db = request.dreambooth
    meta |= {
        "ss_sd_model_name": request.model,
        "ss_output_name": request.name or request.output.name,
        "ss_network_dropout": str(spec.dropout),
        "ss_network_targets": spec.targets,
        "ss_learning_rate": str(train.lr),
        "ss_unet_lr": str(train.lr),
        "ss_text_encoder_lr": str(request.text_encoder_lr or train.lr) if spec.text_encoder else "0",
        "ss_network_train_unet_only": str(not spec.text_encoder),
        "ss_max_train_steps": str(summary.steps),
        "ss_steps": str(summary.steps),
        "ss_epoch": str(summary.epoch),
        "ss_train_batch_size": str(train.batch_size),
        "ss_gradient_accumulation_steps": str(train.grad_accum),
        "ss_lr_scheduler": train.lr_scheduler,
        "ss_lr_warmup_steps": str(train.warmup_steps),
        "ss_optimizer": train.optimizer,
        "ss_mixed_precision": train.mixed_precision,
        "ss_gradient_checkpointing": str(train.gradient_checkpointing),
        "ss_seed": str(train.seed),
        "ss_min_snr_gamma": str(request.loss.snr_gamma),
        "ss_noise_offset": str(request.loss.noise.offset),
        "ss_resolution": f"({data.resolution}, {data.resolution})",
        "ss_enable_bucket": str(data.buckets),
        "ss_num_train_images": str(summary.data.get("images", 0)),
        "ss_prior_loss_weight": str(db.prior_loss_weight if db.enabled else 0.0),
        "ss_num_reg_images": str(count_images(db.class_folder(request.output)) if db.enabled else 0),
        "ss_instance_prompt": db.instance_prompt or "",
        "ss_class_prompt": db.class_prompt or "",
        "ss_training_comment": "trained with sdcompress lora train",
    }
    return meta


# ---------------------------------------------------------------------------- writing


def _lazy(t: torch.Tensor, dtype: torch.dtype) -> LazyTensor:
    return LazyTensor.of(t.detach().to(dtype).contiguous())


def lycoris_state_dict(modules: list[LycorisModule], naming: Naming, dtype: torch.dtype) -> StateDict:
    """LoHa / LoKr tensors under kohya names (`lora_unet_..hada_w1_a`), as LyCORIS writes them.

    The LoRA writer in `lowrank.layouts` writes up/down pairs only; these
    adapters have other factors, so their state dict is built here with the same
    module naming and written by the same safetensors writer.
    """
    sd: StateDict = {}
    order = sorted(modules, key=lambda m: (COMPONENTS.index(m.target.component), m.target.path))
    for m in order:
        name = naming.kohya(m.target)
        sd[f"{name}.alpha"] = _lazy(torch.tensor(m.alpha), dtype)
        for suffix, tensor in sorted(m.tensors.items()):
            sd[f"{name}.{suffix}"] = _lazy(tensor, dtype)
    return sd


def write_adapters(
    out: Path, stem: str, modules: list, naming: Naming, fmt: str, dtype: torch.dtype, meta: dict[str, str]
) -> list[Path]:
    """Write the adapters in each layout `fmt` names (`kohya`, `peft`, `kohya,peft`); LoHa / LoKr: kohya only."""
    files = []
    lycoris = bool(modules) and not isinstance(modules[0], LoraModule)
    for layout in parse_formats(fmt):
        path = out / (f"{stem}.safetensors" if layout == KOHYA else PEFT_FILE)
        if not lycoris:
            extra = meta if layout == KOHYA else {"sdcompress_training": json.dumps(meta)}
            write_lora(path, modules, naming, fmt=layout, dtype=dtype, metadata=extra, overwrite=True)
        elif layout == KOHYA:
            sd = lycoris_state_dict(modules, naming, dtype)
            write_safetensors(path, sd, {**meta, "sshs_model_hash": data_hash(sd)}, overwrite=True)
        else:
            raise SdcError("LoHa / LoKr adapters are written in the kohya layout only; use --format kohya.")
        files.append(path)
    return files


# ---------------------------------------------------------------------------- the job


def lora_train(request: LoraTrainRequest, progress: ProgressCallback | None = None) -> TrainingRunResult:
    """Run (or resume) LoRA training and write the adapter file(s)."""
    from sdcompress.choices import resolve_dtype

    inputs = [request.model, request.data.data_dir, request.dreambooth.class_data, request.train.work_dir]
    output = check_output(request.output, overwrite=request.train.overwrite_policy, inputs=inputs, kind="dir")
    request.train.validate()
    _check(request)
    model = load_trainable(request.model, request.allow_pickle)
    data = fit_data(request.data, model)
    db = request.dreambooth
    parts = build_parts(model)
    class_folder, generated = (
        ensure_class_images(request, parts, data.resolution) if db.enabled else (None, 0)
    )
    prior = prior_config(class_folder, data, db.class_prompt, db.prior_loss_weight)
    naming = naming_for(model)
    save_dtype = resolve_dtype(request.save_dtype)
    stem = request.name or output.name
    written: list[Path] = []

    def save(task: LoraTrainTask, out: Path, summary: TrainingSummary) -> None:
        meta = training_metadata(request, model, summary, data)
        modules = task.export()
        files = write_adapters(out, stem, modules, naming, request.format, save_dtype, meta)
        record = base_record("lora train", model, request.model, summary)
        record |= {
            "adapter": asdict(request.adapter),
            "adapted_modules": task.adapted_count(),
            "text_encoder_lr": request.text_encoder_lr,
            "dreambooth": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(db).items()}
            | (
                {"class_folder": str(class_folder), "class_images_generated": generated} if db.enabled else {}
            ),
            "files": [f.name for f in files],
        }
        write_run_record(out, record)
        written[:] = [output / f.name for f in files]

    task = LoraTrainTask(
        parts,
        request.loss,
        request.adapter,
        text_encoder_lr=request.text_encoder_lr,
        instance_prompt=db.instance_prompt,
        prior=prior,
        seed=request.train.seed,
        saver=save,
    )
    result = run_training(task, replace(request.train, output_dir=output), data, progress)
    result.files = list(written)
    result.class_images_generated = generated
    return result
