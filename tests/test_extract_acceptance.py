"""diffusers is the referee: extracted LoRAs load completely and fuse to base + rank-R truncation.

For the tiny SD and SDXL pipelines: `load_lora_weights` must inject exactly the
modules the file holds, and the fused U-Net and text-encoder weights must equal
`sdcompress merge` of the same file and base + the rank-R truncated SVD of the
difference.
"""

from __future__ import annotations

import pytest
import torch
from _lowrank_fixtures import write_pair
from peft.tuners.lora import LoraLayer

from sdcompress.checkpoint.instantiate import build_pipeline
from sdcompress.checkpoint.resolve import load_model
from sdcompress.checkpoint.safetensors_io import SafetensorsFile
from sdcompress.lowrank.extract import ExtractOptions
from sdcompress.lowrank.targets import is_target
from sdcompress.services.extract import ExtractRequest, run_extract
from sdcompress.services.merge import LoraRef, MergeRequest, run_merge

RANK = 3
pytestmark = pytest.mark.slow  # builds and fuses four tiny pipelines (~75 s on 2 cores)


@pytest.fixture(scope="module", params=["tiny-sd", "tiny-sdxl"])
def pair(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    bp, tp, base, tuned = write_pair(tmp, request.param)
    return tmp, bp, tp, base, tuned


def _truncated(base, tuned, component, key, rank):
    b = base.components[component][key].load().float()
    d = tuned.components[component][key].load().float() - b
    m = d.reshape(d.shape[0], -1)
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    r = min(rank, len(s))
    return b + ((u[:, :r] * s[:r]) @ vh[:r]).float().reshape(d.shape)


def _lora_modules(module):
    return {n for n, m in module.named_modules() if isinstance(m, LoraLayer)}


def _pipeline(model):
    """build_pipeline, with any buffer left on the meta device (CLIP position_ids) made real."""
    pipe = build_pipeline(model)
    for c in ("text_encoder", "text_encoder_2"):
        te = getattr(pipe, c, None)
        if te is None:
            continue
        for name, buf in list(te.named_buffers()):
            if buf.is_meta and name.endswith("position_ids"):
                owner = te.get_submodule(name.rsplit(".", 1)[0])
                owner.register_buffer(
                    "position_ids", torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False
                )
    return pipe


def _fused(pipe, component):
    return {k: v.detach().float() for k, v in getattr(pipe, component).state_dict().items()}


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_diffusers_loads_every_key_and_fuses_to_the_truncation(pair, fmt):
    tmp, bp, tp, base, tuned = pair
    out = tmp / f"lora-{fmt}.safetensors"
    result = run_extract(
        ExtractRequest(str(bp), str(tp), str(out), ExtractOptions(rank=RANK, dtype=torch.float32), format=fmt)
    )
    f = SafetensorsFile(out)
    suffix = ".lora_down.weight" if fmt == "kohya" else ".lora_A.weight"
    file_modules = [k.removesuffix(suffix) for k in f.entries if k.endswith(suffix)]
    assert result.modules == len(file_modules)
    expected = {
        c: {
            k.removesuffix(".weight")
            for k, lt in base.components[c].items()
            if is_target(c, k, lt.shape, False)
        }
        for c in ("unet", "text_encoder", "text_encoder_2")
        if c in base.components
    }
    assert len(file_modules) == sum(map(len, expected.values()))

    model = load_model(bp)
    pipe = _pipeline(model)
    pipe.load_lora_weights(str(out))
    injected = {c: _lora_modules(getattr(pipe, c)) for c in expected}
    for c, paths in expected.items():
        # every module of the file is injected, nothing else (CLIP paths may drop `text_model.`)
        got = {p if c == "unet" or p.startswith("text_model.") else "text_model." + p for p in injected[c]}
        assert got == paths, c
    pipe.fuse_lora(components=list(expected))
    pipe.unload_lora_weights()

    merged_path = tmp / f"merged-{fmt}"
    run_merge(MergeRequest(models=[str(bp)], output=str(merged_path), loras=[LoraRef(str(out), 1.0)]))
    merged = load_model(merged_path)
    for c, paths in expected.items():
        fused = _fused(pipe, c)
        for p in sorted(paths):
            key = p + ".weight"
            mine = merged.components[c][key].load().float()
            ref = _truncated(base, tuned, c, key, RANK)
            theirs = fused[key if key in fused else key.removeprefix("text_model.")]
            torch.testing.assert_close(mine, ref, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(theirs, ref, atol=2e-5, rtol=1e-4)
        # everything else is untouched
        for key, lt in base.components[c].items():
            if key.removesuffix(".weight") not in paths:
                assert torch.equal(merged.components[c][key].load(), lt.load()), key


def test_report_has_blocks_and_errors(pair):
    tmp, bp, tp, base, tuned = pair
    out = tmp / "report.safetensors"
    r = run_extract(ExtractRequest(str(bp), str(tp), str(out), ExtractOptions(rank=RANK, conv_rank=RANK)))
    assert r.blocks and all(0 <= b.retained <= 1 for b in r.blocks)
    assert any(b.block.startswith("unet.down_blocks") for b in r.blocks)
    assert 0 < r.rel_error < 1
    meta = SafetensorsFile(out).metadata
    assert meta["ss_network_dim"] == str(RANK) and json_ok(meta["ss_network_args"])
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    data = out.read_bytes()
    hlen = int.from_bytes(data[:8], "little")
    import hashlib

    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + hlen :]).hexdigest()


def json_ok(s):
    import json

    return isinstance(json.loads(s), dict)
