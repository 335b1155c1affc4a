"""Architecture knowledge: every family and preset reproduces architectures.md to the parameter."""

from __future__ import annotations

import json

import pytest

from sdcompress.arch.count import count_unet_config
from sdcompress.arch.families import get_family
from sdcompress.arch.layout import UNetLayout, config_from_layout, layout_from_config
from sdcompress.arch.presets import preset_config
from sdcompress.errors import SdcError

# shared/reference/architectures.md
TEACHERS = {"sd1": (859_520_964, 16), "sd2": (865_910_724, 16), "sdxl": (2_567_463_684, 70)}
PRESETS = {
    ("bk-base", "sd1"): (579_384_964, 10),
    ("bk-small", "sd1"): (482_346_884, 9),
    ("bk-tiny", "sd1"): (323_384_964, 9),
    ("bk-base", "sd2"): (583_480_964, None),
    ("bk-small", "sd2"): (485_787_524, None),
    ("bk-tiny", "sd2"): (326_825_604, None),
    ("ssd-1b", "sdxl"): (1_331_334_404, 34),
    ("vega", "sdxl"): (745_225_604, 15),
    ("koala-1b", "sdxl"): (1_161_184_324, 30),
    ("koala-700m", "sdxl"): (782_822_724, 21),
}


@pytest.mark.parametrize("family", TEACHERS)
def test_teacher_counts(family):
    cfg = get_family(family).unet
    params, blocks = TEACHERS[family]
    assert count_unet_config(cfg) == params
    assert layout_from_config(cfg).transformer_blocks() == blocks


@pytest.mark.parametrize(("preset", "teacher"), PRESETS)
def test_preset_counts(preset, teacher):
    cfg = preset_config(preset, teacher)
    params, blocks = PRESETS[preset, teacher]
    assert count_unet_config(cfg) == params
    if blocks is not None:
        assert layout_from_config(cfg).transformer_blocks() == blocks


@pytest.mark.parametrize(("preset", "teacher"), PRESETS)
def test_canonical_spelling_is_the_same_unet(preset, teacher):
    cfg = preset_config(preset, teacher)
    layout = layout_from_config(cfg)
    again = config_from_layout(get_family(teacher).unet, layout, channels=cfg["block_out_channels"])
    assert layout_from_config(again) == layout
    assert count_unet_config(again) == PRESETS[preset, teacher][0]


def test_published_fields_are_kept():
    cfg = preset_config("ssd-1b", "sdxl")
    assert cfg["transformer_layers_per_block"] == [[1], [2, 2], [4, 4]]
    assert cfg["reverse_transformer_layers_per_block"] == [[4, 4, 10], [2, 1, 1], 1]
    assert cfg["mid_block_type"] == "UNetMidBlock2D"


def test_preset_for_wrong_family_is_an_error():
    with pytest.raises(SdcError, match="applies to"):
        preset_config("ssd-1b", "sd1")
    with pytest.raises(SdcError, match="unknown preset"):
        preset_config("nope", "sd1")


def test_inexpressible_mid_depth_is_an_error():
    layout = UNetLayout(down=((0, 0), (2, 2), (4, 4)), up=((4, 4, 4), (2, 2, 2), (0, 0, 0)), mid=3)
    with pytest.raises(SdcError, match="mid block"):
        config_from_layout(get_family("sdxl").unet, layout)


@pytest.mark.parametrize(
    ("preset", "teacher"), [("ssd-1b", "sdxl"), ("bk-tiny", "sd2"), ("koala-700m", "sdxl")]
)
def test_info_prints_the_reference_count(cli, preset, teacher):
    r = cli("info", preset, "--arch", "--family", teacher, "--json")
    assert r.code == 0, r
    data = json.loads(r.stdout)
    assert data["parameters"]["unet"] == PRESETS[preset, teacher][0]
    assert data["preset"] == preset
    r = cli("info", preset, "--arch", "--teacher", teacher)
    assert f"{PRESETS[preset, teacher][0]:,}" in r.stdout


def test_info_on_a_model(cli):
    r = cli("info", "tiny-sdxl", "--json")
    assert r.code == 0, r
    data = json.loads(r.stdout)
    assert data["family"] == "tiny-sdxl" and data["transformer_blocks"] == 70
    assert set(data["parameters"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert sum(data["unet_stages"].values()) == data["parameters"]["unet"]
