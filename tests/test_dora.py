"""DoRA (`lora train --algo dora`): written for LyCORIS/ComfyUI (`dora_scale`) and diffusers, baked like peft.

The referees are the tools' own code: peft's `merge()` of the trained layers,
diffusers' `load_lora_weights` of the PEFT file, LyCORIS's kohya reader of the
kohya file. The adapters get random values (magnitude included) so that the
weight decomposition really changes the weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_lora_file

from sdcompress.checkpoint.instantiate import build_pipeline
from sdcompress.checkpoint.resolve import load_model
from sdcompress.lowrank.layouts import read_lora, resolve
from sdcompress.services.lora_convert import convert_lora
from sdcompress.services.lora_train import naming_for, write_adapters
from sdcompress.services.merge import bake_loras
from sdcompress.training.lora_task import AdapterSpec, LoraTrainTask
from sdcompress.training.task import DiffusionParts, LossConfig


@pytest.fixture(scope="module")
def dora(tmp_path_factory):
    """A DoRA on every linear and conv of tiny-sd's U-Net, randomised, written in both layouts."""
    tmp = tmp_path_factory.mktemp("dora")
    model = load_model("tiny-sd")
    pipe = build_pipeline(model, dtype=torch.float32)
    spec = AdapterSpec(type="dora", rank=4, alpha=2.0, targets="all", text_encoder=True)
    task = LoraTrainTask(DiffusionParts.from_pipeline(pipe), LossConfig(), spec)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        named = [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]
        for name, p in named:
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    modules = task.export()
    files = write_adapters(tmp, "x", modules, naming_for(model), "kohya,peft", torch.float32, {})
    return model, pipe, task, files


def _peft_merged(module, paths):
    """`module`'s weights after peft's own merge of each DoRA layer (undone afterwards), `text_model.` dropped."""
    for path in paths:
        module.get_submodule(path).merge()
    merged = {
        k.replace(".base_layer", "").removeprefix("text_model."): v.clone()
        for k, v in module.state_dict().items()
    }
    for path in paths:
        module.get_submodule(path).unmerge()
    return merged


def test_dora_bakes_like_peft_merge_for_linear_and_conv(dora):
    model, pipe, task, (kohya, peft_file) = dora
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    paths = task.paths["unet"]
    convs = [p for p in paths if pipe.unet.get_submodule(p).get_base_layer().weight.dim() == 4]
    assert convs and len(convs) < len(paths)  # both kinds of layer are adapted
    merged = {c: _peft_merged(m, task.paths[c]) for c, m in modules.items()}
    for file in (kohya, peft_file):
        lora = read_lora(file)
        assert {a.label for a in lora.adapters.values()} == {"DoRA"}
        baked, adapted = bake_loras(model, [(lora, 1.0)])
        assert adapted == sum(len(p) for p in task.paths.values())
        for component in modules:
            for key, lt in baked.components[component].items():
                name = key.removeprefix("text_model.")
                if any(name == p.removeprefix("text_model.") + ".weight" for p in task.paths[component]):
                    want = merged[component][name]
                    torch.testing.assert_close(lt.load().float(), want, atol=1e-5, rtol=1e-4, msg=key)
    # weight decomposition, not a plain LoRA: adding up @ down alone gives other weights
    for target, adapter in resolve(read_lora(kohya), naming_for(model)).items():
        w = model.components[target.component][target.weight_key].load().float()
        plain = w + adapter.delta(tuple(w.shape))
        want = merged[target.component][target.weight_key.removeprefix("text_model.")]
        assert (plain - want).abs().max() > 1e-3


def test_kohya_file_holds_lycoris_dora_scale_and_names_the_algorithm(dora):
    model, pipe, task, (kohya, _) = dora
    lora = read_lora(kohya)
    meta = lora.metadata
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == "lora" and args["dora_wd"] == "True" and args["wd_on_output"] == "True"
    assert "conv_dim" in args
    # ComfyUI's rules (comfy/lora.py): `model_lora_keys_unet` maps lora_unet_<diffusers path, "." -> "_">
    # for every U-Net weight, and `load_lora` consumes <name>.alpha, .dora_scale, .lora_up/.lora_down.weight.
    from safetensors.torch import load_file

    comfy_names = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_") for k in pipe.unet.state_dict()}
    comfy_names = {n.replace("_base_layer", "") for n in comfy_names}
    # model_lora_keys_clip: lora_te_text_model_encoder_layers_<b>_<LORA_CLIP_MAP value>
    clip_map = (
        "mlp_fc1",
        "mlp_fc2",
        "self_attn_k_proj",
        "self_attn_q_proj",
        "self_attn_v_proj",
        "self_attn_out_proj",
    )
    layers = pipe.text_encoder.config.num_hidden_layers
    comfy_names |= {f"lora_te_text_model_encoder_layers_{b}_{c}" for b in range(layers) for c in clip_map}
    consumed = {"alpha", "dora_scale", "lora_up.weight", "lora_down.weight"}
    for key in load_file(kohya):
        module, _, suffix = key.partition(".")
        assert module in comfy_names and suffix in consumed, key
    naming = naming_for(model)
    for m in task.export():
        scale = lora.adapters[naming.kohya(m.target)].tensors["dora_scale"].load()
        out = m.up.shape[0]
        assert scale.shape == ((out, 1, 1, 1) if m.down.dim() == 4 else (out, 1))  # LyCORIS's wd_on_out
        torch.testing.assert_close(scale.reshape(-1), m.magnitude)


def test_lycoris_reads_the_kohya_file_and_merges_the_same_weights(dora):
    """LyCORIS's own kohya reader builds a DoRA module per file module; its merged weight is ours."""
    lycoris = pytest.importorskip("lycoris")
    from safetensors.torch import load_file

    model, _, task, (kohya, _) = dora
    unet = build_pipeline(model, dtype=torch.float32).unet
    # LyCORIS's module loader on the U-Net alone names modules "lycoris_<path>" where kohya has "lora_unet_"
    weights = {k.replace("lora_unet_", "lycoris_", 1): v for k, v in load_file(kohya).items()}
    network, _ = lycoris.create_lycoris_from_weights(1.0, str(kohya), unet, weights_sd=weights)
    lora = read_lora(kohya)
    unet_modules = [n for n in lora.adapters if n.startswith("lora_unet_")]
    assert len(network.loras) == len(unet_modules) and all(m.wd for m in network.loras)
    baked, _ = bake_loras(model, [(lora, 1.0)])
    for module in network.loras:
        path = next(p for p in task.paths["unet"] if "lycoris_" + p.replace(".", "_") == module.lora_name)
        theirs, _ = module.get_merged_weight(multiplier=1.0)
        mine = baked.components["unet"][path + ".weight"].load().float()
        torch.testing.assert_close(mine, theirs.float(), atol=1e-5, rtol=1e-4, msg=path)


@pytest.mark.slow  # ~5 s or more on 2 busy cores
def test_peft_file_loads_in_diffusers_with_every_key_consumed(dora):
    """diffusers' load_lora_weights takes every tensor of the PEFT file (U-Net and text encoder magnitudes too)."""
    from safetensors.torch import load_file

    model, _, _, (_, peft_file) = dora
    pipe = build_pipeline(model, dtype=torch.float32)
    load_lora_file(pipe, peft_file)

    def state(component: str) -> dict[str, torch.Tensor]:
        sd = getattr(pipe, component).state_dict()
        # peft's adapter name in the live modules; transformers 5's CLIP has no `text_model.` level
        return {
            k.replace(".default_0", "").replace(".default", "").removeprefix("text_model."): v
            for k, v in sd.items()
        }

    loaded = {c: state(c) for c in ("unet", "text_encoder")}
    file = load_file(peft_file)
    assert any(k.startswith("text_encoder.") and "magnitude" in k for k in file)
    for key, tensor in file.items():
        component, _, name = key.partition(".")
        name = name.removeprefix("text_model.")
        assert name in loaded[component], key  # nothing left unconsumed
        torch.testing.assert_close(loaded[component][name].float(), tensor.float(), msg=key)
    # and diffusers' fused weights are the baked ones
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    baked, _ = bake_loras(model, [(read_lora(peft_file), 1.0)])
    for component in ("unet", "text_encoder"):
        fused = {k.removeprefix("text_model."): v for k, v in getattr(pipe, component).state_dict().items()}
        for key, lt in baked.components[component].items():
            if key.removeprefix("text_model.") in fused:
                want = lt.load().float()
                torch.testing.assert_close(
                    fused[key.removeprefix("text_model.")], want, atol=1e-5, rtol=1e-4, msg=key
                )


@pytest.mark.slow  # ~5 s or more on 2 busy cores
def test_convert_keeps_the_magnitude_both_ways(dora, tmp_path):
    model, _, _, (kohya, peft_file) = dora
    out = tmp_path / "peft.safetensors"
    convert_lora(kohya, out, "peft")
    back = tmp_path / "kohya.safetensors"
    convert_lora(out, back, "kohya")
    reference, _ = bake_loras(model, [(read_lora(peft_file), 1.0)])
    for file in (out, back):
        baked, _ = bake_loras(model, [(read_lora(file), 1.0)])
        for key, lt in baked.components["unet"].items():
            torch.testing.assert_close(lt.load(), reference.components["unet"][key].load(), msg=key)
    assert read_lora(back).metadata["ss_network_module"] == "lycoris.kohya"


def test_merge_strength_moves_from_the_base_towards_the_dora_weight(dora):
    """A strength s gives W + s (W_dora - W), as ComfyUI applies it."""
    model, _, task, (kohya, _) = dora
    lora = read_lora(kohya)
    full, _ = bake_loras(model, [(lora, 1.0)])
    half, _ = bake_loras(model, [(lora, 0.5)])
    key = task.paths["unet"][0] + ".weight"
    base = model.components["unet"][key].load().float()
    want = base + 0.5 * (full.components["unet"][key].load() - base)
    torch.testing.assert_close(half.components["unet"][key].load(), want, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_lora_train_type_dora_end_to_end(cli, tmp_path):
    """`lora train --algo dora` trains peft's DoRA and writes both layouts with the magnitude."""
    from sdcompress.training.demo_data import write_demo_dataset

    data = write_demo_dataset(tmp_path / "shapes", 1, size=32)
    out = tmp_path / "dora"
    args = ["lora", "train", "--model", "tiny-sd", "--data", str(data), "-o", str(out), "--algo", "dora"]
    args += ["--rank", "2", "--resolution", "32", "--max-steps", "1", "--cpu", "--format", "kohya,peft"]
    result = cli(*args)
    assert result.code == 0, result
    kohya, peft_file = (
        read_lora(out / "dora.safetensors"),
        read_lora(out / "pytorch_lora_weights.safetensors"),
    )
    assert (
        {a.label for a in kohya.adapters.values()}
        == {"DoRA"}
        == {a.label for a in peft_file.adapters.values()}
    )
    assert json.loads(kohya.metadata["ss_network_args"])["dora_wd"] == "True"


@pytest.mark.slow  # ~4 s each: a second referee beside the fast LyCORIS reader test above
@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_lycoris_dora_files_bake_to_lycoris_merge(tmp_path, algo):
    """DoRA files LyCORIS itself writes (LoRA and LoHa with dora_wd) bake to LyCORIS's own merged weights."""
    from test_lora_interop import _lycoris_network, _unet_weights

    from sdcompress.checkpoint.tiny import tiny_model
    from sdcompress.checkpoint.writers import save_single_file
    from sdcompress.services.merge import LoraRef, MergeRequest, run_merge

    base = tmp_path / "base.safetensors"
    save_single_file(tiny_model("tiny-sd"), base)
    unet, net, path = _lycoris_network(base, tmp_path, algo, dim=2, alpha=2.0, algo=algo, dora_wd=True)
    with torch.no_grad():  # magnitudes near the weights' own norms, as a trained DoRA has them
        for module in net.loras:
            w = module.org_weight.float()
            module.dora_scale.copy_(
                w.reshape(w.shape[0], -1).norm(dim=1).reshape(module.dora_scale.shape) * 1.1
            )
    sd = {"lora_unet_" + k.removeprefix("lycoris_"): v.detach().clone() for k, v in net.state_dict().items()}
    from safetensors.torch import save_file

    save_file(sd, path)
    assert {a.label for a in read_lora(path).adapters.values()} == {"DoRA" if algo == "lora" else "LoHa DoRA"}
    out = tmp_path / "baked.safetensors"
    run_merge(MergeRequest([str(base)], str(out), loras=[LoraRef(str(path), 1.0)], dtype=torch.float32))
    net.restore()
    net.merge_to(1.0)
    theirs = {k: v.detach().float() for k, v in unet.state_dict().items()}
    mine = _unet_weights(out)
    for k in theirs:
        torch.testing.assert_close(mine[k], theirs[k], atol=1e-5, rtol=1e-4, msg=k)
