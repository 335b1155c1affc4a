"""`lora train` acceptance on tiny models: loss, diffusers loading, merge equivalence, LyCORIS, students, DreamBooth."""

from __future__ import annotations

import json
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import load_lora_file

from sdcompress.checkpoint.instantiate import build_pipeline
from sdcompress.checkpoint.resolve import load_model
from sdcompress.errors import SdcError
from sdcompress.lowrank.layouts import read_lora
from sdcompress.services.merge import bake_loras
from sdcompress.training.data import DataConfig, build_dataset, collate
from sdcompress.training.demo_data import write_demo_dataset
from sdcompress.training.engine import TrainConfig
from sdcompress.training.finetune_task import UNetTrainingTask
from sdcompress.training.lora_task import AdapterSpec, LoraTrainTask, add_adapters
from sdcompress.training.task import DiffusionParts, LossConfig

RES = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", 4, size=RES)


def pipeline(model):
    """A live fp32 pipeline; position_ids left on the meta device get values (diffusers moves encoders)."""
    pipe = build_pipeline(model, dtype=torch.float32)
    DiffusionParts.from_pipeline(pipe)
    return pipe


def fixed_loss(pipe, data_dir: Path) -> float:
    """Diffusion loss of a pipeline on the data with fixed noise and timesteps (seeded per image)."""
    parts = DiffusionParts.from_pipeline(pipe)
    task = UNetTrainingTask(parts, LossConfig())
    dataset, _ = build_dataset(DataConfig(data_dir=data_dir, resolution=RES), 0)
    total = 0.0
    with torch.no_grad():
        for i in range(len(dataset)):
            for s in range(2):
                batch = collate([dataset[(i, 0)]])
                total += float(task._loss_of(batch, torch.Generator().manual_seed(100 * i + s)))
    return total / (2 * len(dataset))


def train(tmp: Path, data_dir: Path, model: str = "tiny-sd", steps: int = 4, **kwargs):
    from sdcompress.services.lora_train import LoraTrainRequest, lora_train

    adapter = kwargs.pop("adapter", AdapterSpec(rank=4, targets="all", text_encoder=True))
    request = LoraTrainRequest(
        model=model,
        output=tmp / "lora",
        data=DataConfig(data_dir=data_dir, resolution=RES),
        train=TrainConfig(work_dir=tmp / "work", max_steps=steps, lr=1e-2, checkpoint_every=0, cpu=True),
        adapter=adapter,
        **kwargs,
    )
    return lora_train(request)


@pytest.fixture(scope="module")
def sd_lora(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("sd-lora")
    result = train(tmp, data, format="both", save_dtype="fp32")
    return result


def _adapted_layers(pipe) -> int:
    modules = [pipe.unet, pipe.text_encoder] + (
        [pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else []
    )
    return sum(1 for m in modules for _, sub in m.named_modules() if hasattr(sub, "lora_A") and sub.lora_A)


@pytest.mark.slow
def test_lora_train_lowers_loss_and_loads_in_diffusers(sd_lora, data):
    kohya, peft_file = sd_lora.files
    assert kohya.name == "lora.safetensors" and peft_file.name == "pytorch_lora_weights.safetensors"
    lora = read_lora(kohya)
    assert lora.layout == "kohya" and lora.metadata["ss_network_dim"] == "4"
    assert (
        lora.metadata["ss_max_train_steps"] == "4" and lora.metadata["ss_network_module"] == "networks.lora"
    )
    model = load_model("tiny-sd")
    base = pipeline(model)
    before = fixed_loss(base, data)
    pipe = pipeline(model)
    load_lora_file(pipe, str(kohya))
    assert _adapted_layers(pipe) == len(lora.adapters)  # every module in the file became a LoRA layer
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    after = fixed_loss(pipe, data)
    assert after < before, (before, after)
    # fused by diffusers == baked by sdcompress merge
    baked, adapted = bake_loras(model, [(lora, 1.0)])
    assert adapted == len(lora.adapters)
    fused = pipe.unet.state_dict()
    for key, lt in baked.components["unet"].items():
        torch.testing.assert_close(fused[key], lt.load().float(), atol=1e-5, rtol=1e-4)
    # the PEFT file holds the same update
    peft = read_lora(peft_file)
    assert peft.layout == "peft" and len(peft.adapters) == len(lora.adapters)
    peft_baked, _ = bake_loras(model, [(peft, 1.0)])
    for key, lt in peft_baked.components["unet"].items():
        torch.testing.assert_close(lt.load(), baked.components["unet"][key].load(), atol=1e-6, rtol=1e-5)
    record = json.loads((kohya.parent / "sdcompress_run.json").read_text())
    assert record["command"] == "lora train" and record["adapted_modules"] == len(lora.adapters)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_outputs_merge_like_peft(tmp_path, kind):
    """LoHa / LoKr files written from peft adapters bake into the same weights as peft's own merge."""
    from sdcompress.services.lora_train import naming_for, write_adapters

    model = load_model("tiny-sd")
    pipe = pipeline(model)
    spec = AdapterSpec(type=kind, rank=4, alpha=2.0, targets="all")
    task = LoraTrainTask(DiffusionParts.from_pipeline(pipe), LossConfig(), spec)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    files = write_adapters(tmp_path, "x", task.export(), naming_for(model), "kohya", torch.float32, {})
    lora = read_lora(files[0])
    assert lora.layout == "lycoris" and {a.kind for a in lora.adapters.values()} == {kind}
    baked, adapted = bake_loras(model, [(lora, 1.0)])
    assert adapted == len(task.paths["unet"])
    for path in task.paths["unet"]:
        pipe.unet.get_submodule(path).merge()  # peft's own merge
    merged = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items()}
    for key, lt in baked.components["unet"].items():
        torch.testing.assert_close(lt.load().float(), merged[key], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_sdxl_lora_loads_in_diffusers(tmp_path, data):
    result = train(tmp_path, data, model="tiny-sdxl", steps=1, adapter=AdapterSpec(rank=4, text_encoder=True))
    lora = read_lora(result.files[0])
    assert lora.metadata["ss_base_model_version"].startswith("sdxl")
    assert any("input_blocks" in n for n in lora.adapters)  # SGM names for the SDXL U-Net, as kohya writes
    pipe = pipeline(load_model("tiny-sdxl"))
    load_lora_file(pipe, str(result.files[0]))
    assert _adapted_layers(pipe) == len(lora.adapters)


@pytest.mark.slow
def test_lora_on_ssd1b_student_loads_and_merges(tmp_path, data):
    from sdcompress.arch.presets import preset_config
    from sdcompress.checkpoint.instantiate import module_from_config
    from sdcompress.checkpoint.tensors import lazy_state_dict
    from sdcompress.checkpoint.writers import save_diffusers

    teacher = load_model("tiny-sdxl")
    config = preset_config("ssd-1b", "tiny-sdxl")
    unet = module_from_config("unet", config).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(1)
    weights = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in unet.state_dict().items()}
    save_diffusers(teacher.with_unet(lazy_state_dict(weights), config), tmp_path / "student")
    result = train(tmp_path, data, model=str(tmp_path / "student"), steps=1, adapter=AdapterSpec(rank=2))
    student = load_model(str(tmp_path / "student"))
    lora = read_lora(result.files[0])
    baked, adapted = bake_loras(student, [(lora, 1.0)])
    assert adapted == len(lora.adapters) > 0
    pipe = pipeline(student)
    load_lora_file(pipe, str(result.files[0]))
    assert _adapted_layers(pipe) == len(lora.adapters)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()
    for key, lt in baked.components["unet"].items():
        torch.testing.assert_close(fused[key], lt.load().float(), atol=1e-3, rtol=1e-3)


def test_dreambooth_logs_both_terms(cli, tmp_path, data):
    classes = write_demo_dataset(tmp_path / "class", 2, size=RES, seed=5)
    r = cli(
        "lora", "train", "--model", "tiny-sd", "--data", data, "-o", tmp_path / "db", "--resolution", RES,
        "--instance-prompt", "a photo of sks shape", "--class-data", classes, "--class-prompt", "a photo of a shape",
        "--prior-loss-weight", "0.5", "--num-class-images", "2", "--max-steps", "1", "--rank", "2", "--cpu", "--checkpoint-every", "0",
        "--num-workers", "0", "--json",
    )  # fmt: skip
    assert r.code == 0, r
    out = json.loads(r.stdout)
    assert set(out["last_losses"]) == {"loss", "instance", "prior"}
    terms = out["last_losses"]
    assert terms["loss"] == pytest.approx(terms["instance"] + 0.5 * terms["prior"], rel=1e-4)
    meta = read_lora(tmp_path / "db" / "db.safetensors").metadata
    assert meta["ss_instance_prompt"] == "a photo of sks shape" and meta["ss_prior_loss_weight"] == "0.5"


def test_dreambooth_generates_missing_class_images(cli, tmp_path, data):
    """No --class-data: the base model draws --num-class-images class images into OUTPUT.class-images."""
    r = cli(
        "lora", "train", "--model", "tiny-sd", "--data", data, "-o", tmp_path / "db", "--resolution", RES,
        "--instance-prompt", "a photo of sks shape", "--class-prompt", "a photo of a shape",
        "--num-class-images", "2", "--class-inference-steps", "2", "--max-steps", "1", "--rank", "2",
        "--cpu", "--checkpoint-every", "0", "--num-workers", "0", "--json",
    )  # fmt: skip
    assert r.code == 0, r
    out = json.loads(r.stdout)
    assert out["class_images_generated"] == 2 and set(out["last_losses"]) == {"loss", "instance", "prior"}
    folder = tmp_path / "db.class-images"
    images = sorted(folder.glob("*.png"))
    assert [p.name for p in images] == ["class-00000.png", "class-00001.png"]
    assert all(p.with_suffix(".txt").read_text().strip() == "a photo of a shape" for p in images)
    from PIL import Image

    with Image.open(images[0]) as image:
        assert image.size == (RES, RES)
    assert read_lora(tmp_path / "db" / "db.safetensors").metadata["ss_num_reg_images"] == "2"


def test_class_image_generation_is_seeded_and_fills_up(tmp_path):
    """Image i depends on (seed, i) only: filling 1 then 2 gives the bytes of filling 2 at once."""
    from sdcompress.training.finetune_task import generate_class_images

    pipe = DiffusionParts.from_pipeline(pipeline(load_model("tiny-sd"))).pipeline()
    make = lambda folder, n: generate_class_images(  # noqa: E731
        pipe, folder, "a circle", n, seed=7, resolution=RES, steps=2
    )
    assert len(make(tmp_path / "a", 2)) == 2
    assert len(make(tmp_path / "b", 1)) == 1
    assert len(make(tmp_path / "b", 2)) == 1 and make(tmp_path / "b", 2) == []
    for name in ("class-00000.png", "class-00001.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "class-00000.png").read_bytes() != (
        tmp_path / "a" / "class-00001.png"
    ).read_bytes()


def test_class_data_too_small_without_a_class_prompt_is_refused(cli, tmp_path, data):
    classes = write_demo_dataset(tmp_path / "class", 1, size=RES, seed=5)
    message = _bad(cli, tmp_path, data, "--class-data", classes, "--num-class-images", "3")
    assert "--class-prompt" in message and "holds 1 images" in message


def test_lora_train_reads_a_config_file_and_the_command_line_wins(cli, tmp_path, data):
    config = tmp_path / "run.toml"
    config.write_text(
        f'model = "tiny-sd"\ndata = "{data}"\nresolution = {RES}\ncpu = true\n'
        "[lora]\nrank = 2\nalpha = 1.0\nmax_steps = 3\ncheckpoint-every = 0\nnum_workers = 0\n",
        encoding="utf-8",
    )
    r = cli("lora", "train", "--config", config, "-o", tmp_path / "out", "--max-steps", "1", "--json")
    assert r.code == 0, r
    assert json.loads(r.stdout)["steps"] == 1  # the command line wins
    meta = read_lora(tmp_path / "out" / "out.safetensors").metadata
    assert meta["ss_network_dim"] == "2" and float(meta["ss_network_alpha"]) == 1.0  # the file is used


# ---------------------------------------------------------------------------- bad input


def _bad(cli, tmp_path, data, *extra):
    r = cli("lora", "train", "--model", "tiny-sd", "--data", data, "-o", tmp_path / "o", "--resolution", RES,
            "--max-steps", "1", "--cpu", *extra)  # fmt: skip
    assert r.code == 2, r
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()
    return r.stderr


def test_rank_zero_is_refused(cli, tmp_path, data):
    assert "--rank" in _bad(cli, tmp_path, data, "--rank", "0")


def test_rank_larger_than_a_layer_is_refused(cli, tmp_path, data):
    assert "larger than layer" in _bad(cli, tmp_path, data, "--rank", "100000")


def test_unknown_type_and_targets_are_refused(cli, tmp_path, data):
    assert "--algo" in _bad(cli, tmp_path, data, "--algo", "boft")
    assert "--targets" in _bad(cli, tmp_path, data, "--targets", "everything")


def test_data_folder_without_images_is_refused(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    assert "no usable images" in _bad(cli, tmp_path, tmp_path / "empty")


def test_targets_matching_no_module_are_refused():
    vae_like = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Linear(8, 8))
    with pytest.raises(SdcError, match="matches no module"):
        add_adapters(vae_like, "unet", AdapterSpec(rank=2, targets="attention"))


# ---------------------------------------------------------------------------- exact resume


def stop_after(step: int):
    """A progress callback sending Ctrl-C during step `step`, as a user would; the loop stops after it."""

    def callback(event) -> None:
        if event.kind == "step" and event.step == step - 1:
            signal.raise_signal(signal.SIGINT)

    return callback


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    from sdcompress.checkpoint.safetensors_io import read_state_dict

    return {k: v.load() for k, v in read_state_dict(path).items()}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


@pytest.mark.slow  # over ~6 s on 2 idle cores: the fast lane stays under 4 minutes
def test_lora_resume_is_exact(tmp_path, data):
    """2N steps straight == N steps, Ctrl-C, `--resume latest`, N more: adapters, loss history, lr."""
    from sdcompress.services.lora_train import DreamBooth, LoraTrainRequest, lora_train

    classes = write_demo_dataset(tmp_path / "class", 2, size=RES, seed=5)

    def request(name: str, checkpoint_every: int = 0) -> LoraTrainRequest:
        return LoraTrainRequest(
            model="tiny-sd",
            output=tmp_path / name,
            data=DataConfig(data_dir=data, resolution=RES, random_flip=True, caption_dropout=0.3),
            train=TrainConfig(
                work_dir=tmp_path / f"{name}.train",
                max_steps=4,
                batch_size=2,
                lr=1e-2,
                lr_scheduler="cosine",
                warmup_steps=1,
                checkpoint_every=checkpoint_every,
                seed=3,
                cpu=True,
            ),  # fmt: skip
            # dropout draws from the global RNG: resume must restore it too
            adapter=AdapterSpec(rank=2, dropout=0.1, text_encoder=True),
            dreambooth=DreamBooth(
                class_data=classes, class_prompt="a shape", prior_loss_weight=0.5, num_class_images=2
            ),
            save_dtype="fp32",
        )

    straight = lora_train(request("straight"))
    first = request("resumed", checkpoint_every=100)
    stopped = lora_train(first, stop_after(2))
    assert stopped.interrupted and stopped.steps == 2 and not first.output.exists()
    resumed = lora_train(replace(first, train=replace(first.train, resume="latest")))
    assert resumed.resumed_from == stopped.last_checkpoint and resumed.steps == 4
    # the checkpoint holds the adapters, not the frozen model
    saved = sum(p.stat().st_size for p in stopped.last_checkpoint.rglob("*.safetensors"))
    frozen = sum(t.nbytes for t in load_model("tiny-sd").components["unet"].values())
    assert saved < frozen / 10, (saved, frozen)
    assert_bit_identical(tensors_of(straight.files[0]), tensors_of(resumed.files[0]))
    a, b = (json.loads((r.output / "sdcompress_run.json").read_text()) for r in (straight, resumed))
    assert a["loss_curve"] == b["loss_curve"]


def test_lycoris_type_with_a_peft_file_is_refused_before_training(cli, tmp_path, data):
    """No loader reads LoHa / LoKr tensors under PEFT names: the PEFT copy is refused, not written."""
    for fmt in ("peft", "kohya,peft"):
        r = cli("lora", "train", "--model", "tiny-sd", "--data", data, "-o", tmp_path / "out", "--algo", "loha",
                "--format", fmt, "--max-steps", "1", "--cpu")  # fmt: skip
        assert r.code == 2 and "use --format kohya" in r.stderr and "Traceback" not in r.stderr, r
        assert not (tmp_path / "out").exists()


def test_conv_alpha_metadata_matches_the_conv_modules(tmp_path, data):
    """--rank 4 --alpha 2 --targets all: every module carries alpha 2, and ss_network_args says conv_alpha 2."""
    result = train(
        tmp_path, data, steps=1, adapter=AdapterSpec(rank=4, alpha=2.0, targets="all"), format="kohya,peft"
    )
    kohya, peft_file = result.files
    lora = read_lora(kohya)
    assert {a.alpha for a in lora.adapters.values()} == {2.0}
    assert any(a.tensors["down"].shape[-1] == 3 for a in lora.adapters.values())  # 3x3 convs are in the file
    args = json.loads(lora.metadata["ss_network_args"])
    assert args == {"conv_dim": "4", "conv_alpha": "2"}
    assert lora.metadata["ss_network_alpha"] == "2" and lora.metadata["ss_network_dim"] == "4"
    assert peft_file.name == "pytorch_lora_weights.safetensors" and read_lora(peft_file).layout == "peft"
