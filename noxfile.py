"""nox sessions: tests, tests-lowest, lint, docs. CI (.ci/run) runs the tests and tests-lowest."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import nox
from packaging.requirements import Requirement
from packaging.version import Version

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    session.install("-c", "constraints/test.txt", "-e", ".[test]")
    session.run("pytest", "-q", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


# pip has no "lowest" resolution; uv's `lowest-direct` puts every dependency pyproject.toml names at
# its floor and lets what they pull in resolve as usual. Pinned: the resolution is the resolver's.
UV = "uv==0.13.9"
# Pinned by constraints/test.txt to the CPU wheel CI carries, not resolved to its floor (torch 2.4 is
# a multi-GB CUDA download here): torch's floor is the one dependency this session does not check.
NOT_AT_FLOOR = {"torch"}


@nox.session(python="3.11", name="tests-lowest", reuse_venv=False)
def tests_lowest(session: nox.Session) -> None:
    """The suite with every dependency at the floor pyproject.toml declares.

    What a user gets who adds sdcompress to an environment they already have (ComfyUI, kohya):
    pip keeps their older versions while they meet our floors. Built from scratch every time; fails
    when a floor is not the version that gets installed, so the floors stay the tested ones.
    """
    session.install(UV)
    tmp = Path(session.create_tmp())
    lowest, no_torch = tmp / "lowest.txt", tmp / "no-torch.txt"
    no_torch.write_text("torch\n")
    session.run(
        *("uv", "pip", "compile", "pyproject.toml", "--extra", "test", "--python-version", "3.11"),
        *("--resolution", "lowest-direct", "--excludes", str(no_torch), "--no-header", "--quiet"),
        *("-o", str(lowest)),
    )
    # pip, not uv, installs: it finds the CPU torch wheel where the machine's pip is told to look.
    session.install("-c", "constraints/test.txt", "-r", str(lowest))
    session.install("--no-deps", "-e", ".")
    _check_floors(session, ["test"])
    session.run("pytest", "-q", "-p", "no:cacheprovider", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


def _check_floors(session: nox.Session, extras: list[str]) -> None:
    """Fail unless each dependency (and each of `extras`') is installed at exactly its `>=` floor."""
    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(r for e in extras for r in project["optional-dependencies"][e])]
    floors = {}
    for line in declared:
        req = Requirement(line)
        lows = [s.version for s in req.specifier if s.operator == ">="]
        if len(lows) != 1:
            session.error(f"pyproject.toml: {line!r} needs one `>=` floor for tests-lowest to check")
        if req.name not in NOT_AT_FLOOR:
            floors[req.name] = lows[0]
    script = "import importlib.metadata as m, json, sys; print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    installed = json.loads(session.run("python", "-c", script, *floors, silent=True).strip().splitlines()[-1])
    wrong = [
        f"{name}>={floor} installs {installed[name]}"
        for name, floor in floors.items()
        if Version(installed[name]) != Version(floor)
    ]
    if wrong:
        session.error(
            "pyproject.toml floors that are not what the lowest resolution installs: " + "; ".join(wrong)
        )
    session.log("every floor installed as declared: " + ", ".join(f"{n}=={v}" for n, v in installed.items()))


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
