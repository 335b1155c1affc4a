"""The model card and the lineage readers, without any upload."""

from __future__ import annotations

import json

from hub_server import validate_card_yaml
from huggingface_hub import ModelCard

from sdcompress.arch.families import get_family
from sdcompress.hub.card import CardFacts, base_model_id, build_card, default_license
from sdcompress.hub.lineage import Lineage, folder_lineage, loss_entries


def test_loss_entries_accept_every_shape_and_skip_garbage():
    run = {
        "loss_curve": [
            0.5,
            [10, 0.25],
            {"step": 20, "loss": 0.125, "task": 0.1, "lr": 1e-4},
            {"step": 30},
            "x",
        ]
    }
    assert loss_entries(run) == [
        {"step": 1, "loss": 0.5},
        {"step": 10, "loss": 0.25},
        {"step": 20, "loss": 0.125, "task": 0.1, "lr": 1e-4},
    ]
    assert loss_entries({"loss_history": [{"step": 1, "loss": 1}]}) == [{"step": 1, "loss": 1.0}]
    assert loss_entries({"loss_curve": "not a list"}) == []


def test_lineage_tolerates_missing_and_broken_records(tmp_path):
    assert folder_lineage(tmp_path) == Lineage()
    (tmp_path / "sdcompress_prune.json").write_text("{broken")
    (tmp_path / "sdcompress_run.json").write_text(json.dumps(["not", "an", "object"]))
    lineage = folder_lineage(tmp_path)
    assert lineage.prune is None and lineage.run is None
    assert len(lineage.notes) == 2


def test_sample_grid_prefers_a_named_grid_then_the_newest_validation_image(tmp_path):
    (tmp_path / "validation").mkdir()
    for step in (5, 50):
        (tmp_path / "validation" / f"step-{step:08d}.png").write_bytes(b"png")
    assert folder_lineage(tmp_path).sample_grid == "validation/step-00000050.png"
    (tmp_path / "samples.png").write_bytes(b"png")
    assert folder_lineage(tmp_path).sample_grid == "samples.png"


def test_base_model_ids(tmp_path):
    assert base_model_id("SDXL") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert base_model_id("sd1") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert base_model_id("segmind/SSD-1B") == "segmind/SSD-1B"
    assert base_model_id("tiny-sd") is None  # built-in, not on the Hub
    local = tmp_path / "me" / "model"
    local.mkdir(parents=True)
    assert base_model_id(str(local)) is None
    assert base_model_id(None) is None


def test_licenses_follow_the_family():
    assert default_license(get_family("sd1")) == "creativeml-openrail-m"
    assert default_license(get_family("sdxl")) == "openrail++"
    assert default_license(None) == "other"


def test_lora_card_for_sdxl_metadata_validates():
    facts = CardFacts(
        repo_id="me/style",
        kind="lora",
        family=get_family("sdxl"),
        preset=None,
        parameters={"lora": 1000},
        files=[("style.safetensors", 4096)],
        lineage=Lineage(
            run={"command": "lora train", "base_model": "SDXL", "steps": 5, "loss_curve": [1.0, 0.5]}
        ),
        weight_name="style.safetensors",
        lora={"layout": "kohya", "rank": 8, "modules": 12},
    )
    card = build_card(facts)
    assert isinstance(card, ModelCard)
    assert validate_card_yaml(str(card)) == []
    assert card.data.base_model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert card.data.license == "openrail++"
    assert {"lora", "stable-diffusion-xl", "sdcompress"} <= set(card.data.tags)
    text = str(card)
    assert "StableDiffusionXLPipeline" in text and 'weight_name="style.safetensors"' in text
    assert "### LoRA training" in text and "- base model: `SDXL`" in text
    assert "- rank: 8" in text
