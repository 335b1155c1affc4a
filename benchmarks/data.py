"""Prepared (sharded) training data: start-up, memory and throughput at 10K vs 100K samples, and a
distill step from shards vs from the image folder.

Part 1 writes synthetic prepared datasets shaped like tiny-sd's (latent 4x32x32 and text
embeddings 77x32 in fp16, one 64 px bucket) through the same shard writer and index as
`sdcompress data prepare` (random tensors instead of the VAE: encoding 100K images is not
what is measured). For each size a fresh child process opens it as `--data` does
(`build_dataset`), draws the epoch's batches with the engine's sampler, and takes the first
batch through the engine's DataLoader setup; it reports the time to the first batch, the
RSS after it (and its growth over the bare imports), and then the loader's own samples/s
over the next batches (random order, as training reads).

Part 2 distills tiny-sd -> bk-small on the same generated images, once from the image
folder and once from the shards `data prepare` made of them (fp32, centre crop), each in
its own child process, and reports the median step time of each and the ratio.

    python benchmarks/data.py                           # 10K and 100K samples; distill 12 steps
    python benchmarks/data.py --sizes 1000 --steps 6    # quick

Disk: the synthetic datasets take about 15 KB per sample (1.5 GB at 100K). They are written
under a temporary folder in $SDCOMPRESS_CACHE (default ~/.cache/sdcompress) or --work-dir,
and deleted at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESOLUTION = 64  # tiny-sd's: latents 4 x 32 x 32 (its VAE downsamples by 2)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def synthesize(root: Path, samples: int, shard_size: int) -> None:
    """A prepared dataset of random tiny-sd-shaped samples, written by the project's writer and index."""
    import torch

    from sdcompress.training import shards as S
    from sdcompress.training.prepare import ShardRecord, write_index, write_shard

    root.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    records = []
    for number in range(-(-samples // shard_size)):
        first, last = number * shard_size, min((number + 1) * shard_size, samples)
        members = []
        for index in range(first, last):
            tensors = {
                "latent": torch.randn(4, 32, 32, generator=generator).half(),
                "prompt_embeds": torch.randn(77, 32, generator=generator).half(),
            }
            meta = {
                "caption": f"synthetic sample {index}",
                "original_size": [RESOLUTION, RESOLUTION],
                "crop_top_left": [0, 0],
                "target_size": [RESOLUTION, RESOLUTION],
                "source": f"synthetic/{index}.png",
            }
            members.append((S.sample_key(index), S.encode_sample(tensors, meta)))
        path = root / S.shard_name(number)
        offsets = write_shard(path, members)
        count = last - first
        records.append(ShardRecord(path.name, count, [0] * count, path.stat().st_size, offsets=offsets))
    write_index(
        root,
        records,
        empty={"prompt_embeds": torch.zeros(77, 32).half()},
        buckets=[(RESOLUTION, RESOLUTION)],
        resolution=RESOLUTION,
        dtype="fp16",
        conditioning={
            "family": "tiny-sd",
            "model": "synthetic",
            "latent_channels": 4,
            "text_dim": 32,
            "pooled_dim": None,
        },
        source={"data": "synthetic", "images": samples},
    )


def child_open(args) -> dict:
    """Open a prepared dataset as the engine does and time the first batch; then the loader's samples/s."""
    import torch

    from sdcompress.training.config import DataConfig
    from sdcompress.training.data import (
        ResumableBatchSampler,
        build_dataset,
        collate,
        epoch_batches,
        rank_batches,
    )

    torch.set_num_threads(1)
    base = _rss()
    started = time.perf_counter()
    dataset, _ = build_dataset(DataConfig(data_dir=Path(args.path), resolution=RESOLUTION), seed=0)
    batches = rank_batches(epoch_batches(dataset.targets, args.batch_size, 0, 0), 0, 1)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=ResumableBatchSampler(batches, 0, 0), collate_fn=collate, num_workers=0
    )
    stream = iter(loader)
    first = next(stream)
    first_s = time.perf_counter() - started
    rss_first = _rss()
    assert first["latents"].shape == (args.batch_size, 4, 32, 32)
    count, t0 = 0, time.perf_counter()
    for _ in range(args.loader_batches):
        count += len(next(stream)["index"])
    rate = count / (time.perf_counter() - t0)
    return {
        "samples": len(dataset),
        "first_batch_s": first_s,
        "rss_after_first_batch": rss_first,
        "rss_growth": rss_first - base,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "loader_samples_per_s": rate,
    }


def child_distill(args) -> dict:
    """Distill tiny-sd -> the student for `--steps` steps from `--path`; median step time after warm-up."""
    import torch

    from sdcompress.services.distill import DistillRequest, distill
    from sdcompress.training.config import DataConfig, TrainConfig
    from sdcompress.training.task import DiffusionTask

    torch.set_num_threads(1)
    work = Path(args.work)
    inputs_cpu = [0.0]  # CPU seconds spent turning batches into latents and embeddings

    def timed(method):
        def wrapper(self, batch):
            t0 = time.process_time()
            try:
                return method(self, batch)
            finally:
                inputs_cpu[0] += time.process_time() - t0

        return wrapper

    DiffusionTask.latents = timed(DiffusionTask.latents)
    DiffusionTask.encode = timed(DiffusionTask.encode)
    stamps: list[float] = []
    cpu: list[float] = []

    def stamp(event) -> None:
        if event.kind == "step":
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())

    request = DistillRequest(
        teacher="tiny-sd",
        student=args.student,
        output=work / "out",
        data=DataConfig(data_dir=Path(args.path), resolution=RESOLUTION),
        train=TrainConfig(
            work_dir=work / "out.train",
            max_steps=args.steps,
            batch_size=args.batch_size,
            checkpoint_every=0,
            cpu=True,
            lr=1e-4,
        ),
    )
    distill(request, stamp)
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][args.warmup :]
    cpu_steps = [b - a for a, b in zip(cpu, cpu[1:], strict=False)][args.warmup :]
    # CPU time as well as wall time: on a shared machine the wall time mostly measures the neighbours
    return {
        "step_s": statistics.median(steps),
        "cpu_s": statistics.median(cpu_steps),
        "inputs_cpu_s": inputs_cpu[0] / args.steps,
        "steps_timed": len(steps),
    }


def _child(mode: str, **kwargs) -> dict:
    argv = [sys.executable, __file__, "--child", mode]
    for key, value in kwargs.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"child {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--loader-batches", type=int, default=200)
    parser.add_argument("--images", type=int, default=32, help="images for the distill comparison")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="distill runs per variant, alternated")
    parser.add_argument("--work-dir", type=Path, help="where the temporary data goes (default: the cache)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--student", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child_open(args) if args.child == "open" else child_distill(args)
        print("RESULT " + json.dumps(result))
        return

    from sdcompress.checkpoint.tiny import cache_dir

    parent = args.work_dir or cache_dir()
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-", dir=parent))
    report: dict = {"open": [], "distill": {}}
    try:
        for size in args.sizes:
            path = tmp / f"synthetic-{size}"
            t0 = time.perf_counter()
            synthesize(path, size, args.shard_size)
            written = time.perf_counter() - t0
            disk = sum(p.stat().st_size for p in path.iterdir())
            result = _child("open", path=path, batch_size=args.batch_size, loader_batches=args.loader_batches)
            report["open"].append({**result, "disk_bytes": disk, "write_s": written})
            print(f"{size} samples: {json.dumps(report['open'][-1])}", file=sys.stderr, flush=True)
            shutil.rmtree(path)
        report["distill"] = distill_comparison(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    if report["open"]:
        _print_open(report["open"])
    _print_distill(report["distill"])


def _print_open(rows: list[dict]) -> None:
    print("| samples | on disk | written in | first batch | RSS after it | RSS growth | loader samples/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['samples']:,} | {r['disk_bytes'] / 1e9:.2f} GB | {r['write_s']:.0f} s | {r['first_batch_s']:.2f} s "
            f"| {_mib(r['rss_after_first_batch'])} | {_mib(r['rss_growth'])} | {r['loader_samples_per_s']:.0f} |"
        )
    print()


def _print_distill(d: dict) -> None:
    folder, ready = d["folder"], d["shards"]
    print("| distill tiny-sd -> bk-small | step (wall) | step (CPU) | inputs (CPU) | prepare |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| image folder ({d['images']} images) | {folder['step_s'] * 1000:.0f} ms "
        f"| {folder['cpu_s'] * 1000:.0f} ms | {folder['inputs_cpu_s'] * 1000:.1f} ms | - |"
    )
    print(
        f"| prepared shards | {ready['step_s'] * 1000:.0f} ms | {ready['cpu_s'] * 1000:.0f} ms "
        f"| {ready['inputs_cpu_s'] * 1000:.1f} ms "
        f"| {d['prepare_s']:.1f} s ({d['prepare_samples_per_s']:.1f} samples/s) |"
    )
    print(
        f"\nshards / folder: wall {ready['step_s'] / folder['step_s']:.2f}, "
        f"CPU {ready['cpu_s'] / folder['cpu_s']:.2f}"
    )


def distill_comparison(args, tmp: Path) -> dict:
    """The same images, student and settings, trained from the folder and from its shards."""
    from sdcompress.services.data_prepare import DataPrepareRequest, data_prepare
    from sdcompress.services.prune import PruneRequest, prune
    from sdcompress.training.config import DataConfig
    from sdcompress.training.demo_data import write_demo_dataset

    images = write_demo_dataset(tmp / "images", args.images, size=RESOLUTION)
    student = tmp / "student"
    prune(
        PruneRequest(
            teacher="tiny-sd", output=str(student), preset="bk-small", select="uniform", device="cpu"
        )
    )
    t0 = time.perf_counter()
    prepared = data_prepare(
        DataPrepareRequest(
            model="tiny-sd",
            output=tmp / "shards",
            data=DataConfig(data_dir=images, resolution=RESOLUTION),
            dtype="fp32",
            device="cpu",
        )
    )
    prepare_s = time.perf_counter() - t0
    common = dict(student=student, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size)
    runs: dict[str, list[dict]] = {"folder": [], "shards": []}
    for round_ in range(args.rounds):  # alternated, best of each: the neighbours' load changes over minutes
        for name, path in (("folder", images), ("shards", tmp / "shards")):
            runs[name].append(_child("distill", path=path, work=tmp / f"{name}-{round_}", **common))
    folder, shards = ({k: min(r[k] for r in runs[n]) for k in runs[n][0]} for n in ("folder", "shards"))
    return {
        "images": args.images,
        "folder": folder,
        "shards": shards,
        "prepare_s": prepare_s,
        "prepare_samples_per_s": prepared.samples_per_s,
    }


if __name__ == "__main__":
    main()
