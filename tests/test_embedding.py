"""`embedding train` (textual inversion) on tiny-sd and tiny-sdxl: frozen rows, loss, diffusers loading,
the A1111 layout, convert, merge, resume and bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sdcompress.checkpoint.embedding_files import DIFFUSERS_FILES, Embedding, read_embedding, write_a1111
from sdcompress.checkpoint.instantiate import build_pipeline
from sdcompress.checkpoint.resolve import load_model
from sdcompress.checkpoint.safetensors_io import read_state_dict
from sdcompress.errors import SdcError
from sdcompress.services.finetune import build_parts
from sdcompress.training.config import EmbeddingSpec
from sdcompress.training.data import DataConfig, build_dataset, collate
from sdcompress.training.demo_data import write_demo_dataset
from sdcompress.training.embedding_task import EmbeddingTask
from sdcompress.training.engine import TrainConfig, train
from sdcompress.training.task import DiffusionParts, LossConfig

RES = 32
TOKEN = "<my-thing>"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", 4, size=RES)


def spec(**kwargs) -> EmbeddingSpec:
    return EmbeddingSpec(**{"token": TOKEN, "init_words": "a cat", "vectors": 2, **kwargs})


def request(tmp: Path, data_dir: Path, model: str, steps: int = 2, **kwargs):
    from sdcompress.services.embedding_train import EmbeddingTrainRequest

    train_config = TrainConfig(
        work_dir=tmp / "work", max_steps=steps, batch_size=2, lr=5e-2, checkpoint_every=0, cpu=True
    )
    return EmbeddingTrainRequest(
        model=model,
        output=tmp / "emb",
        data=DataConfig(data_dir=data_dir, resolution=RES),
        train=kwargs.pop("train", train_config),
        embedding=kwargs.pop("embedding", spec()),
        **kwargs,
    )


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.load() for k, v in read_state_dict(path).items()}


def fixed_loss(task: EmbeddingTask, data_dir: Path) -> float:
    """The task's loss on every image with fixed noise, timesteps and templates."""
    dataset, _ = build_dataset(DataConfig(data_dir=data_dir, resolution=RES), 0)
    with torch.no_grad():
        losses = [
            float(
                task.compute_loss(collate([dataset[(i, 0)]]), torch.Generator().manual_seed(7 * i + s))[
                    "loss"
                ]
            )
            for i in range(len(dataset))
            for s in range(2)
        ]
    return sum(losses) / len(losses)


def token_inputs(pipe, encoder, prompt: str) -> tuple[torch.Tensor, list[int]]:
    """What `encoder`'s token embedding outputs while the pipeline encodes `prompt`, and the prompt's ids."""
    seen = []
    handle = encoder.get_input_embeddings().register_forward_hook(lambda _m, a, out: seen.append((a[0], out)))
    try:
        pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    finally:
        handle.remove()
    ids, out = seen[0]
    return out[0].detach(), ids[0].tolist()


# ---------------------------------------------------------------------------- training


# tiny-sd in the fast lane (~4 s), tiny-sdxl (both encoders; ~5x slower on CPU) in the slow one
@pytest.mark.parametrize("model", ["tiny-sd", pytest.param("tiny-sdxl", marks=pytest.mark.slow)])
def test_only_the_new_rows_train_and_the_loss_lowers(tmp_path, data, model):
    """Every old row of every token-embedding matrix (and every other weight) is bit-identical afterwards."""
    base = load_model(model)
    parts = build_parts(base)
    before = [{n: p.detach().clone() for n, p in e.named_parameters()} for e in parts.text_encoders]
    unet_before = {n: p.detach().clone() for n, p in parts.unet.named_parameters()}
    task = EmbeddingTask(parts, LossConfig(), spec(norm_reg=0.01), saver=lambda *_: None)
    start = fixed_loss(task, data)
    init = [m.weight.detach().clone() for m in task.rows]
    config = TrainConfig(
        work_dir=tmp_path / "w", max_steps=4, batch_size=2, lr=5e-2, checkpoint_every=0, cpu=True
    )
    result = train(task, config, DataConfig(data_dir=data, resolution=RES))
    assert {"diffusion", "norm"} <= set(result.loss_history[-1])
    assert fixed_loss(task, data) < start
    for encoder, old, rows, first, weights in zip(
        parts.text_encoders, task.old_vocab, task.rows, init, before, strict=True
    ):
        for name, p in encoder.named_parameters():
            if name.endswith("token_embedding.weight"):
                assert p.shape[0] == old + 2
                assert torch.equal(p[:old], weights[name][:old])
            else:
                assert torch.equal(p, weights[name]), name
        assert not torch.equal(rows.weight, first)  # the new vectors did train
    assert all(torch.equal(p, unet_before[n]) for n, p in parts.unet.named_parameters())


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory, data):
    from sdcompress.services.embedding_train import embedding_train

    tmp = tmp_path_factory.mktemp("sd-ti")
    return embedding_train(request(tmp, data, "tiny-sd"))


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory, data):
    from sdcompress.services.embedding_train import embedding_train

    tmp = tmp_path_factory.mktemp("sdxl-ti")
    return embedding_train(request(tmp, data, "tiny-sdxl"))


def test_sd_outputs_load_in_diffusers_and_put_the_vectors_in_the_prompt(sd_run):
    out = sd_run.output
    a1111 = tensors_of(out / "my-thing.safetensors")
    assert list(a1111) == ["emb_params"] and a1111["emb_params"].shape == (2, 32)
    diffusers_file = tensors_of(out / "learned_embeds.safetensors")
    assert torch.equal(diffusers_file[TOKEN], a1111["emb_params"])
    record = json.loads((out / "sdcompress_run.json").read_text())
    assert record["embedding"]["token_names"] == [TOKEN, f"{TOKEN}_1"]

    for source in (
        out / "my-thing.safetensors",
        out,
    ):  # the A1111 file (token given) and the diffusers folder
        pipe = build_pipeline(load_model("tiny-sd"), dtype=torch.float32)
        DiffusionParts.from_pipeline(pipe)
        plain = pipe.encode_prompt("a photo of a cat", "cpu", 1, False)[0]
        kwargs = {"token": TOKEN} if source.is_file() else {}
        pipe.load_textual_inversion(str(source), **kwargs)
        inputs, ids = token_inputs(pipe, pipe.text_encoder, f"a photo of {TOKEN}")
        first = pipe.tokenizer.convert_tokens_to_ids(TOKEN)
        at = ids.index(first)
        assert ids[at + 1] == first + 1  # diffusers expanded the token into its two vectors
        assert torch.equal(inputs[at : at + 2], a1111["emb_params"])
        # before training "<my-thing>" was "a cat" (the init words); the trained token encodes differently
        assert not torch.allclose(pipe.encode_prompt(f"a photo of {TOKEN}", "cpu", 1, False)[0], plain)


def test_sdxl_trains_both_encoders_and_loads_per_encoder_in_diffusers(sdxl_run):
    from safetensors.torch import load_file

    out = sdxl_run.output
    state = load_file(out / "my-thing.safetensors")
    assert (
        set(state) == {"clip_l", "clip_g"}
        and state["clip_l"].shape == (2, 32)
        and state["clip_g"].shape == (2, 64)
    )
    assert torch.equal(tensors_of(out / "learned_embeds_2.safetensors")[TOKEN], state["clip_g"])
    for layout in (
        "a1111",
        "diffusers",
    ):  # the A1111 tensors per encoder, and the diffusers folder's two files
        pipe = build_pipeline(load_model("tiny-sdxl"), dtype=torch.float32)
        DiffusionParts.from_pipeline(pipe)
        plain = pipe.encode_prompt(f"a photo of {TOKEN}", device="cpu", do_classifier_free_guidance=False)[0]
        pairs = ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))
        for (encoder, tokenizer), key, name in zip(pairs, ("clip_l", "clip_g"), DIFFUSERS_FILES, strict=True):
            source = state[key] if layout == "a1111" else str(out)
            extra = {"token": TOKEN} if layout == "a1111" else {"weight_name": name}
            pipe.load_textual_inversion(source, text_encoder=encoder, tokenizer=tokenizer, **extra)
        for encoder, key in ((pipe.text_encoder, "clip_l"), (pipe.text_encoder_2, "clip_g")):
            inputs, ids = token_inputs(pipe, encoder, f"a photo of {TOKEN}")
            at = ids.index(pipe.tokenizer.convert_tokens_to_ids(TOKEN))
            assert torch.equal(inputs[at : at + 2], state[key]), (layout, key)
        embeds = pipe.encode_prompt(f"a photo of {TOKEN}", device="cpu", do_classifier_free_guidance=False)[0]
        assert embeds.shape == plain.shape and not torch.allclose(embeds, plain)


# ---------------------------------------------------------------------------- convert and merge


def test_convert_round_trips_both_layouts(cli, tmp_path, sd_run, sdxl_run):
    for run in (sd_run, sdxl_run):
        a1111 = run.output / "my-thing.safetensors"
        folder, back = (
            tmp_path / f"{run.output.parent.name}-diffusers",
            tmp_path / f"{run.output.parent.name}.safetensors",
        )
        r = cli("convert", a1111, "-o", folder)
        assert r.code == 0, r
        for name in [p.name for p in run.output.glob("learned_embeds*.safetensors")]:
            assert tensors_of(folder / name).keys() == {TOKEN}
            assert torch.equal(tensors_of(folder / name)[TOKEN], tensors_of(run.output / name)[TOKEN])
        r = cli("convert", folder, "-o", back, "--format", "a1111")
        assert r.code == 0, r
        original, again = tensors_of(a1111), tensors_of(back)
        assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
        assert read_embedding(back).token == TOKEN


@pytest.mark.slow  # writes and reloads two tiny pipelines
def test_merge_bakes_the_token_into_a_diffusers_folder(cli, tmp_path, sd_run, sdxl_run):
    from diffusers import DiffusionPipeline

    from sdcompress.checkpoint.tiny import tiny_model_path

    for run, model in ((sd_run, "tiny-sd"), (sdxl_run, "tiny-sdxl")):
        out = tmp_path / f"{model}-baked"
        r = cli(
            "merge", tiny_model_path(model), "--embedding", run.output / "my-thing.safetensors", "-o", out
        )
        assert r.code == 0, r
        pipe = DiffusionPipeline.from_pretrained(out)
        emb = read_embedding(run.output / "my-thing.safetensors")
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if model == "tiny-sdxl" else [])
        tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if model == "tiny-sdxl" else [])
        for encoder, tokenizer, vectors in zip(encoders, tokenizers, emb.vectors, strict=True):
            ids = tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
            assert ids == [49408, 49409]
            assert torch.equal(encoder.get_input_embeddings().weight[ids], vectors)
            inputs, prompt_ids = token_inputs(pipe, encoder, f"a photo of {TOKEN}")
            at = prompt_ids.index(ids[0])
            assert torch.equal(inputs[at : at + 2], vectors)


# ---------------------------------------------------------------------------- resume and config


@pytest.mark.slow  # two short runs and a resume
def test_resume_is_exact(tmp_path, data):
    from sdcompress.services.embedding_train import embedding_train

    def stop_after(step: int):
        import signal

        def callback(event) -> None:
            if event.kind == "step" and event.step == step - 1:
                signal.raise_signal(signal.SIGINT)

        return callback

    def make(name: str, every: int):
        base = request(
            tmp_path / name, data, "tiny-sd", steps=4, embedding=spec(norm_reg=0.1, template="style")
        )
        return replace(base, train=replace(base.train, checkpoint_every=every, lr_scheduler="cosine", seed=3))

    straight = embedding_train(make("a", 0))
    first = make("b", 100)
    stopped = embedding_train(first, stop_after(2))
    assert stopped.interrupted and stopped.steps == 2
    saved = sum(p.stat().st_size for p in stopped.last_checkpoint.rglob("*.safetensors"))
    assert saved < 10_000, saved  # the checkpoint holds the vectors, not the embedding matrix
    resumed = embedding_train(replace(first, train=replace(first.train, resume="latest")))
    assert resumed.resumed_from == stopped.last_checkpoint and resumed.steps == 4
    for f in ("my-thing.safetensors", "learned_embeds.safetensors"):
        a, b = tensors_of(straight.output / f), tensors_of(resumed.output / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f
    curves = [
        json.loads((r.output / "sdcompress_run.json").read_text())["loss_curve"] for r in (straight, resumed)
    ]
    assert curves[0] == curves[1]


def test_cli_config_file_and_validation_image(cli, tmp_path, data):
    config = tmp_path / "run.toml"
    config.write_text(
        f'model = "tiny-sd"\ndata = "{data}"\nresolution = {RES}\ncpu = true\n'
        '[embedding]\ntoken = "<cfg-thing>"\ninit-words = "a red shape"\nmax-steps = 3\ncheckpoint-every = 0\n'
        'validation-prompt = ["a photo of <cfg-thing>"]\nvalidation-steps = 1\n'
        # bf16 on the CPU: the frozen U-Net in bf16, the encoders in fp32, and the validation grid renders
        'mixed-precision = "bf16"\n',
        encoding="utf-8",
    )
    r = cli("embedding", "train", "--config", config, "-o", tmp_path / "out", "--max-steps", "1", "--json")
    assert r.code == 0, r
    result = json.loads(r.stdout)
    assert result["steps"] == 1 and len(result["validation_images"]) == 1  # the command line wins
    emb = read_embedding(tmp_path / "out" / "cfg-thing.safetensors")
    assert emb.token == "<cfg-thing>" and emb.count == 3  # one vector per init word, from the file


# ---------------------------------------------------------------------------- bad input


def _bad(cli, tmp_path, data, *extra, model="tiny-sd"):
    r = cli("embedding", "train", "--model", model, "--data", data, "-o", tmp_path / "o", "--resolution", RES,
            "--max-steps", "1", "--cpu", *extra)  # fmt: skip
    assert r.code == 2, r
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.train").exists()
    return r.stderr


def test_bad_options_are_one_sentence(cli, tmp_path, data):
    assert "--vectors must be between 1" in _bad(
        cli, tmp_path, data, "--token", TOKEN, "--init-words", "a", "--vectors", "0"
    )
    assert "already" in _bad(cli, tmp_path, data, "--token", "cat", "--init-words", "a")
    assert "already" in _bad(cli, tmp_path, data, "--token", "<|endoftext|>", "--init-words", "a")
    assert "--init-words gives 2" in _bad(
        cli, tmp_path, data, "--token", TOKEN, "--init-words", "a cat", "--vectors", "1"
    )
    assert "--token is required" in _bad(cli, tmp_path, data, "--init-words", "a cat")


def test_template_none_needs_the_token_in_every_caption(cli, tmp_path, data):
    message = _bad(cli, tmp_path, data, "--token", TOKEN, "--init-words", "a", "--template", "none")
    assert "do not name <my-thing>" in message


def test_an_sd1_embedding_for_an_sdxl_model_is_refused(cli, tmp_path):
    from sdcompress.checkpoint.tiny import tiny_model_path

    sd1 = write_a1111(tmp_path / "sd1.safetensors", Embedding(TOKEN, [torch.randn(2, 32)]))
    r = cli("merge", tiny_model_path("tiny-sdxl"), "--embedding", sd1, "-o", tmp_path / "out")
    assert r.code == 2 and "is an embedding for SD 1/2" in r.stderr and "Traceback" not in r.stderr, r
    assert not (tmp_path / "out").exists()
    r = cli("merge", tiny_model_path("tiny-sd"), "--embedding", sd1, "-o", tmp_path / "out.safetensors")
    assert r.code == 2 and "cannot carry the extended tokenizer" in r.stderr, r
    wide = write_a1111(tmp_path / "wide.safetensors", Embedding(TOKEN, [torch.randn(2, 48)]))
    r = cli("merge", tiny_model_path("tiny-sd"), "--embedding", wide, "-o", tmp_path / "out")
    assert r.code == 2 and "48-wide" in r.stderr, r
    r = cli("convert", sd1, "-o", tmp_path / "x", "--format", "peft")
    assert r.code == 2 and "a1111 or diffusers" in r.stderr, r
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()


def test_spec_checks_without_a_model():
    with pytest.raises(SdcError, match="--norm-reg"):
        spec(norm_reg=-1).validate()
    assert spec(vectors=None, init_words="a red cat").vector_count == 3


def test_captions_name_the_token_with_all_its_vectors():
    """A caption naming the token keeps its words; others get a template in front; N vectors -> N names."""
    from sdcompress.training.embedding_task import TEMPLATES

    task = EmbeddingTask.__new__(EmbeddingTask)  # the caption rule alone, without a model
    task.spec, task.names = spec(template="style"), [TOKEN, f"{TOKEN}_1"]
    g = torch.Generator().manual_seed(0)
    assert task.caption(f"{TOKEN} on a table", g) == f"{TOKEN} {TOKEN}_1 on a table"
    made = task.caption("on a table", g)
    assert made.endswith(", on a table") and f"{TOKEN} {TOKEN}_1" in made
    assert made.split(",")[0].replace(f"{TOKEN} {TOKEN}_1", "{}") in TEMPLATES["style"]
    assert task.caption("", g).replace(f"{TOKEN} {TOKEN}_1", "{}") in TEMPLATES["style"]
    again = [task.caption("", torch.Generator().manual_seed(s)) for s in range(3)]
    assert again == [
        task.caption("", torch.Generator().manual_seed(s)) for s in range(3)
    ]  # seeded by the step


def test_a_lone_module_tensor_is_not_taken_for_an_embedding(tmp_path):
    from safetensors.torch import save_file

    from sdcompress.checkpoint.embedding_files import is_embedding

    save_file({"foo.weight": torch.zeros(3)}, str(tmp_path / "foo.safetensors"))
    save_file({"<tok>": torch.zeros(2, 32)}, str(tmp_path / "tok.safetensors"))
    assert not is_embedding(tmp_path / "foo.safetensors") and is_embedding(tmp_path / "tok.safetensors")


def test_output_inside_the_data_or_a_foreign_folder_is_refused(cli, tmp_path, data):
    base = ["embedding", "train", "--model", "tiny-sd", "--data", data, "--token", TOKEN, "--init-words", "a"]
    r = cli(*base, "-o", data / "out")
    assert r.code == 2 and "lies inside the input" in r.stderr and not (data / "out").exists(), r
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine\n")
    r = cli(*base, "-o", tmp_path / "out", "--overwrite")
    assert (
        r.code == 2 and "notes.txt" in r.stderr and (tmp_path / "out" / "notes.txt").read_text() == "mine\n"
    ), r
