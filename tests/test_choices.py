"""Typed choices: one dtype resolver, and options the chosen path cannot honour refused, never dropped."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from sdcompress.checkpoint.resolve import load_model
from sdcompress.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from sdcompress.checkpoint.tensors import lazy_state_dict
from sdcompress.checkpoint.tiny import tiny_model_path
from sdcompress.choices import DType, ModelFormat, output_kind, resolve_dtype
from sdcompress.errors import SdcError
from sdcompress.services.convert import ConvertRequest
from sdcompress.services.merge import LoraRef, MergeRequest

KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("float16", torch.float16),
        ("half", torch.float16),
        ("fp32", torch.float32),
        ("float32", torch.float32),
        ("torch.float16", torch.float16),
        (DType.BF16, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_resolve_dtype_knows_every_spelling(name, dtype):
    assert resolve_dtype(name) is dtype


def test_resolve_dtype_refuses_others_in_one_sentence():
    assert resolve_dtype(None) is None
    with pytest.raises(SdcError, match=r"^--vae-dtype 'int8' is not one of fp32, fp16, bf16\.$"):
        resolve_dtype("int8", "--vae-dtype")


def test_output_kind_follows_the_suffix():
    assert output_kind("model.SafeTensors") == ModelFormat.SINGLE_FILE
    assert output_kind("model/") == ModelFormat.DIFFUSERS


def test_choices_do_not_import_torch():
    code = "import sys, sdcompress.choices; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _lora(path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"{KEY}.lora_down.weight": torch.randn(2, 32, generator=g),
        f"{KEY}.lora_up.weight": torch.randn(32, 2, generator=g),
        f"{KEY}.alpha": torch.tensor(1.0),
    }
    write_safetensors(path, lazy_state_dict(tensors), {"ss_base_model_version": "sd_v1"})
    return path


@pytest.mark.parametrize(
    "options",
    [
        ["--ema"],
        ["--device", "cpu"],
        ["--vae-dtype", "fp16"],
        ["--prediction-type", "epsilon"],
        ["--tokenizer", "."],
        ["--allow-pickle"],
        ["--unet-only"],
    ],
    ids=lambda o: o[0],
)
def test_convert_of_a_lora_refuses_model_options(cli, tmp_path, options):
    src, out = _lora(tmp_path / "lora.safetensors"), tmp_path / "out.safetensors"
    r = cli("convert", src, "-o", out, *options)
    assert r.code == 2, r
    message = r.stderr.strip()
    assert message.count("\n") == 0 and options[0] in message and "LoRA file" in message, message
    assert not out.exists()


def test_convert_of_a_lora_names_every_unused_option(cli, tmp_path):
    src = _lora(tmp_path / "lora.safetensors")
    r = cli("convert", src, "-o", tmp_path / "o.safetensors", "--ema", "--unet-only", "--allow-pickle")
    assert r.code == 2 and "--ema, --unet-only and --allow-pickle do not apply" in r.stderr, r


def test_convert_of_a_lora_honours_dtype_and_format(cli, tmp_path):
    src, out = _lora(tmp_path / "lora.safetensors"), tmp_path / "peft.safetensors"
    r = cli("convert", src, "-o", out, "--format", "peft", "--dtype", "bfloat16")
    assert r.code == 0, r
    sd = SafetensorsFile(out).state_dict()
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)


def test_convert_refuses_a_model_layout_for_a_lora_and_a_lora_layout_for_a_model(cli, tmp_path):
    src = _lora(tmp_path / "lora.safetensors")
    r = cli("convert", src, "-o", tmp_path / "x", "--format", "diffusers")
    assert r.code == 2 and "kohya or peft" in r.stderr, r
    r = cli("convert", "tiny-sd", "-o", tmp_path / "y.safetensors", "--format", "kohya")
    assert r.code == 2 and "single-file or diffusers" in r.stderr, r
    assert not (tmp_path / "x").exists() and not (tmp_path / "y.safetensors").exists()


def test_old_to_flag_still_works_and_says_it_is_deprecated(cli, tmp_path):
    src = _lora(tmp_path / "lora.safetensors")
    r = cli("convert", src, "-o", tmp_path / "p.safetensors", "--to", "peft")
    assert r.code == 0, r
    assert "--to is deprecated" in r.stderr
    r = cli("convert", src, "-o", tmp_path / "q.safetensors", "--to", "peft", "--format", "kohya")
    assert r.code == 2 and "give only --format" in r.stderr, r


def test_bogus_prediction_type_is_refused_everywhere(cli, tmp_path):
    out = tmp_path / "folder"
    r = cli("convert", "tiny-sd", "-o", out, "--prediction-type", "bogus")
    assert r.code == 2 and "bogus" in r.stderr, r
    assert not out.exists()
    with pytest.raises(SdcError, match="--prediction-type 'bogus' is not one of epsilon, v_prediction"):
        ConvertRequest("tiny-sd", str(out), prediction_type="bogus")
    # A folder used to take any string and write it into scheduler_config.json.
    with pytest.raises(SdcError, match="--prediction-type"):
        load_model(tiny_model_path("tiny-sd"), prediction_type="bogus")


def test_ema_of_a_folder_is_refused(tmp_path):
    with pytest.raises(SdcError, match="no EMA"):
        load_model("tiny-sd", ema=True)


def test_weighted_sum_refuses_density(cli, tmp_path):
    out = tmp_path / "m.safetensors"
    r = cli("merge", "tiny-sd", "tiny-sd", "--method", "weighted-sum", "--density", "0.5", "-o", out)
    assert r.code == 2, r
    assert "--method weighted-sum does not use --density (it takes --alpha)" in r.stderr, r
    assert not out.exists()


@pytest.mark.parametrize(
    ("models", "options", "needle"),
    [
        (["a"], {"alpha": 0.5}, "--alpha only applies when merging two or more models"),
        (["a"], {"rank": 4, "format": "peft"}, "--rank and --format only apply when merging LoRA files"),
        ([], {"method": "ties", "seed": 1}, "--method and --seed only apply when merging two or more"),
        (["a", "b"], {"rank": 4}, "--rank only applies when merging LoRA files alone"),
    ],
)
def test_merge_refuses_options_of_another_kind_of_merge(models, options, needle):
    with pytest.raises(SdcError, match=needle):
        MergeRequest(models, "out.safetensors", loras=[LoraRef("l.safetensors")], **options)


def test_allow_pickle_is_honoured_for_a_diffusers_folder_with_bin_weights(cli, tmp_path):
    folder = tmp_path / "bin-model"
    shutil.copytree(tiny_model_path("tiny-sd"), folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    original = {k: v.load() for k, v in SafetensorsFile(weights).state_dict().items()}
    torch.save(original, folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(SdcError, match="--allow-pickle"):
        load_model(folder)
    model = load_model(folder, allow_pickle=True)
    assert all(torch.equal(model.components["unet"][k].load(), v) for k, v in original.items())
    out = tmp_path / "single.safetensors"
    assert cli("convert", folder, "-o", out).code == 2 and not out.exists()
    r = cli("convert", folder, "-o", out, "--allow-pickle")
    assert r.code == 0, r


def test_info_family_is_the_new_name_of_teacher(cli):
    import json

    new = cli("info", "bk-tiny", "--arch", "--family", "sd2", "--json")
    old = cli("info", "bk-tiny", "--arch", "--teacher", "sd2", "--json")
    assert new.code == 0 and old.code == 0, (new, old)
    assert json.loads(new.stdout) == json.loads(old.stdout)
    assert json.loads(new.stdout)["family"] == "sd2"
    assert "--teacher is deprecated" in old.stderr and "deprecated" not in new.stderr


def test_requests_check_their_choices_when_built():
    from sdcompress.services.bench import BenchRequest
    from sdcompress.services.prune import PruneRequest

    assert BenchRequest(["tiny-sd"], dtype="bfloat16").dtype == DType.BF16
    with pytest.raises(SdcError, match="--family applies with --random-weights"):
        BenchRequest(["tiny-sd"], family="sd1")
    with pytest.raises(SdcError, match="--mid-block 'half' is not one of keep, resnet, none"):
        PruneRequest("tiny-sd", "out", mid_block="half")
    with pytest.raises(SdcError, match="--select 'random' is not one of importance, uniform, last"):
        PruneRequest("tiny-sd", "out", select="random")
