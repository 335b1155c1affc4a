"""Checkpoint merges: sdcompress vs sd-mecha on full-size SD 1.5 single files.

Takes three random fp16 SD 1.5-shaped single files (A, B, C) from the
sdcompress cache (written on first use and kept), then in separate child processes runs weighted sum (alpha 0.3) and add difference
(alpha 0.5) with sdcompress and with sd-mecha, and prints wall time and peak
RSS side by side. Each output is then checked elementwise against a plain
torch computation, tensor by tensor. Run by hand:

    .venv/bin/python benchmarks/merge.py --workdir /tmp/sdc-merge-bench

Disk: the inputs stay in $SDCOMPRESS_CACHE/random (default ~/.cache/sdcompress/random,
3 x 2.1 GB; delete the folder to free them); the four merged files (2.1 GB each) go to
--workdir, so it needs about 9 GB free; delete it after reading the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def _inputs() -> list[Path]:
    """A, B and C: random fp16 SD 1.5 single files from the sdcompress cache (written on first use)."""
    from sdcompress.testing import cached_random_model

    return [cached_random_model("sd1", "single-file", seed=seed) for seed in range(3)]


def run(method: str, tool: str, work: Path) -> dict:
    a, b, c = map(str, _inputs())
    out = work / f"{tool}-{method}.safetensors"
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    if tool == "sdcompress":
        from sdcompress.services.merge import MergeRequest, run_merge

        models = [a, b] if method == "weighted-sum" else [a, b, c]
        alpha = 0.3 if method == "weighted-sum" else 0.5
        run_merge(MergeRequest(models, str(out), method=method, alpha=alpha))
    else:
        import sd_mecha

        ma, mb, mc = (sd_mecha.model(p, "sd1-ldm") for p in (a, b, c))
        recipe = (
            sd_mecha.weighted_sum(ma, mb, alpha=0.3)
            if method == "weighted-sum"
            else sd_mecha.add_difference(ma, mb, mc, alpha=0.5)
        )
        sd_mecha.merge(recipe, output=out, merge_dtype=torch.float32, output_dtype=torch.float16, threads=1)
    return {"seconds": time.perf_counter() - t0}


def check(method: str, tool: str, work: Path) -> float:
    """Max |out - plain torch| over every tensor both files share (read one tensor at a time)."""
    from sdcompress.checkpoint.safetensors_io import read_state_dict

    a, b, c = map(read_state_dict, _inputs())
    out = read_state_dict(work / f"{tool}-{method}.safetensors")
    worst = 0.0
    for k, lt in out.items():
        if k not in a or not lt.dtype.is_floating_point:
            continue
        x, y = a[k].load().float(), b[k].load().float()
        want = torch.lerp(x, y, 0.3) if method == "weighted-sum" else x + (y - c[k].load().float()) * 0.5
        worst = max(worst, float((lt.load().float() - want.half().float()).abs().max()))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/sdc-merge-bench")
    p.add_argument("--run", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.run:
        print(json.dumps(run(args.run[0], args.run[1], work)))
        return
    t0 = time.perf_counter()
    inputs = _inputs()
    print(f"inputs ready in {time.perf_counter() - t0:.1f} s at {inputs[0].parent}", flush=True)
    print(f"\n{'merge':<16}{'tool':<12}{'seconds':>9}{'peak RSS GiB':>14}{'max |err| vs torch':>20}")
    for method in ("weighted-sum", "add-difference"):
        for tool in ("sdcompress", "sd-mecha"):
            cmd = [sys.executable, __file__, "--workdir", str(work), "--run", method, tool]
            log = work / f"{tool}-{method}.log"
            with open(log, "w") as f:
                proc = subprocess.Popen(
                    cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONWARNINGS": "ignore"}
                )
                _, status, usage = os.wait4(proc.pid, 0)
            text = log.read_text()
            if os.waitstatus_to_exitcode(status) != 0:
                print(f"{method:<16}{tool:<12} failed: {text[-1500:]}")
                continue
            res = json.loads(text.strip().splitlines()[-1])
            err = check(method, tool, work)
            print(
                f"{method:<16}{tool:<12}{res['seconds']:>9.1f}{usage.ru_maxrss / 2**20:>14.2f}{err:>20.3g}",
                flush=True,
            )


if __name__ == "__main__":
    main()
