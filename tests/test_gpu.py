"""The CUDA paths against the CPU: SVD batching, conversion, a mixed-precision distillation step.

Each test body runs on every device at hand: the `cpu` case runs everywhere (so the checks
themselves are tested on every change), the `cuda` case is marked `gpu` and skipped without
CUDA. `pytest -m gpu` runs the CUDA cases alone (benchmarks/gpu_suite.py does).
"""

from __future__ import annotations

import filecmp
import math
from pathlib import Path

import pytest
import torch

from sdcompress.lowrank.svd import EXACT_MIN_DIM, low_rank, low_rank_many

CUDA = pytest.param(
    "cuda",
    id="cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
)
DEVICES = [pytest.param("cpu", id="cpu"), CUDA]


def _structured(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A weight change as fine-tunes make them: rank-8 structure over a small full-rank floor."""
    m, n = shape[0], math.prod(shape[1:])
    low = torch.randn(m, 8, generator=generator) @ torch.randn(8, n, generator=generator) / 8**0.5
    return (low + 1e-2 * torch.randn(m, n, generator=generator)).reshape(shape)


@pytest.mark.parametrize("device", DEVICES)
def test_svd_batched_on_device_equals_the_cpu_result(device):
    """Same-shaped layers stacked on the device give the factors the CPU computes one at a time."""
    g = torch.Generator().manual_seed(0)
    # larger than EXACT_MIN_DIM, so the randomized path (not the exact fallback) is what is compared
    side = EXACT_MIN_DIM + 64
    shapes = [(side, 2 * side)] * 3 + [(side, side // 4, 3, 3)] * 2
    weights = [_structured(s, g) for s in shapes]
    batched = low_rank_many(weights, [8] * len(weights), device=device)
    for w, got in zip(weights, batched, strict=True):
        want = low_rank(w, 8)  # the CPU's one-matrix path
        assert got.up.device.type == "cpu" and got.up.dtype == torch.float32
        product, reference = got.up @ got.down, want.up @ want.down
        assert torch.linalg.matrix_norm(product - reference) <= 1e-3 * torch.linalg.matrix_norm(reference)
        assert torch.allclose(got.s, want.s, rtol=1e-4)
        assert got.energy == pytest.approx(want.energy, rel=1e-5)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_convert_on_device_bit_equals_the_cpu(device, dtype, tmp_path):
    """A dtype-changing conversion gives the same bytes whatever device it ran on."""
    from sdcompress.services.convert import ConvertRequest, convert

    paths = []
    for i, where in enumerate((device, "cpu")):  # on the CPU: twice, the same bytes
        paths.append(tmp_path / f"{i}-{where}-{dtype}.safetensors")
        convert(ConvertRequest(src="tiny-sd", output=str(paths[-1]), dtype=dtype, device=where))
    assert filecmp.cmp(paths[0], paths[1], shallow=False)
    # the cast happened: the fp32 tiny model is written at half the size
    from sdcompress.checkpoint.safetensors_io import SafetensorsFile

    dtypes = {e[0] for e in SafetensorsFile(paths[0]).entries.values()}
    assert dtypes == {"F16" if dtype == "fp16" else "BF16"}, dtypes


def _state(path: Path, component: str) -> dict[str, torch.Tensor]:
    from sdcompress.checkpoint.resolve import load_model

    return {k: v.load() for k, v in load_model(str(path)).components[component].items()}


MIXED = [pytest.param("cpu", "bf16", id="cpu-bf16")] + [
    pytest.param("cuda", mp, id=f"cuda-{mp}", marks=CUDA.marks) for mp in ("fp16", "bf16")
]


@pytest.mark.parametrize(("device", "mixed_precision"), MIXED)
def test_mixed_precision_distill_step_is_finite_and_trains_only_the_student(
    device, mixed_precision, tmp_path
):
    from test_distill import make_student, request

    from sdcompress.checkpoint.tiny import tiny_model_path
    from sdcompress.services.distill import distill
    from sdcompress.training.demo_data import write_demo_dataset

    teacher = tiny_model_path("tiny-sdxl")
    student = make_student("tiny-sdxl", "ssd-1b", tmp_path / "student")
    data = write_demo_dataset(tmp_path / "data", 2, size=32)
    losses: list[dict[str, float]] = []
    req = request(
        str(teacher),
        student,
        data,
        tmp_path / "out",
        max_steps=2,
        batch_size=1,
        mixed_precision=mixed_precision,
        gradient_checkpointing=True,
        cpu=device == "cpu",
    )
    result = distill(req, lambda e: losses.append(dict(e.losses)) if e.kind == "step" else None)
    assert result.steps == 2 and len(losses) == 2
    assert all(math.isfinite(v) for step in losses for v in step.values()), losses
    assert {"task", "output"} <= set(losses[0]), losses[0]
    before, after = _state(student, "unet"), _state(result.output, "unet")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before), "student unchanged"
    assert all(torch.isfinite(t).all() for t in after.values())
    for component in ("vae", "text_encoder", "text_encoder_2"):  # the teacher's parts are copied untouched
        want, got = _state(teacher, component), _state(result.output, component)
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k].to(want[k].dtype)) for k in want), component


def test_on_device_routes_only_dtype_changes_through_the_device():
    """`convert --device` casts on the device; tensors that keep their dtype stay byte-range copies."""
    from sdcompress.checkpoint.tensors import LazyTensor, RawRange
    from sdcompress.services.convert import _on_device

    seen: list[str] = []
    half = torch.randn(4, 3, dtype=torch.float16)
    full = torch.randn(4, 3)
    steps = torch.arange(3)
    raw = (RawRange("model.safetensors", 0, half.nbytes),)
    sd = {
        "same": LazyTensor(tuple(half.shape), half.dtype, lambda: half, raw),
        "cast": LazyTensor(tuple(full.shape), full.dtype, lambda: seen.append("cast") or full),
        "int": LazyTensor(tuple(steps.shape), steps.dtype, lambda: steps),
    }
    out = _on_device(sd, torch.device("cpu"), torch.float16)
    assert out["same"] is sd["same"] and out["same"].raw == raw
    assert out["int"] is sd["int"]
    assert out["cast"].dtype == torch.float16 and not seen
    assert torch.equal(out["cast"].load(), full.to(torch.float16)) and seen == ["cast"]
    assert _on_device(sd, torch.device("cpu"), None) is sd
