"""The training commands' options, generated from the dataclasses: TOML keys, defaults, errors.

The service functions are replaced by a recorder, so these tests check what
the command line and `--config` files turn into (the request the service
gets) without training anything.
"""

from __future__ import annotations

import pytest

from sdcompress.choices import DType
from sdcompress.errors import SdcError
from sdcompress.training.config import (
    AdapterSpec,
    DataConfig,
    DistillWeights,
    DreamBooth,
    LossConfig,
    TrainConfig,
)

SERVICES = {
    "finetune": ("sdcompress.services.finetune", "finetune"),
    "distill": ("sdcompress.services.distill", "distill"),
    "lora": ("sdcompress.services.lora_train", "lora_train"),
    "data": ("sdcompress.services.data_prepare", "data_prepare"),
}
BASE_ARGS = {
    "finetune": ["finetune", "--model", "tiny-sd"],
    "distill": ["distill", "--teacher", "tiny-sd", "--student", "s"],
    "lora": ["lora", "train", "--model", "tiny-sd"],
    "data": ["data", "prepare", "--model", "tiny-sd"],
}


@pytest.fixture
def recorded(monkeypatch):
    """Replace the four services by one that keeps the request and stops with exit code 2."""
    import importlib

    requests = []

    def record(request, progress=None):
        requests.append(request)
        raise SdcError("recorded")

    for module, name in SERVICES.values():
        monkeypatch.setattr(importlib.import_module(module), name, record)
    return requests


def run(cli, recorded, command: str, *args) -> object:
    r = cli(*BASE_ARGS[command], *map(str, args))
    assert r.code == 2 and "recorded" in r.stderr, r
    return recorded[-1]


def test_defaults_are_the_dataclass_defaults(cli, recorded, tmp_path):
    """The CLI adds no defaults of its own beyond the override table (lr per command, lora's fp16)."""
    out = tmp_path / "out"
    request = run(cli, recorded, "finetune", "--data", tmp_path, "-o", out)
    assert request.train == TrainConfig(output_dir=out)
    assert request.train.num_workers == 0 and request.train.max_steps is None
    assert request.data == DataConfig(data_dir=tmp_path)
    assert request.loss == LossConfig()
    assert request.save_dtype is None

    request = run(cli, recorded, "lora", "--data", tmp_path, "-o", out)
    assert request.train == TrainConfig(output_dir=out, lr=1e-4)
    assert request.adapter == AdapterSpec() and request.dreambooth == DreamBooth()
    assert request.save_dtype == DType.FP16 and request.format == "kohya"

    request = run(cli, recorded, "distill", "--data", tmp_path, "-o", out)
    assert request.train == TrainConfig(output_dir=out, lr=5e-5)
    assert request.weights == DistillWeights() and request.features == "blocks"


def test_options_reach_the_nested_dataclasses(cli, recorded, tmp_path):
    request = run(
        cli, recorded, "finetune", "--data", tmp_path, "-o", tmp_path / "o", "--random-crop", "--noise-offset",
        "0.1", "--prediction-type", "v_prediction", "--validation-prompt", "a", "--validation-prompt", "b",
        "--epochs", "2", "--work-dir", tmp_path / "w",
    )  # fmt: skip
    assert request.data.center_crop is False
    assert request.loss.noise.offset == 0.1 and request.loss.noise.prediction_type == "v_prediction"
    assert request.train.validation.prompts == ("a", "b") and request.train.validation.seeds == (0,)
    # --epochs used to be ignored: the CLI's max-steps default of 1000 won over it
    assert request.train.epochs == 2 and request.train.max_steps is None
    assert request.train.work_dir == tmp_path / "w"


def test_toml_keys_are_the_flag_names(cli, recorded, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        f'model = "tiny-sd"\ndata = "{tmp_path}"\nbatch-size = 3\n'
        '[lora]\nformat = "peft"\ntype = "loha"\ndtype = "bf16"\nrandom_crop = true\ngrad_accum = 2\n',
        encoding="utf-8",
    )
    r = cli("lora", "train", "--config", config, "-o", tmp_path / "o", "--batch-size", "1")
    assert r.code == 2 and "recorded" in r.stderr, r
    request = recorded[-1]
    assert request.format == "peft" and request.adapter.type == "loha" and request.save_dtype == DType.BF16
    assert request.data.data_dir == tmp_path and request.data.center_crop is False
    assert request.train.grad_accum == 2 and request.train.batch_size == 1  # the command line wins

    config.write_text('dtype = "float16"\nmixed-precision = "bf16"\n', encoding="utf-8")
    request = run(cli, recorded, "finetune", "--config", config, "--data", tmp_path, "-o", tmp_path / "o")
    assert request.save_dtype == DType.FP16 and request.train.mixed_precision == "bf16"


def test_old_python_names_in_toml_still_work_with_a_note(cli, recorded, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('format_ = "peft"\ntype_ = "lokr"\nsave_dtype = "fp32"\n', encoding="utf-8")
    r = cli(*BASE_ARGS["lora"], "--config", config, "--data", tmp_path, "-o", tmp_path / "o")
    assert r.code == 2 and "recorded" in r.stderr, r
    request = recorded[-1]
    assert request.format == "peft" and request.adapter.type == "lokr" and request.save_dtype == DType.FP32
    assert "'format_' is deprecated; write 'format'" in r.stderr
    assert "'type_' is deprecated; write 'algo'" in r.stderr


def test_old_save_dtype_flag_still_works_with_a_note(cli, recorded, tmp_path):
    r = cli(*BASE_ARGS["lora"], "--data", tmp_path, "-o", tmp_path / "o", "--save-dtype", "bf16")
    assert r.code == 2 and "recorded" in r.stderr, r
    assert recorded[-1].save_dtype == DType.BF16 and "--save-dtype is deprecated" in r.stderr


def test_old_type_flag_still_works_with_a_note(cli, recorded, tmp_path):
    r = cli(*BASE_ARGS["lora"], "--data", tmp_path, "-o", tmp_path / "o", "--type", "loha")
    assert r.code == 2 and "recorded" in r.stderr, r
    assert recorded[-1].adapter.type == "loha" and "--type is deprecated" in r.stderr


def test_a_typo_in_a_toml_key_names_the_closest_key(cli, recorded, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("batch-szie = 2\n", encoding="utf-8")
    r = cli(*BASE_ARGS["distill"], "--config", config, "--data", tmp_path, "-o", tmp_path / "o")
    assert r.code == 2 and not recorded, r
    assert "unknown option 'batch-szie'; did you mean 'batch-size'?" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_choices_and_missing_options_are_one_line(cli, recorded, tmp_path):
    for args, expected in (
        (["--data", tmp_path, "-o", tmp_path / "o", "--mixed-precision", "fp8"], "--mixed-precision"),
        (["--data", tmp_path, "-o", tmp_path / "o", "--no-such-flag"], "--no-such-flag"),
        (["--data", tmp_path], "--output is required"),
    ):
        r = cli(*BASE_ARGS["finetune"], *map(str, args))
        assert r.code == 2 and expected in r.stderr, r
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not recorded


def test_a_bad_value_in_the_file_is_refused(cli, recorded, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[finetune]\noptimizer = "sgd"\n', encoding="utf-8")
    r = cli(*BASE_ARGS["finetune"], "--config", config, "--data", tmp_path, "-o", tmp_path / "o")
    assert r.code == 2 and "'optimizer' has a bad value" in r.stderr and not recorded, r


def test_flags_are_declared_once_across_sections():
    from sdcompress.cli import distill, finetune, lora  # noqa: F401  (building them checks duplicates)
    from sdcompress.cli._training_options import build_params

    with pytest.raises(TypeError, match="declared by both"):
        build_params((DataConfig, DataConfig), (None, "Data"), {}, {})


def test_data_prepare_options_keep_their_defaults(cli, recorded, tmp_path):
    """`data prepare` takes its options from the dataclasses now; its defaults are the ones it always had."""
    from sdcompress.checkpoint.atomic import Overwrite

    request = run(cli, recorded, "data", tmp_path, "-o", tmp_path / "o")
    assert request.data == DataConfig(data_dir=tmp_path) and request.output == tmp_path / "o"
    assert request.dtype == "fp16" and request.shard_size == 1000
    assert request.batch_size == 8 and request.num_workers == 0
    assert request.device == "auto" and request.resume is False and request.allow_pickle is False
    assert request.overwrite is Overwrite.NEVER

    request = run(
        cli, recorded, "data", "--dataset-name", "user/set", "--dataset-split", "test", "--image-column", "img",
        "--caption-column", "c", "--caption-extension", ".caption", "--resolution", "64", "--buckets",
        "--require-captions", "--dtype", "float32", "--shard-size", "5", "--batch-size", "2",
        "--num-workers", "1", "--device", "cpu", "--resume", "--allow-pickle", "--overwrite", "-o", tmp_path / "o",
    )  # fmt: skip
    assert request.data == DataConfig(
        dataset_name="user/set", dataset_split="test", image_column="img", caption_column="c",
        caption_extension=".caption", resolution=64, buckets=True, require_captions=True,
    )  # fmt: skip
    assert (request.dtype, request.shard_size, request.batch_size, request.num_workers) == ("fp32", 5, 2, 1)
    assert request.device == "cpu" and request.resume and request.allow_pickle
    assert request.overwrite is Overwrite.OURS


def test_data_prepare_reads_a_config_file(cli, recorded, tmp_path):
    """Keys are the flag names (SOURCE is `source`), under `[data-prepare]` or at the top; the CLI wins."""
    config = tmp_path / "run.toml"
    config.write_text(
        f'model = "tiny-sd"\nresolution = 64\n[data-prepare]\nsource = "{tmp_path}"\nshard-size = 7\n'
        'dtype = "bf16"\nbuckets = true\noutput = "elsewhere"\n',
        encoding="utf-8",
    )
    r = cli("data", "prepare", "--config", config, "-o", tmp_path / "o", "--shard-size", "9")
    assert r.code == 2 and "recorded" in r.stderr, r
    request = recorded[-1]
    assert request.model == "tiny-sd" and request.output == tmp_path / "o"
    assert request.data == DataConfig(data_dir=tmp_path, resolution=64, buckets=True)
    assert request.shard_size == 9 and request.dtype == "bf16"


def test_data_prepare_has_no_augmentation_options(cli, recorded, tmp_path):
    """Prepared latents are fixed center crops: the training-only data flags are not offered."""
    for flag in ("--random-crop", "--random-flip"):
        r = cli(*BASE_ARGS["data"], tmp_path, "-o", tmp_path / "o", flag)
        assert r.code == 2 and "No such option" in r.stderr and not recorded, r
    config = tmp_path / "run.toml"
    config.write_text("caption-dropout = 0.1\n", encoding="utf-8")
    r = cli(*BASE_ARGS["data"], tmp_path, "-o", tmp_path / "o", "--config", config)
    assert r.code == 2 and "unknown option 'caption-dropout'" in r.stderr and not recorded, r


def test_a_subset_naming_an_unknown_option_is_refused():
    from sdcompress.cli._training_options import build_params

    with pytest.raises(TypeError, match="unknown options: \\['datta'\\]"):
        build_params((DataConfig,), (None, "Data"), {}, {}, only={DataConfig: ("datta",)})
