"""`push` end to end against a loopback Hub (tests/hub_server.py), plus its bad-input paths."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import tree_digest
from hub_server import FakeHub

TOKEN = "hf_test_token"


@pytest.fixture(scope="module")
def student_folder(tmp_path_factory) -> Path:
    """A pipeline folder as prune + distill leave it: weights, both records, a validation grid, a README."""
    from PIL import Image

    from sdcompress.checkpoint.tiny import tiny_model_path

    folder = tmp_path_factory.mktemp("push") / "student"
    shutil.copytree(tiny_model_path("tiny-sd"), folder)
    # the records as `prune` and `distill` write them (sdcompress/services/prune.py, distill.run_record)
    (folder / "sdcompress_prune.json").write_text(
        json.dumps(
            {
                "sdcompress": "0.1.0",
                "teacher": "SD15",
                "family": "sd1",
                "preset": "bk-small",
                "select": "none",
                "parameters": {"teacher": 859520964, "student": 482346692},
                "stages": [{"stage": "mid_block", "teacher": 97038080, "student": 0}],
                "transformer_blocks": {"teacher": 16, "student": 11},
                "removed": [
                    {"block": "mid_block", "score": None, "reason": "structure"},
                    {
                        "block": "down_blocks.0.attentions.1.transformer_blocks.0",
                        "score": None,
                        "reason": "structure",
                    },
                ],
            }
        )
    )
    curve = [
        {"step": s, "loss": 1.0 / s, "task": 0.5 / s, "features": 0.25 / s, "lr": 1e-4} for s in range(1, 41)
    ]
    (folder / "sdcompress_run.json").write_text(
        json.dumps(
            {
                "tool": "sdcompress",
                "command": "distill",
                "teacher": "SD15",
                "student": "bk-small/",
                "preset": "bk-small",
                "teacher_unet_parameters": 859520964,
                "student_unet_parameters": 482346692,
                "steps": 40,
                "epoch": 1,
                "loss_weights": {"task": 1.0, "output": 1.0, "features": 1.0},
                "feature_pairs": [{"teacher": "up_blocks.0", "student": "up_blocks.0"}],
                "options": {"learning_rate": 1e-4, "batch_size": 4},
                "data": {"images": 16},
                "loss_curve": curve,
            }
        )
    )
    (folder / "validation").mkdir()
    for step in (10, 40):
        Image.new("RGB", (8, 8), (step, 0, 0)).save(folder / "validation" / f"step-{step:08d}.png")
    (folder / "README.md").write_text("my own notes\n")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return folder


@pytest.fixture
def lora_file(tmp_path) -> Path:
    from sdcompress.checkpoint.safetensors_io import write_safetensors
    from sdcompress.checkpoint.tensors import LazyTensor

    gen = torch.Generator().manual_seed(0)
    sd = {}
    for name in ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_mid_block_attentions_0_proj_out"):
        sd[f"{name}.lora_down.weight"] = LazyTensor.of(torch.randn(4, 32, generator=gen))
        sd[f"{name}.lora_up.weight"] = LazyTensor.of(torch.randn(32, 4, generator=gen))
        sd[f"{name}.alpha"] = LazyTensor.of(torch.tensor(4.0))
    path = tmp_path / "style.safetensors"
    write_safetensors(path, sd, {"ss_base_model_version": "sd_v1", "ss_network_dim": "4"})
    return path


@pytest.fixture
def online(monkeypatch):
    """The test session runs with HF_HUB_OFFLINE=1 (conftest); loopback push tests turn it off here only,
    and make sure nothing goes through hf_xet (every file is uploaded inline, "regular")."""
    import huggingface_hub._commit_api as commit_api
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_xet(**kwargs):
        # huggingface_hub < 1.0 calls its uploaders with an empty list when every file is "regular".
        if kwargs.get("additions") or kwargs.get("actions"):
            raise AssertionError("hf_xet / LFS upload was used")

    monkeypatch.setattr(commit_api, "_upload_xet_files", no_xet)
    monkeypatch.setattr(commit_api, "_upload_lfs_files", no_xet)
    monkeypatch.setenv("HF_TOKEN", TOKEN)


@pytest.fixture
def hub(online):
    with FakeHub(token=TOKEN) as server:
        yield server


def _front_matter(readme: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", readme, re.S)
    assert m, readme[:200]
    return yaml.safe_load(m.group(1))


def _one_error_line(result) -> str:
    assert result.code == 2, result
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].rstrip().endswith("."), errors[0]
    return errors[0]


def test_push_folder_end_to_end(cli, hub, student_folder, monkeypatch):
    import huggingface_hub
    from huggingface_hub import ModelCard, constants

    before = tree_digest(student_folder)
    r = cli("push", student_folder, "--repo", "me/tiny-student", "--endpoint", hub.url, "--private")
    assert r.code == 0, r
    assert TOKEN not in r.stdout + r.stderr

    repo = hub.repos["me/tiny-student"]
    assert repo.private
    assert len(repo.commits) == 1 and not repo.commits[0].lfs_files
    uploaded = repo.branches["main"]
    expected = {
        p.relative_to(student_folder).as_posix(): p.read_bytes()
        for p in student_folder.rglob("*")
        if p.is_file() and ".git" not in p.parts and p.name != "README.md"
    }
    assert set(uploaded) == set(expected) | {"README.md"}
    for path, data in expected.items():
        assert uploaded[path] == data, path  # byte for byte
    assert tree_digest(student_folder) == before  # the folder is untouched (its README too)
    assert (student_folder / "README.md").read_text() == "my own notes\n"

    readme = uploaded["README.md"].decode()
    # the server validated the card's metadata before the commit, as the Hub does
    assert hub.validated and hub.validated[-1] == (readme, [])
    if int(huggingface_hub.__version__.split(".")[0]) >= 1:  # < 1.0 always asks huggingface.co
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        ModelCard(readme).validate()  # huggingface_hub's own validation call, answered by the loopback hub

    meta = _front_matter(readme)
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert meta["library_name"] == "diffusers"
    assert meta["pipeline_tag"] == "text-to-image"
    assert meta["license"] == "apache-2.0"  # tiny models are sdcompress's own random weights
    assert {"sdcompress", "pruned", "distillation", "bk-small"} <= set(meta["tags"])
    # lineage: teacher, preset, removed blocks, counts before/after, options, loss curve, sample grid
    assert "`SD15`" in readme and "| preset | `bk-small` |" in readme
    assert "removed blocks | 2: `mid_block`, `down_blocks.0.attentions.1.transformer_blocks.0`" in readme
    assert "859,520,964 → 482,346,692 (-43.9%)" in readme
    assert "| transformer blocks (teacher → student) | 16 → 11 (-31.2%) |" in readme
    assert "| mid_block | 97,038,080 | 0 |" in readme
    assert '"learning_rate": 0.0001' in readme and '"loss_weights"' in readme
    assert "feature_pairs" not in readme  # bulky: it stays in the uploaded record
    assert "### Distillation" in readme and "- steps: 40 (epoch 1)" in readme
    assert "40 logged steps" in readme and "| 40 | 0.025 | 0.00625 | 0.0125 |" in readme
    assert "![samples](validation/step-00000040.png)" in readme
    assert "| unet | 8,525,412 |" in readme  # counted from the weights by sdcompress.services.info
    assert not hub.unknown, hub.unknown
    assert {"POST /api/repos/create", "POST /api/validate-yaml"} <= {f"{m} {p}" for m, p in hub.requests}


def test_push_again_to_a_branch_and_as_pr(cli, hub, lora_file):
    r = cli("push", lora_file, "--repo", "me/style", "--endpoint", hub.url)
    assert r.code == 0, r
    r = cli(
        "push",
        lora_file,
        "--repo",
        "me/style",
        "--endpoint",
        hub.url,
        "--revision",
        "dev",
        "--commit-message",
        "second",
    )
    assert r.code == 0, r
    r = cli("push", lora_file, "--repo", "me/style", "--endpoint", hub.url, "--create-pr", "--json")
    assert r.code == 0, r
    result = json.loads(r.stdout)
    assert result["pr_url"].endswith("/me/style/discussions/1")
    assert result["kind"] == "lora"

    repo = hub.repos["me/style"]
    assert [c.revision for c in repo.commits] == ["main", "dev", "main"]
    assert repo.commits[1].summary == "second"
    assert repo.commits[2].pr == 1
    for branch in ("main", "dev", "refs/pr/1"):
        assert repo.branches[branch]["style.safetensors"] == lora_file.read_bytes()
    meta = _front_matter(repo.branches["main"]["README.md"].decode())
    assert "lora" in meta["tags"]
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # from ss_base_model_version
    assert 'weight_name="style.safetensors"' in repo.branches["main"]["README.md"].decode()
    assert not hub.unknown, hub.unknown


def test_dry_run_needs_no_token_and_no_network(cli, student_folder, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    r = cli(
        "push", student_folder, "--repo", "me/tiny-student", "--dry-run", "--endpoint", "http://127.0.0.1:9"
    )
    assert r.code == 0, r
    assert "unet/diffusion_pytorch_model.safetensors" in r.stdout
    assert "README.md" in r.stdout and "pipeline_tag: text-to-image" in r.stdout
    assert ".git/HEAD" not in r.stdout
    assert "nothing was sent" in r.stderr


def test_missing_token(cli, student_folder, monkeypatch, tmp_path):
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    line = _one_error_line(cli("push", student_folder, "--repo", "me/x", "--endpoint", "http://127.0.0.1:9"))
    assert "no Hugging Face token" in line and "HF_TOKEN" in line


def test_hub_unreachable(cli, online, lora_file):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed as soon as the block ends: nothing listens there
    line = _one_error_line(cli("push", lora_file, "--repo", "me/x", "--endpoint", f"http://127.0.0.1:{port}"))
    assert "cannot reach the Hub" in line and str(port) in line


def test_old_huggingface_hub_reads_back_commits_on_the_given_endpoint(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    from sdcompress.hub.upload import _commit_urls_parse

    default = constants.ENDPOINT
    monkeypatch.setattr(huggingface_hub, "__version__", "0.34.0")
    with _commit_urls_parse("http://127.0.0.1:1"):
        assert constants.ENDPOINT == "http://127.0.0.1:1"  # what its CommitInfo parses URLs against
    assert default == constants.ENDPOINT
    monkeypatch.setattr(huggingface_hub, "__version__", "1.0.0")
    with _commit_urls_parse("http://127.0.0.1:1"):
        assert default == constants.ENDPOINT  # 1.0 takes the endpoint from HfApi: nothing to change


def test_offline_mode(lora_file):
    # In a new process, as a user sets it: huggingface_hub < 1.0 reads HF_HUB_OFFLINE once, when it
    # builds its cached HTTP session, so patching the constant inside this process tests nothing there.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": TOKEN}
    command = [sys.executable, "-m", "sdcompress", "push", str(lora_file), "--repo", "me/x"]
    p = subprocess.run(
        [*command, "--endpoint", "http://127.0.0.1:9"], env=env, capture_output=True, text=True, timeout=300
    )
    line = _one_error_line(SimpleNamespace(code=p.returncode, stdout=p.stdout, stderr=p.stderr))
    assert "offline mode" in line


@pytest.mark.parametrize("repo", ["no-owner", "a/b/c", "me/bad--name", "me/.hidden", "me/" + "x" * 100])
def test_invalid_repo_name_is_refused_before_any_request(cli, hub, lora_file, repo):
    line = _one_error_line(cli("push", lora_file, "--repo", repo, "--endpoint", hub.url))
    assert "repo name" in line
    assert hub.requests == []


def test_path_missing(cli, hub, tmp_path):
    line = _one_error_line(cli("push", tmp_path / "nope", "--repo", "me/x", "--endpoint", hub.url))
    assert "does not exist" in line
    assert hub.requests == []


def test_unauthorised_token_is_reported_and_never_shown(cli, hub, lora_file, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_secret")
    line = _one_error_line(cli("push", lora_file, "--repo", "me/x", "--endpoint", hub.url))
    assert "refused the token" in line and "401" in line
    assert "hf_wrong_secret" in hub.seen_tokens
    monkeypatch.setenv("HF_TOKEN", hub.read_only_token)
    r = cli("push", lora_file, "--repo", "me/x", "--endpoint", hub.url, "--token", hub.read_only_token)
    assert "403" in _one_error_line(r)
    assert hub.read_only_token not in r.stdout + r.stderr
    assert "me/x" not in hub.repos


def test_pickled_checkpoint_is_refused(cli, hub, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really")
    line = _one_error_line(cli("push", ckpt, "--repo", "me/x", "--endpoint", hub.url))
    assert "convert" in line


def test_single_file_dry_run_reads_lineage_from_metadata(cli, tmp_path):
    """A single .safetensors file carries its records in its metadata (`sdcompress.prune` / `sdcompress.run`)."""
    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.checkpoint.safetensors_io import write_safetensors

    unet = load_model("tiny-sd").components["unet"]
    path = tmp_path / "student-unet.safetensors"
    prune = {"teacher": "stabilityai/stable-diffusion-2-1-base", "preset": "bk-tiny"}
    write_safetensors(path, unet, {"sdcompress.prune": json.dumps(prune), "sdcompress.run": "{not json"})
    r = cli("push", path, "--repo", "me/unet", "--dry-run", "--json", "--license", "mit")
    assert r.code == 0, r
    result = json.loads(r.stdout)
    assert result["kind"] == "single-file"
    assert [f["path"] for f in result["files"]] == ["student-unet.safetensors", "README.md"]
    assert result["files"][0]["bytes"] == path.stat().st_size
    meta = _front_matter(result["card"])
    assert meta["base_model"] == "stabilityai/stable-diffusion-2-1-base" and meta["license"] == "mit"
    assert {"pruned", "bk-tiny"} <= set(meta["tags"])
    assert "from_single_file" in result["card"]
    assert any("sdcompress.run" in n for n in result["notes"])  # a broken record is skipped, and said so


def test_card_of_a_real_prune_output(cli, tmp_path):
    """The record `prune` writes is read as it is: teacher, preset, removed blocks, counts before and after."""
    from sdcompress.services.prune import PruneRequest, prune

    out = tmp_path / "bk-small"
    result = prune(PruneRequest(teacher="tiny-sd", output=str(out), preset="bk-small", device="cpu"))
    r = cli("push", out, "--repo", "me/bk-small", "--dry-run", "--json", "--exclude", "tokenizer/*")
    assert r.code == 0, r
    pushed = json.loads(r.stdout)
    assert not any(f["path"].startswith("tokenizer/") for f in pushed["files"])
    assert "sdcompress_prune.json" in [f["path"] for f in pushed["files"]]
    card = pushed["card"]
    before, after = result.parameters["teacher"], result.parameters["student"]
    assert f"{before:,} → {after:,}" in card
    assert "| preset | `bk-small` |" in card and "| teacher | `tiny-sd` |" in card
    assert f"removed blocks | {len(result.removed)}: `{result.removed[0]['block']}`" in card
    assert f"| unet | {after:,} |" in card
    assert {"pruned", "bk-small"} <= set(_front_matter(card)["tags"])


def test_card_rejected_by_the_hub_is_one_sentence_and_nothing_is_committed(cli, hub, lora_file):
    r = cli("push", lora_file, "--repo", "me/style", "--endpoint", hub.url, "--base-model", "not a model id")
    line = _one_error_line(r)
    assert "rejected the model card metadata" in line and "base_model" in line
    assert hub.repos["me/style"].commits == []
    r = cli("push", lora_file, "--repo", "me/style", "--endpoint", hub.url, "--base-model", "x", "--no-card")
    assert r.code == 0, r
    assert set(hub.repos["me/style"].branches["main"]) == {"style.safetensors"}
