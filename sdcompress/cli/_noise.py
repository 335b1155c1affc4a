"""Keep third-party chatter out of normal output; `--debug` lets it through.

transformers, diffusers, huggingface_hub, accelerate and peft log advice meant
for their own developers ("`CLIPImageProcessor` requires torchvision", "There
are modules in AutoencoderKL that should be kept in float32: []") and raise
deprecation warnings about calls we make. A user of sdcompress can act on none
of it, and it breaks up our progress bars. What matters to the user (a bad
input, a LoRA that does not load) is our own message, so the CLI shows only
the libraries' errors unless `--debug` is given.

This runs once at CLI start, before any of those libraries is imported (the
CLI stays fast): the libraries read their `*_VERBOSITY` variable when they set
up their logger, and setting the logger level by name covers one that was
already imported (in-process callers such as the tests). Each library offers
its own switch but none covers the others, hence one small module.
"""

from __future__ import annotations

import logging
import os
import warnings

# The libraries' own switches: read when each first sets up its logger (also in child processes).
VERBOSITY_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
# Logger names set directly, so a library imported before the CLI started is quiet too.
LOGGERS = ("transformers", "diffusers", "huggingface_hub", "accelerate", "peft", "torch", "PIL")
# Python warnings attributed to these packages are theirs, not the user's.
THIRD_PARTY = (
    r"(transformers|diffusers|huggingface_hub|accelerate|peft|torch|torchvision|safetensors|PIL)(\.|$)"
)

# What the user had set before sdcompress started: their own choice always wins.
_USER_ENV = {name: os.environ.get(name) for name in VERBOSITY_ENV}
_ENV_OF_LOGGER = {
    "transformers": "TRANSFORMERS_VERBOSITY",
    "diffusers": "DIFFUSERS_VERBOSITY",
    "huggingface_hub": "HF_HUB_VERBOSITY",
}


def configure(debug: bool) -> None:
    """Third-party log records below ERROR and third-party warnings hidden, unless `debug`."""
    for name, value in VERBOSITY_ENV.items():
        if _USER_ENV[name] is not None:
            continue
        if debug:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    for name in LOGGERS:
        env = _ENV_OF_LOGGER.get(name)
        if env is not None and _USER_ENV[env] is not None:
            continue
        # WARNING is the libraries' own default level, restored under --debug.
        logging.getLogger(name).setLevel(logging.WARNING if debug else logging.ERROR)
    if debug:
        warnings.filterwarnings("default", module=THIRD_PARTY)
        return
    warnings.filterwarnings("ignore", module=THIRD_PARTY)
    # Deprecations are addressed to developers; libraries attribute them to our calling frame.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
