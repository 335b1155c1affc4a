"""Where a metric's network comes from: a local path or a Hugging Face Hub id, never a silent download.

Tests and offline machines give a path; a hub id is fetched through
huggingface_hub (honouring HF_HUB_OFFLINE and its cache). When neither works
the user gets one sentence naming the weights and the flag to point at them.
"""

from __future__ import annotations

from pathlib import Path

from sdcompress.errors import SdcError


def unavailable(metric: str, ref: str, flag: str) -> SdcError:
    return SdcError(
        f"the {metric} weights {ref!r} are not available offline; download them once and pass {flag} PATH "
        "(a local copy), or run where the Hugging Face Hub is reachable."
    )


def hub_file(ref: str, metric: str, flag: str) -> Path:
    """A local file, or `owner/repo/path/in/repo` fetched through the Hub cache."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    parts = ref.split("/")
    if len(parts) < 3:
        raise SdcError(f"{flag} {ref} does not exist; give a file path or owner/repo/file on the Hub.")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
    except Exception as e:  # offline, unknown repo or file: huggingface_hub has many error types
        raise unavailable(metric, ref, flag) from e
