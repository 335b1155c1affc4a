"""CLI start-up: help and usage errors answer without importing torch (issue 10.6).

Every command in the app's command table (and every subcommand of a group) is
covered, so a new command is checked without editing this file. Each probe runs
in a fresh interpreter, since the test process itself has torch loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sdcompress.checkpoint.atomic import Overwrite
from sdcompress.cli import app
from sdcompress.errors import SdcError

HEAVY = ("torch", "diffusers", "transformers")


def _command_paths() -> list[list[str]]:
    """Every runnable command as argv: top-level commands, and `group sub` for each group's subcommands."""
    paths = []
    for name in app.COMMANDS:
        paths.append([name])
        command = app.load_command(name)
        for sub in getattr(command, "commands", {}):
            paths.append([name, sub])
    return paths


def _probe(*argvs: list[str]) -> dict:
    """Run `sdcompress ARGV` for each argv in one fresh interpreter; exit codes and the heavy modules loaded."""
    probe = (
        "import sys, json\n"
        "import sdcompress.cli.app as app\n"
        "codes = []\n"
        f"for argv in {[list(a) for a in argvs]!r}:\n"
        "    sys.argv = ['sdcompress', *argv]\n"
        "    try:\n"
        "        app.main()\n"
        "    except SystemExit as e:\n"
        "        codes.append(e.code)\n"
        f"print(json.dumps({{'codes': codes, 'loaded': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_app_does_not_import_torch():
    assert _probe()["loaded"] == []


def test_the_root_help_and_an_unknown_command_do_not_import_torch():
    assert _probe(["--help"], ["no-such-command"]) == {"codes": [0, 2], "loaded": []}


@pytest.mark.parametrize("path", _command_paths(), ids=" ".join)
def test_help_and_a_usage_error_do_not_import_torch(path):
    """`CMD --help` and `CMD --no-such-option` (one-sentence error, exit 2) leave torch unimported."""
    assert _probe([*path, "--help"], [*path, "--no-such-option"]) == {"codes": [0, 2], "loaded": []}


def test_a_bad_option_value_does_not_import_torch():
    """A value the option's own type refuses (not just an unknown flag) is a usage error too."""
    assert _probe(["finetune", "--mixed-precision", "fp8"]) == {"codes": [2], "loaded": []}


def test_the_command_summaries_match_the_commands():
    """`--help` lists the commands from a table (no imports); each summary is its command's own help."""
    for name, (_, _, summary) in app.COMMANDS.items():
        command = app.load_command(name)
        assert " ".join(command.help.split("\n\n")[0].split()) == summary, name


# ---------------------------------------------------------------------------- --overwrite-foreign

# command line (output in {out}) and the service function each command hands its request to;
# the services are imported when the command runs, so replacing them here intercepts the request.
WRITERS = {
    "convert": (["convert", "tiny-sd", "-o", "{out}"], "sdcompress.services.convert", "convert"),
    "prune": (
        ["prune", "--teacher", "tiny-sd", "--preset", "bk-tiny", "-o", "{out}"],
        "sdcompress.services.prune",
        "prune",
    ),
    "extract-lora": (
        ["extract-lora", "tiny-sd", "tiny-sd", "-o", "{out}.safetensors"],
        "sdcompress.services.extract",
        "run_extract",
    ),
    "merge": (["merge", "tiny-sd", "tiny-sd", "-o", "{out}"], "sdcompress.services.merge", "run_merge"),
    "demo": (["demo", "-o", "{out}"], "sdcompress.services.demo", "run_demo"),
    "data prepare": (
        ["data", "prepare", "{out}.src", "--model", "tiny-sd", "-o", "{out}"],
        "sdcompress.services.data_prepare",
        "data_prepare",
    ),
}


@pytest.mark.parametrize("command", WRITERS)
@pytest.mark.parametrize(
    ("flags", "policy"),
    [([], Overwrite.NEVER), (["--overwrite"], Overwrite.OURS), (["--overwrite-foreign"], Overwrite.ANY)],
    ids=["none", "overwrite", "overwrite-foreign"],
)
def test_overwrite_flags_reach_the_service_as_one_policy(cli, monkeypatch, tmp_path, command, flags, policy):
    """Each writing command turns --overwrite / --overwrite-foreign into the writers' `Overwrite` policy."""
    import importlib

    argv, module, function = WRITERS[command]
    seen = []

    def record(request, *_args, **_kwargs):
        seen.append(request.overwrite)
        raise SdcError("recorded")

    monkeypatch.setattr(importlib.import_module(module), function, record)
    r = cli(*[a.format(out=tmp_path / "out") for a in argv], *flags)
    assert r.code == 2 and "recorded" in r.stderr, r
    assert seen == [policy] and type(seen[0]) is Overwrite
