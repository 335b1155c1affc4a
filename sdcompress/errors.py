"""The one error type users see.

Everything the user can fix (a path, an option, a file that is not what it
claims) is raised as `SdcError` with one sentence that names the problem and
the fix. The CLI prints it and exits with code 2; anything else is a bug and
keeps its traceback.
"""


class SdcError(Exception):
    """A problem with the user's input, reported as one sentence (exit code 2)."""

    exit_code = 2
