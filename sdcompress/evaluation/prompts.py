"""The prompts an eval renders: a text file (one prompt a line) or `coco:N` from a local COCO captions file.

BK-SDM's protocol takes 30K captions of MS-COCO val2014, one per image. We read
`captions_val2014.json` (the annotations file COCO publishes) from a path the
user gives, never from the network, and take the first caption of each image
in image-id order, then the first N: a fixed, documented subset, so two evals
with the same N see the same prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdcompress.errors import SdcError

COCO_PREFIX = "coco:"


def read_prompt_file(path: Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, stripped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SdcError(f"--prompts {path} does not exist; give a text file with one prompt a line.") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise SdcError(f"--prompts {path} is not a UTF-8 text file; give one prompt a line.") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SdcError(f"--prompts {path} holds no prompts; write one prompt a line.")
    return prompts


def coco_captions(annotations: Path | None, count: int) -> list[str]:
    """The first caption of each of the first `count` val2014 images (by image id)."""
    if annotations is None:
        raise SdcError(
            "--prompts coco:N needs the COCO captions file; download annotations_trainval2014.zip from "
            "cocodataset.org and pass --coco-captions annotations/captions_val2014.json."
        )
    try:
        data = json.loads(Path(annotations).read_text(encoding="utf-8"))
        entries = data["annotations"]
        first: dict[int, str] = {}
        for entry in sorted(entries, key=lambda e: (int(e["image_id"]), int(e["id"]))):
            first.setdefault(int(entry["image_id"]), " ".join(str(entry["caption"]).split()))
    except FileNotFoundError:
        raise SdcError(f"--coco-captions {annotations} does not exist; give captions_val2014.json.") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, IsADirectoryError):
        raise SdcError(
            f"--coco-captions {annotations} is not a COCO captions file (a JSON object with 'annotations' "
            "of image_id, id and caption); give captions_val2014.json."
        ) from None
    if count > len(first):
        raise SdcError(f"coco:{count} asks for more prompts than {annotations} has images ({len(first)}).")
    return [first[i] for i in sorted(first)[:count]]


def load_prompts(spec: str, coco_annotations: Path | None = None) -> list[str]:
    """`spec` is a prompt file or `coco:N`."""
    if spec.lower().startswith(COCO_PREFIX):
        text = spec[len(COCO_PREFIX) :]
        if not text.isdigit() or int(text) < 1:
            raise SdcError(f"--prompts {spec!r} needs a positive count, e.g. coco:30000.")
        return coco_captions(coco_annotations, int(text))
    return read_prompt_file(Path(spec).expanduser())
