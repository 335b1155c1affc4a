"""quantize on full-size random-weight checkpoints: size, U-Net output error, time and peak RSS per format.

    python benchmarks/quantize.py --family sd1 --workdir /tmp/sdc-bench
    python benchmarks/quantize.py --family sdxl --no-error --workdir /tmp/sdc-bench   # streaming target

For each family the cached fp16 single file (sdcompress.testing) is copied with `cp` (the floor)
and quantized to each format by `sdcompress quantize --no-report` in a child process (wall time
including `sync`, and the child's peak RSS). Then, in this process, each output's U-Net output
error against the source on the report's fixed inputs (relative L2, cosine), and the measured
allocation (`--budget`, layers scored by `--fast` weight error) against the default keep-list
grown by the same number of bytes in file order (the first, high-resolution blocks first).

Targets (issue 20): an SDXL single file quantizes on CPU with peak RSS under 2 GB, and `fp8`
takes at most 2x the `cp` time. Random weights have no structure that makes one layer more
sensitive than another, so the allocation figure is a check of the machinery, not of the
allocation's worth on a trained model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORMATS = ["fp8", "fp8-e5m2", "fp8-scaled", "gguf-q8_0", "gguf-q4_0"]


# A child forked from this (large) process counts this process's pages in its peak RSS until it
# execs: the command is started from a small interpreter instead, which reports its child's peak.
_WRAP = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
)


def child(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds including sync, peak RSS GiB of the command alone)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAP, *cmd], capture_output=True, text=True)
    subprocess.run(["sync"], check=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - start, int(proc.stdout.split()[-1]) / 2**20


def error_of(src: Path, out: Path, fmt: str) -> tuple[float, float]:
    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.quantize.report import fixed_inputs, output_error
    from sdcompress.services.quantize import QuantizeRequest, _dequantized_unet

    model = load_model(src)
    req = QuantizeRequest(str(src), str(out), fmt, report=False, overwrite=True)
    e = output_error(model, _dequantized_unet(req, model), fixed_inputs(model, samples=2))
    return e.relative, e.cosine


def allocation(src: Path, work: Path, extra: float, scorings: list[str]) -> None:
    """Measured allocations vs the default keep-list grown in file order, at the same budget."""
    from sdcompress.checkpoint.keymap import unet as unet_map
    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.quantize.keep import KeepList
    from sdcompress.services.quantize import QuantizeRequest, quantize

    def run(name: str, **kw) -> tuple[object, float]:
        started = time.perf_counter()
        r = quantize(QuantizeRequest(str(src), str(work / f"{name}.safetensors"), "fp8", report=False,
                                     overwrite=True, **kw))  # fmt: skip
        return r, time.perf_counter() - started

    base, _ = run("d")
    budget = int(base.bytes_written * (1 + extra))
    rows = [("default keep-list", "d", base, 0.0)]
    for scoring in scorings:
        r, secs = run(scoring, budget=str(budget), fast=scoring == "weight")
        label = "measured, weight error" if scoring == "weight" else "measured, output error"
        rows.append((label, scoring, r, secs))
    model = load_model(src)
    sf = unet_map.unet_to_single_file(model.components["unet"], model.unet_layout)
    keep, room, order = KeepList(), budget - base.bytes_written, []
    for name, t in sf.items():
        if not keep.keeps(name, t) and t.nbytes - t.numel <= room:
            order.append(name)
            room -= t.nbytes - t.numel
    folklore, _ = run("f", keep=list(order))
    rows.append(("keep-list + file order", "f", folklore, 0.0))
    print(f"\nallocation at {budget / 1e9:.3f} GB (default keep-list file + {extra:.0%}):")
    for label, path, r, secs in rows:
        rel, cos = error_of(src, work / f"{path}.safetensors", "fp8")
        took = f"  ({secs:.0f} s)" if secs else ""
        print(f"  {label:24} {r.bytes_written / 1e9:7.3f} GB  quantized {r.quantized_fraction:6.1%}  "
              f"output rel. error {rel:.3e}  cosine {cos:.6f}{took}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl"])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--no-error", action="store_true", help="skip the output error (loads the U-Net in fp32)")
    ap.add_argument(
        "--allocation", type=float, default=0.05, help="extra budget share for the allocation (0: skip)"
    )
    ap.add_argument(
        "--scoring", default="output,weight", help="allocation scorings to compare: output (one U-Net pass per "
        "layer), weight (--fast)",
    )  # fmt: skip
    args = ap.parse_args()
    from sdcompress.testing import cached_random_model

    src = cached_random_model(args.family)
    size = src.stat().st_size
    formats = [f for f in args.formats.split(",") if f]
    if importlib.util.find_spec("gguf") is None:
        skipped = [f for f in formats if f.startswith("gguf")]
        formats = [f for f in formats if not f.startswith("gguf")]
        if skipped:
            print(f"(gguf not installed: {', '.join(skipped)} skipped)")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        cp_s, cp_rss = child(["cp", str(src), str(work / "copy.safetensors")])
        (work / "copy.safetensors").unlink()
        print(f"{args.family}: source {size / 1e9:.3f} GB fp16; cp {cp_s:.1f} s, peak RSS {cp_rss:.2f} GiB")
        print(f"{'format':12} {'size GB':>8} {'vs fp16':>8} {'time s':>7} {'x cp':>5} {'cp s':>5} {'RSS GiB':>8} "
              f"{'rel. error':>11} {'cosine':>9}")  # fmt: skip
        for fmt in formats:
            out = work / f"q.{'gguf' if fmt.startswith('gguf') else 'safetensors'}"
            cmd = [sys.executable, "-m", "sdcompress", "quantize", str(src), "-o", str(out), "--format", fmt,
                   "--no-report", "--overwrite"]  # fmt: skip
            secs, rss = child(cmd)
            cp_s, _ = child(["cp", str(src), str(work / "copy.safetensors")])  # paired: the machine drifts
            (work / "copy.safetensors").unlink()
            q = out.stat().st_size
            rel = cos = float("nan")
            if not args.no_error:
                rel, cos = error_of(src, out, fmt)
            print(f"{fmt:12} {q / 1e9:8.3f} {q / size:8.1%} {secs:7.1f} {secs / cp_s:5.2f} {cp_s:5.1f} {rss:8.2f} "
                  f"{rel:11.3e} {cos:9.6f}")  # fmt: skip
            out.unlink()
        if args.allocation > 0 and not args.no_error:
            allocation(src, work, args.allocation, [x for x in args.scoring.split(",") if x])
    print(json.dumps({"family": args.family, "source_bytes": size}))


if __name__ == "__main__":
    main()
