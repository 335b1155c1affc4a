"""Shared fixtures: the model cache, one torch thread, and a way to run the CLI in-process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from sdcompress.checkpoint.tiny import cache_dir

# Every test (and every subprocess it starts) reads the tiny models and the full-size random models
# from one cache that outlives the run (SDCOMPRESS_CACHE, by default ~/.cache/sdcompress): each is
# deterministic and versioned, made once and reused, so test runs do not pile up copies in the
# system's temporary folder. The README's development section lists it. Tests never touch the network.
os.environ["SDCOMPRESS_CACHE"] = str(cache_dir())
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test models are tiny: one thread per process is as fast on an idle 2-core machine and stays
# fast on a busy one, where OpenMP threads spinning against each other make torch 10-20x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")


torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`, capped at 4: a worker holds its own tiny models and a full-size test can hold a
    2 GB SD 1.5, so a many-core box would run out of memory long before it ran out of cores."""
    return max(1, min(os.cpu_count() or 1, 4))


class CliResult:
    def __init__(self, code: int, stdout: str, stderr: str):
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, stdout={self.stdout[-500:]!r}, stderr={self.stderr[-1500:]!r})"


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `sdcompress ARGS...` through the real entry point (error mapping included)."""
    from sdcompress.cli.app import main

    def run(*args: str) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["sdcompress", *map(str, args)])
        capsys.readouterr()
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def tree_digest(path: Path) -> dict[str, bytes]:
    """Every file's bytes under `path` (or of `path`), to prove inputs were not modified."""
    import hashlib

    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).digest() for p in files}


def offline_weight_name(path: Path | str) -> dict[str, str]:
    """What diffusers needs, besides a LoRA file's path, to read it with HF_HUB_OFFLINE set (as tests run).

    diffusers < 0.40 refuses a file path without `weight_name` offline; every version accepts the
    file's own name, but newer ones get the bare path, as diffusers documents and users call it.
    """
    import diffusers
    from packaging.version import Version

    return {} if Version(diffusers.__version__) >= Version("0.40") else {"weight_name": Path(path).name}


def load_lora_file(pipe, path: Path | str) -> None:
    """`pipe.load_lora_weights(file)`, as a user calls it (see `offline_weight_name`)."""
    pipe.load_lora_weights(str(path), **offline_weight_name(path))
