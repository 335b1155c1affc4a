"""Uploading files to the Hugging Face Hub as one commit, with errors a user can act on.

Why `create_commit` rather than `upload_folder`: the model card is generated
in memory and must land in the same commit as the weights without touching
the user's folder, and `upload_folder` (with hf_xet installed) switches to a
multi-commit pipeline we cannot add an in-memory file to. `create_commit`
still asks the Hub per file whether to send it inline ("regular") or as a
large file (LFS / Xet), and skips files the Hub already holds, so a re-run
after an interruption sends only what is missing.

The token is handed to `HfApi` in memory only: it is never printed, logged or
written, and it is scrubbed from any error message before that is shown.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sdcompress.checkpoint.atomic import MANIFEST
from sdcompress.errors import SdcError

# Never uploaded from a folder: version control, caches, our own unfinished atomic writes, and the
# manifests that tell `--overwrite` which local files sdcompress wrote (bookkeeping, not the model).
DEFAULT_EXCLUDE = (
    ".git/*",
    "*/.git/*",
    ".cache/*",
    "*/__pycache__/*",
    "__pycache__/*",
    "*.partial",
    "*.old",
    MANIFEST,
    f"*/{MANIFEST}",
)
CARD_NAME = "README.md"


@dataclass(frozen=True)
class UploadFile:
    """One file of the commit: from disk (`local`) or from memory (`data`, the model card)."""

    path_in_repo: str
    size: int
    local: Path | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class CommitOutcome:
    repo_url: str
    commit_url: str
    commit_oid: str
    pr_url: str | None


def check_repo_id(repo_id: str) -> str:
    """OWNER/NAME as the Hub spells it; checked before any network call."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1:
        raise SdcError(f"--repo {repo_id!r} is not a repo name; use OWNER/NAME, e.g. me/sdxl-small.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise SdcError(
            f"--repo {repo_id!r} is not a valid repo name; use letters, digits, '-', '_' and '.' "
            "(no '--' or '..', at most 96 characters) as OWNER/NAME."
        ) from None
    return repo_id


def check_endpoint(endpoint: str | None) -> str | None:
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise SdcError(f"--endpoint {endpoint!r} is not a URL; use e.g. https://huggingface.co.")
    return endpoint.rstrip("/") if endpoint else None


def resolve_token(token: str | None) -> str:
    """--token, else HF_TOKEN, else the token saved by `hf auth login`."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise SdcError(
            "no Hugging Face token found; set HF_TOKEN, run `hf auth login`, or pass --token (or use --dry-run)."
        )
    return found


def _excluded(rel: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(rel, p) for p in patterns)


def folder_files(folder: Path, exclude: tuple[str, ...] = ()) -> list[UploadFile]:
    """Every file under `folder` to upload, in a stable order, with the default exclusions."""
    patterns = DEFAULT_EXCLUDE + tuple(exclude)
    files = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not _excluded(rel, patterns):
            files.append(UploadFile(rel, p.stat().st_size, local=p))
    return files


def _is_transport_error(e: BaseException) -> bool:
    """A connection, DNS or timeout failure of huggingface_hub's HTTP client.

    Matched by class name because the client package differs between
    huggingface_hub versions (httpx, httpx2), and importing either would tie us to one.
    """
    return any(
        c.__name__ == "TransportError" and c.__module__.split(".")[0].startswith("httpx")
        for c in type(e).__mro__
    )


@contextlib.contextmanager
def hub_errors(endpoint: str, repo_id: str, token: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub / network failures into one sentence each (never showing the token)."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def clean(text: str) -> str:
        text = " ".join(str(text).split())
        return text.replace(token, "***") if token else text

    try:
        yield
    except OfflineModeIsEnabled:
        raise SdcError(
            "huggingface_hub is in offline mode (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE to push, "
            "or use --dry-run."
        ) from None
    except RevisionNotFoundError as e:
        raise SdcError(
            f"the Hub has no such revision for {repo_id} ({clean(e.server_message or '')}); check --revision."
        ) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        detail = clean(e.server_message or "") or f"HTTP {status}"
        if status in (401, 403):
            raise SdcError(
                f"the Hub at {endpoint} refused the token for {repo_id} (HTTP {status}: {detail}); "
                "use a token with write access to that namespace (HF_TOKEN, `hf auth login` or --token)."
            ) from None
        if isinstance(e, RepositoryNotFoundError):
            raise SdcError(
                f"{repo_id} was not found on {endpoint} or the token cannot write to it; check --repo and the token."
            ) from None
        raise SdcError(f"the Hub at {endpoint} answered HTTP {status} for {repo_id}: {detail}.") from None
    except ValueError as e:
        if "metadata" in str(e).lower():
            raise SdcError(
                f"the Hub rejected the model card metadata: {clean(e)}; pass --no-card to skip it."
            ) from None
        raise
    except OSError as e:  # httpx transport errors, DNS, refused connections
        raise SdcError(
            f"cannot reach the Hub at {endpoint} ({clean(e) or e.__class__.__name__}); "
            "check the network or --endpoint / HF_ENDPOINT."
        ) from None
    except Exception as e:
        if _is_transport_error(e):
            raise SdcError(
                f"cannot reach the Hub at {endpoint} ({clean(e) or e.__class__.__name__}); "
                "check the network or --endpoint / HF_ENDPOINT."
            ) from None
        raise


@contextlib.contextmanager
def _commit_urls_parse(endpoint: str) -> Iterator[None]:
    """Let huggingface_hub < 1.0 read back a commit made on an `--endpoint` other than its default.

    Those versions parse the returned commit URL against the default endpoint (HF_ENDPOINT), not
    the one `HfApi` was given, and raise after the commit is made on any other host; 1.0 passes the
    endpoint along. For older versions the default points at `endpoint` for the call only.
    """
    import huggingface_hub
    from huggingface_hub import constants

    if int(huggingface_hub.__version__.split(".")[0]) >= 1 or endpoint == constants.ENDPOINT:
        yield
        return
    default = constants.ENDPOINT
    constants.ENDPOINT = endpoint
    try:
        yield
    finally:
        constants.ENDPOINT = default


def commit_files(
    files: list[UploadFile],
    *,
    repo_id: str,
    token: str,
    endpoint: str | None,
    private: bool,
    revision: str | None,
    commit_message: str,
    create_pr: bool,
) -> CommitOutcome:
    """Create the repo (if needed) and the branch (if named), then commit every file at once."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(api.endpoint, repo_id, token), _commit_urls_parse(api.endpoint):
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations = [
            CommitOperationAdd(
                path_in_repo=f.path_in_repo, path_or_fileobj=f.data if f.data is not None else str(f.local)
            )
            for f in files
        ]
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )
    return CommitOutcome(
        repo_url=str(repo_url), commit_url=info.commit_url, commit_oid=info.oid, pr_url=info.pr_url
    )
