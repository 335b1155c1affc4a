"""Every CUDA path of sdcompress in one command that fits a short GPU loan, with the figures recorded.

    python benchmarks/gpu_suite.py --out gpu-run          # on a CUDA machine: every step, full size
    python benchmarks/gpu_suite.py --tiny --out /tmp/x    # the same steps on the CPU with the tiny models
    python benchmarks/gpu_suite.py --only quantize --out gpu-q   # one step and the steps it needs

The full plan's step budgets add up to more than 10 minutes (its total is 14.5 minutes), so where a
command may run 10 minutes at most, run it in two calls, each with a total that leaves time for
the report (the second call finds the random models in the cache and builds nothing):

    python benchmarks/gpu_suite.py --only bench,quantize,extract-cuda --total-s 570 --out gpu-run/1
    python benchmarks/gpu_suite.py --only extract-cpu,convert,data-prepare,distill,finetune,lora-train,dmd2-lora,dmd2-full,pytest-gpu --total-s 570 --out gpu-run/2

The first call's budgets (build 100 s, prune 75, bench 90, quantize 180, extract-cuda 60) add up
to 505 s. The second's add up to 835 s, but its build is a cache hit (seconds, not 100) and the
budgets are ceilings; a step the total does not reach is reported "not run: the suite's total
time budget was spent" and can be run alone with `--only STEP`.

Steps, in order (each a child process with its own time budget; the whole run stops
starting steps once its total budget is spent, and a step whose input failed is not run):

- build: full-size random SD 1.5 and SDXL single files, weights drawn on the GPU
  (`sdcompress.testing.cached_random_model`), an SDXL "fine-tune" of it (U-Net + a low-rank
  change) for extraction, and a small captioned image set;
- prune: the ssd-1b, koala-700m and vega students of that SDXL (`prune --select uniform`);
- bench: `bench sdxl ssd-1b koala-700m vega --random-weights` at 1024 px in fp16 (U-Nets built
  directly on the GPU), the ratios beside Segmind's and KOALA's published figures;
- quantize: `quantize --format fp8` and `--format fp8-scaled` of the SDXL single file and of the
  ssd-1b student (seconds, bytes), then `bench` of each source (fp16) against its two fp8 files
  at 1024 px, batch 1: steps/s, peak memory, the ratios to fp16, and how bench ran the fp8
  weights (its note: cast up per layer, or fp8 matmuls);
- extract-lora on the GPU and on the CPU cores: time, peak memory, and the error against an
  exact SVD on sampled layers;
- convert of the SDXL single file with `--device cuda --dtype fp16` and on the CPU: the
  outputs must be byte-identical;
- data prepare, and a few steps each of distill (SDXL -> ssd-1b, 1024 px, fp16, gradient
  checkpointing, 8-bit AdamW when bitsandbytes imports), finetune (SD 1.5, bf16) and lora train
  (SDXL, fp16): step time, peak memory, finite losses;
- a few steps each of distill --objective dmd2: SDXL -> SDXL (`--lora 64 --fake-lora 64`) and
  SDXL -> ssd-1b (full student, full fake score, 8-bit AdamW when bitsandbytes imports), 1024 px,
  fp16, gradient checkpointing: step time, peak memory, finite losses;
- the CUDA-only tests (`pytest -m gpu`).

The CLI is called as users call it (`python -m sdcompress ...`) except where a figure must be
taken inside the process (step times, peak GPU memory, per-layer errors): there a child runs the
service (`--probe NAME`) and prints its figures as JSON. It writes OUT/gpu_suite.json and
OUT/gpu_suite.md and exits 1 naming the failed steps. Work files go to OUT/work (deleted at the
end unless --keep; the GPU run needs about 45 GB of disk at its peak); the random models stay in
the sdcompress cache ($SDCOMPRESS_CACHE/random: the SD 1.5 and SDXL files and the SDXL
"fine-tune"), so a second try or a second `--only` call skips building them; the pruned students
live in OUT/work and are pruned again by each call that needs them.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent

# Published speed figures, from the publishers (copied into /work/shared/reference/architectures.md):
# Segmind, SSD-1B vs SDXL on an A100 80GB, it/s of the pipeline at 1024 px.
SEGMIND_A100_IT_S = {1: (16.02, 10.26), 4: (4.78, 3.03), 8: (2.44, 1.54), 16: (1.21, 0.75)}
# KOALA-Lightning-700M: a 1024x1024 image in 0.66 s (10 steps) on an RTX 4090, about 4x SDXL.
KOALA_PUBLISHED = "KOALA-Lightning-700M: 1024 px in 0.66 s (10 steps, RTX 4090), ~4x SDXL"


@dataclass(frozen=True)
class Plan:
    """What the run uses: the full-size GPU settings, or the tiny CPU ones (`--tiny`)."""

    tiny: bool
    device: str  # where the CUDA paths run: cuda, or cpu with --tiny
    sd1: str
    sdxl: str
    students: tuple[str, ...]
    bench_family: str | None  # --family for bench's presets (the tiny teacher), None at full size
    bench_batches: str
    bench_steps: int
    xl_resolution: int
    sd1_resolution: int
    images: int
    train_steps: int
    mixed: dict[str, str]  # training command -> mixed precision
    rank: int
    total_s: float
    budgets: dict[str, float]

    @classmethod
    def make(cls, tiny: bool) -> Plan:
        if tiny:
            return cls(
                tiny=True,
                device="cpu",
                sd1="tiny-sd",
                sdxl="tiny-sdxl",
                students=("ssd-1b", "koala-700m", "vega"),
                bench_family="tiny-sdxl",
                bench_batches="1,2",
                bench_steps=2,
                xl_resolution=32,
                sd1_resolution=32,
                images=2,
                train_steps=2,
                mixed={
                    "distill": "bf16",
                    "finetune": "no",
                    "lora-train": "no",
                    "dmd2": "no",
                },  # bf16 is slow on a CPU
                rank=8,
                total_s=900,
                budgets=dict.fromkeys(STEP_NAMES, 240.0),
            )
        return cls(
            tiny=False,
            device="cuda",
            sd1="sd1",
            sdxl="sdxl",
            students=("ssd-1b", "koala-700m", "vega"),
            bench_family=None,
            bench_batches="1,4",
            bench_steps=10,
            xl_resolution=1024,
            sd1_resolution=512,
            images=8,
            train_steps=4,
            mixed={"distill": "fp16", "finetune": "bf16", "lora-train": "fp16", "dmd2": "fp16"},
            rank=32,
            # 14.5 minutes (9 before the two DMD2 steps, 11.5 before quantize): more than a 10-minute
            # command allows, so run it in two `--only` calls (module docstring) where that limit applies.
            total_s=870,
            budgets={
                "build": 100,
                "prune": 75,
                "bench": 90,
                # 2 SDXL (6.9 GB) + 2 ssd-1b (U-Net) quantizations, ~23 s per SDXL fp8 on 2 idle CPU
                # cores before the fp8 rounding was made 2x faster (docs/benchmarks.md), then per model one
                # bench of source, fp8, fp8-scaled (fp8 matmuls) and one of the two fp8 files cast up
                "quantize": 180,
                "extract-cuda": 60,
                "extract-cpu": 90,
                "convert": 90,
                "data-prepare": 45,
                "distill": 90,
                "finetune": 60,
                "lora-train": 75,
                "dmd2-lora": 75,
                "dmd2-full": 75,
                "pytest-gpu": 60,
            },
        )

    @property
    def bench_models(self) -> list[str]:
        return [self.sdxl, *self.students]


STEP_NAMES = (
    "build",
    "prune",
    "bench",
    "quantize",
    "extract-cuda",
    "extract-cpu",
    "convert",
    "data-prepare",
    "distill",
    "finetune",
    "lora-train",
    "dmd2-lora",
    "dmd2-full",
    "pytest-gpu",
)
NEEDS = {
    "prune": ("build",),
    "quantize": ("build", "prune"),
    "extract-cuda": ("build",),
    "extract-cpu": ("build",),
    "convert": ("build",),
    "data-prepare": ("build",),
    "distill": ("build", "prune"),
    "finetune": ("build",),
    "lora-train": ("build",),
    "dmd2-lora": ("build",),
    "dmd2-full": ("build", "prune"),
}


@dataclass
class StepResult:
    name: str
    ok: bool
    seconds: float
    budget_s: float
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


class StepFailed(Exception):
    """A step's command failed or ran out of time; the message is the reason for the report."""


# ---------------------------------------------------------------------------- child processes


def _child_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _run(cmd: list[str], timeout: float, log: Path) -> str:
    """Run one child in its own process group; on timeout the whole group is killed. Returns stdout."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as err:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=_child_env(),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise StepFailed(f"over its time budget ({timeout:.0f} s): {' '.join(cmd[1:6])} ...") from None
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise StepFailed(f"exit {proc.returncode}: {' '.join(cmd[1:6])} ...: {' | '.join(tail)[-600:]}")
    return out


def _last_json(stdout: str) -> dict[str, Any]:
    """The JSON a CLI `--json` call or a probe printed (the last line that parses as an object)."""
    text = stdout.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    for line in reversed(text.splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    raise StepFailed(f"no JSON in the output: {text[-300:]!r}")


class Runner:
    """Runs the steps in order against one deadline and records what each did."""

    def __init__(self, plan: Plan, out: Path, work: Path) -> None:
        self.plan, self.out, self.work = plan, out, work
        self.deadline = time.monotonic() + plan.total_s
        self.results: list[StepResult] = []
        self.step_deadline = self.deadline

    def left(self) -> float:
        return min(self.deadline, self.step_deadline) - time.monotonic()

    def cli(self, *args: str, log: str) -> dict[str, Any]:
        """`python -m sdcompress ARGS --json`, the way users run it."""
        out = _run(
            [sys.executable, "-m", "sdcompress", *args, "--json"], self.left(), self.out / "logs" / log
        )
        return _last_json(out)

    def probe(self, name: str, **config: Any) -> dict[str, Any]:
        """This script as a child running one service in-process (`--probe NAME`)."""
        cmd = [sys.executable, str(HERE), "--probe", name, "--config", json.dumps(config, default=str)]
        return _last_json(
            _run(cmd, self.left(), self.out / "logs" / f"{name}-{config.get('device', '')}.log")
        )

    def step(self, name: str, fn) -> None:
        budget = self.plan.budgets[name]
        failed_needs = [n for n in NEEDS.get(name, ()) if not self._ok(n)]
        remaining = self.deadline - time.monotonic()
        start = time.monotonic()
        if failed_needs:
            result = StepResult(name, False, 0.0, budget, f"not run: needs {', '.join(failed_needs)}")
        elif remaining < 1:
            result = StepResult(name, False, 0.0, budget, "not run: the suite's total time budget was spent")
        else:
            self.step_deadline = start + budget
            print(f"[{name}] budget {min(budget, remaining):.0f} s", file=sys.stderr, flush=True)
            try:
                metrics = fn() or {}
                result = StepResult(name, True, time.monotonic() - start, budget, None, metrics)
            except StepFailed as e:
                result = StepResult(name, False, time.monotonic() - start, budget, str(e))
            except Exception as e:  # a bug in the suite's own checks still names the step
                result = StepResult(name, False, time.monotonic() - start, budget, f"{type(e).__name__}: {e}")
        status = "ok" if result.ok else f"FAILED: {result.error}"
        print(f"[{name}] {result.seconds:.1f} s {status}", file=sys.stderr, flush=True)
        self.results.append(result)

    def _ok(self, name: str) -> bool:
        return any(r.name == name and r.ok for r in self.results)

    def metrics(self, name: str) -> dict[str, Any]:
        return next(r.metrics for r in self.results if r.name == name)


# ---------------------------------------------------------------------------- the steps


def step_build(r: Runner) -> dict[str, Any]:
    return r.probe("build", device=r.plan.device, tiny=r.plan.tiny, work=r.work, images=r.plan.images,
                   size=r.plan.xl_resolution)  # fmt: skip


def step_prune(r: Runner) -> dict[str, Any]:
    teacher = r.metrics("build")["sdxl"]
    out: dict[str, Any] = {}
    for preset in r.plan.students:
        t = time.monotonic()
        res = r.cli("prune", "--teacher", teacher, "--preset", preset, "--select", "uniform", "--unet-only",
                    "--device", r.plan.device, "-o", str(r.work / preset), "--overwrite", log=f"prune-{preset}.log")  # fmt: skip
        params = _find(res, "parameters")
        student = params.get("student") if isinstance(params, dict) else params
        out[preset] = {"seconds": round(time.monotonic() - t, 2), "parameters": student}
    return out


def step_bench(r: Runner) -> dict[str, Any]:
    p = r.plan
    args = ["bench", *p.bench_models, "--random-weights", "--batch-sizes", p.bench_batches,
            "--resolution", str(p.xl_resolution), "--steps", str(p.bench_steps), "--warmup", "1" if p.tiny else "3",
            "--device", p.device, "--dtype", "fp32" if p.tiny else "fp16"]  # fmt: skip
    if p.bench_family:
        args += ["--family", p.bench_family]
    res = r.cli(*args, log="bench.log")
    rows = []
    base = {b["batch_size"]: b["steps_per_s"] for b in res["models"][0]["results"]}
    for m in res["models"]:
        for b in m["results"]:
            sps, ref = b["steps_per_s"], base.get(b["batch_size"])
            published = SEGMIND_A100_IT_S.get(b["batch_size"]) if m["ref"] == "ssd-1b" else None
            rows.append(
                {
                    "model": m["ref"],
                    "parameters": m["parameters"],
                    "batch": b["batch_size"],
                    "steps_per_s": sps,
                    "peak_memory": b["peak_memory"],
                    "vs_sdxl": sps / ref if sps and ref else None,
                    "published_vs_sdxl": published[0] / published[1] if published else None,
                    "error": b.get("error"),
                }
            )
    failed = [f"{x['model']} batch {x['batch']}: {x['error']}" for x in rows if x["steps_per_s"] is None]
    if failed:
        raise StepFailed("bench measured nothing for " + "; ".join(failed))
    return {"device": res["device"], "dtype": res["dtype"], "memory_kind": res["memory_kind"], "rows": rows}


QUANT_FORMATS = ("fp8", "fp8-scaled")


def step_quantize(r: Runner) -> dict[str, Any]:
    """fp8 and fp8-scaled files of the SDXL single file and the ssd-1b student, each benched against
    its source at the XL resolution, batch 1.

    `--no-report`: the output-error report loads the U-Net twice in fp32 and runs it on the CPU,
    which would double the step; benchmarks/quantize.py measures the error, this step the speed.
    """
    p = r.plan
    dtype = "fp32" if p.tiny else "fp16"
    sources = {p.sdxl: r.metrics("build")["sdxl"], "ssd-1b": str(r.work / "ssd-1b")}
    files: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for label, src in sources.items():
        files[label] = {}
        targets = []
        for fmt in QUANT_FORMATS:
            target = r.work / f"{label}-{fmt}.safetensors"
            t = time.monotonic()
            res = r.cli("quantize", src, "-o", str(target), "--format", fmt, "--no-report", "--overwrite",
                        log=f"quantize-{label}-{fmt}.log")  # fmt: skip
            files[label][fmt] = {
                "seconds": round(time.monotonic() - t, 2),
                "bytes": res["bytes_written"],
                "source_bytes": res["source_bytes"],
                "quantized_fraction": res["quantized_fraction"],
            }
            targets.append(str(target))
        res = r.cli("bench", src, *targets, "--batch-sizes", "1", "--resolution", str(p.xl_resolution),
                    "--steps", str(p.bench_steps), "--warmup", "1" if p.tiny else "3", "--device", p.device,
                    "--dtype", dtype, log=f"quantize-bench-{label}.log")  # fmt: skip
        rows += _quant_rows(label, dtype, res)
        if p.device == "cuda":  # bench's default there is fp8 matmuls: the cast-up path beside them
            res = r.cli("bench", src, *targets, "--batch-sizes", "1", "--resolution", str(p.xl_resolution),
                        "--steps", str(p.bench_steps), "--warmup", "3", "--device", p.device, "--dtype", dtype,
                        "--fp8-compute", "cast-up", log=f"quantize-bench-{label}-cast-up.log")  # fmt: skip
            rows += [x | {"format": f"{x['format']} cast-up"} for x in _quant_rows(label, dtype, res)[1:]]
        for target in targets:  # 4.4 GB each at full size: the later steps need the disk
            Path(target).unlink()
    failed = [f"{x['model']} {x['format']}: {x['error']}" for x in rows if x["steps_per_s"] is None]
    if failed:
        raise StepFailed("bench measured nothing for " + "; ".join(failed))
    return {"device": p.device, "dtype": dtype, "resolution": p.xl_resolution, "files": files, "rows": rows}


def _quant_rows(label: str, dtype: str, res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model of one bench call (source, then its fp8 files), with ratios to the source."""
    source = res["models"][0]
    base = source["results"][0]
    rows = []
    for fmt, m in zip((dtype, *QUANT_FORMATS), res["models"], strict=True):
        b = m["results"][0]
        # bench says how it ran a quantized file's weights (fp8 matmuls or cast up per layer) in a
        # note that starts with the file's name; recorded as it is
        note = next((n for n in res["notes"] if n.startswith(f"{m['ref']} is ")), None)
        rows.append(
            {
                "model": label,
                "format": fmt,
                "file_bytes": m["size_on_disk"],
                "weights_bytes": m["weights_bytes"],
                "steps_per_s": b["steps_per_s"],
                "peak_memory": b["peak_memory"],
                "speed_vs_source": b["speedup"],
                "memory_vs_source": _ratio(b["peak_memory"], base["peak_memory"]),
                "file_vs_source": _ratio(m["size_on_disk"], source["size_on_disk"]),
                "compute": note or f"{dtype} weights",
                "error": b.get("error"),
            }
        )
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def step_extract(r: Runner, device: str) -> dict[str, Any]:
    b = r.metrics("build")
    return r.probe("extract", device=device, base=b["sdxl"], tuned=b["sdxl_tuned"], rank=r.plan.rank,
                   out=r.work / f"extract-{device}.safetensors")  # fmt: skip


def step_convert(r: Runner) -> dict[str, Any]:
    src = r.metrics("build")["sdxl"]
    suffix = "" if src.endswith(".safetensors") else ".safetensors"  # the other format than the source
    outs, out = [], {}
    for label, device in (("device", r.plan.device), ("cpu", "cpu")):  # twice on the CPU with --tiny
        target = r.work / f"convert-{label}{suffix}"
        t = time.monotonic()
        res = r.cli("convert", src, "-o", str(target), "--device", device, "--dtype", "fp16", "--overwrite",
                    log=f"convert-{label}.log")  # fmt: skip
        out[f"{label}_seconds"] = round(time.monotonic() - t, 2)
        out["direction"], out["bytes"] = res["direction"], res["bytes_written"]
        outs.append(target)
    different = _differences(*outs)
    if different:
        raise StepFailed(f"{r.plan.device} and CPU conversions differ in {', '.join(different[:5])}")
    out["identical"] = True
    for path in outs:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return out


def step_data_prepare(r: Runner) -> dict[str, Any]:
    b = r.metrics("build")
    t = time.monotonic()
    res = r.cli("data", "prepare", b["images"], "--model", b["sdxl"], "-o", str(r.work / "shards"),
                "--resolution", str(r.plan.xl_resolution), "--device", r.plan.device, "--overwrite",
                log="data-prepare.log")  # fmt: skip
    return {"seconds": round(time.monotonic() - t, 2), "samples": _find(res, "samples")}


def step_train(r: Runner, command: str) -> dict[str, Any]:
    b, p = r.metrics("build"), r.plan
    config: dict[str, Any] = {
        "device": p.device,
        "command": command,
        "images": b["images"],
        "steps": p.train_steps,
        "mixed_precision": p.mixed.get(command),
        "out": r.work / command,
    }
    if command == "distill":
        config |= {"model": b["sdxl"], "student": r.work / "ssd-1b", "resolution": p.xl_resolution}
        config["optimizer"] = "adamw8bit" if _has_bitsandbytes() and p.device == "cuda" else "adamw"
    elif command == "finetune":
        config |= {"model": b["sd1"], "resolution": p.sd1_resolution}
    elif command == "dmd2-lora":  # student and fake score as LoRAs on SDXL: the one-GPU recipe
        rank = p.rank if p.tiny else 64  # the tiny model's layers are narrower than 64
        config |= {"model": b["sdxl"], "resolution": p.xl_resolution, "lora": rank, "fake_lora": rank}
        config["mixed_precision"] = p.mixed["dmd2"]
    elif command == "dmd2-full":  # a full pruned student and a full fake score
        config |= {"model": b["sdxl"], "student": r.work / "ssd-1b", "resolution": p.xl_resolution}
        config["optimizer"] = "adamw8bit" if _has_bitsandbytes() and p.device == "cuda" else "adamw"
        config["mixed_precision"] = p.mixed["dmd2"]
    else:
        config |= {"model": b["sdxl"], "resolution": p.xl_resolution}
    return r.probe("train", **config)


def step_pytest(r: Runner) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_gpu.py"]
    out = _run(cmd, r.left(), r.out / "logs" / "pytest-gpu.log")
    return {"summary": out.strip().splitlines()[-1] if out.strip() else ""}


def _find(obj: Any, key: str) -> Any:
    """The first value under `key` anywhere in a JSON result (the CLIs nest differently)."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        obj = list(obj.values())
    if isinstance(obj, list):
        for v in obj:
            found = _find(v, key)
            if found is not None:
                return found
    return None


def _differences(a: Path, b: Path) -> list[str]:
    """Files that differ (by bytes) between two outputs, file or folder; [] when identical."""
    if a.is_file() or b.is_file():
        return [] if a.is_file() and b.is_file() and filecmp.cmp(a, b, shallow=False) else [a.name]
    names = sorted({p.relative_to(a) for p in a.rglob("*") if p.is_file()}
                   | {p.relative_to(b) for p in b.rglob("*") if p.is_file()})  # fmt: skip
    return [str(n) for n in names if not ((a / n).is_file() and (b / n).is_file()
                                           and filecmp.cmp(a / n, b / n, shallow=False))]  # fmt: skip


def _has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


# ---------------------------------------------------------------------------- probes (in the child)


def _peaks(device: str) -> dict[str, Any]:
    import torch

    out = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if device.startswith("cuda"):
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def _tuned(model, device: str):
    """`model` with every U-Net LoRA target changed by a rank-8 term plus a small noise floor.

    A fine-tune in miniature: the change has a clear low-rank structure, so the extraction error
    against an exact SVD says something; drawn on `device`, seeded by the key.
    """
    import zlib

    import torch

    from sdcompress.checkpoint.tensors import LazyTensor
    from sdcompress.lowrank.targets import is_target

    def changed(key: str, v: LazyTensor) -> torch.Tensor:
        w = v.load().to(device, torch.float32)
        m = w.reshape(w.shape[0], -1)
        g = torch.Generator(device=device).manual_seed(zlib.crc32(key.encode()))
        u = torch.randn(m.shape[0], 8, generator=g, device=device)
        d = torch.randn(8, m.shape[1], generator=g, device=device)
        scale = float(m.float().std()) or 1.0
        m = m + scale * (0.1 * (u @ d) / 8**0.5 + 1e-3 * torch.randn(m.shape, generator=g, device=device))
        return m.reshape(w.shape).to(v.dtype).cpu()

    unet = model.components["unet"]
    model.components["unet"] = {
        k: LazyTensor(v.shape, v.dtype, lambda k=k, v=v: changed(k, v))
        if is_target("unet", k, v.shape, conv=True)
        else v
        for k, v in unet.items()
    }
    return model


def probe_build(c: dict[str, Any]) -> dict[str, Any]:
    """The models and images every later step reads; the full-size ones are kept in the cache."""
    import torch

    from sdcompress.checkpoint.writers import save_single_file
    from sdcompress.testing import cached_random_model, random_cache_dir, random_full_model
    from sdcompress.training.demo_data import write_demo_dataset

    work, device = Path(c["work"]), c["device"]
    t = time.perf_counter()
    if c["tiny"]:
        from sdcompress.checkpoint.tiny import tiny_model, tiny_model_path

        sd1, sdxl = tiny_model_path("tiny-sd"), tiny_model_path("tiny-sdxl")
        tuned = work / "tiny-sdxl-tuned.safetensors"
        if not tuned.is_file():
            save_single_file(_tuned(tiny_model("tiny-sdxl"), device), tuned, dtype=torch.float32)
    else:
        sd1 = cached_random_model("sd1", draw_device=device)
        sdxl = cached_random_model("sdxl", draw_device=device)
        tuned = random_cache_dir() / f"{sdxl.stem}-tuned.safetensors"  # same bytes on a rerun: keep it
        if not tuned.is_file():
            save_single_file(
                _tuned(random_full_model("sdxl", draw_device=device), device), tuned, overwrite=True
            )
    models_s = time.perf_counter() - t
    images = work / "images"
    if not images.is_dir():
        write_demo_dataset(images, count=c["images"], size=c["size"])
    return {
        "sd1": str(sd1),
        "sdxl": str(sdxl),
        "sdxl_tuned": str(tuned),
        "images": str(images),
        "models_seconds": round(models_s, 2),
        "sdxl_bytes": _size(sdxl),
    }


def _size(path: Path) -> int:
    return (
        path.stat().st_size
        if path.is_file()
        else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    )


def probe_extract(c: dict[str, Any]) -> dict[str, Any]:
    """extract-lora through the service (time, peak memory), then exact SVDs of sampled layers.

    The LoRA is written in fp32 here so the error measured from the file is the SVD's, not fp16
    rounding; the error is recomputed from the file, because the per-layer figure the extraction
    reports is |D|^2 - sum(s^2), whose cancellation is of the order of the error itself when a
    change is almost exactly low rank.
    """
    import torch

    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.lowrank.extract import ExtractOptions
    from sdcompress.lowrank.layouts import read_lora, resolve
    from sdcompress.lowrank.targets import naming_for
    from sdcompress.services.extract import ExtractRequest, run_extract

    device, rank = c["device"], int(c["rank"])
    opts = ExtractOptions(rank=rank, conv_rank=rank, device=device, dtype=torch.float32)
    t = time.perf_counter()
    res = run_extract(ExtractRequest(c["base"], c["tuned"], str(c["out"]), opts, overwrite=True))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    figures = {"seconds": round(time.perf_counter() - t, 2), "modules": res.modules, **_peaks(device)}
    # sampled layers: the three largest U-Net targets and three spread over the rest
    layers = [x for x in res.layers if x.target.component == "unet" and x.rank > 0]
    layers.sort(key=lambda x: -math.prod(x.shape))
    sample = layers[:3] + layers[3 :: max(1, (len(layers) - 3) // 3)][:3]
    base_model = load_model(c["base"])
    base, tuned = base_model.components["unet"], load_model(c["tuned"]).components["unet"]
    adapters = resolve(read_lora(c["out"]), naming_for(base_model))
    ours = exact = 0.0
    worst = 0.0
    for layer in sample:
        key = layer.target.weight_key
        d = tuned[key].load().to(device, torch.float64) - base[key].load().to(device, torch.float64)
        m = d.reshape(d.shape[0], -1)
        s = torch.linalg.svdvals(m)
        best = float((s[layer.rank :] ** 2).sum())
        approx = adapters[layer.target].delta(tuple(d.shape)).to(device, torch.float64)
        err = float(((d - approx) ** 2).sum())
        ours, exact = ours + err, exact + best
        worst = max(worst, err / best if best > 0 else 1.0)
    Path(c["out"]).unlink(missing_ok=True)
    figures |= {
        "sampled_layers": len(sample),
        "error_vs_exact": ours / exact if exact else 1.0,
        "worst_layer": worst,
    }
    return figures


def probe_train(c: dict[str, Any]) -> dict[str, Any]:
    """A few steps of one training command through its service: step times, peak memory, finite losses."""
    import torch

    from sdcompress.training.config import AdapterSpec, DataConfig, TrainConfig

    device, out = c["device"], Path(c["out"])
    data = DataConfig(data_dir=Path(c["images"]), resolution=int(c["resolution"]))
    train = TrainConfig(
        work_dir=out.with_name(out.name + ".train"),
        overwrite=True,
        max_steps=int(c["steps"]),
        lr=1e-5,
        checkpoint_every=0,
        optimizer=c.get("optimizer", "adamw"),
        mixed_precision=c["mixed_precision"],
        gradient_checkpointing=True,
        cpu=device == "cpu",
    )
    stamps: list[float] = []
    losses: list[dict[str, float]] = []

    def on_event(e) -> None:
        if e.kind == "step":
            stamps.append(time.perf_counter())
            losses.append(dict(e.losses))

    t0 = time.perf_counter()
    command = c["command"]
    if command == "distill":
        from sdcompress.services.distill import DistillRequest, distill

        distill(DistillRequest(c["model"], str(c["student"]), out, data, train), on_event)
    elif command.startswith("dmd2"):
        from sdcompress.services.distill import DistillRequest, distill
        from sdcompress.training.config import ConsistencyConfig, DmdConfig

        student = str(c["student"]) if c.get("student") else None
        consistency = ConsistencyConfig(objective="dmd2", lora=c.get("lora"))
        dmd = DmdConfig(fake_lora=c.get("fake_lora"), fake_updates=2, gan_weight=5e-3)
        request = DistillRequest(c["model"], student, out, data, train, consistency=consistency, dmd=dmd)
        distill(request, on_event)
    elif command == "finetune":
        from sdcompress.services.finetune import FinetuneRequest, finetune

        finetune(FinetuneRequest(c["model"], out, data, train), on_event)
    else:
        from sdcompress.services.lora_train import LoraTrainRequest, lora_train

        lora_train(LoraTrainRequest(c["model"], out, data, train, adapter=AdapterSpec(rank=16)), on_event)
    total = time.perf_counter() - t0
    bad = [
        f"step {i + 1}: {k}={v}" for i, d in enumerate(losses) for k, v in d.items() if not math.isfinite(v)
    ]
    if bad or not losses:
        raise SystemExit(f"{command}: losses not finite ({'; '.join(bad[:4]) or 'no step reported'})")
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(train.work_dir, ignore_errors=True)
    return {
        "steps": len(losses),
        "mixed_precision": c["mixed_precision"],
        "optimizer": str(train.optimizer.value if hasattr(train.optimizer, "value") else train.optimizer),
        "step_s": round(statistics.median(gaps), 3) if gaps else None,
        "first_step_s": round(stamps[0] - t0, 2),
        "total_s": round(total, 2),
        "last_loss": losses[-1],
        "losses_finite": True,
        **_peaks(device),
        "torch_threads": torch.get_num_threads(),
    }


PROBES = {"build": probe_build, "extract": probe_extract, "train": probe_train}


# ---------------------------------------------------------------------------- report


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, float | int) and not isinstance(x, bool) else str(x)


def _highlights(s: StepResult) -> str:
    m = s.metrics
    if not s.ok:
        return s.error or ""
    if s.name.startswith("extract"):
        gpu = f", peak GPU {m['peak_gpu_gib']} GiB" if "peak_gpu_gib" in m else ""
        return (f"{m['seconds']} s, peak RSS {m['peak_rss_gib']} GiB{gpu}; error vs exact SVD "
                f"{m['error_vs_exact']:.4f}x on {m['sampled_layers']} layers (worst {m['worst_layer']:.4f}x)")  # fmt: skip
    if s.name in ("distill", "finetune", "lora-train"):
        gpu = f", peak GPU {m['peak_gpu_gib']} GiB" if "peak_gpu_gib" in m else ""
        return (f"{m['steps']} steps {m['mixed_precision']} {m['optimizer']}: {_fmt(m['step_s'])} s/step, "
                f"peak RSS {m['peak_rss_gib']} GiB{gpu}, losses finite")  # fmt: skip
    if s.name == "convert":
        return ", ".join(f"{k} {v}" for k, v in m.items())
    if s.name == "prune":
        return ", ".join(f"{k} {v['seconds']} s ({_fmt(v['parameters'], ',')} params)" for k, v in m.items())
    if s.name == "build":
        return f"models {m['models_seconds']} s, SDXL file {m['sdxl_bytes'] / 2**30:.2f} GiB"
    if s.name == "bench":
        return f"{len(m['rows'])} rows, {m['device']} {m['dtype']} (table below)"
    if s.name == "quantize":
        made = "; ".join(f"{label} {fmt} {q['seconds']} s" for label, f in m["files"].items()
                         for fmt, q in f.items())  # fmt: skip
        return f"{made} (table below)"
    return ", ".join(f"{k} {v}" for k, v in m.items() if not isinstance(v, dict | list))[:200]


def markdown(report: dict[str, Any], results: list[StepResult]) -> str:
    lines = [
        f"# GPU suite ({report['mode']}), {report['date']}",
        "",
        f"Device: {report['device']}. torch {report['torch']}. Total {report['total_seconds']:.0f} s "
        f"of a {report['budget_seconds']:.0f} s budget."
        + (f" Steps run (`--only`): {', '.join(report['only'])}." if report.get("only") else ""),
        "",
        "| step | status | seconds | budget s | figures |",
        "|---|---|---:|---:|---|",
    ]
    for s in results:
        status = "ok" if s.ok else "**FAILED**"
        try:
            cell = _highlights(s)
        except (KeyError, TypeError, ValueError):  # a figure missing must not cost the whole report
            cell = json.dumps(s.metrics, default=str)[:300]
        cell = cell.replace("|", "\\|")
        lines.append(f"| {s.name} | {status} | {s.seconds:.1f} | {s.budget_s:.0f} | {cell} |")
    bench = next((s for s in results if s.name == "bench" and s.ok), None)
    if bench:
        lines += [
            "",
            f"U-Net denoising steps/s at {report['resolution']} px, CFG on ({bench.metrics['dtype']}); "
            "published: Segmind's SSD-1B/SDXL pipeline it/s on an A100 80GB.",
            "",
            "| model | U-Net params | batch | steps/s | vs first | published vs SDXL | peak memory |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in bench.metrics["rows"]:
            pub = f"{row['published_vs_sdxl']:.2f}x" if row["published_vs_sdxl"] else "-"
            if row["model"] == "koala-700m" and row["batch"] == 1:
                pub = KOALA_PUBLISHED
            peak = f"{row['peak_memory'] / 2**30:.2f} GiB" if row["peak_memory"] else "-"
            lines.append(
                f"| {row['model']} | {row['parameters']:,} | {row['batch']} | {_fmt(row['steps_per_s'])} | "
                f"{_fmt(row['vs_sdxl'], '.2f')}x | {pub} | {peak} |"
            )
    quant = next((s for s in results if s.name == "quantize" and s.ok), None)
    if quant:
        lines += ["", *_quant_table(quant.metrics)]
    ex = {s.name: s.metrics for s in results if s.name.startswith("extract") and s.ok}
    if len(ex) == 2 and report["mode"] == "gpu":
        ratio = ex["extract-cpu"]["seconds"] / ex["extract-cuda"]["seconds"]
        lines += ["", f"extract-lora: the GPU is {ratio:.1f}x faster than the CPU cores of this machine."]
    failed = [s.name for s in results if not s.ok]
    lines += ["", f"Failed: {', '.join(failed)}." if failed else "Every step passed."]
    return "\n".join(lines) + "\n"


def _quant_table(m: dict[str, Any]) -> list[str]:
    """The quantize step's table: each file's size and bench figures beside its source's."""
    lines = [
        f"fp8 files against their source ({m['dtype']}), U-Net denoising steps/s at {m['resolution']} px, "
        "batch 1, CFG on; `quantize` time and file size from the command, peak memory from bench.",
        "",
        "| model | format | quantize s | file | vs source | steps/s | vs source | peak memory | vs source "
        "| fp8 weights ran as |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in m["rows"]:
        made = m["files"][row["model"]].get(row["format"], {})
        peak = f"{row['peak_memory'] / 2**30:.3f} GiB" if row["peak_memory"] else "-"
        size = f"{row['file_bytes'] / 2**30:.3f} GiB" if row["file_bytes"] else "-"
        how = row["compute"].split(": ", 1)[-1]  # the note without the file's name
        lines.append(
            f"| {row['model']} | {row['format']} | {_fmt(made.get('seconds'))} | {size} | "
            f"{_fmt(row['file_vs_source'], '.2f')}x | {_fmt(row['steps_per_s'])} | "
            f"{_fmt(row['speed_vs_source'], '.2f')}x | {peak} | {_fmt(row['memory_vs_source'], '.2f')}x | {how} |"
        )
    return lines


def _device_name(plan: Plan) -> str:
    import torch

    if plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), {os.cpu_count()} CPU cores"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def selected_steps(only: str | None) -> tuple[str, ...]:
    """The steps `--only A,B` runs: those named and every step they need, in the suite's order."""
    if only is None:
        return STEP_NAMES
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in STEP_NAMES]
    if unknown or not names:
        raise ValueError(
            f"--only takes step names from {', '.join(STEP_NAMES)}; got {', '.join(unknown) or 'none'}."
        )
    wanted: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += NEEDS.get(name, ())
    return tuple(n for n in STEP_NAMES if n in wanted)


def run_suite(plan: Plan, out: Path, keep: bool, only: tuple[str, ...] = STEP_NAMES) -> int:
    import torch

    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    r = Runner(plan, out, work)
    t0 = time.monotonic()
    steps = {
        "build": step_build,
        "prune": step_prune,
        "bench": step_bench,
        "quantize": step_quantize,
        "extract-cuda": lambda r: step_extract(r, plan.device),
        "extract-cpu": lambda r: step_extract(r, "cpu"),
        "convert": step_convert,
        "data-prepare": step_data_prepare,
        "distill": lambda r: step_train(r, "distill"),
        "finetune": lambda r: step_train(r, "finetune"),
        "lora-train": lambda r: step_train(r, "lora-train"),
        "dmd2-lora": lambda r: step_train(r, "dmd2-lora"),
        "dmd2-full": lambda r: step_train(r, "dmd2-full"),
        "pytest-gpu": step_pytest,
    }
    for name in only:
        r.step(name, lambda fn=steps[name]: fn(r))
    report = {
        "mode": "tiny" if plan.tiny else "gpu",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": _device_name(plan),
        "torch": torch.__version__,
        "resolution": plan.xl_resolution,
        "total_seconds": time.monotonic() - t0,
        "budget_seconds": plan.total_s,
        "only": None if only == STEP_NAMES else list(only),
        "published": {
            "segmind_a100_it_s_ssd1b_sdxl": {str(k): v for k, v in SEGMIND_A100_IT_S.items()},
            "koala": KOALA_PUBLISHED,
        },
        "steps": [asdict(s) for s in r.results],
        "failed": [s.name for s in r.results if not s.ok],
    }
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu_suite.md").write_text(markdown(report, r.results))
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    if report["failed"]:
        print(
            f"gpu_suite: failed steps: {', '.join(report['failed'])} (see {out / 'gpu_suite.md'})",
            file=sys.stderr,
        )
        return 1
    print(
        f"gpu_suite: every step passed in {report['total_seconds']:.0f} s; {out / 'gpu_suite.md'}",
        file=sys.stderr,
    )
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="Folder for gpu_suite.json, gpu_suite.md and the step logs.")
    p.add_argument("--tiny", action="store_true", help="The same steps on the CPU with the tiny models.")
    p.add_argument("--keep", action="store_true", help="Keep OUT/work (students, LoRAs, images).")
    p.add_argument(
        "--only",
        metavar="STEP[,STEP...]",
        help=f"Run these steps and the steps they need (of: {', '.join(STEP_NAMES)}).",
    )
    p.add_argument(
        "--total-s",
        type=float,
        help="The run's total time budget in seconds (default: the plan's; 570 fits a 10-minute command).",
    )
    p.add_argument("--probe", choices=sorted(PROBES), help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe:  # child: one service in-process, its figures as JSON on the last line
        print(json.dumps(PROBES[args.probe](json.loads(args.config)), default=str))
        return
    if not args.out:
        p.error("--out is required")
    try:
        only = selected_steps(args.only)
    except ValueError as e:
        print(f"gpu_suite: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.total_s is not None and not args.total_s > 0:
        print(f"gpu_suite: --total-s must be above 0 seconds, got {args.total_s:g}.", file=sys.stderr)
        raise SystemExit(2)
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print(
            "gpu_suite: no CUDA GPU here; run it on a CUDA machine, or use --tiny on the CPU.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    plan = Plan.make(args.tiny)
    if args.total_s is not None:
        plan = replace(plan, total_s=args.total_s)
    raise SystemExit(run_suite(plan, Path(args.out), args.keep, only))


if __name__ == "__main__":
    main()
