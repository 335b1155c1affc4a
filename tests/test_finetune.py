"""`finetune` on tiny models: the loss goes down, EMA weights are what is saved, bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_lora_train import RES, fixed_loss, pipeline

from sdcompress.checkpoint.resolve import load_model
from sdcompress.checkpoint.safetensors_io import read_state_dict
from sdcompress.training.demo_data import write_demo_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", 4, size=RES)


@pytest.mark.slow
def test_finetune_lowers_the_loss(cli, tmp_path, data):
    r = cli(
        "finetune", "--model", "tiny-sd", "--data", data, "-o", tmp_path / "out", "--resolution", RES,
        "--max-steps", "3", "--lr", "1e-3", "--cpu", "--checkpoint-every", "0", "--num-workers", "0",
        "--save-single-file", "--json",
    )  # fmt: skip
    assert r.code == 0, r
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and (out / "unet" / "config.json").is_file()
    record = json.loads((out / "sdcompress_run.json").read_text())
    assert record["command"] == "finetune" and record["steps"] == 3
    before = fixed_loss(pipeline(load_model("tiny-sd")), data)
    after = fixed_loss(pipeline(load_model(str(out))), data)
    assert after < before, (before, after)
    single = load_model(str(out / "model.safetensors"))
    tuned = load_model(str(out))
    for key in list(tuned.components["unet"])[:20]:
        torch.testing.assert_close(
            single.components["unet"][key].load(), tuned.components["unet"][key].load()
        )


def test_finetune_with_ema_saves_the_ema_weights(cli, tmp_path, data):
    r = cli(
        "finetune", "--model", "tiny-sd", "--data", data, "-o", tmp_path / "out", "--resolution", RES,
        "--max-steps", "2", "--lr", "1e-3", "--cpu", "--checkpoint-every", "2", "--num-workers", "0",
        "--ema", "--ema-decay", "0.5", "--json",
    )  # fmt: skip
    assert r.code == 0, r
    ckpt = next((tmp_path / "out.train" / "checkpoints").iterdir())
    raw = read_state_dict(ckpt / "model.safetensors")
    ema_state = torch.load(ckpt / "custom_checkpoint_1.pkl", weights_only=False)
    saved = read_state_dict(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    base = load_model("tiny-sd").components["unet"]
    names = list(base)  # parameter order == state-dict order for the U-Net (no buffers)
    shadow = dict(zip(names, ema_state["shadow_params"], strict=True))
    differs = 0
    for key in names:
        torch.testing.assert_close(saved[key].load(), shadow[key].to(saved[key].dtype))
        differs += not torch.equal(saved[key].load(), raw[key].load())
    assert differs > len(names) // 2  # the raw weights were not what got saved


def test_finetune_bad_input_is_one_line(cli, tmp_path, data):
    (tmp_path / "empty").mkdir()
    for args in (
        ["--data", tmp_path / "empty"],
        ["--data", data, "--text-encoder-lr", "-1", "--train-text-encoder"],
        ["--data", data, "--mixed-precision", "fp8"],
    ):
        r = cli("finetune", "--model", "tiny-sd", "-o", tmp_path / "o", "--resolution", RES, "--cpu", *args)
        assert r.code == 2, r
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "o").exists()
