"""Our streaming writer produces files the reference library reads, and our reader agrees with it."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdcompress.checkpoint.safetensors_io import SafetensorsFile, read_state_dict, write_safetensors
from sdcompress.checkpoint.tensors import LazyTensor, concat_rows, lazy_state_dict

TENSORS = {
    "a": torch.randn(3, 5),
    "b": torch.randn(2, 2).half(),
    "c": torch.randn(4).bfloat16(),
    "d": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "scalar": torch.tensor(2.5),
    "empty": torch.empty(0, 3),
    "flag": torch.tensor([True, False]),
}


def test_written_file_reads_with_safetensors(tmp_path):
    write_safetensors(tmp_path / "x.safetensors", lazy_state_dict(TENSORS), {"hello": "world"})
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"hello": "world"}
        for k, v in TENSORS.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and torch.equal(got, v), k


def test_reader_agrees_with_safetensors(tmp_path):
    save_file(TENSORS, str(tmp_path / "ref.safetensors"), {"m": "1"})
    f = SafetensorsFile(tmp_path / "ref.safetensors")
    assert f.metadata == {"m": "1"}
    for k, lt in f.state_dict().items():
        assert torch.equal(lt.load(), TENSORS[k]), k


def test_byte_copies_of_slices_and_concatenations(tmp_path):
    fused = torch.randn(9, 4)
    save_file({"fused": fused}, str(tmp_path / "src.safetensors"))
    lt = read_state_dict(tmp_path / "src.safetensors")["fused"]
    q, k, v = lt.rows(0, 3), lt.rows(3, 6), lt.rows(6, 9)
    assert q.raw is not None and k.raw[0].offset == q.raw[0].offset + 3 * 4 * 4
    out = {
        "q": q,
        "k": k,
        "v": v,
        "again": concat_rows([q, k, v]),
        "t": lt.transposed(),
        "r": lt.reshaped((36,)),
    }
    write_safetensors(tmp_path / "dst.safetensors", out)
    got = read_state_dict(tmp_path / "dst.safetensors")
    assert torch.equal(got["q"].load(), fused[:3]) and torch.equal(got["v"].load(), fused[6:])
    assert torch.equal(got["again"].load(), fused)
    assert torch.equal(got["t"].load(), fused.t())
    assert torch.equal(got["r"].load(), fused.reshape(36))


def test_declared_shape_is_enforced(tmp_path):
    import pytest

    bad = {"x": LazyTensor((2, 2), torch.float32, lambda: torch.zeros(3))}
    with pytest.raises(RuntimeError):
        write_safetensors(tmp_path / "bad.safetensors", bad)
    assert not list(tmp_path.iterdir())


def test_load_threads_write_the_same_bytes_in_order(tmp_path):
    """With load threads the file is byte for byte the one written without them, copies and
    loads interleaved, and each load ran with one torch thread (parallel across tensors)."""
    save_file({"src": torch.randn(6, 4)}, str(tmp_path / "src.safetensors"))
    copied = read_state_dict(tmp_path / "src.safetensors")["src"]
    threads = []

    def loaded(t: torch.Tensor):
        def load():
            threads.append(torch.get_num_threads())
            return t

        return LazyTensor(tuple(t.shape), t.dtype, load)

    sd = {}
    for i in range(12):
        sd[f"t{i}"] = loaded(torch.randn(i + 1, 3))
        if i % 4 == 0:
            sd[f"copy{i}"] = copied
    write_safetensors(tmp_path / "serial.safetensors", sd)
    threads.clear()
    write_safetensors(tmp_path / "threads.safetensors", sd, load_workers=3)
    assert (tmp_path / "serial.safetensors").read_bytes() == (tmp_path / "threads.safetensors").read_bytes()
    assert threads == [1] * 12


def test_a_failed_load_in_a_thread_leaves_nothing(tmp_path):
    import pytest

    def boom():
        raise RuntimeError("boom")

    sd = {f"t{i}": LazyTensor.of(torch.ones(2)) for i in range(5)}
    sd["bad"] = LazyTensor((2,), torch.float32, boom)
    sd.update({f"u{i}": LazyTensor.of(torch.ones(2)) for i in range(5)})
    with pytest.raises(RuntimeError, match="boom"):
        write_safetensors(tmp_path / "x.safetensors", sd, load_workers=2)
    assert not list(tmp_path.iterdir())
