"""`bench`: how fast and how big a U-Net is, measured, with the first model as the baseline.

A denoising step is one U-Net forward; with classifier-free guidance a
pipeline runs the conditional and unconditional halves as one batch, so the
U-Net sees twice the image batch (`cfg=False` turns that off). Inputs are
built from the U-Net's own config (latent channels and size, text width,
SDXL's pooled text embeddings and time ids), so any layout the config can
describe is measured the same way. Peak memory is CUDA's
`max_memory_allocated` on a GPU; on the CPU it is the growth of the
process's resident memory from before the U-Net was built, sampled by a
thread, and labelled as such.

`random_weights` measures an architecture (a family or a preset) without its
weights: the U-Net is built on the meta device and materialised directly on
the target device in the target dtype, so SDXL in fp16 needs no fp32 copy.
"""

from __future__ import annotations

import gc
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdcompress.arch.families import FAMILIES, Config, Family, find_family, get_family
from sdcompress.arch.presets import PRESETS, get_preset, preset_for_family
from sdcompress.checkpoint.model import Model, disk_size
from sdcompress.checkpoint.sampling import PIPELINE_STEPS, OwnSampling, own_sampling
from sdcompress.choices import DType, Fp8Compute, parse_choices, resolve_dtype
from sdcompress.devices import resolve_device
from sdcompress.errors import SdcError

TEXT_TOKENS = 77
RSS_SAMPLE_S = 0.002


@dataclass
class BenchRequest:
    models: list[str]
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    resolution: int | None = None
    steps: int = 10
    warmup: int = 2
    device: str = "auto"
    dtype: DType | None = None  # default: fp16 on CUDA, fp32 on a CPU
    cfg: bool = True
    random_weights: bool = False
    family: str | None = None  # with random_weights: the family presets are applied to
    allow_pickle: bool = False
    seed: int = 0
    # Denoising steps one image needs, per model in order (one value: every model); empty: each model's
    # default (`default_image_steps`). Seconds per image = steps needed / steps per second.
    image_steps: tuple[int, ...] = ()
    fp8_compute: Fp8Compute = Fp8Compute.AUTO  # an fp8 file's Linears: fp8 matmul or cast up

    def __post_init__(self) -> None:
        parse_choices(self)
        if self.family is not None and not self.random_weights:
            raise SdcError("--family applies with --random-weights (real models know their family); drop it.")


@dataclass
class BatchResult:
    batch_size: int  # images per step
    unet_batch: int  # what the U-Net sees (doubled by CFG)
    steps_per_s: float | None
    ms_per_step: float | None
    images_per_s: float | None
    peak_memory: int | None
    speedup: float | None = None
    error: str | None = None
    seconds_per_image: float | None = None  # the model's image steps / (steps/s x batch)


@dataclass
class ModelBench:
    ref: str
    family: str
    preset: str | None
    random_weights: bool
    parameters: int
    size_on_disk: int | None
    weights_bytes: int
    resolution: int
    latent_size: int
    results: list[BatchResult] = field(default_factory=list)
    image_steps: int = 0  # denoising steps one image needs with this model
    cfg: bool = True  # whether its U-Net batch is doubled for guidance
    # an fp8 file's Linears multiplied in fp8 (None: not an fp8 file, or cast up)
    fp8_matmul_layers: int | None = None


@dataclass
class BenchResult:
    device: str
    dtype: str
    cfg: bool
    steps: int
    warmup: int
    memory_kind: str  # "cuda_max_allocated" | "cpu_peak_rss_delta"
    baseline: str
    models: list[ModelBench]
    cpu_threads: int | None = None  # torch intra-op threads, when measured on the CPU
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------- the U-Net under test


@dataclass
class _Subject:
    ref: str
    family: Family
    preset: str | None
    config: Config
    vae_config: Config
    text_embed_dim: int | None
    size_on_disk: int | None
    unet_factory: Callable[[torch.device, torch.dtype], torch.nn.Module]
    scheduler: str | None = None  # the scheduler class a model ships with (None: an architecture)
    quantized: str | None = None  # a quantized file's format (its fp8 weights are cast up per layer)
    sampling: OwnSampling = field(default_factory=OwnSampling)  # how the model says it is sampled
    fp8_matmul: bool = False  # set by `bench` for the device: its fp8 Linears multiply in fp8
    fp8_matmul_layers: int | None = None  # how many, once built


def default_image_steps(subject: _Subject) -> int:
    """The steps its run record gives (a DMD2 student: the trained ones), else by its scheduler."""
    return subject.sampling.steps or PIPELINE_STEPS


def uses_cfg(subject: _Subject, req: BenchRequest) -> bool:
    """One U-Net batch, not two, for a U-Net guided by its guidance-scale embedding (an LCM) or one
    its run record says to sample without guidance (a DMD2 student: guidance is in its weights)."""
    return req.cfg and not subject.config.get("time_cond_proj_dim") and not subject.sampling.unguided


def _text_embed_dim(configs: dict[str, Config], family: Family) -> int | None:
    """Width of SDXL's pooled text embedding (the second text encoder's projection)."""
    if configs.get("text_encoder_2"):
        return int(
            configs["text_encoder_2"].get("projection_dim") or configs["text_encoder_2"]["hidden_size"]
        )
    for spec in family.text_encoders:
        if spec.component == "text_encoder_2":
            return int(spec.config.get("projection_dim") or spec.config["hidden_size"])
    return None


@torch.no_grad()
def random_unet(config: Config, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A U-Net of this config with random weights, allocated once, on `device`, in `dtype`.

    Norm layers get ones and zeros, other weights N(0, 1/fan_in), so activations
    stay finite in fp16 (speed does not depend on the values, but NaNs and
    denormals can).
    """
    from sdcompress.checkpoint.instantiate import module_from_config

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in `dtype` on meta: no cast, no fp32 copy
    try:
        unet = module_from_config("unet", config)
    finally:
        torch.set_default_dtype(previous)
    unet = unet.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    for module in unet.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, norms) and name == "weight":
                p.fill_(1)
            elif name == "bias" or p.dim() < 2:
                p.zero_()
            else:
                fan_in = p[0].numel()
                p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
    for name, buf in unet.named_buffers():
        if buf.is_floating_point():
            raise SdcError(f"the U-Net has a buffer {name} that random init does not know; this is a bug.")
    return unet.eval()


def _arch_subject(name: str, family_name: str | None, seed: int) -> _Subject:
    """A family or preset name, measured with random weights."""
    family = find_family(name)
    if family is not None:
        config, preset = dict(family.unet), None
    else:
        try:
            preset_obj = get_preset(name)
        except SdcError:
            raise SdcError(
                f"{name!r} is neither a family nor a preset; with --random-weights use one of "
                f"{', '.join(FAMILIES)}, {', '.join(PRESETS)}."
            ) from None
        family = get_family(family_name or preset_obj.topologies[0])
        config, preset = preset_for_family(name, family).student_config(family.unet), preset_obj.name
    configs = {t.component: t.config for t in family.text_encoders}
    return _Subject(
        ref=name,
        family=family,
        preset=preset,
        config=config,
        vae_config=family.vae,
        text_embed_dim=_text_embed_dim(configs, family),
        size_on_disk=None,
        unet_factory=lambda device, dtype: random_unet(config, device, dtype, seed),
    )


def _model_subject(ref: str, allow_pickle: bool) -> _Subject:
    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.quantize.describe import of_model

    model = load_model(ref, allow_pickle=allow_pickle)
    quant = of_model(model)
    scheduler = model.configs.get("scheduler", {}).get("_class_name")
    subject = _Subject(
        ref=ref,
        family=model.family,
        preset=model.preset,
        config=dict(model.configs["unet"]),
        vae_config=model.configs.get("vae") or model.family.vae,
        text_embed_dim=_text_embed_dim(model.configs, model.family),
        size_on_disk=disk_size(model.path),
        unet_factory=lambda device, dtype: _unet(model, device, dtype, subject),
        scheduler=scheduler,
        quantized=quant.format if quant is not None else None,
        sampling=own_sampling(model.path, scheduler),
    )
    return subject


def _unet(
    model: Model, device: torch.device, dtype: torch.dtype, subject: _Subject | None = None
) -> torch.nn.Module:
    """The U-Net in `dtype`; a quantized file's fp8 weights stay fp8: cast up per layer, and with
    `subject.fp8_matmul` its fitting Linears multiplied in fp8."""
    from sdcompress.checkpoint.instantiate import build_module
    from sdcompress.quantize.describe import of_model

    if of_model(model) is None:
        return build_module(model, "unet", dtype=dtype, device=str(device))
    from sdcompress.checkpoint.instantiate import load_weights, module_from_config
    from sdcompress.quantize.cast_up import cast_up_per_layer, fp8_codes

    # scaled fp8: the codes are loaded, not the full-precision product the resolver reads them as
    weights, scales = fp8_codes(model.components["unet"])
    unet = module_from_config("unet", model.configs["unet"])
    load_weights(unet, weights, dtype=None, device=str(device))
    cast_up_per_layer(unet.eval(), dtype, scales)
    if subject is not None and subject.fp8_matmul:
        from sdcompress.quantize.fp8_matmul import swap_linears

        subject.fp8_matmul_layers = swap_linears(unet, dtype, scales)
    return unet


def _family_for(name: str, req: BenchRequest) -> str | None:
    """With random weights, presets apply to --family, else to the first model when it is a fitting family
    (`bench tiny-sd bk-small --random-weights`), else to the preset's own teacher family."""
    if req.family:
        return req.family
    first = req.models[0].lower()
    if first not in FAMILIES or name.lower() == first or name.lower() not in PRESETS:
        return None
    return first if get_family(first).topology in get_preset(name).topologies else None


def _subjects(req: BenchRequest) -> list[_Subject]:
    if req.random_weights:
        return [_arch_subject(name, _family_for(name, req), req.seed) for name in req.models]
    return [_model_subject(ref, req.allow_pickle) for ref in req.models]


# ---------------------------------------------------------------------------- inputs


def latent_size(subject: _Subject, resolution: int) -> int:
    scale = 2 ** (len(subject.vae_config["block_out_channels"]) - 1)
    levels = len(subject.config["block_out_channels"])
    multiple = scale * 2 ** (levels - 1)
    if resolution <= 0 or resolution % multiple:
        raise SdcError(
            f"--resolution {resolution} does not suit {subject.ref} ({levels} U-Net levels, VAE factor "
            f"{scale}); use a multiple of {multiple}."
        )
    return resolution // scale


def unet_inputs(
    config: Config,
    batch: int,
    latent: int,
    device: torch.device,
    dtype: torch.dtype,
    text_embed_dim: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The arguments a pipeline hands the U-Net at one denoising step, shaped by its config."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    cross = config["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, list | tuple) else cross
    inputs: dict[str, Any] = {
        "sample": randn(batch, config.get("in_channels", 4), latent, latent),
        "timestep": torch.full((batch,), 500, device=device, dtype=torch.long),
        "encoder_hidden_states": randn(batch, TEXT_TOKENS, cross),
    }
    if config.get("addition_embed_type") == "text_time":
        time_dim = config["addition_time_embed_dim"]
        total = config["projection_class_embeddings_input_dim"]
        text_dim = text_embed_dim if text_embed_dim is not None else total - 6 * time_dim
        n_ids = (total - text_dim) // time_dim
        if text_dim + n_ids * time_dim != total:
            raise SdcError(
                f"cannot build SDXL conditioning for this U-Net: {total} is not {text_dim} + k x {time_dim}."
            )
        size = float(latent * 8)
        ids = [size, size, 0.0, 0.0, size, size][:n_ids] if n_ids <= 6 else [size] * n_ids
        inputs["added_cond_kwargs"] = {
            "text_embeds": randn(batch, text_dim),
            "time_ids": torch.tensor([ids] * batch, device=device, dtype=dtype),
        }
    return inputs


# ---------------------------------------------------------------------------- measuring


def _return_freed_memory_to_os() -> None:
    """Make RSS follow live memory on glibc, so a second model is not measured inside the first one's heap.

    glibc raises its mmap threshold after large frees, so freed tensors stay in
    the heap and the next model reuses them without RSS growing. Fixing the
    threshold (128 KiB) keeps large tensors in their own mappings, returned on
    free, and `malloc_trim` hands back what the heap still holds.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS is still measured, only less precisely
        return


class _RssSampler:
    """Peak resident memory of this process, sampled by a thread (the CPU has no allocator counter)."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.baseline = self._proc.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(RSS_SAMPLE_S)

    def start(self) -> _RssSampler:
        self._thread.start()
        return self

    def reset_peak(self) -> None:
        self.peak = self._proc.memory_info().rss

    def peak_delta(self) -> int:
        self.peak = max(self.peak, self._proc.memory_info().rss)
        return max(0, self.peak - self.baseline)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


@torch.inference_mode()
def time_steps(
    unet: torch.nn.Module, inputs: dict[str, Any], steps: int, warmup: int, device: torch.device
) -> float:
    """Seconds for `steps` U-Net forwards after `warmup` untimed ones."""
    for _ in range(warmup):
        unet(**inputs)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        unet(**inputs)
    _sync(device)
    return time.perf_counter() - start


def _measure_model(
    subject: _Subject,
    req: BenchRequest,
    device: torch.device,
    dtype: torch.dtype,
    report: Callable[[str], None],
    image_steps: int,
) -> ModelBench:
    resolution = req.resolution or subject.family.resolution
    latent = latent_size(subject, resolution)
    gc.collect()
    if device.type == "cpu":
        _return_freed_memory_to_os()
    sampler = _RssSampler().start() if device.type == "cpu" else None
    try:
        report(f"{subject.ref}: building the U-Net on {device}")
        unet = subject.unet_factory(device, dtype)
        params = sum(p.numel() for p in unet.parameters())
        bench = ModelBench(
            ref=subject.ref,
            family=subject.family.name,
            preset=subject.preset,
            random_weights=req.random_weights,
            parameters=params,
            size_on_disk=subject.size_on_disk,
            weights_bytes=sum(p.numel() * p.element_size() for p in unet.parameters()),
            resolution=resolution,
            latent_size=latent,
            image_steps=image_steps,
            cfg=uses_cfg(subject, req),
            fp8_matmul_layers=subject.fp8_matmul_layers,
        )
        for batch in req.batch_sizes:
            unet_batch = batch * (2 if bench.cfg else 1)
            report(f"{subject.ref}: batch {batch} ({unet_batch} in the U-Net), {req.steps} steps")
            result = _measure_batch(unet, subject, req, batch, unet_batch, latent, device, dtype, sampler)
            if result.images_per_s:
                result.seconds_per_image = image_steps / result.images_per_s
            bench.results.append(result)
        del unet
    finally:
        if sampler is not None:
            sampler.stop()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return bench


def _measure_batch(
    unet: torch.nn.Module,
    subject: _Subject,
    req: BenchRequest,
    batch: int,
    unet_batch: int,
    latent: int,
    device: torch.device,
    dtype: torch.dtype,
    sampler: _RssSampler | None,
) -> BatchResult:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    elif sampler is not None:
        sampler.reset_peak()
    try:
        inputs = unet_inputs(
            subject.config, unet_batch, latent, device, dtype, subject.text_embed_dim, req.seed
        )
        seconds = time_steps(unet, inputs, req.steps, req.warmup, device)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        if not _is_oom(e):
            raise
        return BatchResult(batch, unet_batch, None, None, None, None, error="out of memory")
    finally:
        inputs = None  # free the batch before the next one
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else sampler.peak_delta()
    sps = req.steps / seconds
    return BatchResult(batch, unet_batch, sps, 1000.0 / sps, sps * batch, int(peak))


def _warm_up_process(subject: _Subject, req: BenchRequest, device: torch.device, dtype: torch.dtype) -> None:
    """One untimed forward before anything is measured on the CPU.

    The first forward in a process maps kernel libraries and thread pools
    (hundreds of MB of RSS); without this the baseline model would be charged
    for them and every other model would look lighter than it is.
    """
    latent = latent_size(subject, req.resolution or subject.family.resolution)
    unet = subject.unet_factory(device, dtype)
    inputs = unet_inputs(subject.config, min(req.batch_sizes), latent, device, dtype, subject.text_embed_dim)
    time_steps(unet, inputs, 1, 0, device)
    del unet, inputs
    gc.collect()


def _speedups(models: list[ModelBench]) -> None:
    base = {r.batch_size: r.steps_per_s for r in models[0].results}
    for m in models:
        for r in m.results:
            b = base.get(r.batch_size)
            r.speedup = r.steps_per_s / b if (r.steps_per_s and b) else None


def _check(req: BenchRequest) -> None:
    if not req.models:
        raise SdcError("name at least one model to bench.")
    if not req.batch_sizes or any(b < 1 for b in req.batch_sizes):
        raise SdcError("--batch-sizes must be positive integers, e.g. 1,4,8.")
    if req.steps < 1 or req.warmup < 0:
        raise SdcError("--steps must be at least 1 and --warmup at least 0.")
    if len(req.image_steps) not in (0, 1, len(req.models)) or any(n < 1 for n in req.image_steps):
        raise SdcError(
            f"--image-steps needs one positive step count, or one per model ({len(req.models)}), e.g. 50,50,4."
        )


def _use_fp8_matmul(req: BenchRequest, device: torch.device, subjects: list[_Subject]) -> bool:
    """`--fp8-compute` for this device: auto takes fp8 matmuls on a CUDA device that has them (on a
    CPU, torch's fp8 matmul is a reference path, no faster than casting up); asked-for ones must run."""
    from sdcompress.quantize import fp8_matmul

    mode = req.fp8_compute
    if mode is not Fp8Compute.AUTO and not any(s.quantized for s in subjects):
        raise SdcError(f"--fp8-compute {mode} applies to fp8 files; none of the models is one.")
    if mode is Fp8Compute.CAST_UP or not any(s.quantized for s in subjects):
        return False
    if mode is Fp8Compute.AUTO:
        return device.type == "cuda" and fp8_matmul.available(device)
    if not fp8_matmul.available(device):
        raise SdcError(
            f"--fp8-compute matmul: torch has no fp8 matmul on {device} (CUDA needs compute capability 8.9 "
            "or newer); use --fp8-compute cast-up."
        )
    return True


def bench(req: BenchRequest, on_progress: Callable[[str], None] | None = None) -> BenchResult:
    report = on_progress or (lambda message: None)
    _check(req)
    device = resolve_device(req.device)
    dtype = resolve_dtype(req.dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
    subjects = _subjects(req)
    for s in subjects:  # fail on a bad resolution before measuring anything
        latent_size(s, req.resolution or s.family.resolution)
    matmul = _use_fp8_matmul(req, device, subjects)
    for s in subjects:
        s.fp8_matmul = matmul and s.quantized is not None
    if device.type == "cpu":
        report("warming up the process (not measured)")
        _warm_up_process(subjects[0], req, device, dtype)
    steps = req.image_steps * len(subjects) if len(req.image_steps) == 1 else req.image_steps
    steps = steps or tuple(default_image_steps(s) for s in subjects)
    models = [_measure_model(s, req, device, dtype, report, n) for s, n in zip(subjects, steps, strict=True)]
    _speedups(models)
    notes = []
    if device.type == "cpu":
        notes.append(
            "CPU: peak memory is the growth of resident memory from before the U-Net was built "
            f"(weights + activations), sampled every {RSS_SAMPLE_S * 1000:.0f} ms."
        )
    if req.random_weights:
        notes.append("random weights: speed and memory of the architecture; no checkpoint was read.")
    compute = str(dtype).removeprefix("torch.")
    for s in subjects:
        if s.quantized is None:
            continue
        scaled = ", times their scales" if s.quantized == "fp8-scaled" else ""
        if s.fp8_matmul and s.fp8_matmul_layers:
            notes.append(
                f"{s.ref} is {s.quantized}: {s.fp8_matmul_layers} Linear layers multiply in fp8 (torch._scaled_mm, "
                f"activations quantized per tensor); its other fp8 weights stay fp8 in memory and are cast up "
                f"to {compute} per layer for each forward{scaled}."
            )
        else:
            if req.fp8_compute is Fp8Compute.CAST_UP:
                why = "asked for"
            elif s.fp8_matmul:
                why = "no layer fits it: e4m3fn Linear weights with dimensions that are multiples of 16"
            else:
                why = f"none on {device.type}"
            notes.append(
                f"{s.ref} is {s.quantized}: its fp8 weights stay fp8 in memory and are cast up to "
                f"{compute} per layer for each forward{scaled} (no fp8 matmul: {why})."
            )
    return BenchResult(
        device=str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
        dtype=str(dtype).removeprefix("torch."),
        cfg=req.cfg,
        steps=req.steps,
        warmup=req.warmup,
        memory_kind="cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss_delta",
        baseline=models[0].ref,
        models=models,
        cpu_threads=torch.get_num_threads() if device.type == "cpu" else None,
        notes=notes,
    )


# ---------------------------------------------------------------------------- plot


def plot(result: BenchResult, path: Path, *, overwrite: bool = False) -> None:
    """A grouped bar chart of steps/s per batch size, drawn with Pillow (a dependency already;
    matplotlib is not, and a bar chart does not need it)."""
    from PIL import Image, ImageDraw, ImageFont

    batches = [r.batch_size for r in result.models[0].results]
    width, height, left, bottom, top = 900, 520, 70, 60, 90
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=11)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3"]
    values = [r.steps_per_s or 0.0 for m in result.models for r in m.results]
    vmax = max(values + [1e-9]) * 1.15
    plot_h = height - top - bottom
    draw.text(
        (left, 15),
        f"U-Net denoising steps/s ({result.device}, {result.dtype}, CFG {'on' if result.cfg else 'off'})",
        fill="black",
        font=font,
    )
    for i, m in enumerate(result.models):  # legend
        x = left + i * 200
        draw.rectangle([x, 45, x + 14, 59], fill=colors[i % len(colors)])
        draw.text((x + 20, 45), f"{m.ref} ({m.resolution}px)"[:28], fill="black", font=small)
    draw.line([left, top, left, height - bottom], fill="black")
    draw.line([left, height - bottom, width - 20, height - bottom], fill="black")
    for k in range(5):
        v = vmax * k / 4
        y = height - bottom - plot_h * k / 4
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((5, y - 7), f"{v:.3g}", fill="black", font=small)
    group_w = (width - 20 - left) / len(batches)
    bar_w = group_w * 0.8 / len(result.models)
    for g, batch in enumerate(batches):
        gx = left + g * group_w + group_w * 0.1
        draw.text((gx + group_w * 0.3, height - bottom + 8), f"batch {batch}", fill="black", font=font)
        for i, m in enumerate(result.models):
            r = next((r for r in m.results if r.batch_size == batch), None)
            if r is None:
                continue
            x0 = gx + i * bar_w
            label = "OOM" if r.steps_per_s is None else f"{r.steps_per_s:.3g}"
            h = plot_h * (r.steps_per_s or 0.0) / vmax
            draw.rectangle(
                [x0, height - bottom - h, x0 + bar_w - 3, height - bottom], fill=colors[i % len(colors)]
            )
            if r.speedup is not None and i > 0:
                label += f" ({r.speedup:.2f}x)"
            draw.text((x0, height - bottom - h - 15), label, fill="black", font=small)
    from sdcompress.checkpoint.atomic import atomic_file

    with atomic_file(path, overwrite=overwrite) as tmp:
        img.save(tmp, format="PNG")
