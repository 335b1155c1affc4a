"""CLI start-up: `sdcompress --help`, commands' help and usage errors beside `hf --help`, and the app's imports.

    python benchmarks/cli_startup.py --runs 10

Each command runs `--runs` times in a fresh process; the script prints the
median and the best wall time of each, then the slowest imports of
`python -X importtime -c "import sdcompress.cli.app"` and whether torch is
among them. `hf` is huggingface_hub's own Typer CLI, a fair reference for what
a Typer app with rich help costs to start. Target (issue 10): under 0.5 s on an
idle machine for help and usage errors.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time


def _time(cmd: list[str], runs: int) -> tuple[float, float]:
    """(median, best) wall seconds of `runs` fresh runs of `cmd` (output discarded, exit code ignored)."""
    env = {**os.environ, "COLUMNS": "100"}
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def _import_profile(top: int) -> tuple[list[tuple[int, str]], bool]:
    """The `top` slowest cumulative imports of the app (microseconds, module), and whether torch is one."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import sdcompress.cli.app"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
        rows.append((int(cumulative), name))
    torch = any(name == "torch" for _, name in rows)
    return sorted(rows, reverse=True)[:top], torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--top", type=int, default=8, help="slowest imports to list")
    args = parser.parse_args()

    installed = shutil.which("sdcompress")
    sdc = [installed] if installed else [sys.executable, "-m", "sdcompress"]
    commands = {
        "sdcompress --help": [*sdc, "--help"],
        "sdcompress finetune --help": [*sdc, "finetune", "--help"],
        "sdcompress merge --help": [*sdc, "merge", "--help"],
        "sdcompress lora train --bogus (usage error)": [*sdc, "lora", "train", "--bogus"],
        "sdcompress convert --bogus (usage error)": [*sdc, "convert", "--bogus"],
    }
    hf = shutil.which("hf")
    if hf:
        commands["hf --help"] = [hf, "--help"]
    print(f"{'command':45} {'median s':>9} {'best s':>8}   ({args.runs} runs, load {os.getloadavg()[0]:.2f})")
    for label, cmd in commands.items():
        median, best = _time(cmd, args.runs)
        print(f"{label:45} {median:9.3f} {best:8.3f}")
    rows, torch = _import_profile(args.top)
    print(f"\npython -X importtime -c 'import sdcompress.cli.app': torch imported: {torch}")
    for micros, name in rows:
        print(f"  {micros / 1000:8.1f} ms  {name}")


if __name__ == "__main__":
    main()
