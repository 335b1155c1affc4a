"""nf4 and int8 diffusers folders (sdcompress/quantize/diffusers_folder.py).

int8 (torchao weight-only) runs on a CPU and is checked end to end: diffusers reloads the folder
with int8 Linear weights and the U-Net's output stays near the source's. nf4 (bitsandbytes 4-bit)
needs CUDA in diffusers; without a GPU these tests check it is refused in one sentence before
anything is written (docs/gguf.md says what was not verified).
"""

from __future__ import annotations

import pytest
import torch

from sdcompress.choices import QuantFormat
from sdcompress.errors import SdcError
from sdcompress.quantize.diffusers_folder import quantize_folder


def _unet_out(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x.to(unet.dtype), 10, ctx.to(unet.dtype)).sample.float()


@pytest.mark.slow
def test_int8_folder_reloads_quantized_and_close(tmp_path):
    pytest.importorskip("torchao")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torchao.utils import TorchAOBaseTensor
    from transformers import CLIPTextModel

    from sdcompress.checkpoint.tiny import tiny_model_path

    src = tiny_model_path("tiny-sd")
    out = tmp_path / "int8"
    quantize_folder("tiny-sd", out, QuantFormat.INT8, text_encoders=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".quantize-source-")]

    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    q = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert isinstance(q, TorchAOBaseTensor)
    assert not isinstance(unet.conv_in.weight, TorchAOBaseTensor)  # Linear only
    te = CLIPTextModel.from_pretrained(out / "text_encoder")
    assert isinstance(
        next(m.weight for n, m in te.named_modules() if n.endswith("q_proj")), TorchAOBaseTensor
    )

    ref = UNet2DConditionModel.from_pretrained(src / "unet")
    a, b = _unet_out(ref), _unet_out(unet)
    assert 0 < ((a - b).norm() / a.norm()).item() < 0.05  # bf16 alone is ~0.017 on this model

    vae_ref, vae = AutoencoderKL.from_pretrained(src / "vae"), AutoencoderKL.from_pretrained(out / "vae")
    for (k, v), (_, w) in zip(vae_ref.state_dict().items(), vae.state_dict().items(), strict=True):
        assert torch.equal(v, w), k  # untouched


def test_refusals_are_one_sentence_and_write_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(SdcError, match="not a diffusers-folder format"):
        quantize_folder("tiny-sd", out, QuantFormat.GGUF_Q8_0, text_encoders=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SdcError, match="nf4 needs a CUDA GPU"):
        quantize_folder("tiny-sd", out, QuantFormat.NF4, text_encoders=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_backend_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(SdcError, match=r"sdcompress\[int8\]"):
        quantize_folder("tiny-sd", tmp_path / "o", QuantFormat.INT8, text_encoders=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the GPU check
    with pytest.raises(SdcError, match=r"sdcompress\[nf4\]"):
        quantize_folder("tiny-sd", tmp_path / "o", QuantFormat.NF4, text_encoders=False)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_folder_leaves_no_output(cli, tmp_path, monkeypatch):
    """`quantize --format int8` writes through a temporary folder: a failure half way leaves nothing."""
    import sdcompress.quantize.diffusers_folder as folder

    def fails_half_way(model_ref, out_dir, fmt, **kwargs):
        (out_dir / "unet").mkdir(parents=True)
        (out_dir / "unet" / "config.json").write_text("{}")
        raise SdcError("the disk went away.")

    monkeypatch.setattr(folder, "quantize_folder", fails_half_way)
    out = tmp_path / "int8"
    r = cli("quantize", "tiny-sd", "-o", out, "--format", "int8")
    assert r.code == 2 and "the disk went away" in r.stderr, r
    assert list(tmp_path.iterdir()) == []
