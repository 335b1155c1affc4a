"""The training options as data: one dataclass per concern, each field carrying its command-line flag.

These dataclasses are the only place a training option is declared. The
engine, the tasks and the services read them; the CLI builds its `distill`,
`finetune`, `lora train` and `data prepare` options *from* them (`cli/_training_options.py`
reads each field's `option(...)` metadata: flag, help, panel, choices), and
`--config run.toml` keys are the same flag names. A field without that
metadata is a library-only setting (e.g. Adam's betas) with no flag.

This module imports neither torch nor anything heavy, so the CLI can build
its help from it in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sdcompress.choices import CaptionTemplate, Choice, PredictionType
from sdcompress.errors import SdcError

# Help panels (rich) the options are grouped in; None is Typer's plain "Options" panel.
DATA = "Data"
OPTIMISATION = "Optimisation"
LOSS = "Loss"
RUN = "Checkpoints, validation and logging"
ADAPTER = "Adapter"
DREAMBOOTH = "DreamBooth"
DISTILLATION = "Distillation"
EMBEDDING = "Embedding"


@dataclass(frozen=True)
class Flag:
    """How a dataclass field appears on the command line and in `--config` files.

    `negate`: the flag is the field's opposite (`--random-crop` sets `center_crop=False`).
    `aliases`: old spellings still accepted, with a deprecation note (CLI and TOML).
    """

    name: str
    help: str
    panel: str | None = None
    choices: type[Choice] | None = None
    parser: Callable[[str], Any] | None = None  # Typer parser for sets with aliases (DType)
    metavar: str | None = None
    short: str | None = None
    negate: bool = False
    aliases: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The Python name of the flag: `--batch-size` -> `batch_size` (also the TOML key)."""
        return self.name.lstrip("-").replace("-", "_")


def option(name: str, help: str, panel: str | None = None, **kwargs: Any) -> dict[str, Flag]:
    """Field metadata declaring the field's flag: `field(default=..., metadata=option("--lr", ...))`."""
    return {"cli": Flag(name, help, panel, **kwargs)}


def flag_of(f: Any) -> Flag | None:
    return f.metadata.get("cli")


def coerce_choices(obj: Any) -> None:
    """Turn plain strings into the fields' Enums (library callers may pass "fp16"); refuse unknown values.

    Called from `__post_init__`, so a bad choice fails when the config is made,
    whether it came from the CLI, a TOML file or Python.
    """
    for f in fields(obj):
        flag = flag_of(f)
        value = getattr(obj, f.name)
        if flag is None or flag.choices is None or value is None or isinstance(value, flag.choices):
            continue
        object.__setattr__(obj, f.name, flag.choices.parse(value, flag.name))


# ---------------------------------------------------------------------------- choices


class MixedPrecision(Choice):
    NO = "no"
    FP16 = "fp16"
    BF16 = "bf16"


class Optimizer(Choice):
    ADAMW = "adamw"
    ADAMW8BIT = "adamw8bit"


class LrScheduler(Choice):
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"
    LINEAR = "linear"
    COSINE = "cosine"
    COSINE_WITH_RESTARTS = "cosine_with_restarts"
    POLYNOMIAL = "polynomial"


class Tracker(Choice):
    NONE = "none"
    TENSORBOARD = "tensorboard"
    WANDB = "wandb"


class AdapterType(Choice):
    LORA = "lora"
    LOHA = "loha"
    LOKR = "lokr"
    DORA = "dora"  # LoRA with weight decomposition (peft's use_dora): magnitude times normalised direction


class TargetSet(Choice):
    ATTENTION = "attention"
    ATTENTION_FF = "attention+ff"
    ALL_LINEAR = "all-linear"
    ALL = "all"


class Objective(Choice):
    """What `distill` trains the student to do."""

    DISTILL = "distill"  # imitate the teacher's outputs and features at one timestep (BK-SDM)
    LCM = "lcm"  # latent consistency distillation: jump along the teacher's ODE in few steps
    DMD2 = "dmd2"  # distribution matching (DMD2): a few-step student whose samples score as the teacher's


class ConsistencyLoss(Choice):
    L2 = "l2"
    HUBER = "huber"


class FeatureMode(Choice):
    BLOCKS = "blocks"
    ATTENTIONS = "attentions"
    SELF_ATTENTION = "self-attention"
    NONE = "none"


DEFAULT_MAX_STEPS = 1000  # when neither max_steps nor epochs is given


# ---------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are turned into training tensors."""

    # Declared str so that Typer keeps a URL intact (Path folds `s3://` into `s3:/`); a local
    # path becomes a Path in __post_init__, a URL stays a str.
    data_dir: str | None = field(
        default=None,
        metadata=option(
            "--data",
            "Folder of images with .txt captions or metadata.jsonl, or a prepared dataset (or its URL).",
            DATA,
        ),
    )
    dataset_name: str | None = field(
        default=None,
        metadata=option("--dataset-name", "Hugging Face dataset id (needs `datasets`, online).", DATA),
    )
    dataset_split: str = field(
        default="train", metadata=option("--dataset-split", "Split of --dataset-name.", DATA)
    )
    image_column: str = field(
        default="image", metadata=option("--image-column", "Image column of --dataset-name.", DATA)
    )
    caption_column: str = field(
        default="text",
        metadata=option("--caption-column", "Caption column (dataset or metadata.jsonl).", DATA),
    )
    caption_extension: str = field(
        default=".txt", metadata=option("--caption-extension", "Sidecar caption suffix.", DATA)
    )
    resolution: int | None = field(  # None: the model's (the services fill it in)
        default=None, metadata=option("--resolution", "Training resolution (default: the model's).", DATA)
    )
    center_crop: bool = field(
        default=True, metadata=option("--random-crop", "Random instead of center crops.", DATA, negate=True)
    )
    random_flip: bool = field(
        default=False, metadata=option("--random-flip", "Flip half of the images horizontally.", DATA)
    )
    caption_dropout: float = field(
        default=0.0,
        metadata=option("--caption-dropout", "Fraction of captions replaced by the empty caption.", DATA),
    )
    buckets: bool = field(
        default=False, metadata=option("--buckets", "Aspect-ratio buckets instead of square crops.", DATA)
    )
    bucket_step: int = 64  # pixels per bucket side step: VAE factor x U-Net downsampling (64 for SD)
    require_captions: bool = field(
        default=False,
        metadata=option(
            "--require-captions", "Refuse images without a caption (default: empty caption).", DATA
        ),
    )

    def __post_init__(self) -> None:
        from sdcompress.training.remote import is_url

        if isinstance(self.data_dir, str) and not is_url(self.data_dir):
            object.__setattr__(self, "data_dir", Path(self.data_dir))

    def validate(self) -> None:
        """Reject options that cannot work before any image is read."""
        if (self.data_dir is None) == (self.dataset_name is None):
            raise SdcError("give exactly one data source: --data DIR or --dataset-name NAME.")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise SdcError(f"--resolution must be a positive multiple of 8, got {self.resolution}.")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise SdcError(f"--caption-dropout must be between 0 and 1, got {self.caption_dropout}.")


# ---------------------------------------------------------------------------- loss


@dataclass(frozen=True)
class NoiseConfig:
    """How training noise is drawn: `offset` adds a per-channel constant (noise offset)."""

    offset: float = field(
        default=0.0, metadata=option("--noise-offset", "Noise offset (0.05-0.1 is usual).", LOSS)
    )
    prediction_type: PredictionType | None = field(  # None: the scheduler's own
        default=None,
        metadata=option(
            "--prediction-type",
            "epsilon, v_prediction or sample (default: the model's; distill: the teacher's).",
            LOSS,
            choices=PredictionType,
        ),
    )
    timesteps: str | None = field(  # None: every training timestep
        default=None,
        metadata=option(
            "--timesteps",
            "Train only at these timesteps, as a step-distilled teacher was: trailing:4, leading:N, "
            "linspace:N or a list such as 999,749,499,249 (default: all).",
            LOSS,
        ),
    )

    def __post_init__(self) -> None:
        coerce_choices(self)


@dataclass(frozen=True)
class LossConfig:
    """Task-loss options shared by every diffusion job."""

    snr_gamma: float | None = field(
        default=None, metadata=option("--snr-gamma", "Min-SNR weighting gamma (5 is usual).", LOSS)
    )
    noise: NoiseConfig = NoiseConfig()
    cache_latents: bool = field(
        default=False,
        metadata=option("--cache-latents", "Encode each image once (needs center crop, no flip).", DATA),
    )


def check_cache_latents(data: DataConfig, loss: LossConfig) -> None:
    """Cached latents are the same every epoch, so the images must be too."""
    if loss.cache_latents and (not data.center_crop or data.random_flip):
        raise SdcError("--cache-latents needs fixed images; drop --random-crop and --random-flip.")


# ---------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class ValidationConfig:
    """What to render every `every` steps (0: only at the end when prompts are given)."""

    prompts: tuple[str, ...] = field(
        default=(), metadata=option("--validation-prompt", "Prompt for validation grids (repeatable).", RUN)
    )
    seeds: tuple[int, ...] = field(
        default=(0,), metadata=option("--validation-seed", "Seed per grid column (repeatable).", RUN)
    )
    every: int = field(
        default=0, metadata=option("--validation-every", "Render the grid every N steps.", RUN)
    )
    steps: int = field(default=20, metadata=option("--validation-steps", "Inference steps per image.", RUN))
    guidance_scale: float = 5.0
    resolution: int | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Everything the loop needs besides the task and the data.

    `work_dir` defaults to OUTPUT.train next to `output_dir`; `max_steps` to
    1000 unless `epochs` is given; `max_grad_norm` 0 or None and
    `keep_checkpoints` 0 or None mean off / keep all.
    """

    @property
    def overwrite_policy(self) -> Any:
        """`overwrite` and `overwrite_foreign` as the one policy the output writers take (`atomic.Overwrite`)."""
        from sdcompress.checkpoint.atomic import overwrite_mode

        return overwrite_mode(self.overwrite, self.overwrite_foreign)

    work_dir: Path | None = field(
        default=None,
        metadata=option("--work-dir", "Checkpoints, validation grids, logs (default: OUTPUT.train).", RUN),
    )
    output_dir: Path | None = field(
        default=None, metadata=option("--output", "Where to write the result. Required.", short="-o")
    )
    overwrite: bool = field(
        default=False,
        metadata=option(
            "--overwrite",
            "Replace an existing output that sdcompress wrote (a folder holding other files is refused).",
        ),
    )
    overwrite_foreign: bool = field(
        default=False,
        metadata=option(
            "--overwrite-foreign",
            "Replace an existing output folder even if it holds files sdcompress did not write "
            "(they are deleted; implies --overwrite).",
        ),
    )
    max_steps: int | None = field(
        default=None,
        metadata=option(
            "--max-steps", "Optimizer steps to train (default: 1000 unless --epochs).", OPTIMISATION
        ),
    )
    epochs: int | None = field(
        default=None, metadata=option("--epochs", "Epochs to train (instead of --max-steps).", OPTIMISATION)
    )
    batch_size: int = field(
        default=1, metadata=option("--batch-size", "Images per GPU per micro-batch.", OPTIMISATION)
    )
    grad_accum: int = field(
        default=1, metadata=option("--grad-accum", "Micro-batches per optimizer step.", OPTIMISATION)
    )
    lr: float = field(default=1e-5, metadata=option("--lr", "Learning rate.", OPTIMISATION))
    lr_scheduler: LrScheduler = field(
        default=LrScheduler.CONSTANT,
        metadata=option(
            "--lr-scheduler",
            "constant, constant_with_warmup, linear, cosine, ...",
            OPTIMISATION,
            choices=LrScheduler,
        ),
    )
    warmup_steps: int = field(
        default=0, metadata=option("--warmup-steps", "Linear warmup steps.", OPTIMISATION)
    )
    optimizer: Optimizer = field(
        default=Optimizer.ADAMW,
        metadata=option("--optimizer", "adamw or adamw8bit (bitsandbytes).", OPTIMISATION, choices=Optimizer),
    )
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = field(
        default=1e-2, metadata=option("--weight-decay", "AdamW weight decay.", OPTIMISATION)
    )
    max_grad_norm: float | None = field(
        default=1.0, metadata=option("--max-grad-norm", "Gradient clipping norm (0: off).", OPTIMISATION)
    )
    mixed_precision: MixedPrecision = field(
        default=MixedPrecision.NO,
        metadata=option("--mixed-precision", "no, fp16 or bf16.", OPTIMISATION, choices=MixedPrecision),
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=option("--gradient-checkpointing", "Recompute activations to save memory.", OPTIMISATION),
    )
    allow_tf32: bool = True
    seed: int = field(
        default=0, metadata=option("--seed", "Seed for data order, augmentation and noise.", OPTIMISATION)
    )
    checkpoint_every: int = field(
        default=500, metadata=option("--checkpoint-every", "Save a checkpoint every N steps.", RUN)
    )
    keep_checkpoints: int | None = field(
        default=3, metadata=option("--keep-checkpoints", "Keep the last K checkpoints (0: all).", RUN)
    )
    resume: str | None = field(
        default=None, metadata=option("--resume", "latest or a checkpoint folder.", RUN)
    )
    ema: bool = field(default=False, metadata=option("--ema", "Keep an EMA of the weights and save it.", RUN))
    ema_decay: float = field(default=0.9999, metadata=option("--ema-decay", "EMA decay.", RUN))
    validation: ValidationConfig = ValidationConfig()
    report_to: Tracker = field(
        default=Tracker.NONE,
        metadata=option("--report-to", "none, tensorboard or wandb.", RUN, choices=Tracker),
    )
    # 0 (load in the main process), like the diffusers examples: works everywhere (no fork or pickling
    # of the dataset), and the tiny per-image work here rarely starves a GPU; raise it for big JPEG sets.
    num_workers: int = field(
        default=0, metadata=option("--num-workers", "Data loader worker processes.", DATA)
    )
    cpu: bool = field(
        default=False, metadata=option("--cpu", "Train on the CPU even when a GPU is present.", OPTIMISATION)
    )

    def __post_init__(self) -> None:
        coerce_choices(self)
        if self.output_dir is not None:
            object.__setattr__(self, "output_dir", Path(self.output_dir))
        if self.work_dir is None and self.output_dir is not None:
            object.__setattr__(self, "work_dir", self.output_dir.with_name(self.output_dir.name + ".train"))
        elif self.work_dir is not None:
            object.__setattr__(self, "work_dir", Path(self.work_dir))

    def validate(self) -> None:
        """Reject impossible settings before any model is touched."""
        checks = [
            (self.work_dir is not None, "give --work-dir or --output"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (self.lr > 0, "--lr must be positive"),
            (self.warmup_steps >= 0, "--warmup-steps must be 0 or more"),
            (self.checkpoint_every >= 0, "--checkpoint-every must be 0 (off) or more"),
            (self.num_workers >= 0, "--num-workers must be 0 or more"),
            (self.max_steps is None or self.epochs is None, "give --max-steps or --epochs, not both"),
            (
                (self.max_steps or 1) >= 1 and (self.epochs or 1) >= 1,
                "--max-steps and --epochs must be positive",
            ),
            (0.0 < self.ema_decay < 1.0, "--ema-decay must be between 0 and 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise SdcError(message + "; fix the option and run again.")


# ---------------------------------------------------------------------------- what each job adds


@dataclass(frozen=True)
class AdapterSpec:
    """What to train: adapter type, rank, alpha, dropout, the U-Net target set, and the text encoders."""

    rank: int = field(default=16, metadata=option("--rank", "Adapter rank.", ADAPTER))
    alpha: float | None = field(  # None: alpha = rank (scale 1)
        default=None, metadata=option("--alpha", "Adapter alpha (default: the rank).", ADAPTER)
    )
    dropout: float = field(default=0.0, metadata=option("--dropout", "Adapter dropout.", ADAPTER))
    targets: TargetSet = field(
        default=TargetSet.ATTENTION,
        metadata=option(
            "--targets",
            f"U-Net modules: {', '.join(TargetSet)} (all adds convs).",
            ADAPTER,
            choices=TargetSet,
        ),
    )
    type: AdapterType = field(
        default=AdapterType.LORA,
        metadata=option(
            "--algo",
            f"Adapter algorithm (LyCORIS's `algo`): {', '.join(AdapterType)}.",
            ADAPTER,
            choices=AdapterType,
            aliases=("--type",),
        ),
    )
    text_encoder: bool = field(
        default=False, metadata=option("--text-encoder", "Also adapt the text encoder(s).", ADAPTER)
    )

    def __post_init__(self) -> None:
        coerce_choices(self)

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def validate(self) -> None:
        if self.rank < 1:
            raise SdcError(f"--rank must be at least 1, got {self.rank}; pass a positive rank such as 16.")
        if not 0.0 <= self.dropout < 1.0:
            raise SdcError(f"--dropout must be in [0, 1), got {self.dropout}.")
        if self.alpha is not None and self.alpha <= 0:
            raise SdcError(f"--alpha must be positive, got {self.alpha}.")


@dataclass(frozen=True)
class DreamBooth:
    """DreamBooth options: every instance caption becomes `instance_prompt`; class images add a prior term.

    Prior preservation is on with `class_data` or `class_prompt`. With a class
    prompt, the class folder (default `OUTPUT.class-images/`) is filled up to
    `num_class_images` (default 100) by the base model before training.
    """

    instance_prompt: str | None = field(
        default=None, metadata=option("--instance-prompt", "Caption for every training image.", DREAMBOOTH)
    )
    class_data: Path | None = field(
        default=None,
        metadata=option(
            "--class-data",
            "Folder of class images (prior preservation); default with --class-prompt: OUTPUT.class-images.",
            DREAMBOOTH,
        ),
    )
    class_prompt: str | None = field(
        default=None,
        metadata=option(
            "--class-prompt",
            "Caption for every class image; missing class images are generated from it by the base model.",
            DREAMBOOTH,
        ),
    )
    num_class_images: int | None = field(
        default=None,
        metadata=option(
            "--num-class-images",
            "Class images wanted; the base model makes the missing ones (default 100).",
            DREAMBOOTH,
        ),
    )
    class_inference_steps: int = field(
        default=30,
        metadata=option("--class-inference-steps", "Inference steps per generated class image.", DREAMBOOTH),
    )

    prior_loss_weight: float = field(
        default=1.0, metadata=option("--prior-loss-weight", "Weight of the class (prior) loss.", DREAMBOOTH)
    )

    @property
    def enabled(self) -> bool:
        return self.class_data is not None or self.class_prompt is not None

    def class_folder(self, output: Path) -> Path:
        return (
            Path(self.class_data)
            if self.class_data is not None
            else output.with_name(output.name + ".class-images")
        )


@dataclass(frozen=True)
class DistillWeights:
    """Weights of the three terms; BK-SDM's recipe is 1/1/1, Segmind's distill-sd 1/0.5/0.5."""

    task: float = field(
        default=1.0, metadata=option("--task-weight", "Weight of the diffusion loss.", DISTILLATION)
    )
    output: float = field(
        default=1.0,
        metadata=option("--output-weight", "Weight of MSE(student, teacher output).", DISTILLATION),
    )
    features: float = field(
        default=1.0, metadata=option("--feature-weight", "Weight of the feature MSEs.", DISTILLATION)
    )


EVAL_PROMPTS = (
    "a red cube on a wooden table",
    "a cat sleeping on a sofa",
    "a lighthouse on a cliff at sunset",
    "a bowl of fruit, studio photo",
)


@dataclass(frozen=True)
class TeacherEvalConfig:
    """`distill --eval-every N`: the student scored against its teacher on fixed prompts (`evaluation.probe`)."""

    every: int = field(
        default=0,
        metadata=option(
            "--eval-every",
            "Every N steps, render fixed prompts with student and teacher; log latent MSE, PSNR, SSIM.",
            RUN,
        ),
    )
    steps: int = field(
        default=10, metadata=option("--eval-steps", "Inference steps per --eval-every image.", RUN)
    )
    prompts: tuple[str, ...] = EVAL_PROMPTS
    guidance: float = 7.5
    resolution: int | None = None  # default: the training resolution

    def validate(self) -> None:
        if self.every < 0 or self.steps < 1:
            raise SdcError("--eval-every must be 0 (off) or more and --eval-steps at least 1.")


@dataclass(frozen=True)
class ConsistencyConfig:
    """Latent consistency distillation (`distill --objective lcm`), with the LCM / LCM-LoRA recipe's defaults.

    The teacher's ODE is solved with DDIM on `ddim_timesteps` skipping steps; the guidance scale w is drawn
    from [w_min, w_max] and fed to a full student as a guidance-scale embedding (`w_embedding` wide,
    diffusers' `time_cond_proj_dim`), while a LoRA student (`lora` rank) learns one guided model without it.
    A full student's target is an EMA copy of itself (`target_ema_decay`); a LoRA student is its own target.
    """

    objective: Objective = field(
        default=Objective.DISTILL,
        metadata=option(
            "--objective",
            "distill (imitate the teacher: task + output + feature losses), lcm (a few-step student by "
            "latent consistency distillation) or dmd2 (a few-step student by distribution matching); "
            "with lcm and dmd2 --student defaults to the teacher.",
            DISTILLATION,
            choices=Objective,
        ),
    )
    lora: int | None = field(
        default=None,
        metadata=option(
            "--lora",
            "LCM and DMD2: train a LoRA of this rank on the student instead of the whole U-Net.",
            DISTILLATION,
            metavar="RANK",
        ),
    )
    lora_targets: TargetSet = field(
        default=TargetSet.ALL,
        metadata=option(
            "--lora-targets",
            f"LCM/DMD2 LoRA modules (student and --fake-lora): {', '.join(TargetSet)} "
            "(all: linears and convs, as LCM-LoRA).",
            DISTILLATION,
            choices=TargetSet,
        ),
    )
    w_min: float = field(
        default=5.0,
        metadata=option("--w-min", "LCM: smallest guidance w drawn (scale = 1 + w).", DISTILLATION),
    )
    w_max: float = field(
        default=15.0, metadata=option("--w-max", "LCM: largest guidance w drawn.", DISTILLATION)
    )
    w_embedding: int = field(
        default=256,
        metadata=option(
            "--w-embedding",
            "LCM: width of the guidance-scale embedding of a full student (0: none; LoRA: always none).",
            DISTILLATION,
        ),
    )
    ddim_timesteps: int = field(
        default=50,
        metadata=option(
            "--ddim-timesteps", "LCM: DDIM solver steps over the teacher's schedule.", DISTILLATION
        ),
    )
    target_ema_decay: float = field(
        default=0.95,
        metadata=option(
            "--target-ema-decay", "LCM: EMA decay of the full student's target network.", DISTILLATION
        ),
    )
    consistency_loss: ConsistencyLoss = field(
        default=ConsistencyLoss.HUBER,
        metadata=option("--consistency-loss", "LCM: huber or l2.", DISTILLATION, choices=ConsistencyLoss),
    )
    huber_c: float = field(default=0.001, metadata=option("--huber-c", "LCM: Huber loss c.", DISTILLATION))
    timestep_scaling: float = 10.0  # LCMScheduler's default; the boundary scalings use it

    def __post_init__(self) -> None:
        coerce_choices(self)

    @property
    def is_lcm(self) -> bool:
        return self.objective == Objective.LCM

    @property
    def is_dmd2(self) -> bool:
        return self.objective == Objective.DMD2

    @property
    def few_step(self) -> bool:
        """LCM and DMD2 train a few-step sampler of any student, by default the teacher itself."""
        return self.is_lcm or self.is_dmd2

    def validate(self) -> None:
        checks = [
            (self.lora is None or self.lora >= 1, "--lora must be a rank of 1 or more"),
            (self.lora is None or self.few_step, "--lora needs --objective lcm or dmd2"),
            (0 <= self.w_min <= self.w_max, "--w-min must be 0 or more and at most --w-max"),
            (self.w_embedding >= 0 and self.w_embedding % 2 == 0, "--w-embedding must be 0 or an even width"),
            (1 <= self.ddim_timesteps <= 1000, "--ddim-timesteps must be between 1 and 1000"),
            (0.0 <= self.target_ema_decay < 1.0, "--target-ema-decay must be in [0, 1)"),
            (self.huber_c > 0, "--huber-c must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise SdcError(message + "; fix the option and run again.")


# The real score's classifier-free guidance as DMD2 trains them: SDXL 8, SD 1.5 (and other U-Nets) 1.75.
DMD2_GUIDANCE_SDXL = 8.0
DMD2_GUIDANCE_SD = 1.75


@dataclass(frozen=True)
class DmdConfig:
    """Distribution matching distillation (`distill --objective dmd2`), with the DMD2 paper's recipe.

    The student's samples are scored by the frozen teacher (the real score, guided by `teacher_guidance`)
    and by a fake score U-Net that follows the student's distribution (initialised from the teacher,
    `fake_updates` denoising updates per student update, full or a LoRA of rank `fake_lora` on the
    teacher's frozen weights); the student moves along the normalised difference. `student_steps` is
    1, 2, 4 or a timestep list (999,749,499,249); multi-step students learn by backward simulation.
    """

    student_steps: str = field(
        default="4",
        metadata=option(
            "--student-steps",
            "DMD2: the student's sampling steps, 1, 2 or 4 (trailing: 999,749,499,249), or a timestep list.",
            DISTILLATION,
            metavar="STEPS",
        ),
    )
    teacher_guidance: float | None = field(  # None: the family's (DMD2_GUIDANCE)
        default=None,
        metadata=option(
            "--teacher-guidance",
            "DMD2: classifier-free guidance of the real score (default as the paper: 8 for SDXL, "
            "1.75 for SD 1.x/2.x).",
            DISTILLATION,
        ),
    )
    fake_lora: int | None = field(
        default=None,
        metadata=option(
            "--fake-lora",
            "DMD2: train the fake score as a LoRA of this rank on the teacher's frozen weights "
            "(default: a full copy of the teacher).",
            DISTILLATION,
            metavar="RANK",
        ),
    )
    fake_updates: int = field(
        default=5,
        metadata=option(
            "--fake-updates",
            "DMD2: fake-score updates per student update (two time-scale rule).",
            DISTILLATION,
        ),
    )
    fake_lr: float | None = field(  # None: --lr
        default=None,
        metadata=option("--fake-lr", "DMD2: learning rate of the fake score (default: --lr).", DISTILLATION),
    )
    gan_weight: float = field(
        default=0.0,
        metadata=option(
            "--gan-weight",
            "DMD2: weight of the GAN loss on the fake score's bottleneck features (0: no GAN head; "
            "the paper's SDXL recipe: 5e-3).",
            DISTILLATION,
        ),
    )
    kd_weight: float = field(
        default=0.0,
        metadata=option(
            "--kd-weight",
            "DMD2: weight of block-feature distillation against the teacher (--features taps; 0: off).",
            DISTILLATION,
        ),
    )
    min_step: float = 0.02  # the distribution-matching timestep range, as fractions of T (the paper's)
    max_step: float = 0.98

    def guidance(self, is_sdxl: bool) -> float:
        """The real score's guidance: --teacher-guidance, else the paper's value for the family."""
        if self.teacher_guidance is not None:
            return self.teacher_guidance
        return DMD2_GUIDANCE_SDXL if is_sdxl else DMD2_GUIDANCE_SD

    def validate(self, objective: Objective) -> None:
        changed = [
            f.metadata["cli"].name
            for f in fields(self)
            if "cli" in f.metadata and getattr(self, f.name) != f.default
        ]
        checks = [
            (objective == Objective.DMD2 or not changed, f"{', '.join(changed)} needs --objective dmd2"),
            (self.fake_lora is None or self.fake_lora >= 1, "--fake-lora must be a rank of 1 or more"),
            (self.fake_updates >= 1, "--fake-updates must be 1 or more"),
            (self.fake_lr is None or self.fake_lr > 0, "--fake-lr must be positive"),
            (
                self.teacher_guidance is None or self.teacher_guidance >= 1,
                "--teacher-guidance must be 1 or more",
            ),
            (self.gan_weight >= 0 and self.kd_weight >= 0, "--gan-weight and --kd-weight must be 0 or more"),
        ]
        for ok, message in checks:
            if not ok:
                raise SdcError(message + "; fix the option and run again.")


@dataclass(frozen=True)
class EmbeddingSpec:
    """Textual inversion: the new token, where its vectors start, how many, and how captions name it."""

    token: str | None = field(
        default=None,
        metadata=option("--token", "The new token prompts will use, e.g. '<my-thing>'. Required.", EMBEDDING),
    )
    init_words: str | None = field(
        default=None,
        metadata=option(
            "--init-words",
            "Words the vectors start from, one vector per word (e.g. 'a cat'). Required.",
            EMBEDDING,
        ),
    )
    vectors: int | None = field(
        default=None,
        metadata=option(
            "--vectors",
            "Vectors for the token (default: one per init word; more use the init words again in turn).",
            EMBEDDING,
        ),
    )
    norm_reg: float = field(
        default=0.0,
        metadata=option(
            "--norm-reg",
            "Weight of a penalty keeping the new vectors' norms near the vocabulary's mean norm (0: off).",
            EMBEDDING,
        ),
    )
    template: CaptionTemplate = field(
        default=CaptionTemplate.OBJECT,
        metadata=option(
            "--template",
            "Captions for images without one (or without the token): object, style or none.",
            EMBEDDING,
            choices=CaptionTemplate,
        ),
    )

    def __post_init__(self) -> None:
        coerce_choices(self)

    @property
    def words(self) -> list[str]:
        return (self.init_words or "").split()

    @property
    def vector_count(self) -> int:
        return self.vectors if self.vectors is not None else len(self.words)

    def validate(self) -> None:
        if not self.token:
            raise SdcError("--token is required: the new word prompts will use, such as '<my-thing>'.")
        if any(c.isspace() for c in self.token):
            raise SdcError(f"--token {self.token!r} must be one word without spaces, such as '<my-thing>'.")
        if not self.words:
            raise SdcError("--init-words is required: words close to the concept, such as 'a cat'.")
        if self.vectors is not None and not 1 <= self.vectors <= 75:
            raise SdcError(f"--vectors must be between 1 and 75 (CLIP's prompt length), got {self.vectors}.")
        if self.vector_count < len(self.words):
            raise SdcError(
                f"--init-words gives {len(self.words)} vectors, more than --vectors {self.vectors}; "
                "give fewer words or more vectors."
            )
        if self.norm_reg < 0:
            raise SdcError(f"--norm-reg must be 0 or more, got {self.norm_reg}.")
