"""`sdcompress push PATH --repo OWNER/NAME`."""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Annotated

import typer

from sdcompress.cli._options import Json
from sdcompress.cli._output import emit_json, human_bytes, note, out, success, table
from sdcompress.services.push import PushRequest
from sdcompress.services.push import push as run_push


def push(
    path: Annotated[
        str, typer.Argument(help="A diffusers folder, a .safetensors checkpoint or a LoRA file.")
    ],
    repo: Annotated[str, typer.Option("--repo", help="Target repo on the Hub, as OWNER/NAME.")],
    private: Annotated[
        bool, typer.Option("--private", help="Create the repo private (if it is new).")
    ] = False,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Branch to commit to (created if missing; default main).")
    ] = None,
    commit_message: Annotated[
        str | None, typer.Option("--commit-message", help="The commit's summary.")
    ] = None,
    create_pr: Annotated[
        bool, typer.Option("--create-pr", help="Open a pull request instead of committing to the branch.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="List what would be uploaded and print the model card; no network."),
    ] = False,
    token: Annotated[
        str | None,
        typer.Option(
            "--token", help="Hub token (default: HF_TOKEN, else the token saved by `hf auth login`)."
        ),
    ] = None,
    endpoint: Annotated[
        str | None, typer.Option("--endpoint", help="Hub URL (default: HF_ENDPOINT, else huggingface.co).")
    ] = None,
    license_: Annotated[
        str | None, typer.Option("--license", help="License for the card (default: the family's license).")
    ] = None,
    base_model: Annotated[
        str | None,
        typer.Option("--base-model", help="Hub id of the base model (default: the recorded teacher)."),
    ] = None,
    card: Annotated[
        bool, typer.Option("--card/--no-card", help="Write a README.md model card into the upload.")
    ] = True,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude", help="Glob of folder files not to upload (repeatable), e.g. 'checkpoints/*'."
        ),
    ] = None,
    json_: Json = False,
) -> None:
    """Upload a model folder, a single file or a LoRA to the Hugging Face Hub with a model card.

    The card records the lineage sdcompress knows (teacher, preset or removed blocks, parameter
    counts, training options and loss curve, sample grid). Your folder is never modified.
    """
    req = PushRequest(
        path=path,
        repo=repo,
        private=private,
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
        dry_run=dry_run,
        token=token,
        endpoint=endpoint,
        license=license_,
        base_model=base_model,
        card=card,
        exclude=tuple(exclude or ()),
    )
    result = run_push(req, on_progress=None if json_ else note)
    if json_:
        emit_json(asdict(result))
        return
    title = f"Would upload to {result.repo_id}" if result.dry_run else f"Uploaded to {result.repo_id}"
    table(
        title,
        ["file", "size"],
        [(f["path"], human_bytes(f["bytes"])) for f in result.files],
        right=["size"],
    )
    if result.dry_run:
        if result.card is not None:
            out.rule("README.md")
            sys.stdout.write(result.card)
            sys.stdout.flush()
        note(f"dry run: nothing was sent to {result.endpoint}.")
    else:
        success(f"committed {result.commit_oid} to {result.repo_id}: {result.commit_url}")
        if result.pr_url:
            success(f"pull request: {result.pr_url}")
    for n in result.notes:
        note(n)
