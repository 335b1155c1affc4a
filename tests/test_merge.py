"""merge: checkpoint methods equal plain torch, LoRA + LoRA is exact, LyCORIS deltas, bad LoRAs refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _lowrank_fixtures import tuned_copy

from sdcompress.checkpoint.resolve import load_model
from sdcompress.checkpoint.safetensors_io import write_safetensors
from sdcompress.checkpoint.tensors import lazy_state_dict
from sdcompress.checkpoint.tiny import tiny_model
from sdcompress.checkpoint.writers import save_single_file
from sdcompress.errors import SdcError
from sdcompress.lowrank import merge_math
from sdcompress.lowrank.layouts import read_lora
from sdcompress.lowrank.merge_math import lora_delta
from sdcompress.services.lora_convert import convert_lora
from sdcompress.services.merge import LoraRef, MergeRequest, run_merge

KEY = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge")
    a = tiny_model("tiny-sd")
    b = tuned_copy(a, seed=2)
    c = tuned_copy(a, seed=3)
    for name, m in (("a", a), ("b", b), ("c", c)):
        save_single_file(m, tmp / f"{name}.safetensors")
    return tmp


def _unet(path):
    return {k: v.load() for k, v in load_model(path).components["unet"].items()}


def test_weighted_sum_and_add_difference_equal_plain_torch(files, tmp_path):
    a, b, c = (_unet(files / f"{n}.safetensors") for n in "abc")
    run_merge(
        MergeRequest(
            [str(files / "a.safetensors"), str(files / "b.safetensors")],
            str(tmp_path / "ws.safetensors"),
            alpha=0.3,
        )
    )
    ws = _unet(tmp_path / "ws.safetensors")
    for k in a:
        torch.testing.assert_close(ws[k], a[k] * 0.7 + b[k] * 0.3, atol=1e-6, rtol=1e-5)
    run_merge(MergeRequest([str(files / f"{n}.safetensors") for n in "abc"], str(tmp_path / "ad"), alpha=0.5))
    ad = _unet(tmp_path / "ad")
    for k in a:
        torch.testing.assert_close(ad[k], a[k] + (b[k] - c[k]) * 0.5, atol=1e-6, rtol=1e-5)


def test_ties_and_dare_math():
    base = torch.zeros(10)
    t1 = torch.tensor([1.0, -2, 3, 0, 0, 0, 0, 0, 0, 0.1])
    t2 = torch.tensor([1.0, 2, -1, 0, 0, 0, 0, 0, 0, 0.1])
    out = merge_math.ties([base, t1, t2], density=0.3, alpha=1.0)
    # trimmed to the top 3 of each; sign elected per entry; mean of agreeing entries
    assert out[0] == 1.0 and out[2] == 3.0 and out[1] == 0.0 and out[9] == 0.0
    d = merge_math.dare([torch.zeros(100000), torch.ones(100000)], density=0.25, seed=1)
    assert set(d.unique().tolist()) <= {0.0, 4.0} and abs(float(d.mean()) - 1.0) < 0.05
    torch.testing.assert_close(merge_math.dare([base, t1], density=1.0), t1)


def test_conv_lora_delta_composes_the_two_convolutions():
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(3, 4, 3, 3, generator=g), torch.randn(5, 3, 1, 1, generator=g)
    x = torch.randn(1, 4, 8, 8, generator=g)
    w = lora_delta(up, down, 1.0).reshape(5, 4, 3, 3)
    torch.testing.assert_close(
        F.conv2d(x, w, padding=1), F.conv2d(F.conv2d(x, down, padding=1), up), atol=1e-4, rtol=1e-4
    )
    mid, d1 = torch.randn(3, 3, 3, 3, generator=g), torch.randn(3, 4, 1, 1, generator=g)
    w = lora_delta(up, d1, 1.0, mid).reshape(5, 4, 3, 3)
    ref = F.conv2d(F.conv2d(F.conv2d(x, d1), mid, padding=1), up)
    torch.testing.assert_close(F.conv2d(x, w, padding=1), ref, atol=1e-4, rtol=1e-4)


def _write(path, tensors, metadata=None):
    write_safetensors(path, lazy_state_dict(tensors), metadata)
    return path


def _kohya(name):
    return "lora_unet_" + name.replace(".", "_")


def test_lycoris_modules_bake_to_their_formulas(files, tmp_path):
    g = torch.Generator().manual_seed(0)
    base = load_model(files / "a.safetensors").components["unet"]
    w = base[KEY + ".weight"].shape  # [32, 32]
    cw = base[CONV + ".weight"].shape  # [32, 32, 3, 3]
    t = {}
    a1, b1, a2, b2 = (torch.randn(s, generator=g) for s in ((w[0], 2), (2, w[1]), (w[0], 2), (2, w[1])))
    n = _kohya(KEY)
    t.update({f"{n}.hada_w1_a": a1, f"{n}.hada_w1_b": b1, f"{n}.hada_w2_a": a2, f"{n}.hada_w2_b": b2})
    t[f"{n}.alpha"] = torch.tensor(1.0)
    k1, k2 = torch.randn(4, 4, generator=g), torch.randn(8, 8 * 9, generator=g)
    c = _kohya(CONV)
    t.update({f"{c}.lokr_w1": k1, f"{c}.lokr_w2": k2})
    path = _write(tmp_path / "lyco.safetensors", t)
    assert read_lora(path).layout == "lycoris"
    out = tmp_path / "baked.safetensors"
    run_merge(MergeRequest([str(files / "a.safetensors")], str(out), loras=[LoraRef(str(path), 0.5)]))
    merged = load_model(out).components["unet"]
    loha = (a1 @ b1) * (a2 @ b2) * (1.0 / 2)
    torch.testing.assert_close(
        merged[KEY + ".weight"].load(), base[KEY + ".weight"].load() + 0.5 * loha, atol=1e-5, rtol=1e-5
    )
    lokr = torch.kron(k1, k2).reshape(cw)
    torch.testing.assert_close(
        merged[CONV + ".weight"].load(), base[CONV + ".weight"].load() + 0.5 * lokr, atol=1e-5, rtol=1e-5
    )


def _plain_lora(tmp, name, seed, r=2, alpha=1.0):
    g = torch.Generator().manual_seed(seed)
    n = _kohya(KEY)
    t = {f"{n}.lora_down.weight": torch.randn(r, 32, generator=g), f"{n}.lora_up.weight": torch.randn(32, r, generator=g),
         f"{n}.alpha": torch.tensor(alpha)}  # fmt: skip
    return _write(tmp / name, t, {"ss_base_model_version": "sd_v1"})


def _delta(path):
    lf = read_lora(path)
    (a,) = [a for a in lf.adapters.values()]
    return a.delta((32, 32))


def test_lora_plus_lora_is_exact_and_rerank_is_the_svd(tmp_path):
    p1, p2 = (
        _plain_lora(tmp_path, "1.safetensors", 1),
        _plain_lora(tmp_path, "2.safetensors", 2, r=3, alpha=3.0),
    )
    out = tmp_path / "sum.safetensors"
    run_merge(
        MergeRequest([], str(out), loras=[LoraRef(str(p1), 0.5), LoraRef(str(p2), -1.0)], dtype=torch.float32)
    )
    want = 0.5 * _delta(p1) - _delta(p2)
    torch.testing.assert_close(_delta(out), want, atol=1e-5, rtol=1e-5)
    out2 = tmp_path / "r2.safetensors"
    run_merge(
        MergeRequest(
            [], str(out2), loras=[LoraRef(str(p1), 0.5), LoraRef(str(p2), -1.0)], rank=2, dtype=torch.float32
        )
    )
    u, s, vh = torch.linalg.svd(want)
    torch.testing.assert_close(_delta(out2), (u[:, :2] * s[:2]) @ vh[:2], atol=1e-4, rtol=1e-4)


def test_kohya_peft_round_trip(tmp_path):
    p1 = _plain_lora(tmp_path, "k.safetensors", 5, r=4, alpha=2.0)
    convert_lora(p1, tmp_path / "p.safetensors", to="peft")
    lf = read_lora(tmp_path / "p.safetensors")
    assert lf.layout == "peft" and next(iter(lf.adapters)).startswith("unet.down_blocks.0")
    torch.testing.assert_close(_delta(tmp_path / "p.safetensors"), _delta(p1))
    convert_lora(tmp_path / "p.safetensors", tmp_path / "k2.safetensors", to="kohya")
    assert read_lora(tmp_path / "k2.safetensors").adapters.keys() == read_lora(p1).adapters.keys()
    torch.testing.assert_close(_delta(tmp_path / "k2.safetensors"), _delta(p1))


def test_lora_that_matches_nothing_is_an_error(files, tmp_path):
    bogus = _write(tmp_path / "bogus.safetensors", {"lora_unet_nowhere_to_q.lora_down.weight": torch.zeros(2, 32),
                                                    "lora_unet_nowhere_to_q.lora_up.weight": torch.zeros(32, 2)})  # fmt: skip
    out = tmp_path / "m.safetensors"
    with pytest.raises(SdcError, match="match the model"):
        run_merge(MergeRequest([str(files / "a.safetensors")], str(out), loras=[LoraRef(str(bogus))]))
    assert not out.exists()


def test_lora_for_another_family_is_an_error(files, tmp_path):
    xl = _write(tmp_path / "xl.safetensors", {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 32),
                                              "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 2)},
                {"ss_base_model_version": "sdxl_base_v1-0"})  # fmt: skip
    with pytest.raises(SdcError, match="SDXL"):
        run_merge(
            MergeRequest(
                [str(files / "a.safetensors")], str(tmp_path / "m.safetensors"), loras=[LoraRef(str(xl))]
            )
        )
    wide = _write(tmp_path / "wide.safetensors", {f"{_kohya(KEY)}.lora_down.weight": torch.zeros(2, 768),
                                                  f"{_kohya(KEY)}.lora_up.weight": torch.zeros(320, 2)})  # fmt: skip
    with pytest.raises(SdcError, match="does not fit"):
        run_merge(
            MergeRequest(
                [str(files / "a.safetensors")], str(tmp_path / "m.safetensors"), loras=[LoraRef(str(wide))]
            )
        )


def test_lora_ref_parse():
    assert LoraRef.parse("a.safetensors:0.5") == LoraRef("a.safetensors", 0.5)
    assert LoraRef.parse("a.safetensors") == LoraRef("a.safetensors", 1.0)
    assert LoraRef.parse("C:/x/a.safetensors") == LoraRef("C:/x/a.safetensors", 1.0)


def _perturbed(model, seed):
    """Every floating tensor of every component changed, so each block's weight shows in the result."""
    import dataclasses

    from sdcompress.checkpoint.tensors import LazyTensor

    g = torch.Generator().manual_seed(seed)
    comps = {}
    for c, sd in model.components.items():
        comps[c] = {
            k: LazyTensor.of(v.load() + 0.01 * torch.randn(v.shape, generator=g).to(v.dtype))
            if v.dtype.is_floating_point
            else v
            for k, v in sd.items()
        }
    return dataclasses.replace(model, components=comps)


def test_block_weights_equal_plain_torch_per_block(tmp_path):
    from sdcompress.arch.count import stage_of
    from sdcompress.lowrank.block_weights import BlockWeights

    a_model = tiny_model("tiny-sd")
    save_single_file(a_model, tmp_path / "a.safetensors")
    save_single_file(_perturbed(a_model, 7), tmp_path / "b.safetensors")
    spec = "down=0.2,down.1=0.9,mid_block=0.5,up=0.8,te=0.1"
    run_merge(
        MergeRequest(
            [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")],
            str(tmp_path / "bw.safetensors"),
            alpha=0.3,
            block_weights=BlockWeights.parse(spec),
        )
    )
    a, b, out = (load_model(tmp_path / f"{n}.safetensors").components for n in ("a", "b", "bw"))

    def want_alpha(c, key):
        if c == "text_encoder":
            return 0.1
        if c != "unet":
            return 0.3  # the VAE is not named: --alpha
        stage = stage_of(key)
        return {"down_blocks.1": 0.9, "mid_block": 0.5}.get(
            stage, 0.2 if stage.startswith("down") else 0.8 if stage.startswith("up") else 0.3
        )

    seen = set()
    for c, sd in out.items():
        for k, lt in sd.items():
            if not lt.dtype.is_floating_point:
                continue
            x, y = a[c][k].load(), b[c][k].load()
            w = want_alpha(c, k)
            seen.add(w)
            assert torch.equal(lt.load(), torch.lerp(x.float(), y.float(), w).to(x.dtype)), (c, k)
    assert seen == {0.1, 0.2, 0.3, 0.5, 0.8, 0.9}


def test_block_weights_most_specific_name_wins():
    from sdcompress.lowrank.block_weights import BlockWeights

    bw = BlockWeights.parse("unet=0.1, up=0.2, up_blocks.2=0.3, te2=0.4, te=0.5")
    assert bw.alpha_for("unet", "up_blocks.2.resnets.0.conv1.weight") == 0.3
    assert bw.alpha_for("unet", "up_blocks.1.resnets.0.conv1.weight") == 0.2
    assert bw.alpha_for("unet", "conv_in.weight") == 0.1
    assert bw.alpha_for("text_encoder_2", "text_model.final_layer_norm.weight") == 0.4
    assert bw.alpha_for("text_encoder", "text_model.final_layer_norm.weight") == 0.5
    assert bw.alpha_for("vae", "encoder.conv_in.weight") is None


@pytest.mark.parametrize(
    ("spec", "needle"),
    [("down=x", "not a number"), ("left=0.5", "not NAME=VALUE"), ("up=1,up=2", "twice"), (" , ", "empty")],
)
def test_block_weights_bad_spelling(spec, needle):
    from sdcompress.lowrank.block_weights import BlockWeights

    with pytest.raises(SdcError, match=needle):
        BlockWeights.parse(spec)


def test_block_weights_naming_a_missing_block_is_an_error(files, tmp_path):
    from sdcompress.lowrank.block_weights import BlockWeights

    with pytest.raises(SdcError, match="does not have"):
        run_merge(
            MergeRequest(
                [str(files / "a.safetensors"), str(files / "b.safetensors")],
                str(tmp_path / "x.safetensors"),
                block_weights=BlockWeights.parse("up.9=0.5,te2=0.1"),
            )
        )
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(SdcError, match="two or more models"):
        run_merge(
            MergeRequest(
                [str(files / "a.safetensors")],
                str(tmp_path / "y.safetensors"),
                loras=[LoraRef("l.safetensors")],
                block_weights=BlockWeights.parse("up=0.5"),
            )
        )


def test_block_weights_through_the_cli(cli, files, tmp_path):
    """The command line spelling reaches the merge: the U-Net's down stage takes its own alpha."""
    out = tmp_path / "cli.safetensors"
    r = cli("merge", files / "a.safetensors", files / "b.safetensors", "--alpha", "0.3",
            "--block-weights", "down=0,up=1", "-o", out)  # fmt: skip
    assert r.code == 0, r
    a, b, merged = _unet(files / "a.safetensors"), _unet(files / "b.safetensors"), _unet(out)
    for k in ("down_blocks.0.resnets.0.conv1.weight", "up_blocks.0.resnets.0.conv1.weight"):
        assert not torch.equal(a[k], b[k])  # the inputs differ there, so the check below can fail
    assert torch.equal(
        merged["down_blocks.0.resnets.0.conv1.weight"], a["down_blocks.0.resnets.0.conv1.weight"]
    )
    assert torch.equal(merged["up_blocks.0.resnets.0.conv1.weight"], b["up_blocks.0.resnets.0.conv1.weight"])
    bad = cli("merge", files / "a.safetensors", files / "b.safetensors", "--block-weights", "sideways=1",
              "-o", tmp_path / "bad.safetensors")  # fmt: skip
    assert bad.code == 2 and not (tmp_path / "bad.safetensors").exists()
