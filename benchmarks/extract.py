"""LoRA extraction: sdcompress vs LyCORIS `extract_diff` vs an exact torch.linalg.svd path.

Generates a full-size SD 1.5-shaped U-Net pair (random base; tuned = base +
rank-8 structure + noise on every LoRA-able layer), then runs each method in
its own child process and prints wall time, peak RSS (of that child) and the
total squared Frobenius error of the rank-32 (+ conv rank 32) factors over
the same layers. Run by hand:

    .venv/bin/python benchmarks/extract.py                  # all three
    .venv/bin/python benchmarks/extract.py --skip lycoris
    .venv/bin/python benchmarks/extract.py --subset   # six SD 1.5 layer shapes, one process

Disk: the generated pair (two fp16 SD 1.5 U-Nets, 3.4 GB) is kept in --workdir, by
default in the sdcompress cache ($SDCOMPRESS_CACHE/random/extract-bench, default
~/.cache/sdcompress), and reused by the next run; the three LoRA files beside it are
about 0.3 GB. Delete the folder to free it. --subset needs no disk.
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

RANK = 32
CONV_RANK = 32


def _generate(workdir: Path, family: str, dtype: torch.dtype) -> tuple[Path, Path]:
    from sdcompress.arch.families import get_family
    from sdcompress.checkpoint.instantiate import module_from_config
    from sdcompress.checkpoint.model import Model
    from sdcompress.checkpoint.tensors import LazyTensor
    from sdcompress.checkpoint.writers import save_diffusers
    from sdcompress.lowrank.targets import is_target

    fam = get_family(family)
    shapes = {k: tuple(v.shape) for k, v in module_from_config("unet", fam.unet).state_dict().items()}
    paths = []
    for which in ("base", "tuned"):
        out = workdir / f"{family}-{which}"
        paths.append(out)
        if (out / "config.json").is_file():
            continue

        def tensor(key: str, shape: tuple[int, ...], which: str = which) -> torch.Tensor:
            seed = zlib.crc32(key.encode())
            g = torch.Generator().manual_seed(seed)
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else shape[0]
            w = torch.randn(shape, generator=g) / fan_in**0.5
            if which == "tuned" and is_target("unet", key, shape, conv=True):
                m = w.reshape(shape[0], -1)
                r = 8
                delta = torch.randn(m.shape[0], r, generator=g) @ torch.randn(r, m.shape[1], generator=g)
                m += 0.02 * delta / (r * m.shape[1]) ** 0.5 + 2e-4 * torch.randn(m.shape, generator=g)
            return w.to(dtype)

        sd = {k: LazyTensor(s, dtype, lambda k=k, s=s: tensor(k, s)) for k, s in shapes.items()}
        model = Model(f"bench-{which}", None, "diffusers", fam, {"unet": sd}, {"unet": dict(fam.unet)})
        save_diffusers(model, out, unet_only=True)
    return paths[0], paths[1]


def _targets(sd: dict) -> list[str]:
    from sdcompress.lowrank.targets import is_target

    return [k for k, v in sd.items() if is_target("unet", k, tuple(v.shape), conv=True)]


def _error_of(delta_of: dict, base, tuned) -> float:
    """Sum over target layers of |diff - approx|^2 (layers a method leaves out count in full)."""
    total = 0.0
    for key in _targets(base):
        d = tuned[key].load().float() - base[key].load().float()
        approx = delta_of.get(key)
        r = d if approx is None else d - approx.reshape(d.shape)
        total += float((r.double() ** 2).sum())
    return total


def run_sdcompress(base: Path, tuned: Path, out: Path) -> dict:
    from sdcompress.lowrank.extract import ExtractOptions
    from sdcompress.services.extract import ExtractRequest, run_extract

    opts = ExtractOptions(rank=RANK, conv_rank=CONV_RANK, dtype=torch.float32, text_encoder=False)
    t0 = time.perf_counter()
    r = run_extract(ExtractRequest(str(base), str(tuned), str(out), opts, overwrite=True))
    return {"seconds": time.perf_counter() - t0, "sq_error": sum(x.sq_error for x in r.layers)}


def run_exact(base: Path, tuned: Path, out: Path) -> dict:
    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.lowrank.targets import is_conv_kernel

    b, t = load_model(base).components["unet"], load_model(tuned).components["unet"]
    t0 = time.perf_counter()
    err = 0.0
    for key in _targets(b):
        d = (t[key].load().float() - b[key].load().float()).reshape(b[key].shape[0], -1)
        s = torch.linalg.svdvals(d)
        r = CONV_RANK if is_conv_kernel(b[key].shape) else RANK
        err += float((s[r:].double() ** 2).sum())
    return {"seconds": time.perf_counter() - t0, "sq_error": err}


def run_lycoris(base: Path, tuned: Path, out: Path) -> dict:
    from diffusers import UNet2DConditionModel
    from lycoris.utils import extract_diff

    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.lowrank.layouts import Adapter
    from sdcompress.lowrank.targets import Naming

    t0 = time.perf_counter()
    ub = UNet2DConditionModel.from_pretrained(base)
    ut = UNet2DConditionModel.from_pretrained(tuned)
    sd = extract_diff(
        [], [], ub, ut, mode="fixed", linear_mode_param=RANK, conv_mode_param=CONV_RANK, extract_device="cpu"
    )
    seconds = time.perf_counter() - t0
    del ub, ut
    b, t = load_model(base).components["unet"], load_model(tuned).components["unet"]
    naming = Naming({"unet": list(b)}, sdxl=False)
    from sdcompress.checkpoint.tensors import LazyTensor

    adapters: dict[str, Adapter] = {}
    for k, v in sd.items():
        name, _, suffix = k.partition(".")
        a = adapters.setdefault(name, Adapter(name))
        if suffix == "alpha":
            a.alpha = float(v)
        else:
            a.tensors[
                {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid"}.get(
                    suffix, suffix
                )
            ] = LazyTensor.of(v)
    delta_of = {}
    for name, a in adapters.items():
        target = naming.from_kohya(name)
        if target is not None:
            delta_of[target.weight_key] = a.delta(b[target.weight_key].shape)
    return {"seconds": seconds, "sq_error": _error_of(delta_of, b, t), "modules": len(delta_of)}


SUBSET_SHAPES = [(1280, 1280, 3, 3), (10240, 1280), (1280, 5120), (640, 640, 3, 3), (320, 320), (320, 768)]


def run_subset() -> None:
    """Representative SD 1.5 layer shapes, the three methods back to back per layer (same load)."""
    from lycoris.utils import extract_conv, extract_linear

    from sdcompress.lowrank.svd import low_rank

    g = torch.Generator().manual_seed(0)
    totals = {"sdcompress": [0.0, 0.0], "exact": [0.0, 0.0], "lycoris": [0.0, 0.0]}
    for shape in SUBSET_SHAPES:
        m, n = shape[0], int(torch.tensor(shape[1:]).prod())
        d = 0.02 * (torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g)) / (8 * n) ** 0.5
        d = (d + 2e-4 * torch.randn(m, n, generator=g)).reshape(shape)
        r = CONV_RANK if len(shape) == 4 else RANK
        row = []
        t = time.perf_counter()
        lr = low_rank(d, r)
        row.append(("sdcompress", time.perf_counter() - t, lr.up @ lr.down))
        t = time.perf_counter()
        u, sv, vh = torch.linalg.svd(d.reshape(m, n), full_matrices=False)
        row.append(("exact", time.perf_counter() - t, (u[:, :r] * sv[:r]) @ vh[:r]))
        t = time.perf_counter()
        (a, b, *_), kind = extract_conv(d, "fixed", r) if len(shape) == 4 else extract_linear(d, "fixed", r)
        approx = d.reshape(m, n) if kind == "full" else b.reshape(m, -1) @ a.reshape(a.shape[0], -1)
        row.append(("lycoris", time.perf_counter() - t, approx))
        cells = []
        for name, sec, approx in row:
            err = float(((d.reshape(m, n) - approx.reshape(m, n)).double() ** 2).sum())
            totals[name][0] += sec
            totals[name][1] += err
            cells.append(f"{name} {sec:7.2f} s err {err:.5g}")
        print(f"{str(shape):<22}" + " | ".join(cells), flush=True)
    ex = totals["exact"][1]
    for name, (sec, err) in totals.items():
        print(f"{name:<12}{sec:>9.2f} s  sq error {err:.6g}  ({err / ex:.4f}x exact)")


METHODS = {"sdcompress": run_sdcompress, "exact": run_exact, "lycoris": run_lycoris}


def main() -> None:
    from sdcompress.testing import random_cache_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(random_cache_dir() / "extract-bench"))
    p.add_argument("--family", default="sd1")
    p.add_argument("--skip", action="append", default=[])
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--subset", action="store_true", help="Only time representative layer shapes (minutes).")
    args = p.parse_args()
    if args.subset:
        run_subset()
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    base, tuned = work / f"{args.family}-base", work / f"{args.family}-tuned"
    if args.run:  # child: one method, result as JSON on the last line
        res = METHODS[args.run](base, tuned, work / f"{args.run}.safetensors")
        print(json.dumps(res))
        return
    t0 = time.perf_counter()
    _generate(work, args.family, torch.float16)
    print(f"pair ready in {time.perf_counter() - t0:.1f} s at {work}", flush=True)
    rows = []
    for name in METHODS:
        if name in args.skip:
            continue
        t = time.perf_counter()
        cmd = [sys.executable, __file__, "--workdir", str(work), "--family", args.family, "--run", name]
        log_out, log_err = work / f"{name}.stdout", work / f"{name}.stderr"
        with open(log_out, "w") as fo, open(log_err, "w") as fe:
            proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        wall = time.perf_counter() - t
        stdout, stderr = log_out.read_text(), log_err.read_text()
        peak = usage.ru_maxrss * 1024  # KiB on Linux
        if os.waitstatus_to_exitcode(status) != 0:
            print(f"{name} failed:\n{stderr[-3000:]}")
            continue
        res = json.loads(stdout.strip().splitlines()[-1])
        note = ""
        rows.append((name, res["seconds"], wall, peak / 2**30, res["sq_error"], note))
    exact = next((r[4] for r in rows if r[0] == "exact"), None)
    print(
        f"\n{'method':<12}{'extract s':>11}{'process s':>11}{'peak RSS GiB':>14}{'sq error':>14}{'vs exact':>10}"
    )
    for name, sec, wall, gib, err, note in rows:
        ratio = f"{err / exact:.4f}" if exact else "-"
        print(f"{name:<12}{sec:>11.1f}{wall:>11.1f}{gib:>14.2f}{err:>14.6g}{ratio:>10}{note}")


if __name__ == "__main__":
    main()
