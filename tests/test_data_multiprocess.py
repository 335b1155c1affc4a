"""Prepared data under `accelerate launch` with two CPU processes (gloo): one dataset, disjoint shards.

Rank r writes shards r, r+2, ... and rank 0 merges one index: the bytes equal a
one-process prepare. Training from the shards, each rank reads only its own
shards, and a run stopped with Ctrl-C and resumed ends with the weights of an
uninterrupted run. The launcher setup is the one of test_distill_multiprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("webdataset")

SCRIPT = textwrap.dedent(
    """
    import json, signal, sys
    from dataclasses import replace
    from pathlib import Path
    import torch
    from accelerate import PartialState
    from sdcompress.services.data_prepare import DataPrepareRequest, data_prepare
    from sdcompress.services.distill import DistillRequest, distill
    from sdcompress.training import shards
    from sdcompress.training.config import DataConfig, TrainConfig

    student, images, root = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    state = PartialState(cpu=True)
    assert state.num_processes == 2 and state.backend == "gloo"
    rank = state.process_index

    prepared = root / "prepared"
    result = data_prepare(DataPrepareRequest(
        model="tiny-sd", output=prepared, data=DataConfig(data_dir=images, resolution=32),
        dtype="fp32", shard_size=2, batch_size=2, device="cpu",
    ))
    assert result.output == prepared and result.samples == 8, result

    read = set()
    _read = shards._Shards.read
    def logged(self, index, _read=_read):
        read.add(self.locate(index)[0])
        return _read(self, index)
    shards._Shards.read = logged

    def run(name, callback=None, **changes):
        out = root / name
        train = TrainConfig(work_dir=root / f"{name}.train", max_steps=4, batch_size=1, lr=1e-3,
                            checkpoint_every=0, cpu=True, seed=5)
        request = DistillRequest(teacher="tiny-sd", student=student, output=out,
                                 data=DataConfig(data_dir=prepared, resolution=32),
                                 train=replace(train, **changes))
        return distill(request, callback)

    straight = run("straight")
    assert straight.steps == 4
    def ctrl_c_at_2(event):
        if event.kind == "step" and event.step == 2:
            signal.raise_signal(signal.SIGINT)
    stopped = run("resumed", ctrl_c_at_2, checkpoint_every=100)
    assert stopped.interrupted and stopped.steps == 3, stopped
    resumed = run("resumed", checkpoint_every=100, resume="latest")
    assert resumed.steps == 4 and resumed.resumed_from is not None
    (root / f"read{rank}.json").write_text(json.dumps(sorted(read)))
    """
)


@pytest.mark.slow
def test_two_processes_prepare_one_dataset_and_train_from_disjoint_shards(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("the accelerate launcher is not installed")
    from conftest import tree_digest
    from safetensors.torch import load_file
    from test_distill import make_student

    from sdcompress.services.data_prepare import DataPrepareRequest, data_prepare
    from sdcompress.training.config import DataConfig
    from sdcompress.training.demo_data import write_demo_dataset

    student = make_student("tiny-sd", "bk-small", tmp_path / "student")
    images = write_demo_dataset(tmp_path / "images", 8, size=32)
    root = tmp_path / "runs"
    root.mkdir()
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29519",
        str(script), str(student), str(images), str(root),
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    single = tmp_path / "single"
    data_prepare(
        DataPrepareRequest(
            model="tiny-sd",
            output=single,
            data=DataConfig(data_dir=images, resolution=32),
            dtype="fp32",
            shard_size=2,
            batch_size=2,
            device="cpu",
        )
    )
    relative = lambda root_: {Path(k).relative_to(root_): v for k, v in tree_digest(root_).items()}  # noqa: E731
    assert relative(root / "prepared") == relative(single)  # two writers, one merged index: same bytes

    read = [set(json.loads((root / f"read{r}.json").read_text())) for r in (0, 1)]
    assert read[0] == {0, 2} and read[1] == {1, 3}, read  # every rank its own shards, none shared

    weights = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(root / "straight" / weights), load_file(root / "resumed" / weights)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run differs from the uninterrupted one"
