"""A loopback stand-in for the Hugging Face Hub API, enough for huggingface_hub to create a repo and commit.

It answers what `HfApi.create_repo`, `create_branch` and `create_commit`
call (with every file in "regular" upload mode, so no LFS or Xet transfer is
involved): `POST /api/repos/create`, `POST /api/validate-yaml`,
`GET /api/models/{repo}` (and `/revision/{rev}`, which huggingface_hub < 1.0 asks
before a commit), `POST /api/models/{repo}/branch/{branch}`,
`POST /api/models/{repo}/preupload/{rev}` and
`POST /api/models/{repo}/commit/{rev}` (NDJSON, base64 contents). Anything
else is recorded in `unknown` and answered 404, so a test can assert the
client asked for nothing we did not expect. Tokens are checked like the Hub
does: a bad one gets 401, a read-only one 403 on writes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

PIPELINE_TAGS = {"text-to-image", "image-to-image", "unconditional-image-generation"}
_REPO = r"(?P<repo>[^/]+/[^/]+)"


@dataclass
class Commit:
    oid: str
    summary: str
    revision: str
    pr: int | None
    files: dict[str, bytes]
    lfs_files: list[dict[str, Any]]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[Commit] = field(default_factory=list)
    prs: int = 0


def validate_card_yaml(content: str) -> list[str]:
    """The Hub's model-card checks that matter here: YAML front matter with well-typed known fields."""
    m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
    if not m:
        return ["README.md has no YAML metadata block"]
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError as e:
        return [f"YAML does not parse: {e}"]
    if not isinstance(meta, dict):
        return ["metadata is not a mapping"]
    errors = []
    for key in ("license", "library_name", "pipeline_tag"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f'"{key}" must be a string')
    if meta.get("pipeline_tag") is not None and meta["pipeline_tag"] not in PIPELINE_TAGS:
        errors.append(f'"pipeline_tag" {meta["pipeline_tag"]!r} is not a known task')
    tags = meta.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        errors.append('"tags" must be a list of strings')
    base = meta.get("base_model")
    bases = base if isinstance(base, list) else [base] if base is not None else []
    for b in bases:
        if not isinstance(b, str) or not re.fullmatch(r"[\w.-]+/[\w.-]+", b):
            errors.append(f'"base_model" {b!r} is not a model id')
    return errors


class FakeHub:
    """Start with `with FakeHub(token=...) as hub:`; `hub.url` is the endpoint."""

    def __init__(self, token: str = "hf_test_token", read_only_token: str = "hf_read_only") -> None:
        self.token = token
        self.read_only_token = read_only_token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unknown: list[tuple[str, str]] = []
        self.validated: list[tuple[str, list[str]]] = []  # (content, errors)
        self.seen_tokens: set[str] = set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ handlers

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                return

            def do_GET(self) -> None:
                hub._dispatch(self, "GET")

            def do_POST(self) -> None:
                hub._dispatch(self, "POST")

            def do_PUT(self) -> None:
                hub._dispatch(self, "PUT")

        return Handler

    def _reply(
        self, h: BaseHTTPRequestHandler, status: int, body: Any, headers: dict[str, str] | None = None
    ):
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def _error(self, h: BaseHTTPRequestHandler, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._reply(h, status, {"error": message}, headers)

    def _auth(self, h: BaseHTTPRequestHandler, write: bool) -> bool:
        auth = h.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        if token:
            self.seen_tokens.add(token)
        if token == self.token:
            return True
        if token == self.read_only_token and not write:
            return True
        if token == self.read_only_token:
            self._error(h, 403, "You don't have the rights to create a model under this namespace")
        else:
            self._error(h, 401, "Invalid credentials in Authorization header")
        return False

    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(h.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        with self._lock:
            self.requests.append((method, path))
        routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("GET", rf"/api/models/{_REPO}", self._repo_info),
            ("GET", rf"/api/models/{_REPO}/revision/(?P<rev>.+)", self._repo_info),
            ("POST", rf"/api/models/{_REPO}/branch/(?P<rev>.+)", self._create_branch),
            ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>.+)", self._preupload),
            ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>.+)", self._commit),
        ]
        for m_, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if m_ == method and match:
                with self._lock:
                    handler(h, body, query, **match.groupdict())
                return
        self.unknown.append((method, path))
        self._error(h, 404, f"fake hub does not serve {method} {path}")

    def _repo_or_404(self, h: BaseHTTPRequestHandler, repo: str) -> Repo | None:
        if repo not in self.repos:
            self._error(h, 404, "Repository not found", code="RepoNotFound")
            return None
        return self.repos[repo]

    def _create_repo(self, h, body, query) -> None:
        if not self._auth(h, write=True):
            return
        payload = json.loads(body)
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.repos:
            self._reply(
                h, 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            )
            return
        # huggingface_hub >= 1.0 sends "visibility"; older versions send "private": true.
        private = payload.get("visibility") == "private" or payload.get("private") is True
        self.repos[repo_id] = Repo(repo_id, private=private)
        self._reply(h, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, h, body, query) -> None:
        content = json.loads(body)["content"]
        errors = validate_card_yaml(content)
        self.validated.append((content, errors))
        if errors:
            self._reply(h, 400, {"errors": [{"message": e} for e in errors], "warnings": []})
        else:
            self._reply(h, 200, {"errors": [], "warnings": []})

    def _repo_info(self, h, body, query, repo: str, rev: str = "main") -> None:
        if not self._auth(h, write=False):
            return
        r = self._repo_or_404(h, repo)
        if r is not None and rev not in r.branches:
            self._error(h, 404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        elif r is not None:
            sha = r.commits[-1].oid if r.commits else "0" * 40
            self._reply(
                h, 200, {"id": repo, "modelId": repo, "sha": sha, "private": r.private, "siblings": []}
            )

    def _create_branch(self, h, body, query, repo: str, rev: str) -> None:
        if not self._auth(h, write=True):
            return
        r = self._repo_or_404(h, repo)
        if r is None:
            return
        if rev in r.branches:
            self._error(h, 409, "Reference already exists")
            return
        r.branches[rev] = dict(r.branches["main"])
        self._reply(h, 200, {})

    def _preupload(self, h, body, query, repo: str, rev: str) -> None:
        if not self._auth(h, write=True):
            return
        r = self._repo_or_404(h, repo)
        if r is None:
            return
        if rev not in r.branches:
            self._error(h, 404, f"Invalid rev id: {rev}", code="RevisionNotFound")
            return
        files = json.loads(body)["files"]
        answer = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
        ]
        self._reply(h, 200, {"files": answer, "commitOid": r.commits[-1].oid if r.commits else "0" * 40})

    def _commit(self, h, body, query, repo: str, rev: str) -> None:
        if not self._auth(h, write=True):
            return
        r = self._repo_or_404(h, repo)
        if r is None:
            return
        if rev not in r.branches:
            self._error(h, 404, f"Invalid rev id: {rev}", code="RevisionNotFound")
            return
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        files: dict[str, bytes] = {}
        lfs = []
        for item in lines:
            if item["key"] == "file":
                assert item["value"]["encoding"] == "base64"
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "lfsFile":
                lfs.append(item["value"])
        oid = hashlib.sha1(body).hexdigest()
        pr = None
        if query.get("create_pr") == ["1"]:
            r.prs += 1
            pr = r.prs
            r.branches[f"refs/pr/{pr}"] = {**r.branches[rev], **files}
        else:
            r.branches[rev].update(files)
        r.commits.append(Commit(oid, header["summary"], rev, pr, files, lfs))
        reply = {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid}
        if pr is not None:
            reply["pullRequestUrl"] = f"{self.url}/{repo}/discussions/{pr}"
        self._reply(h, 200, reply)
