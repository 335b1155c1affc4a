"""nox sessions: tests, lint, docs. `nox -s tests` is what CI runs."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    session.install("-c", "constraints/test.txt", "-e", ".[test]")
    session.run("pytest", "-q", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "sdcompress", "tests", "benchmarks")
    session.run("ruff", "format", "--check", "sdcompress", "tests", "benchmarks")


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    session.install("-c", "constraints/test.txt", "-e", ".[docs]")
    session.run("python", "docs/gen_cli_reference.py")
    session.run("mkdocs", "build", "--strict", env={"NO_MKDOCS_2_WARNING": "1"})
