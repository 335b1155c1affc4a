"""convert: single file <-> diffusers for every family and layout, refereed by diffusers' own loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _models import meta_model, random_student
from safetensors import safe_open

from sdcompress.arch.infer import structural_view
from sdcompress.checkpoint.keymap.unet import layout_from_single_file_keys
from sdcompress.checkpoint.resolve import load_model, split_single_file
from sdcompress.checkpoint.writers import save_single_file, single_file_state_dict

CASES = [
    ("sd1", None), ("sd2", None), ("sd2-v", None), ("sdxl", None), ("sdxl-refiner", None),
    ("sdxl", "ssd-1b"), ("sdxl", "vega"), ("sdxl", "koala-1b"), ("sdxl", "koala-700m"),
    ("sd1", "bk-base"), ("sd1", "bk-small"), ("sd1", "bk-tiny"), ("sd2", "bk-tiny"),
]  # fmt: skip


def _shapes(sd):
    return {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}


@pytest.mark.parametrize(("family", "preset"), CASES)
def test_full_size_round_trip_on_meta(family, preset):
    """single file -> diffusers -> single file keeps every name and shape, at full size."""
    model = meta_model(family, preset)
    first, _ = single_file_state_dict(model)
    back = split_single_file(first, prediction_type=model.prediction_type)
    assert back.family.name == family
    assert back.preset == preset
    assert set(back.components) == set(model.components)
    for name, sd in model.components.items():
        assert _shapes(back.components[name]) == _shapes(sd), name
    assert structural_view(back.configs["unet"]) == structural_view(model.configs["unet"])
    second, _ = single_file_state_dict(back)
    assert list(second) == list(first)
    assert _shapes(second) == _shapes(first)


@pytest.mark.parametrize(("family", "preset"), CASES)
def test_unet_names_agree_with_diffusers_converter(family, preset):
    """diffusers' own single-file converter, given our config, produces exactly our diffusers names."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    model = meta_model(family, preset, unet_only=True)
    sf, _ = single_file_state_dict(model)
    checkpoint = {"model.diffusion_model." + k: v.load() for k, v in sf.items()}
    cfg = {k: v for k, v in model.configs["unet"].items() if not k.startswith("_")}
    ref = convert_ldm_unet_checkpoint(checkpoint, cfg)
    assert set(ref) == set(model.components["unet"])


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize(
    ("teacher", "preset"),
    [("tiny-sd", None), ("tiny-sdxl", None), ("tiny-sd", "bk-tiny"), ("tiny-sd", "bk-small"),
     ("tiny-sdxl", "ssd-1b"), ("tiny-sdxl", "vega"), ("tiny-sdxl", "koala-700m"), ("tiny-sdxl", "koala-1b")],
)  # fmt: skip
def test_values_round_trip_bit_identical(cli, tmp_path, teacher, preset):
    model = load_model(teacher)
    if preset:
        model = random_student(model, preset)
    src = tmp_path / "src.safetensors"
    save_single_file(model, src)
    assert cli("convert", src, "-o", tmp_path / "folder").code == 0
    r = cli("convert", tmp_path / "folder", "-o", tmp_path / "back.safetensors")
    assert r.code == 0, r
    a, b = _tensors(src), _tensors(tmp_path / "back.safetensors")
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    ("teacher", "preset"), [("tiny-sd", "bk-tiny"), ("tiny-sdxl", "ssd-1b"), ("tiny-sdxl", "koala-700m")]
)
def test_pruned_single_file_has_contiguous_indices_and_infers_its_config(tmp_path, teacher, preset):
    student = random_student(load_model(teacher), preset)
    save_single_file(student, tmp_path / "s.safetensors")
    keys = [
        k.removeprefix("model.diffusion_model.")
        for k in _tensors(tmp_path / "s.safetensors")
        if k.startswith("model.")
    ]
    for block in ("input_blocks", "output_blocks"):
        idx = sorted({int(k.split(".")[1]) for k in keys if k.startswith(block + ".")})
        assert idx == list(range(idx[0], idx[0] + len(idx))), block
    assert layout_from_single_file_keys(keys) == student.unet_layout
    again = load_model(tmp_path / "s.safetensors")
    assert structural_view(again.configs["unet"]) == structural_view(student.configs["unet"])
    assert again.preset == preset


@pytest.mark.parametrize("teacher", ["tiny-sd", "tiny-sdxl"])
def test_diffusers_from_single_file_is_the_referee(cli, tmp_path, teacher):
    """A file we write loads with diffusers' from_single_file (offline, given our config folder)."""
    import diffusers

    model = load_model(teacher)
    folder = tmp_path / "folder"
    assert cli("convert", teacher, "-o", folder).code == 0
    single = tmp_path / "model.safetensors"
    assert cli("convert", folder, "-o", single).code == 0
    unet = diffusers.UNet2DConditionModel.from_single_file(
        str(single), config=str(folder), subfolder="unet", local_files_only=True
    )
    ours = model.components["unet"]
    for k, v in unet.state_dict().items():
        assert torch.equal(v, ours[k].load()), k
    cls = getattr(diffusers, model.family.pipeline_class)
    pipe = cls.from_single_file(str(single), config=str(folder), local_files_only=True)
    for name in model.components:
        module = getattr(pipe, name)
        sd = module.state_dict()
        src = model.components[name]
        for k, v in src.items():
            key = k if k in sd else k.removeprefix("text_model.")
            assert torch.equal(sd[key], v.load()), (name, k)


def test_dtype_and_unet_only(cli, tmp_path):
    out = tmp_path / "unet.safetensors"
    r = cli("convert", "tiny-sdxl", "-o", out, "--dtype", "fp16", "--unet-only", "--json")
    assert r.code == 0, r
    t = _tensors(out)
    assert all(
        k.startswith(("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out."))
        for k in t
    )
    assert {v.dtype for v in t.values()} == {torch.float16}
    again = load_model(out)
    assert again.format == "unet-only" and again.family.name == "tiny-sdxl"
    # the SDXL VAE stays in fp32 unless asked
    r = cli("convert", "tiny-sdxl", "-o", tmp_path / "half", "--dtype", "fp16")
    assert r.code == 0, r
    half = load_model(tmp_path / "half")
    assert half.dtype_summary()["vae"] == "float32"
    assert half.dtype_summary()["unet"] == "float16"


def test_v_prediction_is_recorded_both_ways(cli, tmp_path):
    r = cli("convert", "tiny-sd", "-o", tmp_path / "v.safetensors", "--prediction-type", "v_prediction")
    assert r.code == 0, r
    assert "v_pred" in _tensors(tmp_path / "v.safetensors")
    assert cli("convert", tmp_path / "v.safetensors", "-o", tmp_path / "folder").code == 0
    sched = json.loads((tmp_path / "folder" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"


def test_ema_weights_are_taken_when_asked(cli, tmp_path):
    model = load_model("tiny-sd")
    sd, _ = single_file_state_dict(model)
    tensors = {k: v.load() for k, v in sd.items()}
    ema_key = "model_ema." + "diffusion_model.input_blocks.0.0.weight".replace(".", "")
    tensors[ema_key] = torch.full_like(tensors["model.diffusion_model.input_blocks.0.0.weight"], 0.5)
    tensors["model_ema.decay"] = torch.tensor(0.999)
    tensors["betas"] = torch.linspace(0, 1, 10)
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "ema.safetensors"))
    assert cli("convert", tmp_path / "ema.safetensors", "-o", tmp_path / "plain").code == 0
    assert cli("convert", tmp_path / "ema.safetensors", "-o", tmp_path / "ema", "--ema").code == 0
    plain, ema = load_model(tmp_path / "plain"), load_model(tmp_path / "ema")
    assert not torch.all(plain.components["unet"]["conv_in.weight"].load() == 0.5)
    assert torch.all(ema.components["unet"]["conv_in.weight"].load() == 0.5)
    assert not plain.extras  # schedule buffers and EMA copies are dropped


def test_lora_files_convert_between_layouts(cli, tmp_path):
    """`convert` routes LoRA files to the layout converter: kohya -> PEFT -> kohya keeps every update."""
    from sdcompress.checkpoint.tensors import LazyTensor
    from sdcompress.lowrank.layouts import read_lora

    base = load_model("tiny-sd")
    unet = dict(base.components["unet"])
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    w = unet[key].load()
    bump = torch.outer(torch.linspace(-1, 1, w.shape[0]), torch.linspace(1, 2, w.shape[1])) * 0.01
    unet[key] = LazyTensor.of(w + bump)
    save_single_file(base, tmp_path / "base.safetensors")
    save_single_file(base.with_unet(unet, base.configs["unet"]), tmp_path / "tuned.safetensors")
    r = cli(
        "extract-lora",
        tmp_path / "base.safetensors",
        tmp_path / "tuned.safetensors",
        "--rank",
        "4",
        "-o",
        tmp_path / "kohya.safetensors",
    )
    assert r.code == 0, r
    r = cli(
        "convert",
        tmp_path / "kohya.safetensors",
        "-o",
        tmp_path / "peft.safetensors",
        "--to",
        "peft",
        "--json",
    )
    assert r.code == 0, r
    assert json.loads(r.stdout)["format"] == "peft"
    assert cli("convert", tmp_path / "peft.safetensors", "-o", tmp_path / "back.safetensors").code == 0
    original, back = read_lora(tmp_path / "kohya.safetensors"), read_lora(tmp_path / "back.safetensors")
    assert read_lora(tmp_path / "peft.safetensors").layout == "peft"
    assert set(original.adapters) == set(back.adapters)
    for name, adapter in original.adapters.items():
        up, down = adapter.tensors["up"], adapter.tensors["down"]
        shape = (up.shape[0], *down.shape[1:])
        assert torch.allclose(adapter.delta(shape), back.adapters[name].delta(shape)), name
