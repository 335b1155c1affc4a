"""Step time and peak memory of `sdcompress distill` beside a plain implementation of the same loss.

Both variants train the same student against the same teacher on the same
generated images with the same settings (batch, resolution, lr, AdamW, loss
task + output + block features, BK-SDM 1/1/1), each in its own subprocess so
peak memory is its own. "plain" is the straightforward loop people write:
hooks by module name, teacher and student in the training dtype, the text
encoder run separately for each U-Net, no accelerate.

    python benchmarks/distill.py                        # CPU: tiny-sd/bk-small, tiny-sdxl/ssd-1b
    python benchmarks/distill.py --pair sd1:bk-small --pair sdxl:ssd-1b --random-weights \
        --resolution 512 --mixed-precision fp16 --gradient-checkpointing        # GPU, full size

Figures go to stdout as a table (and --json).

Disk: next to none. The tiny models live in the sdcompress cache ($SDCOMPRESS_CACHE,
default ~/.cache/sdcompress, 160 MB); --random-weights builds the full-size models in
memory (no files); each run's images and outputs go to a temporary folder removed at
the end (a few MB).
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


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _models(teacher_ref: str, preset: str, device: torch.device, random_weights: bool):
    """Teacher pipeline and student U-Net (preset layout, teacher weights where they fit)."""
    from sdcompress.arch.presets import preset_config
    from sdcompress.checkpoint.instantiate import build_pipeline, module_from_config
    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.training.task import DiffusionParts

    if random_weights:
        from sdcompress.checkpoint.tiny import tiny_model

        # a family's full-size configs with seeded random weights: speed and memory do not need real ones
        model = tiny_model(teacher_ref)
    else:
        model = load_model(teacher_ref)
    pipe = build_pipeline(model, dtype=torch.float32)
    family = model.family.name
    config = preset_config(preset, family)
    student = module_from_config("unet", config).to_empty(device="cpu")
    teacher_sd = pipe.unet.state_dict()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, value in student.state_dict().items():
            if key in teacher_sd and teacher_sd[key].shape == value.shape:
                value.copy_(teacher_sd[key])
            else:
                value.copy_(torch.randn(value.shape, generator=generator) * 0.02)
    parts = DiffusionParts.from_pipeline(pipe)
    return parts, pipe.unet, student


def run_ours(args, data: Path, work: Path) -> dict:
    from sdcompress.training.data import DataConfig
    from sdcompress.training.distill_task import DistillTask
    from sdcompress.training.engine import TrainConfig, train
    from sdcompress.training.features import pair_features

    parts, teacher, student = _models(
        args.teacher, args.preset, torch.device(args.device), args.random_weights
    )
    parts.unet = student
    task = DistillTask(parts, teacher, pair_features(student, teacher, "blocks"), saver=lambda *a: None)
    stamps: list[float] = []
    config = TrainConfig(
        work_dir=work,
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=1e-5,
        checkpoint_every=0,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        cpu=args.device == "cpu",
    )
    train(
        task,
        config,
        DataConfig(data_dir=data, resolution=args.resolution),
        lambda e: stamps.append(time.perf_counter()) if e.kind == "step" else None,
    )
    return _summary(stamps, args)


def run_plain(args, data: Path) -> dict:
    """The straightforward loop: same loss, same optimizer, no engine."""
    import torch.nn.functional as F
    from diffusers.training_utils import compute_snr  # noqa: F401  (what a plain script imports)

    from sdcompress.training.data import DataConfig, build_dataset, collate
    from sdcompress.training.features import pair_features

    device = torch.device(args.device)
    parts, teacher, student = _models(args.teacher, args.preset, device, args.random_weights)
    pairs = pair_features(student, teacher, "blocks")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    for module in [parts.vae, teacher, *parts.text_encoders]:
        module.to(device, dtype if module is not parts.vae else torch.float32).requires_grad_(False)
    student.to(device).train()
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    feats: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, inputs, output):
            feats[name] = output[0] if isinstance(output, tuple) else output

        return fn

    for p in pairs:
        teacher.get_submodule(p.teacher).register_forward_hook(hook("t:" + p.teacher))
        student.get_submodule(p.student).register_forward_hook(hook("s:" + p.student))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    dataset, _ = build_dataset(DataConfig(data_dir=data, resolution=args.resolution), seed=0)
    loader = torch.utils.data.DataLoader(
        [dataset[(i, 0)] for i in range(len(dataset))],
        batch_size=args.batch_size,
        collate_fn=collate,
        shuffle=True,
    )
    scheduler = parts.noise_scheduler
    stamps = []
    step = 0
    while step < args.steps:
        for batch in loader:
            with torch.no_grad():
                pixels = batch["pixel_values"].to(device)
                latents = parts.vae.encode(pixels).latent_dist.sample() * parts.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
            noisy = scheduler.add_noise(latents, noise, t)
            kwargs = {}
            with torch.no_grad():  # the text encoder run once per U-Net, as plain scripts do
                from sdcompress.training.conditioning import encode_prompts, unet_added_conditions

                cond_t = encode_prompts(parts.text_encoders, parts.tokenizers, batch["captions"], device)
                cond_s = encode_prompts(parts.text_encoders, parts.tokenizers, batch["captions"], device)
                added = unet_added_conditions(cond_t, batch, device, dtype)
                if added is not None:
                    kwargs["added_cond_kwargs"] = added
                t_pred = teacher(noisy.to(dtype), t, cond_t.hidden_states.to(dtype), **kwargs).sample
            if added is not None:
                kwargs["added_cond_kwargs"] = {k: v.float() for k, v in added.items()}
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                s_pred = student(noisy, t, cond_s.hidden_states.float(), **kwargs).sample
            task = F.mse_loss(s_pred.float(), noise.float())
            out = F.mse_loss(s_pred.float(), t_pred.float())
            feat = sum(
                F.mse_loss(feats["s:" + p.student].float(), feats["t:" + p.teacher].float()) for p in pairs
            )
            loss = task + out + feat
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            step += 1
            if step >= args.steps:
                break
    return _summary(stamps, args)


def _summary(stamps: list[float], args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][args.warmup :]
    return {"step_s": statistics.median(steps), "peak_bytes": _peak_bytes(device), "steps_timed": len(steps)}


def child(args) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        from sdcompress.training.demo_data import write_demo_dataset

        data = write_demo_dataset(Path(tmp) / "data", max(8, args.batch_size * 2), size=args.resolution)
        result = run_ours(args, data, Path(tmp) / "work") if args.variant == "ours" else run_plain(args, data)
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pair", action="append", help="teacher:preset (default tiny-sd:bk-small, tiny-sdxl:ssd-1b)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--mixed-precision", default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--random-weights", action="store_true", help="full-size family configs, random weights"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return
    pairs = args.pair or ["tiny-sd:bk-small", "tiny-sdxl:ssd-1b"]
    rows = []
    for pair in pairs:
        teacher, preset = pair.split(":")
        row = {"teacher": teacher, "student": preset}
        for variant in ("plain", "ours"):
            cmd = [sys.executable, __file__, "--variant", variant, "--teacher", teacher, "--preset", preset]
            cmd += ["--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup)]
            cmd += ["--batch-size", str(args.batch_size), "--resolution", str(args.resolution)]
            cmd += ["--mixed-precision", args.mixed_precision]
            cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
            cmd += ["--random-weights"] if args.random_weights else []
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{variant} run failed:\n{proc.stderr[-3000:]}")
            row[variant] = json.loads(line[len("RESULT ") :])
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"device {args.device}, batch {args.batch_size}, {args.resolution}px, {args.mixed_precision}, "
          f"median of {args.steps - args.warmup - 1} steps")  # fmt: skip
    print(
        f"{'teacher':<10} {'student':<9} {'plain s/step':>13} {'ours s/step':>12} {'plain peak':>11} {'ours peak':>10}"
    )
    for r in rows:
        print(
            f"{r['teacher']:<10} {r['student']:<9} {r['plain']['step_s']:>13.3f} {r['ours']['step_s']:>12.3f} "
            f"{r['plain']['peak_bytes'] / 2**20:>9.0f}MB {r['ours']['peak_bytes'] / 2**20:>8.0f}MB"
        )


if __name__ == "__main__":
    main()
