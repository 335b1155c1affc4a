"""Third-party log lines and warnings stay out of normal output; `--debug` lets them through (issue 16.6)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from sdcompress.cli import _noise
from sdcompress.training.demo_data import write_demo_dataset

# What transformers 5 and diffusers 0.42 print on every training run (and what they may print elsewhere).
NOISE = ("requires torchvision", "should be kept in float32", "[transformers]", "FutureWarning")


def _sdcompress(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    """A fresh process, so no library is imported before the CLI starts (as for a user)."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}
    return subprocess.run(
        [sys.executable, "-m", "sdcompress", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow  # over ~6 s on 2 idle cores: the fast lane stays under 4 minutes
def test_convert_and_training_print_no_library_noise(tmp_path):
    r = _sdcompress("convert", "tiny-sd", "-o", tmp_path / "sd.safetensors", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = write_demo_dataset(tmp_path / "data", 2, size=32)
    r2 = _sdcompress(
        "lora", "train", "--model", "tiny-sd", "--data", data, "-o", tmp_path / "lora",
        "--max-steps", "1", "--resolution", "32", "--num-workers", "0", "--rank", "2",
        cwd=tmp_path,
    )  # fmt: skip
    assert r2.returncode == 0, r2.stderr
    for text in NOISE:
        assert text not in r.stderr + r.stdout, r.stderr
        assert text not in r2.stderr + r2.stdout, r2.stderr


def _records(name: str) -> tuple[bool, bool]:
    """Whether a WARNING and an ERROR of library logger `name` would be emitted."""
    logger = logging.getLogger(f"{name}.models.something")
    return logger.isEnabledFor(logging.WARNING), logger.isEnabledFor(logging.ERROR)


def _third_party_warning_shown() -> bool:
    with warnings.catch_warnings(record=True) as caught:
        # a warning attributed to a diffusers module, as its deprecation helpers raise them
        warnings.warn_explicit("deprecated", FutureWarning, "modeling_utils.py", 1, module="diffusers.models")
    return bool(caught)


def test_quiet_by_default_and_debug_restores(monkeypatch):
    for name in _noise.VERBOSITY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_noise, "_USER_ENV", dict.fromkeys(_noise.VERBOSITY_ENV))
    levels = {name: logging.getLogger(name).level for name in _noise.LOGGERS}
    try:
        with warnings.catch_warnings():
            _noise.configure(debug=False)
            assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
            assert os.environ["DIFFUSERS_VERBOSITY"] == "error"
            for name in ("transformers", "diffusers", "huggingface_hub", "accelerate", "peft"):
                assert _records(name) == (False, True), name  # errors still reach the user
            assert not _third_party_warning_shown()
        with warnings.catch_warnings():
            _noise.configure(debug=True)
            assert "TRANSFORMERS_VERBOSITY" not in os.environ
            for name in ("transformers", "diffusers", "huggingface_hub", "accelerate", "peft"):
                assert _records(name) == (True, True), name
            assert _third_party_warning_shown()
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def test_the_users_own_verbosity_wins(monkeypatch):
    monkeypatch.setattr(
        _noise, "_USER_ENV", {**dict.fromkeys(_noise.VERBOSITY_ENV), "DIFFUSERS_VERBOSITY": "info"}
    )
    monkeypatch.setenv("DIFFUSERS_VERBOSITY", "info")
    before = logging.getLogger("diffusers").level
    logging.getLogger("diffusers").setLevel(logging.INFO)
    levels = {name: logging.getLogger(name).level for name in _noise.LOGGERS}
    try:
        with warnings.catch_warnings():
            _noise.configure(debug=False)
        assert os.environ["DIFFUSERS_VERBOSITY"] == "info"
        assert logging.getLogger("diffusers").level == logging.INFO
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        logging.getLogger("diffusers").setLevel(before)
