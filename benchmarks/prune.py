"""Full-size SDXL prune: time and peak RSS beside teacher and student sizes.

    python benchmarks/prune.py --workdir /tmp/prune-bench [--calibration-size 256 --calibration-samples 2]

Takes an SDXL pipeline with random fp16 weights from the sdcompress cache
(written on first use, tensor by tensor, and kept for the next run), then runs two
prunes, each in a child process whose peak RSS is read from the OS:
`--preset ssd-1b --select uniform` (nothing to score: must stream, target <= 1 GiB) and
`--drop-transformer-blocks 40` with importance scoring (target <= 1.25x the
teacher U-Net's size). Also `selection`: importance vs uniform vs last
student-vs-teacher MSE at initialisation on the tiny teachers.

Disk: the teacher stays in $SDCOMPRESS_CACHE/random (default ~/.cache/sdcompress/random,
6.9 GB; delete the folder to free it); the two students (about 5 GB each) go to --workdir,
so it needs about 10 GB free; delete it after reading the figures. `selection` needs no disk
beyond the tiny models (160 MB, also in the cache).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3


def run_child(args: list[str]) -> tuple[float, int, int, str]:
    """Run `python -m sdcompress ARGS` and return (seconds, peak RSS bytes, exit code, stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdcompress", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # this process starts exactly one child
    if proc.returncode != 0:
        sys.stderr.write(stderr.decode()[-3000:])
    return seconds, usage.ru_maxrss * 1024, proc.returncode, stdout.decode()


def _size(path: Path) -> int:
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def full_size(workdir: Path, size: int, samples: int) -> None:
    from sdcompress.testing import cached_random_model

    t = time.perf_counter()
    teacher = cached_random_model("sdxl", "diffusers")  # made once, kept in the cache
    print(f"teacher ready in {time.perf_counter() - t:.0f} s: {teacher}")
    unet_bytes = _size(teacher / "unet")
    print(f"teacher: {_size(teacher) / GIB:.2f} GiB on disk, U-Net {unet_bytes / GIB:.2f} GiB")
    runs = [
        ("preset ssd-1b, uniform", ["--preset", "ssd-1b", "--select", "uniform"], 1.0 * GIB, "<= 1 GiB"),
        (
            "drop 40, importance",
            [
                "--drop-transformer-blocks",
                "40",
                "--calibration-size",
                str(size),
                "--calibration-samples",
                str(samples),
                "--batch-size",
                "1",
            ],
            1.25 * unet_bytes,
            f"<= 1.25 x U-Net = {1.25 * unet_bytes / GIB:.2f} GiB",
        ),
    ]
    print(
        f"{'run':22} {'time s':>8} {'peak RSS GiB':>13} {'target':>24} {'student GiB':>12} {'U-Net GiB':>10}"
    )
    for i, (name, options, limit, target) in enumerate(runs):
        out = workdir / f"student-{i}"
        shutil.rmtree(out, ignore_errors=True)
        # each run gets its own grandchild so RUSAGE_CHILDREN of this process is that run's peak alone
        code = subprocess.call(
            [
                sys.executable,
                __file__,
                "_child",
                json.dumps(["prune", "--teacher", str(teacher), "-o", str(out), "--json", *options]),
                name,
                str(limit),
                target,
            ]
        )
        if code:
            raise SystemExit(code)


def child(args: list[str], name: str, limit: float, target: str) -> None:
    seconds, peak, code, stdout = run_child(args)
    if code:
        raise SystemExit(code)
    report = json.loads(stdout)
    out = Path(report["output"])
    ok = "ok" if peak <= limit else "OVER"
    print(
        f"{name:22} {seconds:8.0f} {peak / GIB:13.2f} {target:>24} {_size(out) / GIB:12.2f} {_size(out / 'unet') / GIB:10.2f}  {ok}"
        f"  ({report['transformer_blocks']['student']} blocks, {report['parameters']['student']:,} params)"
    )


def selection() -> None:
    import tempfile

    import torch

    from sdcompress.services.prune import PruneRequest, prune

    torch.set_num_threads(1)
    print(f"{'teacher':10} {'drop':>5} {'importance':>11} {'uniform':>9} {'last':>9}")
    for teacher, n, size in (
        ("tiny-sd", 4, 64),
        ("tiny-sd", 6, 64),
        ("tiny-sdxl", 20, 32),
        ("tiny-sdxl", 40, 32),
    ):
        mse = {}
        with tempfile.TemporaryDirectory() as tmp:
            for select in ("importance", "uniform", "last"):
                r = prune(
                    PruneRequest(
                        teacher=teacher,
                        output=f"{tmp}/{select}",
                        drop_transformer_blocks=n,
                        select=select,
                        evaluate=True,
                        unet_only=True,
                        calibration_samples=4,
                        calibration_size=size,
                    )
                )
                mse[select] = r.init_mse
        print(f"{teacher:10} {n:5d} {mse['importance']:11.4f} {mse['uniform']:9.4f} {mse['last']:9.4f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(json.loads(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="full", choices=["full", "selection"])
    p.add_argument("--workdir", default="/tmp/sdcompress-prune-bench")
    p.add_argument("--calibration-size", type=int, default=256)
    p.add_argument("--calibration-samples", type=int, default=2)
    a = p.parse_args()
    if a.what == "selection":
        selection()
        return
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    full_size(workdir, a.calibration_size, a.calibration_samples)


if __name__ == "__main__":
    main()
