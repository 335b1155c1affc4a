"""The shared training loop: exact resume, Ctrl-C checkpoints, NaN stops, EMA output, validation grids.

These tests run the distill task on micro U-Nets (two levels, 8/16 channels)
inside the tiny-sd pipeline, so each step takes milliseconds and the loop's
bookkeeping is what is being tested.
"""

from __future__ import annotations

import importlib.util
import math
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sdcompress.errors import SdcError
from sdcompress.training import checkpoints as ckpt
from sdcompress.training.data import DataConfig
from sdcompress.training.demo_data import write_demo_dataset
from sdcompress.training.distill_task import DistillTask
from sdcompress.training.engine import TrainConfig, train
from sdcompress.training.features import pair_features
from sdcompress.training.task import DiffusionParts
from sdcompress.training.validation import ValidationConfig


def micro_unet(text_dim: int, layers: int, seed: int) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=layers,
        cross_attention_dim=text_dim,
        norm_num_groups=4,
        attention_head_dim=2,
    )


@pytest.fixture(scope="module")
def tiny_pipe():
    from sdcompress.checkpoint.instantiate import build_pipeline
    from sdcompress.checkpoint.resolve import load_model

    return build_pipeline(load_model("tiny-sd"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", 5, size=40)


class Saved:
    """A saver that keeps the saved U-Net weights in memory."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] | None = None

    def __call__(self, unet, out: Path, summary) -> None:
        self.weights = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        (out / "done").write_text(str(summary.steps))


def make_task(pipe, saver=None) -> DistillTask:
    text_dim = pipe.text_encoder.config.hidden_size
    teacher = micro_unet(text_dim, layers=2, seed=0)
    student = micro_unet(text_dim, layers=1, seed=1)
    parts = DiffusionParts.from_pipeline(pipe)
    parts.unet = student
    pairs = pair_features(student, teacher, "blocks")
    return DistillTask(parts, teacher, pairs, feature_norm=True, saver=saver or Saved())


def base_config(tmp_path: Path, name: str, **changes) -> TrainConfig:
    config = TrainConfig(
        work_dir=tmp_path / f"{name}.train",
        output_dir=tmp_path / name,
        max_steps=20,
        batch_size=2,
        grad_accum=2,
        lr=3e-3,
        lr_scheduler="cosine",
        warmup_steps=4,
        checkpoint_every=0,
        seed=11,
        ema=True,
        ema_decay=0.9,
        cpu=True,
    )
    return replace(config, **changes)


def data_config(data_dir: Path) -> DataConfig:
    return DataConfig(
        data_dir=data_dir, resolution=16, center_crop=False, random_flip=True, caption_dropout=0.3
    )


def test_resume_is_exact_after_a_ctrl_c(tmp_path, tiny_pipe, data_dir):
    straight_saver = Saved()
    straight = train(make_task(tiny_pipe, straight_saver), base_config(tmp_path, "a"), data_config(data_dir))
    assert straight.steps == 20 and not straight.interrupted

    def ctrl_c_at_9(event) -> None:
        if event.kind == "step" and event.step == 9:
            signal.raise_signal(signal.SIGINT)

    config = base_config(tmp_path, "b", checkpoint_every=100)
    stopped = train(make_task(tiny_pipe), config, data_config(data_dir), ctrl_c_at_9)
    assert stopped.interrupted and stopped.steps == 10 and stopped.output_dir is None
    assert not config.output_dir.exists()
    assert stopped.last_checkpoint == ckpt.checkpoint_path(config.work_dir / "checkpoints", 10)
    assert ckpt.read_state(stopped.last_checkpoint)["step"] == 10

    resumed_saver = Saved()
    resumed = train(
        make_task(tiny_pipe, resumed_saver), replace(config, resume="latest"), data_config(data_dir)
    )
    assert resumed.resumed_from == stopped.last_checkpoint and resumed.steps == 20
    # loss terms, lr schedule (cosine with warmup) and data order: identical step by step
    assert resumed.loss_history == straight.loss_history
    assert len({h["lr"] for h in straight.loss_history}) > 5
    assert straight_saver.weights.keys() == resumed_saver.weights.keys()
    for key, value in straight_saver.weights.items():
        assert torch.equal(value, resumed_saver.weights[key]), key
    assert (config.output_dir / "done").read_text() == "20"


def test_saved_weights_are_the_ema_weights(tmp_path, tiny_pipe, data_dir):
    saver = Saved()
    task = make_task(tiny_pipe, saver)
    train(task, base_config(tmp_path, "ema", max_steps=4, grad_accum=1), data_config(data_dir))
    live = task.parts.unet.state_dict()
    differs = [k for k in saver.weights if not torch.equal(saver.weights[k], live[k])]
    assert differs, "with --ema the saved weights must be the EMA weights, not the live ones"


def test_nan_loss_stops_with_clear_error_and_last_checkpoint_resumes(tmp_path, tiny_pipe, data_dir):
    task = make_task(tiny_pipe)
    original = task.compute_loss
    calls = {"n": 0}

    def poisoned(batch, generator):
        calls["n"] += 1
        losses = original(batch, generator)
        if calls["n"] == 8:  # step 8 (grad_accum 1)
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    task.compute_loss = poisoned
    config = base_config(tmp_path, "nan", max_steps=9, grad_accum=1, checkpoint_every=3, keep_checkpoints=2)
    with pytest.raises(SdcError, match=r"non-finite at step 8.*checkpoint-00000006 is kept.*--resume latest"):
        train(task, config, data_config(data_dir))
    kept = ckpt.list_checkpoints(config.work_dir / "checkpoints")
    assert [ckpt.read_state(p)["step"] for p in kept] == [3, 6]
    assert not config.output_dir.exists()

    resumed = train(make_task(tiny_pipe), replace(config, resume="latest"), data_config(data_dir))
    assert resumed.steps == 9 and resumed.resumed_from == kept[-1]
    assert all(math.isfinite(h["loss"]) for h in resumed.loss_history)
    assert len(ckpt.list_checkpoints(config.work_dir / "checkpoints")) == 2  # keep-last-K rotation


def test_validation_grid_and_epochs(tmp_path, tiny_pipe, data_dir):
    validation = ValidationConfig(prompts=("a red circle",), seeds=(0, 1), every=3, steps=2, resolution=16)
    config = base_config(
        tmp_path, "val", max_steps=None, epochs=2, grad_accum=1, ema=False, validation=validation
    )
    result = train(make_task(tiny_pipe), config, data_config(data_dir))
    assert result.steps == 6  # 5 images, batch 2 -> 3 batches per epoch
    assert [p.name for p in result.validation_images] == ["step-00000003.png", "step-00000006.png"]
    from PIL import Image

    with Image.open(result.validation_images[-1]) as grid:
        assert grid.size == (2 * 16, 16)


def test_bad_training_options(tmp_path, tiny_pipe, data_dir):
    for changes, message in [
        ({"mixed_precision": "fp8"}, "--mixed-precision"),
        ({"lr_scheduler": "wobbly"}, "--lr-scheduler"),
        ({"batch_size": 0}, "--batch-size"),
        ({"mixed_precision": "fp16"}, "fp16 needs a GPU"),
        ({"optimizer": "adamw8bit"}, "bitsandbytes"),
        ({"resume": str(tmp_path / "missing")}, "does not exist"),
    ]:
        if changes.get("optimizer") == "adamw8bit" and importlib.util.find_spec("bitsandbytes"):
            continue
        with pytest.raises(SdcError, match=message):
            train(make_task(tiny_pipe), base_config(tmp_path, "bad", **changes), data_config(data_dir))


def test_resume_with_a_changed_batch_size_or_seed_is_refused(tmp_path, tiny_pipe, data_dir):
    config = base_config(tmp_path, "inv", max_steps=2, grad_accum=1, checkpoint_every=1, ema=False)
    first = train(make_task(tiny_pipe), config, data_config(data_dir))
    state = ckpt.read_state(first.last_checkpoint)
    assert (state["batch_size"], state["grad_accum"], state["world_size"], state["seed"]) == (2, 1, 1, 11)
    longer = replace(config, max_steps=4, resume="latest", overwrite=True)
    for changes, message in [
        ({"batch_size": 1}, r"made with --batch-size 2 \(this run: 1\), and exact resume needs the same"),
        ({"grad_accum": 2, "seed": 3}, r"--grad-accum 1 \(this run: 2\), --seed 11 \(this run: 3\)"),
    ]:
        with pytest.raises(SdcError, match=message):
            train(make_task(tiny_pipe), replace(longer, **changes), data_config(data_dir))
    events = []
    resumed = train(make_task(tiny_pipe), longer, data_config(data_dir), events.append)
    assert resumed.steps == 4 and resumed.resumed_from == first.last_checkpoint
    start = next(e for e in events if e.kind == "start")
    assert "ends at step 4 instead of 2" in start.message  # a safe change is said, not refused
