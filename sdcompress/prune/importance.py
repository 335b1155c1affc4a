"""How much each transformer block matters, measured on the teacher itself.

A block's score is the mean squared change of the teacher's prediction when
that one block is skipped (its forward replaced by the identity: a
`BasicTransformerBlock` is residual, so skipping it is exactly what removing
it does). Calibration inputs are noisy latents at evenly spread timesteps,
conditioned on prompt embeddings from the teacher's own text encoder(s), all
from a fixed seed. The same inputs measure a student at initialisation
against its teacher (with a different seed, so the comparison is held out).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sdcompress.arch.families import Config
from sdcompress.checkpoint.model import Model
from sdcompress.errors import SdcError
from sdcompress.prune.flops import added_cond, unet_flops, vae_factor

Progress = Callable[[str, int, int], None]

PROMPTS = (
    "a photograph of an astronaut riding a horse on the moon",
    "a bowl of ramen on a wooden table, studio lighting",
    "portrait of an old fisherman with a grey beard, 85mm, film grain",
    "a watercolor painting of a lighthouse in a storm",
    "isometric pixel art of a tiny medieval village",
    "a red sports car parked on a rainy city street at night, neon reflections",
    "close-up of a hummingbird drinking from a purple flower",
    "an oil painting of a mountain lake at sunrise in the style of the hudson river school",
    "a cozy reading nook with a cat sleeping on a pile of books",
    "a futuristic city skyline with flying cars, concept art",
    "a golden retriever puppy playing in autumn leaves",
    "a plate of sushi, top-down view, high detail",
    "a knight in ornate armor standing in a misty forest",
    "an abstract geometric poster in blue and orange",
    "a snowy cabin in the woods with warm light in the windows",
    "a macro photo of a dew drop on a spider web",
)


def read_prompts(path: str | Path | None) -> list[str]:
    if path is None:
        return list(PROMPTS)
    p = Path(path).expanduser()
    if not p.is_file():
        raise SdcError(f"--prompts {p} is not a file; give a text file with one prompt per line.")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise SdcError(f"--prompts {p} has no prompts; write one prompt per line.")
    return prompts


# Calibration defaults. A GPU scores at the family's resolution. A CPU halves the size (down to a
# quarter of it) until the whole scoring fits CPU_FLOP_BUDGET, about 20 s on two cores:
# tiny models stay under a minute. A full-size U-Net fits at no size that still exercises its
# attention; GPU_WORK_FLOPS (about five minutes of a CPU) is where the CLI says it is GPU work.
GPU_SAMPLES = 8
CPU_SAMPLES = 4
# what torch reached on tiny-sdxl's U-Net on a shared 2-core CPU (4 to 11 GFLOP/s measured)
CPU_FLOPS_PER_SECOND = 5e9
CPU_FLOP_BUDGET = 20 * CPU_FLOPS_PER_SECOND
GPU_WORK_FLOPS = 300 * CPU_FLOPS_PER_SECOND


@dataclass(frozen=True)
class ScoringPlan:
    """What importance scoring (and --evaluate) will cost, known before the teacher is loaded."""

    blocks: int  # teacher blocks scored (one skipped pass each)
    passes: int  # U-Net passes over the calibration set: a reference, one per block, two with --evaluate
    samples: int
    size: int  # calibration image side in pixels
    latent: int
    flops: float  # all passes, every sample
    device: str
    defaulted: bool  # samples and size were chosen for this device, not given
    gpu_work: bool  # on a CPU and too heavy for one: say how to make it cheaper

    @property
    def forwards(self) -> int:
        return self.passes * self.samples


def scoring_plan(
    model: Model,
    *,
    blocks: int,
    evaluate: bool,
    device: torch.device,
    samples: int | None,
    size: int | None,
) -> ScoringPlan:
    """Calibration samples and size (the user's, or this device's defaults) and their cost in FLOPs."""
    family, cfg = model.family, model.configs["unet"]
    factor = vae_factor(family)
    passes = (blocks + 1 if blocks else 0) + (2 if evaluate else 0)
    on_cpu = device.type == "cpu"
    n = samples or (CPU_SAMPLES if on_cpu else GPU_SAMPLES)
    base = size or family.resolution
    if base // factor < 8:
        raise SdcError(f"--calibration-size is too small; give at least {8 * factor} pixels.")
    if passes == 0:
        return ScoringPlan(blocks, 0, n, base, base // factor, 0.0, str(device), False, False)

    def cost(px: int) -> float:
        return float(unet_flops(cfg, family, size=px // factor)) * passes * n

    # A meta forward of a full-size U-Net takes seconds: count one size, scale by pixels for the
    # search (an upper bound: attention shrinks faster than pixels), then count the chosen size.
    at_base, px = cost(base), base
    if size is None and on_cpu:
        floor = max(family.resolution // 4, 8 * factor)
        while px // 2 >= floor and at_base * (px / base) ** 2 > CPU_FLOP_BUDGET:
            px //= 2
    flops = at_base if px == base else cost(px)
    return ScoringPlan(
        blocks=blocks,
        passes=passes,
        samples=n,
        size=px,
        latent=px // factor,
        flops=flops,
        device=str(device),
        defaulted=samples is None and size is None,
        gpu_work=on_cpu and flops > GPU_WORK_FLOPS,
    )


SMALL_PASS_FLOPS = 2e9  # per sample: a tiny model's U-Net pass at calibration sizes


@contextlib.contextmanager
def threads_for(plan: ScoringPlan) -> Iterator[None]:
    """One intra-op thread while a CPU runs small U-Net passes (restored after).

    Tensors this small gain nothing from torch's threads, and where other processes share the
    cores the threads wait on each other: tiny-sdxl -> ssd-1b on a busy 2-core machine took
    2 min 43 s with torch's default threads and 51 s with one.
    """
    if plan.device != "cpu" or plan.forwards == 0 or plan.flops / plan.forwards > SMALL_PASS_FLOPS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compute_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """fp16 on a CPU runs through slow reference kernels (~100x slower than bf16): use bf16 there."""
    if device.type == "cpu" and model_dtype == torch.float16:
        return torch.bfloat16
    return model_dtype


def unet_dtype(model: Model) -> torch.dtype:
    return next(t.dtype for t in model.components["unet"].values() if t.dtype.is_floating_point)


@dataclass
class PromptEmbeddings:
    hidden: torch.Tensor  # (prompts, tokens, width)
    pooled: torch.Tensor | None  # (prompts, width) for SDXL


def encode(
    model: Model, prompts: Sequence[str], device: torch.device, dtype: torch.dtype
) -> PromptEmbeddings:
    """Run the teacher's text encoder(s) on the prompts once, then free them."""
    from transformers import CLIPTokenizer

    from sdcompress.checkpoint.instantiate import build_module, tokenizer_dir
    from sdcompress.training.conditioning import tokenize

    specs = [s for s in model.family.text_encoders if s.component in model.components]
    if not specs:
        raise SdcError(
            "importance scoring needs the teacher's text encoders, but the teacher is a U-Net alone; "
            "give the whole pipeline or use --select uniform or --select last."
        )
    states, pooled = [], None
    for spec in specs:
        tok_name = "tokenizer" if spec.component == "text_encoder" else "tokenizer_2"
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir(model, tok_name))
        encoder = build_module(model, spec.component, dtype=dtype, device=str(device))
        with torch.no_grad():
            ids = tokenize(tokenizer, list(prompts), device)
            if model.family.is_sdxl:  # penultimate hidden states of every encoder, pooled from the last
                out = encoder(ids, output_hidden_states=True)
                states.append(out.hidden_states[-2])
                pooled = out[0]
            else:
                states.append(encoder(ids)[0])
        del encoder
        gc.collect()
    return PromptEmbeddings(torch.cat(states, dim=-1), pooled)


@dataclass
class Calibration:
    """Fixed U-Net inputs: noisy latents, timesteps, prompt conditioning (and SDXL's added conditions)."""

    sample: torch.Tensor
    timestep: torch.Tensor
    hidden: torch.Tensor
    added: dict[str, torch.Tensor] | None

    def __len__(self) -> int:
        return self.sample.shape[0]

    def batches(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict | None]]:
        for i in range(0, len(self), size):
            sl = slice(i, i + size)
            added = None if self.added is None else {k: v[sl] for k, v in self.added.items()}
            yield self.sample[sl], self.timestep[sl], self.hidden[sl], added


def calibration(
    model: Model,
    embeds: PromptEmbeddings,
    *,
    samples: int,
    latent: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Calibration:
    """`samples` noisy latents at timesteps spread over the schedule, prompts taken in turn."""
    from diffusers import DDPMScheduler

    if samples < 1:
        raise SdcError("--calibration-samples must be at least 1.")
    sched_cfg = {k: v for k, v in model.configs["scheduler"].items() if not k.startswith("_")}
    scheduler = DDPMScheduler.from_config(sched_cfg)
    gen = torch.Generator().manual_seed(seed)
    channels = model.configs["unet"].get("in_channels", 4)
    clean = torch.randn(samples, channels, latent, latent, generator=gen)
    noise = torch.randn(samples, channels, latent, latent, generator=gen)
    steps = scheduler.config.num_train_timesteps
    timesteps = torch.tensor([int((i + 0.5) * steps / samples) for i in range(samples)])
    timesteps = timesteps[torch.randperm(samples, generator=gen)]
    noisy = scheduler.add_noise(clean, noise, timesteps)
    which = torch.tensor([(i + seed) % embeds.hidden.shape[0] for i in range(samples)])
    added = added_cond(model.configs["unet"], model.family, samples, latent)
    if added is not None and embeds.pooled is not None:
        added["text_embeds"] = embeds.pooled[which]
    return Calibration(
        noisy.to(device, dtype),
        timesteps.to(device),
        embeds.hidden[which].to(device, dtype),
        None if added is None else {k: v.to(device, dtype) for k, v in added.items()},
    )


def _identity(hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return hidden_states


@contextlib.contextmanager
def skipped(blocks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Run the model as if these transformer blocks were removed (forward replaced by the identity)."""
    for b in blocks:
        b.forward = _identity
    try:
        yield
    finally:
        for b in blocks:
            vars(b).pop("forward", None)


def predict(
    unet: torch.nn.Module, calib: Calibration, batch_size: int, on_batch: Callable[[], None] | None = None
) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for sample, t, hidden, added in calib.batches(batch_size):
            outs.append(unet(sample, t, hidden, added_cond_kwargs=added, return_dict=False)[0].float())
            if on_batch is not None:
                on_batch()
    return outs


def mse(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    total = sum(float(((o - r) ** 2).sum()) for o, r in zip(outs, refs, strict=True))
    return total / sum(r.numel() for r in refs)


def score_blocks(
    unet: torch.nn.Module,
    calib: Calibration,
    blocks: Sequence[str],
    *,
    batch_size: int = 4,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Mean squared change of the teacher's prediction when each block alone is skipped.

    Progress counts U-Net batches (the reference pass, then each block's), so the bar and its
    ETA move within a block too on a slow device.
    """
    batches = -(-len(calib) // batch_size)
    total = (len(blocks) + 1) * batches
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress("scoring blocks", done, total)

    if progress is not None:
        progress("scoring blocks", 0, total)
    reference = predict(unet, calib, batch_size, on_batch=step)
    scores = {}
    for path in blocks:
        with skipped([unet.get_submodule(path)]):
            scores[path] = mse(predict(unet, calib, batch_size, on_batch=step), reference)
    return scores


def shared_student(teacher: torch.nn.Module, config: Config, mapping: dict[str, str]) -> torch.nn.Module:
    """The student as a module whose weights are the teacher module's own tensors (no copy)."""
    from sdcompress.checkpoint.instantiate import module_from_config

    student = module_from_config("unet", config)
    params = teacher.state_dict()
    student.load_state_dict({k: params[v] for k, v in mapping.items()}, strict=True, assign=True)
    return student.eval()


def load_teacher_unet(model: Model, device: torch.device) -> tuple[torch.nn.Module, torch.dtype]:
    from sdcompress.checkpoint.instantiate import build_module

    dtype = compute_dtype(unet_dtype(model), device)
    return build_module(model, "unet", dtype=dtype, device=str(device)), dtype
