"""One full-size SD 1.5 round trip with random fp16 weights (slow; CI runs it).

The 2.1 GB source lives in the sdcompress cache (made once, shared with the
benchmarks); the 4 GB this test writes is deleted as soon as it has passed.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from sdcompress.checkpoint.safetensors_io import SafetensorsFile
from sdcompress.testing import cached_random_model


@pytest.mark.slow
def test_full_size_sd15_round_trip_is_bit_identical(cli, tmp_path):
    src = cached_random_model("sd1", "single-file")
    assert src.stat().st_size > 2_000_000_000
    r = cli("convert", src, "-o", tmp_path / "folder")
    assert r.code == 0, r
    r = cli("convert", tmp_path / "folder", "-o", tmp_path / "back.safetensors")
    assert r.code == 0, r
    a, b = SafetensorsFile(src), SafetensorsFile(tmp_path / "back.safetensors")
    assert a.keys() == b.keys()
    for k in a.keys():  # noqa: SIM118 - SafetensorsFile is not a mapping
        ta, tb = a.lazy(k).load(), b.lazy(k).load()
        assert ta.dtype == tb.dtype == torch.float16 and torch.equal(ta, tb), k
    info = cli("info", tmp_path / "folder", "--json")
    assert '"family": "sd1"' in info.stdout
    # passed: free the 4 GB now rather than at the end of the session (a failure keeps them to inspect)
    shutil.rmtree(tmp_path / "folder")
    (tmp_path / "back.safetensors").unlink()
