"""The CLIP tokenizer, written offline from the BPE merges bundled with the package.

A single-file checkpoint carries no tokenizer, and without the network
`CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")` cannot run.
CLIP's `vocab.json` is not data of its own: it is derived from the BPE merges
file (the 256 byte symbols, the same with the end-of-word mark `</w>`, one
entry per merge, then the two special tokens). So the package ships only the
merges file (MIT, like CLIP) and writes the four files transformers reads.
transformers offers no way to derive the vocabulary from merges, hence this
module.

All SD text encoders share this vocabulary; they differ in the padding token:
`<|endoftext|>` for SD 1 and SDXL's first encoder, `!` for SD 2 and SDXL's
second.
"""

from __future__ import annotations

import functools
import gzip
import json
from importlib import resources
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77
MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"

# CLIP keeps the first 49152 - 256 - 2 merges of the file: a vocabulary of 49152 learned symbols
# (256 bytes + merges + 2 specials) doubled for the byte symbols with `</w>`, i.e. 49408 in all.
_NUM_MERGES = 49152 - 256 - 2
_MERGES_HEADER = "#version: 0.2"


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes, in CLIP's order (byte-level BPE).

    Printable Latin-1 bytes stand for themselves and come first, in byte order;
    the other bytes (controls, space, ...) follow, in byte order, as the code
    points 256, 257, ...
    """
    spans = ((0x21, 0x7E), (0xA1, 0xAC), (0xAE, 0xFF))  # "!".."~", "¡".."¬", "®".."ÿ"
    printable = [b for lo, hi in spans for b in range(lo, hi + 1)]
    kept = set(printable)
    others = [b for b in range(256) if b not in kept]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


@functools.cache
def clip_merges() -> tuple[str, ...]:
    """The merges CLIP uses, as "left right" lines (read once per process)."""
    data = resources.files("sdcompress").joinpath("data", MERGES_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    # Line 0 is the file's own version header.
    merges = tuple(lines[1 : 1 + _NUM_MERGES])
    if len(merges) != _NUM_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise RuntimeError(f"the bundled {MERGES_FILE} is damaged; reinstall sdcompress")
    return merges


@functools.cache
def clip_vocab() -> dict[str, int]:
    """Token -> id for CLIP's 49,408-entry vocabulary, derived from the merges."""
    symbols = byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(m.replace(" ", "") for m in clip_merges())]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"derived CLIP vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    return vocab


@functools.cache
def _vocab_json() -> str:
    return json.dumps(clip_vocab(), ensure_ascii=False)


@functools.cache
def _merges_txt() -> str:
    return "\n".join([_MERGES_HEADER, *clip_merges()]) + "\n"


def _special_tokens(pad_token: str) -> dict[str, str]:
    return {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}


def _tokenizer_config(pad_token: str, model_max_length: int) -> dict:
    vocab = clip_vocab()
    # The padding token is special too (`!` for SD 2 / SDXL's second encoder), as in the published
    # tokenizers: it is then never merged with neighbouring text.
    special = {BOS_TOKEN, EOS_TOKEN, pad_token}
    added = {
        str(vocab[tok]): {
            "content": tok,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for tok in sorted(special, key=lambda t: vocab[t])
    }
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        **_special_tokens(pad_token),
    }


def write_clip_tokenizer(
    dst: Path, *, pad_token: str = EOS_TOKEN, model_max_length: int = MODEL_MAX_LENGTH
) -> None:
    """Write a CLIP tokenizer folder at `dst` that `CLIPTokenizer.from_pretrained(dst)` reads offline.

    `pad_token` must be a token of the vocabulary (`<|endoftext|>` or `!` for the SD families).
    The folder is created if needed; the four files in it are overwritten (callers own atomicity,
    usually by writing inside an `atomic_dir`).
    """
    if pad_token not in clip_vocab():
        raise ValueError(f"pad token {pad_token!r} is not in the CLIP vocabulary")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "vocab.json").write_text(_vocab_json(), encoding="utf-8")
    (dst / "merges.txt").write_text(_merges_txt(), encoding="utf-8")
    config = _tokenizer_config(pad_token, model_max_length)
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    specials = _special_tokens(pad_token)
    (dst / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")


def write_extended_tokenizer(
    dst: Path, new_tokens: dict[str, int], *, src: Path | None, pad_token: str
) -> None:
    """A tokenizer folder at `dst` that knows `new_tokens` (token -> id) besides the vocabulary (a baked embedding).

    Written in the slow-tokenizer file set every transformers version reads:
    `vocab.json` + `merges.txt` from the source folder (or the bundled vocabulary),
    the new tokens as entries of `added_tokens_decoder` in `tokenizer_config.json`.
    A source `tokenizer.json` is left out: it would list the vocabulary without them.
    transformers 5's own `save_pretrained` writes only `tokenizer.json`, which
    transformers 4 (our floor) cannot read as a `CLIPTokenizer`, hence this function.
    """
    dst = Path(dst)
    if src is not None and (Path(src) / "vocab.json").is_file() and (Path(src) / "merges.txt").is_file():
        dst.mkdir(parents=True, exist_ok=True)
        for f in Path(src).iterdir():
            if f.is_file() and f.name != "tokenizer.json":
                (dst / f.name).write_bytes(f.read_bytes())
    else:
        write_clip_tokenizer(dst, pad_token=pad_token)
    config_path = dst / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    added = config.setdefault("added_tokens_decoder", {})
    for token, index in new_tokens.items():
        added[str(index)] = {
            "content": token,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
            "special": False,
        }
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
