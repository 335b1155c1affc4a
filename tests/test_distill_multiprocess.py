"""Two processes under `accelerate launch` run distill (DDP over gloo on the CPU): one output, identical weights.

`accelerate launch --cpu --num_processes 2` starts two processes only through
mpirun; without MPI it starts one. The torch.distributed launcher
(`--multi_gpu`) with the run on the CPU (`TrainConfig.cpu`, i.e. `--cpu` of
the sdcompress command) gives the real two-rank gloo run on any machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sdcompress.hub.lineage import RUN_RECORD

SCRIPT = textwrap.dedent(
    """
    import hashlib, sys
    from pathlib import Path
    import torch
    from accelerate import PartialState
    from sdcompress.services.distill import DistillRequest, distill
    from sdcompress.training.data import DataConfig
    from sdcompress.training.distill_task import DistillTask
    from sdcompress.training.engine import TrainConfig

    student, data, out, hashes = sys.argv[1:5]

    def close_and_hash(self, _close=DistillTask.close):
        digest = hashlib.sha256()
        for key, value in sorted(self.parts.unet.state_dict().items()):
            digest.update(key.encode() + value.detach().cpu().numpy().tobytes())
        rank = PartialState().process_index
        (Path(hashes) / f"rank{rank}.txt").write_text(digest.hexdigest())
        _close(self)

    DistillTask.close = close_and_hash
    out = Path(out)
    request = DistillRequest(
        teacher="tiny-sd",
        student=student,
        output=out,
        data=DataConfig(data_dir=Path(data), resolution=32),
        train=TrainConfig(
            work_dir=out.with_name(out.name + ".train"), max_steps=3, batch_size=1, lr=1e-3,
            checkpoint_every=2, cpu=True, seed=5,
        ),
    )
    result = distill(request)
    assert result.steps == 3, result
    assert PartialState().num_processes == 2 and PartialState().backend == "gloo"
    """
)


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("the accelerate launcher is not installed")
    from test_distill import make_student

    from sdcompress.training.demo_data import write_demo_dataset

    student = make_student("tiny-sd", "bk-small", tmp_path / "student")
    data = write_demo_dataset(tmp_path / "data", 4, size=32)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    hashes = tmp_path / "hashes"
    hashes.mkdir()
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
        str(script), str(student), str(data), str(out), str(hashes),
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ranks = sorted(p.read_text() for p in hashes.glob("rank*.txt"))
    assert len(ranks) == 2 and ranks[0] == ranks[1], "the two ranks ended with different weights"
    outputs = [p for p in tmp_path.iterdir() if p.name.startswith("out") and not p.name.endswith(".train")]
    assert outputs == [out], outputs  # one output, no leftover temporary folders
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["steps"] == 3 and record["options"]["batch_size"] == 1
    from diffusers import UNet2DConditionModel

    saved = UNet2DConditionModel.from_pretrained(out / "unet")
    digest = hashlib.sha256()
    for key, value in sorted(saved.state_dict().items()):
        digest.update(key.encode() + value.numpy().tobytes())
    assert digest.hexdigest() == ranks[0]  # what was written is what both ranks hold
