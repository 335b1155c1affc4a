"""`hypernetwork train`: A1111's format (rebuilt here from its documented layout), training, resume, merge refusal.

The referee for the file is A1111's module structure, rebuilt in this test
from the file's metadata the way A1111's `HypernetworkModule` builds it
(Linear, activation except after the last layer unless `activate_output`,
LayerNorm, Dropout per `dropout_structure`), then loaded strictly: every key
must be where A1111 looks for it, and the outputs must be ours.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_lora_train import RES, assert_bit_identical, fixed_loss, pipeline, stop_after

from sdcompress.checkpoint.resolve import load_model
from sdcompress.checkpoint.tiny import tiny_model
from sdcompress.checkpoint.writers import save_single_file
from sdcompress.training.data import DataConfig
from sdcompress.training.demo_data import write_demo_dataset
from sdcompress.training.engine import TrainConfig
from sdcompress.training.hypernetwork import Hypernetwork, a1111_state, attach, write_a1111
from sdcompress.training.hypernetwork_spec import HypernetworkSpec

A1111_KEYS = {
    "step", "name", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
    "sd_checkpoint", "sd_checkpoint_name", "activate_output", "use_dropout", "dropout_structure",
    "last_layer_dropout", "optional_info",
}  # fmt: skip
# A1111's activation_dict (torch.nn classes by lower-case name, "swish" its Hardswish)
A1111_ACTIVATIONS = {
    "linear": torch.nn.Identity, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU, "elu": torch.nn.ELU,
    "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid,
    "softsign": torch.nn.Softsign, "mish": torch.nn.Mish,
}  # fmt: skip


class A1111Module(torch.nn.Module):
    """A1111's HypernetworkModule as its source builds it from the file's metadata."""

    def __init__(self, dim: int, meta: dict, state: dict) -> None:
        super().__init__()
        ls, drops, act = meta["layer_structure"], meta["dropout_structure"], meta["activation_func"]
        layers: list[torch.nn.Module] = []
        for i in range(len(ls) - 1):
            layers.append(torch.nn.Linear(int(dim * ls[i]), int(dim * ls[i + 1])))
            if not (act == "linear" or act is None or (i >= len(ls) - 2 and not meta["activate_output"])):
                layers.append(A1111_ACTIVATIONS[act]())
            if meta["is_layer_norm"]:
                layers.append(torch.nn.LayerNorm(int(dim * ls[i + 1])))
            if drops is not None and drops[i + 1] > 0:
                layers.append(torch.nn.Dropout(p=drops[i + 1]))
        self.linear = torch.nn.Sequential(*layers)
        self.load_state_dict(state)  # strict: the file's keys are exactly A1111's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x)


SPECS = {
    "default": HypernetworkSpec(),
    "deep": HypernetworkSpec(
        layers="1,2,1.5,1",
        activation="relu",
        layer_norm=True,
        dropout=0.3,
        last_layer_dropout=True,
        weight_init="xavier-normal",
        sizes="32,64",
    ),  # fmt: skip
    "swish-output": HypernetworkSpec(layers="1,4,1", activation="swish", activate_output=True),
}


def _randomised(spec: HypernetworkSpec, widths: list[int]) -> Hypernetwork:
    torch.manual_seed(0)
    network = Hypernetwork(widths, spec)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # away from the near-identity start
    return network.eval()


@pytest.mark.parametrize("name", list(SPECS))
def test_the_file_rebuilds_as_a1111_modules_with_the_same_outputs(tmp_path, name):
    spec = SPECS[name]
    widths = spec.widths(32)
    network = _randomised(spec, widths)
    path = tmp_path / "hn.pt"
    write_a1111(path, a1111_state(network, name="hn", step=7, checkpoint_name="tiny-sd", dtype=torch.float32))
    state = torch.load(path, map_location="cpu", weights_only=True)  # plain types only, as ComfyUI loads it
    assert set(state) == A1111_KEYS | set(widths)
    assert state["step"] == 7 and state["name"] == "hn"
    assert state["activation_func"] == str(spec.activation) and state["use_dropout"] == bool(spec.dropout)
    assert state["weight_initialization"] in ("Normal", "XavierNormal")
    for width in widths:
        pair = state[width]
        assert isinstance(pair, tuple) and len(pair) == 2
        assert all(k.startswith("linear.") for k in pair[0])  # A1111's (and ComfyUI's) key names
        x = torch.randn(2, 5, width)
        for ours, theirs in zip((network.key(width), network.value(width)), pair, strict=True):
            rebuilt = A1111Module(width, state, theirs).eval()
            with torch.no_grad():
                torch.testing.assert_close(rebuilt(x), ours(x))


def test_hooks_feed_key_and_value_inputs_of_matching_attention(tmp_path):
    """Every attention layer of a trained width runs its key/value input through the MLPs."""
    pipe = pipeline(load_model("tiny-sd"))
    unet = pipe.unet
    network = _randomised(HypernetworkSpec(), [32])
    handles = attach(unet, network)
    attns = {n: m for n, m in unet.named_modules() if isinstance(getattr(m, "to_k", None), torch.nn.Linear)}
    matching = [m for m in attns.values() if m.to_k.in_features == 32]
    assert len(handles) == 2 * len(matching)
    cross = [m for n, m in attns.items() if n.endswith("attn2")]  # width 32 = tiny-sd's text encoder
    seen = []
    cross[0].to_k.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    ctx = torch.randn(1, 4, 32)
    with torch.no_grad():
        unet(torch.randn(1, 4, 16, 16), 10, ctx)
        torch.testing.assert_close(seen[0], network.key(32)(ctx))  # to_k received hn_k(context)
    for h in handles:
        h.remove()


def test_a_width_no_attention_takes_is_one_sentence(cli, tmp_path):
    data = write_demo_dataset(tmp_path / "d", 1, size=RES)
    r = cli("hypernetwork", "train", "--model", "tiny-sd", "--data", data, "-o", tmp_path / "o",
            "--resolution", RES, "--max-steps", "1", "--cpu", "--sizes", "768")  # fmt: skip
    assert r.code == 2 and "768" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("layers", ["2,1", "1,2", "1,x,1"])
def test_bad_layer_structure_is_refused(cli, tmp_path, layers):
    (tmp_path / "d").mkdir()
    r = cli("hypernetwork", "train", "--model", "tiny-sd", "--data", tmp_path / "d", "-o", tmp_path / "o",
            "--layers", layers)  # fmt: skip
    assert r.code == 2 and "--layers" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r
    assert not (tmp_path / "o").exists()


def test_merge_refuses_a_hypernetwork_in_one_sentence(cli, tmp_path):
    base = tmp_path / "base.safetensors"
    save_single_file(tiny_model("tiny-sd"), base)
    hn = tmp_path / "hn.pt"
    write_a1111(hn, a1111_state(Hypernetwork([32], HypernetworkSpec()), name="hn", step=0,
                                checkpoint_name=None, dtype=torch.float32))  # fmt: skip
    r = cli("merge", base, "--lora", hn, "-o", tmp_path / "out.safetensors")
    assert r.code == 2 and "cannot be baked" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r
    assert not (tmp_path / "out.safetensors").exists()


# ---------------------------------------------------------------------------- training


def _request(tmp: Path, data: Path, name: str, **train):
    from sdcompress.services.hypernetwork_train import HypernetworkTrainRequest

    settings = dict(
        work_dir=tmp / f"{name}.train", max_steps=4, lr=3e-3, checkpoint_every=0, cpu=True, seed=1
    )
    return HypernetworkTrainRequest(
        model="tiny-sd",
        output=tmp / name,
        data=DataConfig(data_dir=data, resolution=RES),
        train=TrainConfig(**(settings | train)),
        spec=HypernetworkSpec(layers="1,2,1", activation="relu", dropout=0.1, sizes="32,64"),
    )


def _loaded(path: Path, spec: HypernetworkSpec) -> Hypernetwork:
    state = torch.load(path, map_location="cpu", weights_only=True)
    network = Hypernetwork([w for w in state if isinstance(w, int)], spec)
    for w in network.widths():
        network.key(w).load_state_dict(state[w][0])
        network.value(w).load_state_dict(state[w][1])
    return network.eval()


@pytest.mark.slow
def test_hypernetwork_training_lowers_the_loss_and_resumes_exactly(tmp_path):
    from sdcompress.services.hypernetwork_train import hypernetwork_train

    data = write_demo_dataset(tmp_path / "shapes", 4, size=RES)
    straight = hypernetwork_train(_request(tmp_path, data, "straight"))
    (file,) = straight.files
    assert file.name == "straight.pt"
    model = load_model("tiny-sd")
    before = fixed_loss(pipeline(model), data)
    pipe = pipeline(model)
    attach(pipe.unet, _loaded(file, _request(tmp_path, data, "x").spec))
    after = fixed_loss(pipe, data)
    assert after < before, (before, after)
    record = json.loads((file.parent / "sdcompress_run.json").read_text())
    assert record["command"] == "hypernetwork train" and record["widths"] == [32, 64]
    # exact resume: 2 steps, Ctrl-C, --resume latest, 2 more == 4 straight (dropout's RNG included)
    first = _request(tmp_path, data, "resumed", checkpoint_every=100)
    stopped = hypernetwork_train(first, stop_after(2))
    assert stopped.interrupted and stopped.steps == 2 and not first.output.exists()
    resumed = hypernetwork_train(replace(first, train=replace(first.train, resume="latest")))
    assert resumed.resumed_from == stopped.last_checkpoint and resumed.steps == 4
    a, b = (torch.load(r.files[0], weights_only=True) for r in (straight, resumed))
    for w in (32, 64):
        for i in (0, 1):
            assert_bit_identical(a[w][i], b[w][i])


@pytest.mark.slow
def test_hypernetwork_train_cli_reads_a_config_file(cli, tmp_path):
    data = write_demo_dataset(tmp_path / "shapes", 2, size=RES)
    config = tmp_path / "run.toml"
    config.write_text(
        f'model = "tiny-sd"\ndata = "{data}"\nresolution = {RES}\ncpu = true\n'
        '[hypernetwork]\nlayers = "1,3,1"\nactivation = "tanh"\nmax_steps = 3\ncheckpoint-every = 0\n',
        encoding="utf-8",
    )
    r = cli("hypernetwork", "train", "--config", config, "-o", tmp_path / "hn", "--max-steps", "1", "--json")
    assert r.code == 0, r
    assert json.loads(r.stdout)["steps"] == 1  # the command line wins
    state = torch.load(tmp_path / "hn" / "hn.pt", weights_only=True)
    assert state["layer_structure"] == [1.0, 3.0, 1.0] and state["activation_func"] == "tanh"
    assert state[32][0]["linear.0.weight"].shape == (96, 32)


def test_several_processes_are_refused_in_one_sentence(monkeypatch):
    """The hooks bypass DDP's wrapper, so `accelerate launch` with several processes is refused."""
    from sdcompress.errors import SdcError
    from sdcompress.training.hypernetwork_task import HypernetworkTask
    from sdcompress.training.task import DiffusionParts, LossConfig

    task = HypernetworkTask(DiffusionParts.from_pipeline(pipeline(load_model("tiny-sd"))), LossConfig(),
                            HypernetworkSpec())  # fmt: skip
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 2)
    with pytest.raises(SdcError, match="one process"):
        task.bind({"hypernetwork": task.network}, torch.device("cpu"), torch.float32)
