"""A family is one entry: names, Hub repository, license and tag live on `Family`; layers import downwards."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sdcompress.arch.families import ALIASES, FAMILIES, TINY_MODELS, find_family, get_family
from sdcompress.arch.presets import hub_repo
from sdcompress.checkpoint.keymap.vae import module_table
from sdcompress.hub.card import default_license

# What `load_model` downloaded for each short name before the facts moved onto the families.
HUB_NAMES = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1",
    "sd21-base": "stabilityai/stable-diffusion-2-1-base",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sdxl-refiner": "stabilityai/stable-diffusion-xl-refiner-1.0",
    "ssd-1b": "segmind/SSD-1B",
    "vega": "segmind/Segmind-Vega",
}


@pytest.mark.parametrize(("name", "repo"), HUB_NAMES.items())
def test_short_names_resolve_to_the_same_hub_repositories(name, repo):
    assert hub_repo(name) == repo
    assert hub_repo(name.upper()) == repo


def test_family_names_and_aliases_name_their_weights_and_tiny_ones_nothing():
    for family in FAMILIES.values():
        for name in (family.name, *family.aliases):
            assert find_family(name) is family
            assert hub_repo(name) == (None if family.tiny else family.hub_id)
    assert hub_repo("bk-small") is None and hub_repo("nowhere") is None
    assert set(ALIASES) == {"sd15", "sd1.5", "sd21", "sd2.1", "sd2-base"}
    assert TINY_MODELS == ("tiny-sd", "tiny-sdxl")


@pytest.mark.parametrize(
    ("name", "topology", "license_", "tag"),
    [
        ("sd1", "sd1", "creativeml-openrail-m", "stable-diffusion"),
        ("sd2-v", "sd2", "openrail++", "stable-diffusion"),
        ("sdxl-refiner", "sdxl-refiner", "openrail++", "stable-diffusion-xl"),
        ("tiny-sd", "sd1", "apache-2.0", None),
        ("tiny-sdxl", "sdxl", "apache-2.0", None),
    ],
)
def test_a_family_carries_its_facts(name, topology, license_, tag):
    family = get_family(name)
    assert (family.topology, family.license, family.hub_tag) == (topology, license_, tag)
    assert default_license(family) == license_


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(m for m in sys.modules if m.startswith('sdcompress')))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_arch_does_not_import_the_checkpoint_layer():
    loaded = _imported_after("import sdcompress.arch.count, sdcompress.arch.infer, sdcompress.arch.presets")
    assert not {m for m in loaded if m.startswith("sdcompress.checkpoint")}


def test_writers_do_not_import_the_resolver():
    """resolve -> tiny -> writers -> resolve was a cycle; the shared names live in `conventions`."""
    assert "sdcompress.checkpoint.resolve" not in _imported_after("import sdcompress.checkpoint.writers")


@pytest.mark.parametrize("levels", [2, 4])
def test_vae_table_is_one_to_one(levels):
    table = module_table(levels)
    single = [s for s, _ in table.values()]
    assert len(set(single)) == len(single)
    assert table[f"decoder.up_blocks.{levels - 1}.resnets"] == ("decoder.up.0.block", "resnets")
