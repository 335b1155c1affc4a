"""Does distillation bring a pruned student closer to its teacher? `sdcompress eval` says, in numbers.

Prunes the teacher to a preset, distills the student for a few steps, then
scores the teacher, the pruned student and the distilled student with
`sdcompress eval` on the same prompts and seeds, and prints their agreement
with the teacher side by side (the distilled one should be closer: lower
latent MSE, higher PSNR and SSIM), with seconds per image as rendered.

    python benchmarks/eval.py                                   # CPU: tiny-sd -> bk-small, seeds 0 1 2
    python benchmarks/eval.py --gpu-line --device cuda          # GPU: SDXL vs ssd-1b, 200 prompts, 1024 px
    python benchmarks/eval.py --gpu-line --smoke --prompts 4    # the same code path on tiny-sdxl, CPU

`--gpu-line` renders 200 COCO-style prompts with a random-weight SDXL (the
cached fp16 copy from `sdcompress.testing`, 6.9 GB on first use) and its
ssd-1b student straight from `prune` (no distillation: random weights have
nothing to teach), at 1024 px in fp16, and records seconds per image.

Disk: the tiny run uses a temporary folder removed at the end (a few MB); the
GPU line keeps its images (200 x 2 PNGs, ~0.5 GB) under --work when given.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

SUBJECTS = ["a red cube on a table", "a cat on a sofa", "two boats at sea", "a snowy mountain at dusk"]
COCO_STYLE = [
    "A {a} {b} next to a {c} in a {d}.",
    "Two {a} {b}s standing near a {c} on a {d}.",
    "A close up of a {b} on top of a {c} by the {d}.",
]
WORDS = {
    "a": ["small", "large", "red", "white", "wooden", "old", "bright", "striped"],
    "b": ["dog", "bus", "table", "bicycle", "kite", "pizza", "clock", "boat"],
    "c": ["bench", "window", "tree", "car", "plate", "fence", "lamp", "train"],
    "d": ["street", "kitchen", "park", "field", "room", "harbour", "station", "beach"],
}


def coco_style_prompts(count: int) -> list[str]:
    """Deterministic captions in the style of COCO's (COCO itself is not shipped with the project)."""
    prompts = []
    for i in range(count):
        template = COCO_STYLE[i % len(COCO_STYLE)]
        picks = {k: v[(i * (3 + j)) % len(v)] for j, (k, v) in enumerate(WORDS.items())}
        prompts.append(template.format(**picks))
    return prompts


def tiny_run(seed: int, work: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Prune, distill, eval on the tiny model with this training seed; agreement per model."""
    from sdcompress.services.distill import DistillRequest, distill
    from sdcompress.services.eval import EvalRequest, evaluate
    from sdcompress.services.prune import PruneRequest, prune
    from sdcompress.training.config import TrainConfig
    from sdcompress.training.data import DataConfig
    from sdcompress.training.demo_data import write_demo_dataset

    data = work / "data"
    if not data.exists():
        write_demo_dataset(data, 8, size=64)
    student = work / "pruned"
    if not student.exists():
        prune(
            PruneRequest(teacher=args.teacher, output=str(student), preset=args.preset, calibration_samples=2)
        )
    distilled = work / f"distilled-{seed}"
    distill(
        DistillRequest(
            teacher=args.teacher,
            student=str(student),
            output=distilled,
            data=DataConfig(data_dir=data, resolution=args.train_resolution),
            train=TrainConfig(
                work_dir=work / f"work-{seed}",
                max_steps=args.distill_steps,
                batch_size=4,
                lr=args.lr,
                checkpoint_every=0,
                num_workers=0,
                seed=seed,
                cpu=args.device == "cpu",
            ),
        )
    )
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(SUBJECTS) + "\n")
    result = evaluate(
        EvalRequest(
            models=[str(student), str(distilled)],
            prompts=str(prompts),
            teacher=args.teacher,
            output=work / "eval",
            steps=args.eval_steps,
            device=args.device,
        )
    )
    names = {args.teacher: "teacher", str(student): "pruned", str(distilled): "distilled"}
    return {names[m.ref]: {**m.agreement, "s_per_image": m.render_seconds_per_image} for m in result.models}


def gpu_line(args: argparse.Namespace, work: Path) -> None:
    from sdcompress.services.eval import EvalRequest, evaluate
    from sdcompress.services.prune import PruneRequest, prune
    from sdcompress.testing import cached_random_model

    resolution = 64 if args.smoke else 1024
    teacher = "tiny-sdxl" if args.smoke else cached_random_model("sdxl", "diffusers", draw_device=args.device)
    student = work / "ssd-1b"
    if not student.exists():
        prune(PruneRequest(teacher=str(teacher), output=str(student), preset="ssd-1b", select="uniform"))
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(coco_style_prompts(args.prompts)) + "\n")
    result = evaluate(
        EvalRequest(
            models=[str(student)],
            prompts=str(prompts),
            teacher=str(teacher),
            output=work / "eval",
            steps=args.eval_steps,
            resolution=resolution,
            batch_size=args.batch_size,
            device=args.device,
        ),
        on_progress=print,
    )
    rows = [
        {"model": "sdxl" if m.teacher else "ssd-1b", **m.agreement, "s_per_image": m.render_seconds_per_image}
        for m in result.models
    ]
    print(json.dumps({"prompts": result.prompts, "resolution": resolution, "models": rows}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="tiny-sd")
    parser.add_argument("--preset", default="bk-small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--distill-steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-resolution", type=int, default=64, help="Distillation image size (px).")
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gpu-line", action="store_true", help="SDXL vs ssd-1b, random weights, 1024 px.")
    parser.add_argument("--prompts", type=int, default=200, help="With --gpu-line.")
    parser.add_argument(
        "--smoke", action="store_true", help="With --gpu-line: tiny-sdxl at 64 px (a CPU check)."
    )
    parser.add_argument("--batch-size", type=int, default=4, help="With --gpu-line.")
    parser.add_argument("--work", type=Path, default=None, help="Keep the folders here (default: temporary).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.gpu_line:
            if args.eval_steps == 10:
                args.eval_steps = 25
            gpu_line(args, work)
            return
        print(f"{'seed':>4}  {'model':<10} {'latent MSE':>11} {'PSNR dB':>8} {'SSIM':>7} {'s/img':>7}")
        for seed in args.seeds:
            for name, row in tiny_run(seed, work, args).items():
                if name == "teacher":
                    continue
                speed = "cached" if row["s_per_image"] is None else f"{row['s_per_image']:.3f}"
                print(
                    f"{seed:>4}  {name:<10} {row['latent_mse']:>11.4g} {row['psnr']:>8.2f} "
                    f"{row['ssim']:>7.4f} {speed:>7}"
                )


if __name__ == "__main__":
    main()
