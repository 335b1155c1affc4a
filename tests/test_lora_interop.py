"""LoRA files other tools write, read and baked the way those tools apply them.

The referees are the tools' own code: LyCORIS builds the LoKr/LoHa/full/norm
files on the tiny SD U-Net and merges or runs them; diffusers' own converter
and loader read the attention-processor layout. NaN/inf in inputs and outputs
are refused with one sentence naming the tensor, unless allowed.
"""

from __future__ import annotations

import math

import pytest
import torch

from sdcompress.checkpoint.instantiate import build_module
from sdcompress.checkpoint.resolve import load_model
from sdcompress.checkpoint.safetensors_io import write_safetensors
from sdcompress.checkpoint.tensors import lazy_state_dict
from sdcompress.checkpoint.tiny import tiny_model
from sdcompress.checkpoint.writers import save_single_file
from sdcompress.errors import SdcError
from sdcompress.lowrank.layouts import read_lora
from sdcompress.services.lora_convert import convert_lora, is_lora_file
from sdcompress.services.merge import LoraRef, MergeRequest, bake_loras, run_merge

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
CONV = "down_blocks.0.resnets.0.conv1"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("interop") / "base.safetensors"
    save_single_file(tiny_model("tiny-sd"), path)
    return path


def _write(path, tensors, metadata=None):
    write_safetensors(path, lazy_state_dict(tensors), metadata)
    return path


def _kohya(path):
    return "lora_unet_" + path.replace(".", "_")


def _unet_weights(path):
    return {k: v.load().float() for k, v in load_model(path).components["unet"].items()}


# ----- LyCORIS, by LyCORIS ------------------------------------------------------------------------

LYCORIS_ALGOS = {
    "lokr-tucker": {"algo": "lokr", "use_tucker": True},
    "lokr-both": {"algo": "lokr", "decompose_both": True, "factor": 4},
    "loha-tucker": {"algo": "loha", "use_tucker": True},
    "full": {"algo": "full"},
    "locon-norm": {"algo": "lora", "use_tucker": True, "train_norm": True},
}


def _lycoris_network(base, tmp, name, *, dim, alpha, **kwargs):
    """LyCORIS's own network on the tiny U-Net with random weights, saved under kohya names."""
    lycoris = pytest.importorskip("lycoris")
    unet = build_module(load_model(base), "unet").float()
    net = lycoris.create_lycoris(
        unet, 1.0, linear_dim=dim, linear_alpha=alpha, conv_dim=dim, conv_alpha=alpha, **kwargs
    )
    net.apply_to()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    sd = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    # LyCORIS's own prefix is "lycoris"; kohya-trained LyCORIS files (the ones people share) use lora_unet
    sd = {"lora_unet_" + k.removeprefix("lycoris_"): v for k, v in sd.items()}
    path = _write(tmp / f"{name}.safetensors", sd, {"ss_network_module": "lycoris.kohya"})
    return unet, net, path


@pytest.mark.parametrize("name", list(LYCORIS_ALGOS))
def test_lycoris_file_bakes_to_lycoris_merge(base, tmp_path, name):
    """alpha = dim (scale 1): LyCORIS 4.1's merge_to applies alpha/dim twice for LoKr/LoHa, so only a
    unit scale makes its merge a referee; the scale itself is checked against its forward below."""
    unet, net, path = _lycoris_network(base, tmp_path, name, dim=2, alpha=2.0, **LYCORIS_ALGOS[name])
    kinds = {a.kind for a in read_lora(path).adapters.values()}
    assert kinds - {"lora"}, kinds  # the file really holds LyCORIS modules
    assert is_lora_file(path)
    out = tmp_path / "baked.safetensors"
    run_merge(MergeRequest([str(base)], str(out), loras=[LoraRef(str(path), 0.7)], dtype=torch.float32))
    net.restore()  # back to plain modules (a full module re-creates its weight), then LyCORIS merges
    net.merge_to(0.7)
    theirs = {k: v.detach().float() for k, v in unet.state_dict().items()}
    mine = _unet_weights(out)
    before = _unet_weights(base)
    changed = [k for k in mine if not torch.equal(mine[k], before[k])]
    assert len(changed) >= 20
    for k in theirs:
        torch.testing.assert_close(mine[k], theirs[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("name", ["lokr-tucker", "loha-tucker", "locon-norm"])
def test_lycoris_scale_matches_lycoris_forward(base, tmp_path, name):
    """alpha != dim: the baked U-Net computes what LyCORIS's own modules compute on the fly."""
    unet, net, path = _lycoris_network(base, tmp_path, name, dim=2, alpha=0.5, **LYCORIS_ALGOS[name])
    out = tmp_path / "baked.safetensors"
    run_merge(MergeRequest([str(base)], str(out), loras=[LoraRef(str(path))], dtype=torch.float32))
    baked = build_module(load_model(out), "unet").float()
    cfg = baked.config
    g = torch.Generator().manual_seed(0)
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    x = torch.randn(1, cfg.in_channels, size, size, generator=g)
    ctx = torch.randn(1, 4, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        theirs = unet(x, 10, ctx).sample
        mine = baked(x, 10, ctx).sample
        plain = build_module(load_model(base), "unet").float()(x, 10, ctx).sample
    assert (theirs - plain).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(mine - plain, theirs - plain, atol=1e-4, rtol=1e-3)


def _tiny_loha(shape, rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out, inner = shape[0], math.prod(shape[1:])
    return {
        "hada_w1_a": torch.randn(out, rank, generator=g),
        "hada_w1_b": torch.randn(rank, inner, generator=g),
        "hada_w2_a": torch.randn(out, rank, generator=g),
        "hada_w2_b": torch.randn(rank, inner, generator=g),
        "alpha": torch.tensor(1.0),
    }


@pytest.mark.parametrize("kind", ["loha", "lokr", "lokr-tucker", "diff", "norm"])
def test_lycoris_kinds_made_for_another_size_are_one_sentence(tmp_path, kind):
    """A tiny-model LyCORIS module baked into a full-size SD 1.5: 'does not fit', never a reshape error."""
    from _models import meta_model

    g = torch.Generator().manual_seed(0)
    name = _kohya(f"{ATTN}.to_q")
    if kind == "loha":
        t = _tiny_loha((32, 32))
    elif kind == "lokr":
        t = {"lokr_w1": torch.randn(4, 4, generator=g), "lokr_w2": torch.randn(8, 8, generator=g)}
    elif kind == "lokr-tucker":
        name = _kohya(CONV)
        t = {"lokr_w1": torch.randn(4, 4, generator=g), "lokr_w2_a": torch.randn(2, 8, generator=g),
             "lokr_w2_b": torch.randn(2, 8, generator=g), "lokr_t2": torch.randn(2, 2, 3, 3, generator=g),
             "alpha": torch.tensor(1.0)}  # fmt: skip
    elif kind == "diff":
        t = {"diff": torch.randn(32, 32, generator=g)}
    else:
        name = _kohya("down_blocks.0.attentions.0.norm")
        t = {"w_norm": torch.randn(32, generator=g), "b_norm": torch.randn(32, generator=g)}
    path = _write(tmp_path / "tiny.safetensors", {f"{name}.{k}": v for k, v in t.items()})
    lora = read_lora(path)
    with pytest.raises(SdcError, match="does not fit") as e:
        bake_loras(meta_model("sd1", unet_only=True), [(lora, 1.0)])
    assert "\n" not in str(e.value)


def test_half_matched_lora_counts_the_modules_that_do_not_match(base, tmp_path):
    g = torch.Generator().manual_seed(0)
    good, bad = _kohya(f"{ATTN}.to_q"), "lora_unet_nowhere_to_q"
    t = {}
    for n in (good, bad, bad + "2"):
        t[f"{n}.lora_down.weight"] = torch.randn(2, 32, generator=g)
        t[f"{n}.lora_up.weight"] = torch.randn(32, 2, generator=g)
    path = _write(tmp_path / "half.safetensors", t)
    with pytest.raises(SdcError) as e:
        run_merge(MergeRequest([str(base)], str(tmp_path / "m.safetensors"), loras=[LoraRef(str(path))]))
    assert "2 of its 3 modules do not match the model" in str(e.value)


# ----- convert on LyCORIS files -------------------------------------------------------------------


def test_convert_of_a_lycoris_file_says_what_convert_supports(tmp_path, cli):
    name = _kohya(f"{ATTN}.to_q")
    path = _write(tmp_path / "loha.safetensors", {f"{name}.{k}": v for k, v in _tiny_loha((32, 32)).items()})
    norm = _kohya("down_blocks.0.attentions.0.norm")
    path2 = _write(
        tmp_path / "norm.safetensors", {f"{norm}.w_norm": torch.zeros(32), f"{norm}.b_norm": torch.zeros(32)}
    )
    assert is_lora_file(path) and is_lora_file(path2)
    for p, kind in ((path, "LoHa"), (path2, "norm")):
        with pytest.raises(SdcError, match=f"LyCORIS file \\({kind} modules"):
            convert_lora(p, tmp_path / "out.safetensors", "peft")
        r = cli("convert", p, "-o", tmp_path / "out.safetensors")
        assert r.code == 2, r
        assert "LyCORIS file" in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "out.safetensors").exists()


# ----- diffusers' attention-processor layout ------------------------------------------------------


def _attn_proc_file(tmp, *, prefix="unet."):
    """The layout `unet.save_attn_procs` / old `save_lora_weights` wrote: `...processor.to_q_lora.down.weight`."""
    g = torch.Generator().manual_seed(3)
    t = {}
    for proj in ("to_q", "to_k", "to_v", "to_out"):
        t[f"{prefix}{ATTN}.processor.{proj}_lora.down.weight"] = torch.randn(2, 32, generator=g) * 0.1
        t[f"{prefix}{ATTN}.processor.{proj}_lora.up.weight"] = torch.randn(32, 2, generator=g) * 0.1
    te = "text_encoder.text_model.encoder.layers.0.self_attn"
    if prefix:
        for proj in ("to_q", "to_out"):
            t[f"{te}.{proj}_lora.down.weight"] = torch.randn(2, 32, generator=g) * 0.1
            t[f"{te}.{proj}_lora.up.weight"] = torch.randn(32, 2, generator=g) * 0.1
    return _write(tmp / f"attn-procs{'' if prefix else '-bare'}.safetensors", t), t


def test_attn_processor_layout_bakes_like_diffusers(base, tmp_path):
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    path, t = _attn_proc_file(tmp_path)
    assert is_lora_file(path)
    lora = read_lora(path)
    assert len(lora.adapters) == 6 and lora.layout == "diffusers-attn-procs"
    # diffusers' own converter: the same modules, in the PEFT layout we also read
    unet_sd = convert_unet_state_dict_to_peft({k: v for k, v in t.items() if k.startswith("unet.")})
    te_sd = {k.removeprefix("text_encoder."): v for k, v in t.items() if k.startswith("text_encoder.")}
    te_sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te_sd))
    peft_sd = {**unet_sd, **{"text_encoder." + k: v for k, v in te_sd.items()}}
    assert all(".lora_A." in k or ".lora_B." in k for k in peft_sd)
    peft = _write(tmp_path / "peft.safetensors", peft_sd)
    ours, ref = tmp_path / "ours.safetensors", tmp_path / "ref.safetensors"
    run_merge(MergeRequest([str(base)], str(ours), loras=[LoraRef(str(path))], dtype=torch.float32))
    run_merge(MergeRequest([str(base)], str(ref), loras=[LoraRef(str(peft))], dtype=torch.float32))
    a, b, plain = load_model(ours), load_model(ref), load_model(base)
    for c in ("unet", "text_encoder"):
        changed = 0
        for k, v in a.components[c].items():
            torch.testing.assert_close(v.load(), b.components[c][k].load(), msg=k)
            changed += not torch.equal(v.load(), plain.components[c][k].load())
        assert changed == (4 if c == "unet" else 2)
    # and diffusers' loader fuses the U-Net part to the same weights
    from sdcompress.checkpoint.instantiate import build_pipeline

    pipe = build_pipeline(load_model(base))
    pipe.unet.load_lora_adapter({k: v for k, v in t.items() if k.startswith("unet.")}, prefix="unet")
    pipe.unet.fuse_lora()
    fused = pipe.unet.state_dict()
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        key = f"{ATTN}.{proj}.weight"
        theirs = fused.get(key, fused.get(f"{ATTN}.{proj}.base_layer.weight"))
        torch.testing.assert_close(
            a.components["unet"][key].load().float(), theirs.float(), atol=1e-6, rtol=1e-5
        )


def test_attn_processor_layout_without_component_prefix_is_a_unet_file(tmp_path):
    path, _ = _attn_proc_file(tmp_path, prefix="")
    lora = read_lora(path)
    assert sorted(lora.adapters) == sorted(f"unet.{ATTN}.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0"))


# ----- NaN / inf ----------------------------------------------------------------------------------


def _plain_lora(tmp, name, *, nan=False, scale=1.0, dtype=torch.float16):
    g = torch.Generator().manual_seed(1)
    n = _kohya(f"{ATTN}.to_q")
    up = torch.randn(32, 2, generator=g) * scale
    if nan:
        up[3, 1] = float("nan")
    t = {f"{n}.lora_down.weight": torch.randn(2, 32, generator=g).to(dtype), f"{n}.lora_up.weight": up.to(dtype),
         f"{n}.alpha": torch.tensor(2.0)}  # fmt: skip
    return _write(tmp / name, t, {"ss_base_model_version": "sd_v1"})


def test_nan_in_a_lora_is_refused_naming_the_tensor(base, tmp_path):
    bad = _plain_lora(tmp_path, "nan.safetensors", nan=True)
    good = _plain_lora(tmp_path, "good.safetensors")
    out = tmp_path / "m.safetensors"
    needle = (
        r"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q\.lora_up\.weight' holds NaN"
    )
    with pytest.raises(SdcError, match=needle):
        run_merge(MergeRequest([str(base)], str(out), loras=[LoraRef(str(bad))]))
    assert not out.exists()
    with pytest.raises(SdcError, match="holds NaN"):  # LoRA + LoRA
        run_merge(MergeRequest([], str(out), loras=[LoraRef(str(bad)), LoraRef(str(good))]))
    with pytest.raises(SdcError, match="holds NaN"):  # re-rank
        run_merge(MergeRequest([], str(out), loras=[LoraRef(str(bad)), LoraRef(str(good))], rank=2))
    with pytest.raises(SdcError, match="holds NaN"):
        convert_lora(bad, out, "peft")
    assert not out.exists()
    # allowed: written as asked (the exact sum), but a re-rank still cannot decompose NaN
    run_merge(MergeRequest([str(base)], str(out), loras=[LoraRef(str(bad))], allow_nonfinite=True))
    w = load_model(out).components["unet"][f"{ATTN}.to_q.weight"].load()
    assert torch.isnan(w).sum() == 32
    with pytest.raises(SdcError, match="cannot re-rank"):
        run_merge(
            MergeRequest(
                [], str(tmp_path / "r.safetensors"), loras=[LoraRef(str(bad)), LoraRef(str(good))], rank=2,
                allow_nonfinite=True,
            )
        )  # fmt: skip


def test_fp16_overflow_of_an_output_is_refused(base, tmp_path):
    huge = _plain_lora(tmp_path, "huge.safetensors", scale=300.0, dtype=torch.float32)
    out = tmp_path / "m.safetensors"
    with pytest.raises(SdcError, match=r"output tensor unet\.down_blocks.*holds inf values \(fp16"):
        run_merge(MergeRequest([str(base)], str(out), loras=[LoraRef(str(huge), 100.0)], dtype=torch.float16))
    assert not out.exists()
    with pytest.raises(SdcError, match="output tensor lora_unet_.*lora_up.weight holds inf"):
        run_merge(MergeRequest([], str(out), loras=[LoraRef(str(huge), 1000.0)], dtype=torch.float16))
    run_merge(MergeRequest([str(base)], str(out), loras=[LoraRef(str(huge), 100.0)], dtype=torch.float16,
                           allow_nonfinite=True))  # fmt: skip
    assert torch.isinf(load_model(out).components["unet"][f"{ATTN}.to_q.weight"].load()).any()


def test_allow_nonfinite_through_the_cli(base, tmp_path, cli):
    bad = _plain_lora(tmp_path, "nan.safetensors", nan=True)
    out = tmp_path / "m.safetensors"
    r = cli("merge", base, "--lora", bad, "-o", out)
    assert r.code == 2 and "holds NaN" in r.stderr and "--allow-nonfinite" in r.stderr, r
    assert not out.exists()
    r = cli("merge", base, "--lora", bad, "-o", out, "--allow-nonfinite")
    assert r.code == 0, r
    r = cli("convert", bad, "-o", tmp_path / "p.safetensors")
    assert r.code == 2 and "holds NaN" in r.stderr, r
    r = cli("convert", bad, "-o", tmp_path / "p.safetensors", "--allow-nonfinite")
    assert r.code == 0, r


def test_convert_refuses_an_fp16_overflow(tmp_path):
    import dataclasses

    from sdcompress.checkpoint.tensors import LazyTensor
    from sdcompress.services.convert import ConvertRequest, convert

    model = tiny_model("tiny-sd")
    key = f"{ATTN}.to_q.weight"
    w = model.components["unet"][key].load().float().clone()
    w[0, 0] = 1e6
    unet = {**model.components["unet"], key: LazyTensor.of(w)}
    src = tmp_path / "big.safetensors"
    save_single_file(dataclasses.replace(model, components={**model.components, "unet": unet}), src)
    out = tmp_path / "half.safetensors"
    with pytest.raises(SdcError, match=rf"output tensor unet\.{ATTN}\.to_q\.weight holds inf values \(fp16"):
        convert(ConvertRequest(str(src), str(out), dtype="fp16"))
    assert not out.exists()
    convert(ConvertRequest(str(src), str(out), dtype="fp16", allow_nonfinite=True))
    assert torch.isinf(load_model(out).components["unet"][key].load()).sum() == 1
