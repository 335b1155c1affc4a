"""Checkpoint merges: sdcompress vs sd-mecha on full-size SD 1.5 single files.

Generates three random fp16 SD 1.5-shaped single files (A, B, C), then in
separate child processes runs weighted sum (alpha 0.3) and add difference
(alpha 0.5) with sdcompress and with sd-mecha, and prints wall time and peak
RSS side by side. Each output is then checked elementwise against a plain
torch computation, tensor by tensor. Run by hand:

    .venv/bin/python benchmarks/merge.py --workdir /tmp/sdc-merge-bench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch


def _generate(work: Path) -> list[Path]:
    from sdcompress.arch.families import get_family
    from sdcompress.checkpoint.instantiate import module_from_config
    from sdcompress.checkpoint.model import Model
    from sdcompress.checkpoint.tensors import LazyTensor
    from sdcompress.checkpoint.writers import save_single_file

    fam = get_family("sd1")
    specs = {"unet": fam.unet, "vae": fam.vae, "text_encoder": fam.text_encoders[0].config}
    shapes = {
        c: {k: tuple(v.shape) for k, v in module_from_config(c, cfg).state_dict().items()}
        for c, cfg in specs.items()
    }
    out = []
    for i, name in enumerate("ABC"):
        path = work / f"{name}.safetensors"
        out.append(path)
        if path.is_file():
            continue

        def make(key: str, shape: tuple[int, ...], i: int = i) -> torch.Tensor:
            g = torch.Generator().manual_seed(zlib.crc32(key.encode()) + i)
            return (torch.randn(shape, generator=g) * 0.02).half()

        comps = {}
        for c, sh in shapes.items():
            if c == "text_encoder":
                sh = {("text_model." + k if not k.startswith("text_model.") else k): s for k, s in sh.items()}
                sh = {k: s for k, s in sh.items() if not k.endswith("position_ids")}
            comps[c] = {k: LazyTensor(s, torch.float16, lambda k=k, s=s: make(k, s)) for k, s in sh.items()}
        configs = {**{c: dict(cfg) for c, cfg in specs.items()}, "scheduler": dict(fam.scheduler)}
        save_single_file(Model(name, None, "single-file", fam, comps, configs), path)
    return out


def run(method: str, tool: str, work: Path) -> dict:
    a, b, c = (str(work / f"{n}.safetensors") for n in "ABC")
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

    a, b, c = (read_state_dict(work / f"{n}.safetensors") for n in "ABC")
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
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/sdc-merge-bench")
    p.add_argument("--run", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.run:
        print(json.dumps(run(args.run[0], args.run[1], work)))
        return
    t0 = time.perf_counter()
    _generate(work)
    print(f"inputs ready in {time.perf_counter() - t0:.1f} s at {work}", flush=True)
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
