"""A passing test run leaves next to nothing on disk, and shared models are made once (issue 19.2)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sdcompress.checkpoint.tiny import cache_dir
from sdcompress.testing import cached_random_model, random_cache_dir


def test_pytest_keeps_temporary_folders_of_failed_tests_only(pytestconfig):
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"


def test_the_model_cache_outlives_the_run_and_is_not_a_fresh_temporary_folder():
    cache = Path(os.environ["SDCOMPRESS_CACHE"])
    assert cache == cache_dir()
    assert not cache.name.startswith("sdcompress-test-cache-")


def test_a_cached_random_model_is_written_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SDCOMPRESS_CACHE", str(tmp_path))
    path = cached_random_model("tiny-sd", "single-file", seed=3)
    assert path.parent == random_cache_dir() == tmp_path / "random" and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert cached_random_model("tiny-sd", "single-file", seed=3) == path
    assert path.stat().st_mtime_ns == stamp  # reused, not rewritten
    folder = cached_random_model("tiny-sd", "diffusers", seed=3)
    assert (folder / "model_index.json").is_file()
    assert sorted(p.name for p in (tmp_path / "random").iterdir() if not p.name.endswith(".lock")) == sorted(
        [path.name, folder.name]
    )


@pytest.mark.slow  # over ~6 s on 2 idle cores: the fast lane stays under 4 minutes
def test_the_built_in_tokenizer_folder_goes_when_the_process_ends():
    code = (
        "from sdcompress.checkpoint.tiny import tiny_model\n"
        "from sdcompress.checkpoint.instantiate import tokenizer_dir\n"
        "p = tokenizer_dir(tiny_model('tiny-sd'), 'tokenizer')\n"
        "assert p.is_dir()\n"
        "print(p)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip())
    assert path.is_relative_to(tempfile.gettempdir())
    assert not path.parent.exists()
