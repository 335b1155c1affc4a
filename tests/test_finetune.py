"""`finetune` on tiny models: the loss goes down, EMA weights are what is saved, bad input is one line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_lora_train import RES, assert_bit_identical, fixed_loss, pipeline, stop_after, tensors_of

from sdcompress.checkpoint.resolve import load_model
from sdcompress.checkpoint.safetensors_io import read_state_dict
from sdcompress.training.data import DataConfig
from sdcompress.training.demo_data import write_demo_dataset
from sdcompress.training.engine import TrainConfig


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


def test_finetune_resume_is_exact(tmp_path, data):
    """2N steps straight == N steps, Ctrl-C, resume, N more: U-Net, text encoder and EMA, bit for bit."""
    from sdcompress.services.finetune import FinetuneRequest, finetune

    def request(name: str, checkpoint_every: int = 0) -> FinetuneRequest:
        return FinetuneRequest(
            model="tiny-sd",
            output=tmp_path / name,
            data=DataConfig(data_dir=data, resolution=RES, random_flip=True, caption_dropout=0.3),
            train=TrainConfig(
                work_dir=tmp_path / f"{name}.train",
                max_steps=4,
                batch_size=2,
                lr=1e-3,
                lr_scheduler="cosine",
                warmup_steps=1,
                checkpoint_every=checkpoint_every,
                seed=3,
                ema=True,
                ema_decay=0.7,
                cpu=True,
            ),  # fmt: skip
            train_text_encoder=True,
            text_encoder_lr=1e-4,
            save_dtype="fp32",
        )

    straight = finetune(request("straight"))
    first = request("resumed", checkpoint_every=100)
    stopped = finetune(first, stop_after(2))
    assert stopped.interrupted and stopped.steps == 2 and not first.output.exists()
    resumed = finetune(replace(first, train=replace(first.train, resume="latest")))
    assert resumed.resumed_from == stopped.last_checkpoint and resumed.steps == 4
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert_bit_identical(tensors_of(straight.output / part), tensors_of(resumed.output / part))
    unet = "unet/diffusion_pytorch_model.safetensors"
    base = tensors_of(load_model("tiny-sd").path / unet)
    assert any(not torch.equal(v, base[k]) for k, v in tensors_of(straight.output / unet).items())
    a, b = (json.loads((r.output / "sdcompress_run.json").read_text()) for r in (straight, resumed))
    assert a["loss_curve"] == b["loss_curve"]


def test_finetune_reads_a_config_file_and_the_command_line_wins(cli, tmp_path, data):
    config = tmp_path / "run.toml"
    config.write_text(
        f'model = "tiny-sd"\ndata = "{data}"\nresolution = {RES}\n'
        "[finetune]\nmax-steps = 3\nseed = 9\ncpu = true\ncheckpoint_every = 0\nnum-workers = 0\n",
        encoding="utf-8",
    )
    r = cli("finetune", "--config", config, "-o", tmp_path / "out", "--max-steps", "1", "--json")
    assert r.code == 0, r
    assert json.loads(r.stdout)["steps"] == 1  # the command line wins
    record = json.loads((tmp_path / "out" / "sdcompress_run.json").read_text())
    assert record["base_model"] == "tiny-sd" and record["options"]["seed"] == 9  # the file is used
