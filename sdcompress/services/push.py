"""`push`: publish a model folder, a single file or a LoRA on the Hub with a model card.

The card records what sdcompress knows about the model (family, preset,
parameter counts, the prune and training records, a sample grid) and goes
into the same commit as the files, from memory: the user's folder is never
modified. `dry_run` does everything except the network: it lists the files
and returns the card, and needs no token.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdcompress.arch.families import FAMILIES, Family
from sdcompress.errors import SdcError
from sdcompress.hub.card import CardFacts, build_card
from sdcompress.hub.lineage import Lineage, eval_beside, file_lineage, folder_lineage
from sdcompress.hub.upload import (
    CARD_NAME,
    UploadFile,
    check_endpoint,
    check_repo_id,
    commit_files,
    folder_files,
    resolve_token,
)


@dataclass
class PushRequest:
    path: str
    repo: str
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    create_pr: bool = False
    dry_run: bool = False
    token: str | None = field(default=None, repr=False)
    endpoint: str | None = None
    license: str | None = None
    base_model: str | None = None
    card: bool = True
    exclude: tuple[str, ...] = ()


@dataclass
class PushResult:
    repo_id: str
    endpoint: str
    kind: str
    dry_run: bool
    private: bool
    revision: str | None
    files: list[dict[str, Any]]
    card: str | None
    repo_url: str | None = None
    commit_url: str | None = None
    commit_oid: str | None = None
    pr_url: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class _Described:
    """What the path is, as far as the card is concerned."""

    kind: str
    family: Family | None = None
    preset: str | None = None
    parameters: dict[str, int] = field(default_factory=dict)
    weight_name: str | None = None
    lora: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _family_from_lora_metadata(meta: dict[str, str]) -> Family | None:
    version = meta.get("ss_base_model_version")
    arch = meta.get("modelspec.architecture", "").removesuffix("/lora")
    for fam in FAMILIES.values():
        if fam.tiny:
            continue
        if (version and fam.base_model_version == version) or (arch and fam.modelspec_architecture == arch):
            return fam
    return None


def _describe_lora(path: Path) -> _Described:
    from sdcompress.lowrank.layouts import read_lora

    d = _Described(kind="lora", weight_name=path.name)
    try:
        lora = read_lora(path)
    except SdcError as e:
        d.notes.append(f"the LoRA could not be parsed for the card ({e})")
        return d
    ranks = Counter(a.rank for a in lora.adapters.values() if a.rank)
    d.family = _family_from_lora_metadata(lora.metadata)
    d.parameters = {"lora": sum(t.numel for a in lora.adapters.values() for t in a.tensors.values())}
    d.lora = {"layout": lora.layout, "modules": len(lora.adapters)}
    if ranks:
        d.lora["rank"] = ranks.most_common(1)[0][0]
    return d


def _describe_model(path: Path, kind: str) -> _Described:
    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.services.info import model_info

    try:
        model = load_model(os.fspath(path))
    except SdcError as e:
        return _Described(
            kind=kind, notes=[f"sdcompress could not read the model, so the card has no counts ({e})"]
        )
    info = model_info(model)
    if kind == "pipeline" and model.unet_only:
        kind = "unet"
    return _Described(
        kind=kind,
        family=model.family,
        preset=info.preset,
        parameters=info.parameters,
        weight_name=path.name if path.is_file() else None,
        notes=list(info.notes),
    )


def _is_peft_lora_folder(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() and not (folder / "model_index.json").is_file()


def _inspect(path: Path, exclude: tuple[str, ...] = ()) -> tuple[_Described, Lineage, list[UploadFile]]:
    """The path's kind, lineage and files (without the card)."""
    from sdcompress.checkpoint.safetensors_io import SafetensorsFile
    from sdcompress.services.lora_convert import is_lora_file

    if path.is_dir():
        if _is_peft_lora_folder(path):
            weights = path / "adapter_model.safetensors"
            described = _describe_lora(weights) if weights.is_file() else _Described(kind="lora")
        else:
            described = _describe_model(path, "pipeline")
        return described, folder_lineage(path), folder_files(path, exclude)
    if path.suffix != ".safetensors":
        raise SdcError(
            f"{path} is not a .safetensors file or a folder; convert it first with `sdcompress convert` "
            "(push never uploads pickled checkpoints)."
        )
    described = _describe_lora(path) if is_lora_file(path) else _describe_model(path, "single-file")
    lineage = file_lineage(SafetensorsFile(path).metadata)
    return described, lineage, [UploadFile(path.name, path.stat().st_size, local=path)]


def _with_card(files: list[UploadFile], card_text: str, notes: list[str]) -> list[UploadFile]:
    kept = [f for f in files if f.path_in_repo != CARD_NAME]
    if len(kept) != len(files):
        notes.append(
            f"the folder's own {CARD_NAME} is replaced by the generated card in the upload (not on disk)"
        )
    data = card_text.encode("utf-8")
    return [*kept, UploadFile(CARD_NAME, len(data), data=data)]


def _endpoint_name(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return endpoint or constants.ENDPOINT


def push(req: PushRequest, on_progress: Callable[[str], None] | None = None) -> PushResult:
    report = on_progress or (lambda message: None)
    repo_id = check_repo_id(req.repo)
    endpoint = check_endpoint(req.endpoint)
    path = Path(req.path).expanduser()
    if not path.exists():
        raise SdcError(f"{path} does not exist; pass a model folder, a .safetensors file or a LoRA file.")
    token = None if req.dry_run else resolve_token(req.token)

    report("reading the model")
    described, lineage, files = _inspect(path, req.exclude)
    lineage.evaluation = eval_beside(path, lineage.notes)
    if not files:
        raise SdcError(f"{path} has no files to upload; check the path.")
    notes = described.notes + lineage.notes
    card_text = None
    if req.card:
        facts = CardFacts(
            repo_id=repo_id,
            kind=described.kind,
            family=described.family,
            preset=described.preset,
            parameters=described.parameters,
            files=[(f.path_in_repo, f.size) for f in files if f.path_in_repo != CARD_NAME],
            lineage=lineage,
            license=req.license,
            base_model=req.base_model,
            weight_name=described.weight_name,
            lora=described.lora,
        )
        card_text = str(build_card(facts))
        files = _with_card(files, card_text, notes)
    result = PushResult(
        repo_id=repo_id,
        endpoint=_endpoint_name(endpoint),
        kind=described.kind,
        dry_run=req.dry_run,
        private=req.private,
        revision=req.revision,
        files=[{"path": f.path_in_repo, "bytes": f.size} for f in files],
        card=card_text,
        notes=notes,
    )
    if req.dry_run:
        return result
    assert token is not None
    report(f"uploading {len(files)} files to {repo_id}")
    outcome = commit_files(
        files,
        repo_id=repo_id,
        token=token,
        endpoint=endpoint,
        private=req.private,
        revision=req.revision,
        commit_message=req.commit_message or f"Upload {path.name} with sdcompress",
        create_pr=req.create_pr,
    )
    result.repo_url = outcome.repo_url
    result.commit_url = outcome.commit_url
    result.commit_oid = outcome.commit_oid
    result.pr_url = outcome.pr_url
    return result
