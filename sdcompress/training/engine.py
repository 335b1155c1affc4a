"""The one training loop shared by distill, finetune and lora train.

The loop knows nothing about what is trained: a `TrainTask` gives the
trainable modules, computes the loss terms for a batch and saves the result.
The loop owns everything around it: accelerate (devices, DDP, mixed precision,
trackers), the optimizer and lr schedule, gradient accumulation and clipping,
EMA, checkpoints and exact resume, Ctrl-C / SIGTERM, NaN detection,
validation grids and progress reporting.

Exact resume rests on one idea: every random draw is a function of the step.
The data order and augmentations are seeded by (seed, epoch, index) in
`training.data`, the noise and timesteps by (seed, step, micro-batch, rank)
here, and the position in the data is `step * grad_accum` micro-batches.
accelerate's `save_state` / `load_state` restore the weights, the optimizer,
the lr scheduler, the EMA and the RNGs; `trainer_state.json` restores the step.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdcompress.checkpoint.atomic import apply_umask, atomic_dir, disk_full_as_error
from sdcompress.errors import SdcError
from sdcompress.training import checkpoints as ckpt
from sdcompress.training.config import DEFAULT_MAX_STEPS, TrainConfig
from sdcompress.training.data import (
    DataConfig,
    DataStats,
    ResumableBatchSampler,
    build_dataset,
    collate,
    plan_epoch,
)
from sdcompress.training.task import TrainingSummary, TrainTask
from sdcompress.training.validation import render_grid, save_grid


@dataclass(frozen=True)
class ProgressEvent:
    """What the loop reports: `kind` is start, step, checkpoint, validation, interrupted or done."""

    kind: str
    step: int
    max_steps: int
    epoch: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    lr: float = 0.0
    it_per_s: float = 0.0
    path: Path | None = None
    message: str = ""


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class TrainResult:
    """How the run ended."""

    steps: int
    max_steps: int
    epoch: int
    interrupted: bool
    resumed_from: Path | None
    last_checkpoint: Path | None
    output_dir: Path | None
    loss_history: list[dict[str, float]]
    data: DataStats
    seconds: float
    validation_images: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------- small helpers


def _noise_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return ((seed * 1_000_003 + step) * 1_009 + micro) * 131 + rank


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it after each optimizer step, saves and stops.

    Catching the signal (instead of letting KeyboardInterrupt fly) means a stop
    never lands in the middle of an optimizer step. A second Ctrl-C aborts at once.
    """

    def __init__(self) -> None:
        self.set = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set = True

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if config.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError as exc:
            raise SdcError(
                "--report-to tensorboard needs tensorboard; install it with `pip install tensorboard`."
            ) from exc
    if config.report_to == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError as exc:
            raise SdcError("--report-to wandb needs wandb; install it with `pip install wandb`.") from exc
    use_cpu = config.cpu or not torch.cuda.is_available()
    if config.mixed_precision == "fp16" and use_cpu:
        raise SdcError("--mixed-precision fp16 needs a GPU; use bf16 or no on the CPU.")
    project = ProjectConfiguration(
        project_dir=str(config.work_dir), logging_dir=str(config.work_dir / "logs")
    )
    return Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=project,
        cpu=config.cpu,
    )


def _reset_accelerate_state() -> None:
    """Let a later run in the same process choose other settings (tests, notebooks).

    accelerate keeps its state in process-wide singletons and refuses a second
    Accelerator with a different mixed precision; the process group (PartialState)
    is kept.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def _make_optimizer(config: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    kwargs = dict(
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise SdcError(
                "--optimizer adamw8bit needs bitsandbytes; install it or use --optimizer adamw."
            ) from exc
        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def _total_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    if config.epochs is None:
        return DEFAULT_MAX_STEPS
    return math.ceil(config.epochs * batches_per_epoch / config.grad_accum)


@dataclass
class _Auxiliary:
    """An auxiliary model as the loop holds it: its spec, prepared modules, optimizer and step count."""

    spec: Any  # task.AuxiliaryModel
    modules: dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    steps: int = 0


# ---------------------------------------------------------------------------- the loop


class _Loop:
    """State of one run; split into methods so each phase reads on its own."""

    def __init__(
        self, task: TrainTask, config: TrainConfig, data_config: DataConfig, callback: ProgressCallback | None
    ):
        self.task = task
        self.config = config
        self.data_config = data_config
        self.callback = callback
        self.checkpoint_dir = config.work_dir / "checkpoints"
        self.history: list[dict[str, float]] = []
        self.validation_images: list[Path] = []
        self.last_checkpoint: Path | None = None
        self.resumed_max_steps: int | None = None
        self.step = 0

    # -- reporting --------------------------------------------------------

    def emit(self, kind: str, **fields: Any) -> None:
        if self.callback is not None and self.accelerator.is_main_process:
            self.callback(ProgressEvent(kind=kind, step=self.step, max_steps=self.max_steps, **fields))

    # -- setup ------------------------------------------------------------

    def setup(self) -> None:
        config = self.config
        self.accelerator = _make_accelerator(config)
        acc = self.accelerator
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        with acc.main_process_first():
            self.dataset, self.stats = build_dataset(self.data_config, config.seed)
        check_data = getattr(self.task, "check_dataset", None)  # prepared data must fit the model
        if check_data is not None:
            check_data(self.dataset)
        self.rank, self.world = acc.process_index, acc.num_processes
        first = plan_epoch(self.dataset, config.batch_size, config.seed, 0, 0, self.world)
        self.batches_per_epoch = len(first)
        self.max_steps = _total_steps(config, self.batches_per_epoch)

        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            config.mixed_precision, torch.float32
        )
        if config.gradient_checkpointing:
            self.task.enable_gradient_checkpointing()
        modules = self.task.trainable_modules()
        groups = self.task.parameter_groups(config.lr)
        self.params = [p for group in groups for p in group["params"]]
        if not self.params:
            raise SdcError(
                "nothing to train: the task has no trainable parameters; check the training options."
            )
        optimizer = _make_optimizer(config, groups)
        from diffusers.optimization import get_scheduler

        # Stepped by the loop once per optimizer step (not prepared by accelerate, which would step it
        # once per process), so warmup and decay are counted in optimizer steps on any number of GPUs.
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=self.max_steps,
        )
        prepared = acc.prepare(*modules.values(), optimizer)
        self.models = list(prepared[:-1])
        self.optimizer = prepared[-1]
        bound = dict(zip(modules, self.models, strict=True))
        self.auxiliary = self._prepare_auxiliary(config)
        for aux in self.auxiliary:
            bound |= aux.modules
        acc.register_for_checkpointing(self.lr_scheduler)
        acc.register_save_state_pre_hook(_keep_trainable_weights)
        self.ema = None
        if config.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=config.ema_decay)
            self.ema.to(acc.device)
            acc.register_for_checkpointing(self.ema)
        # A task's own training state (LCM's EMA target network) is saved and restored with the rest.
        for state in getattr(self.task, "checkpoint_state", list)():
            acc.register_for_checkpointing(state)
        self.task.bind(bound, acc.device, self.weight_dtype)
        if config.report_to != "none":
            acc.init_trackers(self.task.name, config=_tracker_config(config))

    def _prepare_auxiliary(self, config: TrainConfig) -> list[_Auxiliary]:
        """The task's auxiliary models (DMD2's fake score), each with its own optimizer.

        Why the loop and not the task: the fake score takes several optimizer steps per student step, and
        those steps need what the loop owns (accelerate's wrapping and gradient sync, mixed precision,
        clipping, the per-step RNG, checkpoints). Prepared here, their weights and optimizer states are
        saved and restored by `save_state` / `load_state` with the main ones, so resume stays exact.
        """
        out = []
        for aux in getattr(self.task, "auxiliary_models", list)():
            params = [p for group in aux.groups for p in group["params"]]
            if not params:
                raise SdcError(
                    f"the {aux.name} model has no trainable parameters; check the training options."
                )
            optimizer = _make_optimizer(config, aux.groups)
            prepared = self.accelerator.prepare(*aux.modules.values(), optimizer)
            modules = dict(zip(aux.modules, prepared[:-1], strict=True))
            out.append(_Auxiliary(aux, modules, prepared[-1], params))
        return out

    def resume(self) -> Path | None:
        path = ckpt.resolve_resume(self.config.resume, self.checkpoint_dir)
        if path is None:
            return None
        state = ckpt.read_state(path)
        check_resumable(state, self.config, self.world, path)
        # strict=False: checkpoints of adapter training hold only the trainable weights (see below)
        self.accelerator.load_state(str(path), strict=False)
        self.step = int(state["step"])
        self.resumed_max_steps = state.get("max_steps")
        self.history = list(state.get("loss_history", []))
        self.last_checkpoint = path
        return path

    # -- data ---------------------------------------------------------------

    def micro_batches(self, start: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(epoch, batch) from global micro-batch `start` on, crossing epochs forever."""
        epoch, skip = divmod(start, self.batches_per_epoch)
        while True:
            batches = plan_epoch(
                self.dataset, self.config.batch_size, self.config.seed, epoch, self.rank, self.world
            )
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=ResumableBatchSampler(batches, epoch, skip),
                collate_fn=collate,
                num_workers=self.config.num_workers,
                pin_memory=self.accelerator.device.type == "cuda",
            )
            for batch in loader:
                yield epoch, batch
            epoch, skip = epoch + 1, 0

    # -- one optimizer step -----------------------------------------------

    def train_step(
        self, batches: Iterator[tuple[int, dict[str, Any]]], stop: _StopFlag
    ) -> tuple[dict, bool, int]:
        acc, accum = self.accelerator, self.config.grad_accum
        step_batches = [next(batches) for _ in range(accum)]
        totals = self._auxiliary_updates([batch for _, batch in step_batches])
        epoch = step_batches[-1][0]
        for micro, (_, batch) in enumerate(step_batches):
            generator = torch.Generator(device=acc.device).manual_seed(
                _noise_seed(self.config.seed, self.step, micro, self.rank)
            )
            with contextlib.ExitStack() as stack:
                if micro < accum - 1:
                    for model in self.models:
                        stack.enter_context(acc.no_sync(model))
                with acc.autocast():
                    losses = self.task.compute_loss(batch, generator)
                if "loss" not in losses:
                    raise TypeError(f"{type(self.task).__name__}.compute_loss must return a 'loss' entry")
                if torch.isfinite(losses["loss"].detach()).all():
                    acc.backward(losses["loss"] / accum)
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float() / accum
        names = sorted(totals)
        local = torch.stack([totals[n] for n in names] + [torch.tensor(float(stop.set), device=acc.device)])
        gathered = acc.gather(local[None].to(acc.device))
        finite = bool(torch.isfinite(gathered[:, :-1]).all())
        means = gathered[:, :-1].mean(dim=0)
        values = {n: float(v) for n, v in zip(names, means, strict=True)}
        stop_now = bool(gathered[:, -1].max() > 0)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            return values, stop_now, -1
        if self.config.max_grad_norm:
            acc.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)
        after_step = getattr(self.task, "after_optimizer_step", None)  # e.g. LCM's target network update
        if after_step is not None:
            after_step()
        return values, stop_now, epoch

    def _auxiliary_updates(self, batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Each auxiliary model's updates for this step, on the step's micro-batches, before the main update.

        Every update draws from its own generator, seeded by (seed, step, micro-batch, rank, model,
        update), so a resumed run repeats them exactly. Returns the losses, averaged over the updates.
        """
        acc, accum = self.accelerator, len(batches)
        totals: dict[str, torch.Tensor] = {}
        for index, aux in enumerate(self.auxiliary):
            count = aux.spec.updates
            for update in range(count):
                aux.optimizer.zero_grad(set_to_none=True)  # the main loss may have left gradients here
                for micro, batch in enumerate(batches):
                    seed = _noise_seed(self.config.seed, self.step, micro, self.rank)
                    seed = (seed * 7_919 + index * 10_007 + update + 1) % (2**63 - 1)
                    generator = torch.Generator(device=acc.device).manual_seed(seed)
                    with contextlib.ExitStack() as stack:
                        if micro < accum - 1:
                            for model in aux.modules.values():
                                stack.enter_context(acc.no_sync(model))
                        with acc.autocast():
                            losses = aux.spec.compute_loss(batch, generator)
                        if torch.isfinite(losses["loss"].detach()).all():
                            acc.backward(losses["loss"] / accum)
                    for name, value in losses.items():
                        key = aux.spec.name if name == "loss" else f"{aux.spec.name}_{name}"
                        totals[key] = totals.get(key, 0.0) + value.detach().float() / (accum * count)
                if self.config.max_grad_norm:
                    acc.clip_grad_norm_(aux.params, self.config.max_grad_norm)
                aux.optimizer.step()
                aux.optimizer.zero_grad(set_to_none=True)
                aux.steps += 1
        return totals

    # -- saving -------------------------------------------------------------

    def save_checkpoint(self, epoch: int) -> Path:
        acc = self.accelerator
        path = ckpt.checkpoint_path(self.checkpoint_dir, self.step)
        acc.wait_for_everyone()
        with disk_full_as_error(path):
            acc.save_state(str(path))
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {
                "step": self.step,
                "epoch": epoch,
                "micro_batch": self.step * self.config.grad_accum,
                "max_steps": self.max_steps,
                "seed": self.config.seed,
                "batch_size": self.config.batch_size,
                "grad_accum": self.config.grad_accum,
                "world_size": self.world,
                "loss_history": self.history,
            }
            apply_umask(path)  # accelerate saves through safetensors' 0600 temporary files
            ckpt.write_state(path, state)
            ckpt.rotate(self.checkpoint_dir, self.config.keep_checkpoints)
        acc.wait_for_everyone()
        self.last_checkpoint = path
        self.emit("checkpoint", epoch=epoch, path=path)
        return path

    def validate(self, epoch: int) -> None:
        """Main process renders the grid; validation is short by design so other ranks do not time out."""
        acc, vconfig = self.accelerator, self.config.validation
        if not vconfig.prompts:
            return
        acc.wait_for_everyone()
        if acc.is_main_process:
            pipe = self.task.validation_pipeline()
            if pipe is not None:
                grid = render_grid(pipe, vconfig, acc.device, self.data_config.resolution)
                path = save_grid(grid, self.config.work_dir / "validation", self.step)
                self.validation_images.append(path)
                self.emit("validation", epoch=epoch, path=path)
        acc.wait_for_everyone()

    def run_probe(self, probe: Callable[[torch.device], dict[str, float]], epoch: int) -> None:
        """The task's own metrics (e.g. teacher agreement), computed on the main process and logged."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            metrics = probe(acc.device)
            if self.config.report_to != "none":
                acc.log(metrics, step=self.step)
            message = " ".join(f"{k.removeprefix('eval/')}={v:.4g}" for k, v in metrics.items())
            self.emit("eval", epoch=epoch, losses=metrics, message=message)
        acc.wait_for_everyone()

    def save_output(self, epoch: int) -> Path | None:
        acc, out = self.accelerator, self.config.output_dir
        acc.wait_for_everyone()
        if out is not None and acc.is_main_process:
            with contextlib.ExitStack() as stack:
                if self.ema is not None:
                    self.ema.store(self.params)
                    self.ema.copy_to(self.params)
                    stack.callback(self.ema.restore, self.params)
                summary = TrainingSummary(
                    steps=self.step,
                    epoch=epoch,
                    loss_history=self.history,
                    data=self.stats.to_dict(),
                    options=_tracker_config(self.config),
                )
                with atomic_dir(out, overwrite=self.config.overwrite_policy) as tmp:
                    self.task.save(tmp, summary)
        acc.wait_for_everyone()
        return out

    # -- the run ------------------------------------------------------------

    def run(self) -> TrainResult:
        started = time.perf_counter()
        self.setup()
        resumed = self.resume()
        config = self.config
        message = f"resumed from {resumed}" if resumed else ""
        if resumed and self.resumed_max_steps not in (None, self.max_steps):
            message += (
                f"; the run now ends at step {self.max_steps} instead of {self.resumed_max_steps}, "
                "and the lr schedule is stretched or shrunk to that length from here on"
            )
        self.emit("start", message=message)
        batches = self.micro_batches(self.step * config.grad_accum)
        epoch = (self.step * config.grad_accum) // self.batches_per_epoch
        interrupted = False
        window_start, window_steps = time.perf_counter(), 0
        with _StopFlag() as stop:
            while self.step < self.max_steps:
                values, stop_now, step_epoch = self.train_step(batches, stop)
                if step_epoch < 0:
                    self._raise_nan(values)
                epoch = step_epoch
                self.step += 1
                window_steps += 1
                lr = self.lr_scheduler.get_last_lr()[0]
                self.history.append({"step": self.step, **values, "lr": lr})
                elapsed = time.perf_counter() - window_start
                self.emit(
                    "step", epoch=epoch, losses=values, lr=lr, it_per_s=window_steps / max(elapsed, 1e-9)
                )
                if config.report_to != "none":
                    self.accelerator.log({**values, "lr": lr}, step=self.step)
                saved = False
                if config.checkpoint_every and (
                    self.step % config.checkpoint_every == 0 or self.step == self.max_steps
                ):
                    self.save_checkpoint(epoch)
                    saved = True
                if config.validation.every and self.step % config.validation.every == 0:
                    self.validate(epoch)
                probe = getattr(self.task, "probe", None)  # a task may score itself: distill --eval-every
                if probe is not None and probe.every and self.step % probe.every == 0:
                    self.run_probe(probe, epoch)
                if stop_now and self.step < self.max_steps:
                    if not saved:
                        self.save_checkpoint(epoch)
                    interrupted = True
                    self.emit("interrupted", epoch=epoch, path=self.last_checkpoint)
                    break
        output = None
        if not interrupted:
            if config.validation.prompts and not (
                config.validation.every and self.step % config.validation.every == 0
            ):
                self.validate(epoch)
            output = self.save_output(epoch)
            self.emit("done", epoch=epoch, path=output)
        if config.report_to != "none":
            self.accelerator.end_training()
        return TrainResult(
            steps=self.step,
            max_steps=self.max_steps,
            epoch=epoch,
            interrupted=interrupted,
            resumed_from=resumed,
            last_checkpoint=self.last_checkpoint,
            output_dir=output,
            loss_history=self.history,
            data=self.stats,
            seconds=time.perf_counter() - started,
            validation_images=self.validation_images,
        )

    def _raise_nan(self, values: dict[str, float]) -> None:
        bad = ", ".join(f"{k}={v}" for k, v in values.items() if not math.isfinite(v))
        kept = (
            f"the last good checkpoint {self.last_checkpoint} is kept"
            if self.last_checkpoint
            else "no checkpoint had been saved yet"
        )
        raise SdcError(
            f"the loss became non-finite at step {self.step + 1} ({bad}) and training stopped; {kept}; "
            "lower --lr, use --mixed-precision bf16 or no, then run again with --resume latest."
        )


# What exact resume depends on: the data position is `step * grad_accum` micro-batches of `batch_size`
# split over `world_size` ranks, and every random draw is seeded from `seed`. Other options (lr,
# max_steps, validation...) may change between runs.
RESUME_INVARIANTS = (
    ("batch_size", "--batch-size"),
    ("grad_accum", "--grad-accum"),
    ("world_size", "processes"),
    ("seed", "--seed"),
)


def check_resumable(state: dict[str, Any], config: TrainConfig, world_size: int, path: Path) -> None:
    """Refuse to resume a checkpoint whose data position or randomness this run cannot reproduce.

    A changed batch size or process count would silently skip or repeat images,
    a changed seed would draw other noise: the result would no longer be what an
    uninterrupted run gives. Checkpoints written before a value was recorded skip its check.
    """
    now = {
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "world_size": world_size,
        "seed": config.seed,
    }
    changed = [
        f"{flag} {state[key]} (this run: {now[key]})"
        for key, flag in RESUME_INVARIANTS
        if key in state and state[key] != now[key]
    ]
    if changed:
        raise SdcError(
            f"checkpoint {path} was made with {', '.join(changed)}, and exact resume needs the same values; "
            "rerun with those, or start a new run with another --work-dir."
        )


def _tracker_config(config: TrainConfig) -> dict[str, Any]:
    """Trackers accept scalars only."""
    flat = {}
    for key, value in asdict(config).items():
        if isinstance(value, int | float | str | bool):
            flat[key] = value
        elif value is not None and not isinstance(value, dict):
            flat[key] = str(value)
    return flat


def train(
    task: TrainTask,
    config: TrainConfig,
    data: DataConfig,
    callback: ProgressCallback | None = None,
) -> TrainResult:
    """Run `task` on the data until `max_steps` (or `epochs`), a stop signal, or a non-finite loss."""
    config.validate()
    loop = _Loop(task, config, data, callback)
    try:
        return loop.run()
    finally:
        _reset_accelerate_state()


def _keep_trainable_weights(
    models: list[torch.nn.Module], weights: list[dict[str, Any]], output_dir: str
) -> None:
    """Checkpoints keep what training changes: for LoRA, the adapters, not the frozen model.

    accelerate saves every prepared model whole; for adapter training on SDXL
    that is gigabytes per checkpoint for kilobytes of adapters. The frozen
    weights come back from the base model on resume, so only parameters that
    require grad are written (full fine-tuning keeps everything).
    """
    for model, state in zip(models, weights, strict=True):
        inner = getattr(model, "module", model)
        params = dict(inner.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        if len(trainable) == len(params):
            continue
        for key in list(state):
            if key.removeprefix("module.") not in trainable:
                del state[key]
