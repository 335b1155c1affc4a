"""prune: published layouts to the parameter, general surgery, measured selection, bit-identical inheritance."""

from __future__ import annotations

import json
import re

import pytest
import torch
from _models import meta_model
from safetensors import safe_open

from sdcompress.arch.count import count_state_dict, meta_state_dict, meta_unet
from sdcompress.arch.layout import layout_from_config
from sdcompress.arch.presets import preset_config
from sdcompress.checkpoint.resolve import load_model
from sdcompress.errors import SdcError
from sdcompress.prune.mapping import key_map, prefix_table, student_shapes, student_state_dict
from sdcompress.prune.plan import choose_blocks, plan_structure, student_config
from sdcompress.prune.surgery import parse_depths
from sdcompress.services.prune import RECORD_FILE, PruneRequest, prune

COUNTS = [
    ("sd1", "bk-base", 579_384_964), ("sd1", "bk-small", 482_346_884), ("sd1", "bk-tiny", 323_384_964),
    ("sd2", "bk-base", 583_480_964), ("sd2", "bk-small", 485_787_524), ("sd2", "bk-tiny", 326_825_604),
    ("sdxl", "ssd-1b", 1_331_334_404), ("sdxl", "vega", 745_225_604),
    ("sdxl", "koala-1b", 1_161_184_324), ("sdxl", "koala-700m", 782_822_724),
]  # fmt: skip
FAST = {"calibration_samples": 2, "calibration_size": 32, "batch_size": 2}


def _student_on_meta(family: str, **options):
    """Plan and build a student from a full-size meta teacher (positional choice: no weights needed)."""
    model = meta_model(family, unet_only=True)
    plan = plan_structure(model, **options)
    depths, kept = choose_blocks(model.configs["unet"], plan, "last", None)
    config = student_config(model.configs["unet"], plan, depths)
    shapes = student_shapes(config)
    mapping = key_map(shapes, prefix_table(plan.skeleton, kept))
    return config, student_state_dict(model.components["unet"], shapes, mapping), mapping


@pytest.mark.parametrize(("family", "preset", "expected"), COUNTS)
def test_presets_from_full_size_teachers_have_published_counts(family, preset, expected):
    config, sd, _ = _student_on_meta(family, preset=preset)
    assert config == preset_config(preset, family)
    assert count_state_dict(sd) == expected


def test_drop_40_on_sdxl_leaves_30_blocks_in_a_buildable_config():
    config, sd, _ = _student_on_meta("sdxl", drop_transformer_blocks=40)
    assert layout_from_config(config).transformer_blocks() == 30
    module_keys = set(meta_state_dict(meta_unet(config)))
    assert module_keys == set(sd)


def test_ssd_1b_by_hand_is_the_preset():
    hand = _student_on_meta("sdxl", mid_block="resnet", depths="down2=4,4 up0=4,4,10 up1=2,1,1")
    preset = _student_on_meta("sdxl", preset="ssd-1b")
    assert layout_from_config(hand[0]) == layout_from_config(preset[0])
    assert hand[2] == preset[2]  # the same student key -> teacher key map
    same = _student_on_meta("sdxl", depths="mid=0 down2=4,4 up0=4,4,10 up1=2,1,1")
    assert same[2] == preset[2]


def test_depths_spec_errors():
    assert parse_depths("down2=4,4 mid=0 up0=4") == {"down2": [4, 4], "mid": [0], "up0": [4]}
    for bad in ("down2", "down2=a", "side1=2", "down2=1;down2=2", ""):
        with pytest.raises(SdcError):
            parse_depths(bad)
    with pytest.raises(SdcError, match="pruning can only remove"):
        _student_on_meta("sdxl", depths="down2=11,4")


def _expected_teacher_key(key: str, record: dict, up_shift: int) -> str:
    """Independent restatement of the inheritance rules (BK-SDM up indices, level shift, renumbering)."""
    kept = record["kept"]
    m = re.match(
        r"^((?:down|up)_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.0)\.transformer_blocks\.(\d+)\.(.*)$",
        key,
    )
    if m:
        info = kept[m.group(1)]
        return f"{info['teacher']}.transformer_blocks.{info['blocks'][int(m.group(2))]}.{m.group(3)}"
    m = re.match(r"^((?:down|up)_blocks\.\d+\.attentions\.\d+)\.(.*)$", key)
    if m:
        return f"{kept[m.group(1)]['teacher']}.{m.group(2)}"
    m = re.match(r"^up_blocks\.(\d+)\.(resnets)\.(\d+)\.(.*)$", key)
    if m:
        k, i = int(m.group(1)), int(m.group(3))
        layers = len(record["student_config"]["up_block_types"])
        lpb = record["student_config"]["layers_per_block"]
        lpb = lpb if isinstance(lpb, int) else lpb[layers - 1 - k]
        teacher_i = i if lpb == 2 else (0, 2)[i]
        return f"up_blocks.{k + up_shift}.resnets.{teacher_i}.{m.group(4)}"
    m = re.match(r"^up_blocks\.(\d+)\.(.*)$", key)
    if m:
        return f"up_blocks.{int(m.group(1)) + up_shift}.{m.group(2)}"
    return key


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


@pytest.mark.parametrize(
    ("teacher", "options"),
    [
        ("tiny-sd", {"preset": "bk-base"}),
        ("tiny-sd", {"preset": "bk-small"}),
        ("tiny-sd", {"preset": "bk-tiny"}),
        ("tiny-sdxl", {"preset": "ssd-1b", "select": "uniform"}),
        pytest.param("tiny-sdxl", {"preset": "vega", "select": "uniform"}, marks=pytest.mark.slow),
        pytest.param("tiny-sdxl", {"preset": "koala-1b", "select": "last"}, marks=pytest.mark.slow),
        pytest.param("tiny-sdxl", {"preset": "koala-700m", "select": "uniform"}, marks=pytest.mark.slow),
        ("tiny-sdxl", {"drop_transformer_blocks": 40, "select": "uniform"}),
    ],
)
def test_kept_weights_are_bit_identical(tmp_path, teacher, options):
    out = tmp_path / "student"
    result = prune(PruneRequest(teacher=teacher, output=str(out), unet_only=True, **options))
    record = json.loads((out / RECORD_FILE).read_text())
    model = load_model(teacher)
    student = (
        _tensors(out / "unet" / "diffusion_pytorch_model.safetensors")
        if (out / "unet").is_dir()
        else _tensors(out / "diffusion_pytorch_model.safetensors")
    )
    shift = 1 if options.get("preset") == "bk-tiny" else 0
    assert set(student) == set(meta_state_dict(meta_unet(record["student_config"])))
    for key, value in student.items():
        source = model.components["unet"][_expected_teacher_key(key, record, shift)].load()
        assert value.dtype == source.dtype and torch.equal(value, source), key
    assert result.parameters["student"] == sum(v.numel() for v in student.values())


@pytest.mark.slow  # over ~6 s on 2 idle cores: the fast lane stays under 4 minutes
def test_drop_40_student_loads_with_diffusers_and_runs(tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "student"
    result = prune(PruneRequest(teacher="tiny-sdxl", output=str(out), drop_transformer_blocks=40, **FAST))
    assert result.transformer_blocks == {"teacher": 70, "student": 30}
    assert len([r for r in result.removed if r["reason"] == "selection"]) == 40
    assert all(r["score"] is not None for r in result.removed)
    assert result.flops_per_step["student"] < result.flops_per_step["teacher"]
    unet = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    assert sum(p.numel() for p in unet.parameters()) == result.parameters["student"]
    cfg = unet.config
    with torch.no_grad():
        y = unet(
            torch.randn(1, 4, 16, 16),
            torch.tensor([500]),
            torch.randn(1, 77, cfg.cross_attention_dim),
            added_cond_kwargs={
                "text_embeds": torch.randn(1, 64),
                "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
            },
        ).sample
    assert y.shape == (1, 4, 16, 16) and torch.isfinite(y).all()
    for name in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (out / name).is_dir(), name


@pytest.mark.slow
@pytest.mark.parametrize(("teacher", "n"), [("tiny-sd", 4), ("tiny-sdxl", 40)])
def test_importance_beats_uniform_and_last(tmp_path, teacher, n):
    mse = {}
    for select in ("importance", "uniform", "last"):
        r = prune(
            PruneRequest(
                teacher=teacher,
                output=str(tmp_path / select),
                drop_transformer_blocks=n,
                select=select,
                evaluate=True,
                unet_only=True,
                calibration_samples=4,
                calibration_size=64 if teacher == "tiny-sd" else 32,
            )
        )
        mse[select] = r.init_mse
    assert mse["importance"] < mse["uniform"] and mse["importance"] < mse["last"], mse


def test_pruned_student_converts_and_its_layout_is_inferred(tmp_path, cli):
    out = tmp_path / "student"
    r = cli(
        "prune", "--teacher", "tiny-sdxl", "--preset", "koala-700m", "--select", "last", "-o", out, "--json"
    )
    assert r.code == 0, r
    report = json.loads(r.stdout)
    single = tmp_path / "student.safetensors"
    assert cli("convert", out, "-o", single).code == 0
    back = load_model(single)
    assert layout_from_config(back.configs["unet"]) == layout_from_config(report["student_config"])
    assert back.preset == "koala-700m"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--teacher", "tiny-sd", "--preset", "ssd-1b"), "applies to Stable Diffusion XL"),
        (("--teacher", "tiny-sdxl", "--drop-transformer-blocks", "200"), "more than this student can lose"),
        (("--teacher", "tiny-sd", "--drop-transformer-blocks", "1"), "cannot be met exactly"),
        (("--teacher", "/nonexistent/teacher", "--preset", "bk-base"), "does not exist"),
        (("--teacher", "tiny-sd"), "nothing to prune"),
        (("--teacher", "tiny-sd", "--preset", "bk-base", "--mid-block", "none"), "--preset fixes"),
        (("--teacher", "tiny-sd", "--preset", "bk-base", "--select", "random"), "'random' is not one of"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, cli, args, message):
    r = cli("prune", *args, "-o", tmp_path / "out")
    assert r.code == 2, r
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_untouched(tmp_path, cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = cli("prune", "--teacher", "tiny-sd", "--preset", "bk-base", "-o", out)
    assert r.code == 2 and "already exists" in r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ---------------------------------------------------------------------------- cost, defaults, progress (16.7)


@pytest.mark.slow  # over ~6 s on 2 idle cores: the fast lane stays under 4 minutes
def test_cpu_defaults_keep_a_tiny_model_within_the_budget_and_a_gpu_keeps_full_resolution():
    from sdcompress.prune import importance as imp

    model = load_model("tiny-sdxl")
    blocks = len(_candidates_of(model, "ssd-1b"))
    cpu = imp.scoring_plan(
        model, blocks=blocks, evaluate=False, device=torch.device("cpu"), samples=None, size=None
    )
    assert cpu.defaulted and cpu.samples == imp.CPU_SAMPLES
    assert cpu.size < model.family.resolution and cpu.flops <= imp.CPU_FLOP_BUDGET and not cpu.gpu_work
    assert cpu.passes == blocks + 1 and cpu.forwards == (blocks + 1) * cpu.samples
    # the old default (5 minutes and more): 8 samples at the family's resolution, 16x the budget
    old = imp.scoring_plan(
        model, blocks=blocks, evaluate=False, device=torch.device("cpu"), samples=8, size=64
    )
    assert old.flops > 5 * imp.CPU_FLOP_BUDGET and not old.defaulted
    gpu = imp.scoring_plan(
        model, blocks=blocks, evaluate=True, device=torch.device("cuda"), samples=None, size=None
    )
    assert (gpu.samples, gpu.size, gpu.passes) == (imp.GPU_SAMPLES, model.family.resolution, blocks + 3)


def _candidates_of(model, preset):
    from sdcompress.prune.plan import candidates

    return candidates(plan_structure(model, preset=preset))


@pytest.mark.slow  # over ~6 s on 2 idle cores: the fast lane stays under 4 minutes
def test_full_size_on_a_cpu_is_flagged_as_gpu_work_and_the_cli_says_how_to_make_it_cheaper(capsys):
    from sdcompress.cli.prune import announce
    from sdcompress.prune import importance as imp

    model = meta_model("sdxl", unet_only=True)
    blocks = len(_candidates_of(model, "ssd-1b"))
    plan = imp.scoring_plan(
        model, blocks=blocks, evaluate=False, device=torch.device("cpu"), samples=None, size=None
    )
    assert plan.gpu_work and plan.size == model.family.resolution // 4
    announce(plan)
    text = " ".join(capsys.readouterr().err.split())
    assert f"{plan.passes} U-Net passes" in text and f"x {plan.samples} samples at {plan.size} px" in text
    assert "GPU work" in text and "hours on a CPU" in text
    for option in ("--calibration-size", "--calibration-samples", "--select uniform"):
        assert option in text
    tiny = imp.scoring_plan(
        load_model("tiny-sdxl"),
        blocks=blocks,
        evaluate=False,
        device=torch.device("cpu"),
        samples=None,
        size=None,
    )
    announce(tiny)
    assert "GPU work" not in capsys.readouterr().err


@pytest.mark.slow  # over ~6 s on 2 idle cores: the fast lane stays under 4 minutes
def test_scoring_reports_batches_and_the_plan_before_it_starts(tmp_path):
    events, plans = [], []
    prune(
        PruneRequest(
            teacher="tiny-sdxl", output=str(tmp_path / "s"), preset="ssd-1b", unet_only=True, **FAST
        ),
        progress=lambda stage, done, total: events.append((stage, done, total)),
        on_plan=lambda plan: plans.append((plan, len(events))),
    )
    ((plan, seen_before),) = plans
    assert seen_before == 0  # said before any work
    scoring = [e for e in events if e[0] == "scoring blocks"]
    total = (plan.blocks + 1) * (FAST["calibration_samples"] // FAST["batch_size"])
    assert scoring[0] == ("scoring blocks", 0, total) and scoring[-1] == ("scoring blocks", total, total)
    assert [d for _, d, _ in scoring] == list(range(total + 1))


@pytest.mark.slow  # over ~6 s on 2 idle cores: the fast lane stays under 4 minutes
def test_redirected_stderr_gets_progress_lines_with_an_eta(tmp_path, cli, monkeypatch):
    import sdcompress.cli.prune as cli_prune

    monkeypatch.setattr(cli_prune, "LINE_EVERY_S", 0.0)
    r = cli(
        "prune", "--teacher", "tiny-sdxl", "--preset", "ssd-1b", "--unet-only", "-o", tmp_path / "s",
        "--calibration-samples", "1", "--calibration-size", "32", "--batch-size", "1",
    )  # fmt: skip
    assert r.code == 0, r
    err = r.stderr
    assert re.search(r"importance scoring: \d+ U-Net passes .* x 1 samples at 32 px", " ".join(err.split()))
    assert "scoring blocks: 0/" in err and re.search(
        r"scoring blocks: \d+/\d+ \(\d+%\), .* elapsed, about .* left", err
    )


def test_small_cpu_passes_run_on_one_thread_and_threads_are_restored():
    from dataclasses import replace

    from sdcompress.prune import importance as imp

    small = imp.ScoringPlan(45, 45, 4, 16, 8, 45 * 4 * 5e8, "cpu", True, False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for plan, inside in (
            (small, 1),
            (replace(small, flops=45 * 4 * 4e11), 2),
            (replace(small, device="cuda"), 2),
        ):
            with imp.threads_for(plan):
                assert torch.get_num_threads() == inside, plan
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
