"""Conversion speed and memory: sdcompress vs `cp` and vs diffusers, on full-size random fp16 checkpoints.

    python benchmarks/convert.py --family sd1 --family sdxl --workdir /tmp/sdc-bench

For each family the script takes a full-size single file with random fp16
weights from the sdcompress cache (written on first use, tensor by tensor, and
kept for the next run), then, each in its own child process so peak RSS is the
child's own:

- `cp` of the same bytes (the physical floor: read and write every byte once);
- `sdcompress convert` single file -> diffusers folder, and back;
- diffusers' `from_single_file` + `save_pretrained` of the same file (offline,
  given the config folder sdcompress wrote).

Targets (issue 2): at most 1.5x the `cp` time; at most half diffusers' peak RSS.

Disk: the cached inputs stay (SD 1.5 2.1 GB, SDXL 6.9 GB, in $SDCOMPRESS_CACHE/random,
default ~/.cache/sdcompress/random; delete the folder to free them). The outputs
(4x the input at once: the copy, our folder and single file, diffusers' folder) go
to --workdir and are deleted after each family: SDXL needs about 28 GB free there.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path


def _child(cmd: list[str]) -> tuple[float, float]:
    """Run a command and then `sync`; return (wall seconds, peak RSS in GiB of the command alone).

    Every timing includes flushing what the command wrote to disk, so `cp` (whose writes would
    otherwise sit in the page cache) and the converters are compared on durable bytes.
    """
    subprocess.run(["sync"], check=False)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    subprocess.run(["sync"], check=False)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 2**20


def _startup() -> float:
    """Seconds the CLI needs to start (imports), measured once: part of every sdcompress timing."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sdcompress", "--help"], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


DIFFUSERS_SCRIPT = textwrap.dedent(
    """
    import sys, torch, diffusers
    src, config, out, cls = sys.argv[1:5]
    pipe = getattr(diffusers, cls).from_single_file(src, config=config, local_files_only=True,
                                                    torch_dtype=torch.float16)
    pipe.save_pretrained(out)
    """
)


def bench(family: str, work: Path) -> dict[str, float]:
    from sdcompress.arch.families import get_family
    from sdcompress.testing import cached_random_model

    work.mkdir(parents=True, exist_ok=True)
    src = cached_random_model(family, "single-file")  # made once, kept in the cache for the next run
    size = src.stat().st_size
    exe = [sys.executable, "-m", "sdcompress"]
    for p in ("cp.safetensors", "folder", "back.safetensors", "diffusers"):
        shutil.rmtree(work / p, ignore_errors=True) if (work / p).is_dir() else (work / p).unlink(
            missing_ok=True
        )
    subprocess.run(["sync"], check=False)
    r = {"size_gb": size / 1e9, "startup_s": _startup()}
    r["cp_s"], r["cp_rss"] = _child(["cp", str(src), str(work / "cp.safetensors")])
    r["to_diffusers_s"], r["to_diffusers_rss"] = _child(
        [*exe, "convert", str(src), "-o", str(work / "folder")]
    )
    r["to_single_s"], r["to_single_rss"] = _child(
        [*exe, "convert", str(work / "folder"), "-o", str(work / "back.safetensors")]
    )
    cls = get_family(family).pipeline_class
    r["diffusers_s"], r["diffusers_rss"] = _child(
        [sys.executable, "-c", DIFFUSERS_SCRIPT, str(src), str(work / "folder"), str(work / "diffusers"), cls]
    )
    for p in ("cp.safetensors", "back.safetensors"):
        (work / p).unlink(missing_ok=True)
    shutil.rmtree(work / "folder", ignore_errors=True)
    shutil.rmtree(work / "diffusers", ignore_errors=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", action="append", default=None, help="sd1, sd2, sdxl (repeatable)")
    ap.add_argument("--workdir", default="/tmp/sdcompress-bench-convert")
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    print(
        f"{'family':8} {'size':>8} {'cp':>8} {'->diffusers':>12} {'->single':>10} {'x cp':>6} "
        f"{'RSS ours':>9} {'RSS diffusers':>14} {'ratio':>6}"
    )
    for family in args.family or ["sd1", "sdxl"]:
        r = bench(family, Path(args.workdir))
        worst = max(r["to_diffusers_s"], r["to_single_s"])
        ours = max(r["to_diffusers_rss"], r["to_single_rss"])
        print(
            f"{family:8} {r['size_gb']:6.2f}GB {r['cp_s']:7.1f}s {r['to_diffusers_s']:11.1f}s {r['to_single_s']:9.1f}s "
            f"{worst / r['cp_s']:5.2f}x {r['startup_s']:5.1f}s {ours:7.2f}GiB {r['diffusers_rss']:12.2f}GiB {ours / r['diffusers_rss']:5.2f}"
            f"   (diffusers from_single_file+save_pretrained {r['diffusers_s']:.1f}s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
