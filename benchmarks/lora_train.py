"""Step time (it/s) and peak memory of `sdcompress lora train` beside a plain peft + diffusers loop.

Both variants train a LoRA of the same rank on the same U-Net attention
projections (to_q / to_k / to_v / to_out.0) of the same model, on the same
generated images, with the same batch, resolution, lr, AdamW, gradient clipping
and mixed precision, each in its own subprocess so peak memory is its own.
"ours" is the `lora train` service (the shared engine, accelerate, seeded
data, per-step noise). "plain" is the straightforward loop people write from
diffusers' examples: `unet.add_adapter(LoraConfig(...))`, frozen parts in the
weight dtype with the adapters kept fp32, AdamW on the adapter parameters,
MSE on epsilon, no accelerate.

    python benchmarks/lora_train.py                           # CPU: tiny-sd, tiny-sdxl
    python benchmarks/lora_train.py --model sd1 --random-weights --resolution 512 \
        --mixed-precision fp16                                # GPU: SD 1.5 size, random weights
    python benchmarks/lora_train.py --model sdxl --random-weights --resolution 1024 \
        --mixed-precision fp16 --gradient-checkpointing       # GPU: SDXL size, random weights

With --random-weights, --model names a family (sd1, sd2, sdxl); its full-size
configs get seeded random weights, an fp16 diffusers folder that both variants
load, taken from the sdcompress cache (written on first use and kept).
Figures go to stdout as a table (and --json).

Disk: with --random-weights the model stays in $SDCOMPRESS_CACHE/random (default
~/.cache/sdcompress/random; SD 1.5 2.1 GB, SDXL 6.9 GB; delete the folder to free
it). Each run's images and adapter files go to a temporary folder, removed at the
end (tens of MB). Without it: the tiny models only (160 MB, also in the cache).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def run_ours(args, data: Path, work: Path) -> dict:
    from sdcompress.services.lora_train import LoraTrainRequest, lora_train
    from sdcompress.training.data import DataConfig
    from sdcompress.training.engine import TrainConfig
    from sdcompress.training.lora_task import AdapterSpec

    stamps: list[float] = []
    request = LoraTrainRequest(
        model=args.ref,
        output=work / "lora",
        data=DataConfig(data_dir=data, resolution=args.resolution),
        train=TrainConfig(
            work_dir=work / "lora.train",
            max_steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            checkpoint_every=0,
            mixed_precision=args.mixed_precision,
            gradient_checkpointing=args.gradient_checkpointing,
            cpu=args.device == "cpu",
        ),
        adapter=AdapterSpec(rank=args.rank, targets="attention"),
    )

    def stamp(event) -> None:
        if event.kind == "step":
            if args.device != "cpu":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    lora_train(request, stamp)
    from sdcompress.lowrank.layouts import read_lora

    adapted = len(read_lora(work / "lora" / "lora.safetensors").adapters)
    return _summary(stamps, args) | {"adapted": adapted}


def run_plain(args, data: Path) -> dict:
    """The straightforward loop: diffusers' add_adapter with peft's LoraConfig, AdamW, MSE on epsilon."""
    import torch.nn.functional as F
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from sdcompress.checkpoint.instantiate import build_pipeline
    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.training.conditioning import encode_prompts, unet_added_conditions
    from sdcompress.training.data import DataConfig, build_dataset, collate
    from sdcompress.training.task import DiffusionParts

    device, dtype = torch.device(args.device), _dtype(args.mixed_precision)
    parts = DiffusionParts.from_pipeline(build_pipeline(load_model(args.ref), dtype=torch.float32))
    unet = parts.unet
    for module in [unet, parts.vae, *parts.text_encoders]:
        module.requires_grad_(False)
    parts.vae.to(device, torch.float32)
    for encoder in parts.text_encoders:
        encoder.to(device, dtype)
    unet.to(device, dtype)
    unet.add_adapter(
        LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=ATTENTION)
    )
    if dtype != torch.float32:
        cast_training_params(unet, dtype=torch.float32)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    adapted = sum(1 for _, m in unet.named_modules() if hasattr(m, "lora_A") and m.lora_A)
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    dataset, _ = build_dataset(DataConfig(data_dir=data, resolution=args.resolution), seed=0)
    loader = torch.utils.data.DataLoader(
        [dataset[(i, 0)] for i in range(len(dataset))],
        batch_size=args.batch_size,
        collate_fn=collate,
        shuffle=True,
    )
    scheduler = parts.noise_scheduler
    stamps: list[float] = []
    step = 0
    while step < args.steps:
        for batch in loader:
            with torch.no_grad():
                pixels = batch["pixel_values"].to(device)
                latents = parts.vae.encode(pixels).latent_dist.sample() * parts.vae.config.scaling_factor
                cond = encode_prompts(parts.text_encoders, parts.tokenizers, batch["captions"], device)
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
            noisy = scheduler.add_noise(latents, noise, t)
            added = unet_added_conditions(cond, batch, device, dtype)
            kwargs = {"added_cond_kwargs": added} if added is not None else {}
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                pred = unet(noisy.to(dtype), t, cond.hidden_states.to(dtype), **kwargs).sample
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            step += 1
            if step >= args.steps:
                break
    return _summary(stamps, args) | {"adapted": adapted}


def _summary(stamps: list[float], args) -> dict:
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][args.warmup :]
    step_s = statistics.median(steps)
    peak = _peak_bytes(torch.device(args.device))
    return {"step_s": step_s, "it_s": 1.0 / step_s, "peak_bytes": peak, "steps_timed": len(steps)}


def child(args) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        from sdcompress.training.demo_data import write_demo_dataset

        data = write_demo_dataset(Path(tmp) / "data", max(8, args.batch_size * 2), size=args.resolution)
        result = run_ours(args, data, Path(tmp)) if args.variant == "ours" else run_plain(args, data)
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", help="model ref (default tiny-sd, tiny-sdxl)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--mixed-precision", default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--random-weights", action="store_true", help="--model is a family: full-size configs, random weights"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--ref", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return
    rows = []
    from sdcompress.testing import cached_random_model

    for name in args.model or ["tiny-sd", "tiny-sdxl"]:
        ref = str(cached_random_model(name, "diffusers")) if args.random_weights else name
        row = {"model": name}
        for variant in ("plain", "ours"):
            cmd = [sys.executable, __file__, "--variant", variant, "--ref", ref, "--device", args.device]
            cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--rank", str(args.rank)]
            cmd += ["--batch-size", str(args.batch_size), "--resolution", str(args.resolution)]
            cmd += ["--lr", str(args.lr), "--mixed-precision", args.mixed_precision]
            cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{variant} run failed:\n{proc.stderr[-3000:]}")
            row[variant] = json.loads(line[len("RESULT ") :])
        if row["plain"]["adapted"] != row["ours"]["adapted"]:
            raise SystemExit(f"{name}: the variants adapted different modules: {row}")
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"device {args.device}, batch {args.batch_size}, {args.resolution}px, rank {args.rank}, "
          f"{args.mixed_precision}, median of {args.steps - args.warmup - 1} steps")  # fmt: skip
    print(
        f"{'model':<10} {'modules':>7} {'plain it/s':>11} {'ours it/s':>10} {'plain peak':>11} {'ours peak':>10}"
    )
    for r in rows:
        print(
            f"{r['model']:<10} {r['ours']['adapted']:>7} {r['plain']['it_s']:>11.2f} {r['ours']['it_s']:>10.2f} "
            f"{r['plain']['peak_bytes'] / 2**20:>9.0f}MB {r['ours']['peak_bytes'] / 2**20:>8.0f}MB"
        )


if __name__ == "__main__":
    main()
