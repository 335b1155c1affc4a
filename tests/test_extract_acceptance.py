"""diffusers is the referee: extracted LoRAs, loaded the way a user loads them, fuse to what sdcompress bakes.

The pipeline comes from files (`from_pretrained` of a folder written by
diffusers' own `save_pretrained`, or `from_single_file` of our single file),
then `load_lora_weights(file)`, as in diffusers' documentation. The tuned
model changes only some modules (U-Net to_q/to_v/feed-forward, CLIP q_proj and
fc1, and for SDXL the bigG encoder's fused `in_proj_weight` only), the case
that made diffusers drop the text-encoder attention of a kohya file silently
(SD) or refuse it ("Could not automatically infer state dict type", SDXL).
Every changed weight must fuse to the value `sdcompress merge` bakes from the
same file, with every module of the file injected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re

import pytest
import torch
from conftest import load_lora_file
from peft.tuners.lora import LoraLayer

from sdcompress.checkpoint.resolve import load_model
from sdcompress.checkpoint.safetensors_io import SafetensorsFile
from sdcompress.checkpoint.tensors import LazyTensor
from sdcompress.checkpoint.tiny import tiny_model
from sdcompress.checkpoint.writers import save_diffusers, save_single_file
from sdcompress.lowrank.extract import ExtractOptions
from sdcompress.services.extract import ExtractRequest, run_extract
from sdcompress.services.merge import LoraRef, MergeRequest, run_merge

RANK = 4
pytestmark = pytest.mark.slow  # loads and fuses six tiny pipelines

# What the "fine-tune" changed, by a rank-2 delta: a subset, so some text-encoder
# layers (out_proj, fc2) stay out of the extracted file.
_CHANGED = re.compile(r"(attn[12]\.to_[qv]|ff\.net\.(0\.proj|2)|self_attn\.q_proj|mlp\.fc1)\.weight$")
_CHANGED_BIGG = re.compile(r"self_attn\.[qkv]_proj\.weight$")  # in_proj_weight of the single file


def _tuned(base):
    gen = torch.Generator().manual_seed(7)
    components = {}
    for c, sd in base.components.items():
        rx = _CHANGED_BIGG if c == "text_encoder_2" else _CHANGED
        out = dict(sd)
        for key, lt in sd.items():
            if c != "vae" and rx.search(key):
                w = lt.load()
                d = torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(2, w.shape[1], generator=gen)
                out[key] = LazyTensor.of(w + 0.05 * d)
        components[c] = out
    return dataclasses.replace(base, components=components, ref=base.ref + "-tuned")


@pytest.fixture(scope="module", params=["tiny-sd", "tiny-sdxl"])
def setup(request, tmp_path_factory):
    """Base and tuned single files, a diffusers folder written by diffusers itself, and the pipeline loader."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    tmp = tmp_path_factory.mktemp(request.param)
    base = tiny_model(request.param)
    tuned = _tuned(base)
    bp, tp = tmp / "base.safetensors", tmp / "tuned.safetensors"
    save_single_file(base, bp)
    save_single_file(tuned, tp)
    save_diffusers(base, tmp / "config")
    sdxl = request.param == "tiny-sdxl"
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    cls.from_single_file(str(bp), config=str(tmp / "config")).save_pretrained(tmp / "saved")
    if sdxl:

        def load():
            return cls.from_single_file(str(bp), config=str(tmp / "config"))
    else:

        def load():
            return cls.from_pretrained(str(tmp / "saved"))

    components = ["unet", "text_encoder"] + (["text_encoder_2"] if sdxl else [])
    return tmp, bp, tp, base, tuned, load, components


def _file_modules(path, fmt):
    suffix = ".lora_down.weight" if fmt == "kohya" else ".lora_A.weight"
    return [k.removesuffix(suffix) for k in SafetensorsFile(path).entries if k.endswith(suffix)]


@pytest.mark.parametrize(("fmt", "mode"), [("kohya", "fixed"), ("peft", "fixed"), ("kohya", "energy")])
def test_diffusers_loads_the_file_as_a_user_does_and_fuses_to_our_weights(setup, fmt, mode):
    tmp, bp, tp, base, tuned, load, components = setup
    out = tmp / f"lora-{fmt}-{mode}.safetensors"
    options = ExtractOptions(
        rank=RANK, mode=mode, mode_param=0.7 if mode == "energy" else None, dtype=torch.float32
    )
    result = run_extract(ExtractRequest(str(bp), str(tp), str(out), options, format=fmt))
    if mode == "energy":  # the case diffusers mis-scaled: ranks (and so kohya alphas) vary per module
        assert len({x.rank for x in result.layers}) > 1
        alphas = {
            float(t.load()) for k, t in SafetensorsFile(out).state_dict().items() if k.endswith(".alpha")
        }
        assert len(alphas) == 1

    pipe = load()
    load_lora_file(pipe, str(out))
    injected = sum(sum(isinstance(m, LoraLayer) for m in getattr(pipe, c).modules()) for c in components)
    assert injected == len(_file_modules(out, fmt))  # every module of the file, text-encoder attention too
    pipe.fuse_lora(components=components)
    pipe.unload_lora_weights()

    merged_path = tmp / f"merged-{fmt}-{mode}.safetensors"
    run_merge(MergeRequest(models=[str(bp)], output=str(merged_path), loras=[LoraRef(str(out), 1.0)]))
    merged = load_model(merged_path)
    checked = 0
    for c in components:
        fused = {k: v.detach().float() for k, v in getattr(pipe, c).state_dict().items()}
        for key, lt in tuned.components[c].items():
            b = base.components[c][key].load()
            if torch.equal(lt.load(), b):
                continue
            theirs = fused[key if key in fused else key.removeprefix("text_model.")]
            ours = merged.components[c][key].load().float()
            assert not torch.allclose(theirs, b.float()), f"{c}.{key} was not applied by diffusers"
            torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-4, msg=f"{c}.{key}")
            if mode == "fixed":  # rank 4 holds the rank-2 change exactly
                torch.testing.assert_close(ours, lt.load().float(), atol=2e-5, rtol=1e-4)
            checked += 1
    assert checked == result.modules


def test_report_has_blocks_and_errors(setup):
    tmp, bp, tp, *_ = setup
    out = tmp / "report.safetensors"
    r = run_extract(ExtractRequest(str(bp), str(tp), str(out), ExtractOptions(rank=RANK)))
    assert r.blocks and all(0 <= b.retained <= 1 for b in r.blocks)
    assert any(b.block.startswith("unet.") for b in r.blocks)
    meta = SafetensorsFile(out).metadata
    assert meta["ss_network_dim"] == str(RANK) and isinstance(json.loads(meta["ss_network_args"]), dict)
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    data = out.read_bytes()
    hlen = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + hlen :]).hexdigest()
