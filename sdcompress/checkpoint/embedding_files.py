"""Textual-inversion embedding files: the A1111/ComfyUI layout and the diffusers layout, read and written.

An embedding is a token and, for each text encoder of the model family, the
`[N, width]` vectors that token (and its N - 1 companions) stand for.

- A1111 / ComfyUI (`<name>.safetensors`): SD 1.x / 2.x hold one tensor,
  `emb_params` (A1111's reader takes the single tensor of a safetensors file,
  ComfyUI's `load_embed` takes `clip_l`/`clip_g` when present, else the first
  tensor); SDXL holds `clip_l` (first encoder) and `clip_g` (second), the two
  keys A1111 checks for an SDXL embedding and ComfyUI's SDXL tokenizers ask for.
  The token is the file name in both UIs; sdcompress also records it in the
  metadata (`sdcompress.token`), so a conversion keeps it.
- diffusers (`load_textual_inversion`): `learned_embeds.safetensors` holding
  `{token: [N, width]}`, plus `learned_embeds_2.safetensors` for SDXL's second
  encoder (what diffusers' SDXL textual-inversion example writes); diffusers
  loads each with its encoder and tokenizer and names the N vectors
  `token, token_1, ..., token_{N-1}`.

Baking an embedding into a model (`merge --embedding`) extends each text
encoder's token-embedding matrix by the N rows and saves a tokenizer that knows
the new tokens; only a diffusers folder can carry that tokenizer.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdcompress.checkpoint.atomic import Overwrite, atomic_dir
from sdcompress.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from sdcompress.checkpoint.tensors import LazyTensor, concat_rows
from sdcompress.checkpoint.tokenizer import write_clip_tokenizer, write_extended_tokenizer
from sdcompress.errors import SdcError

A1111_KEY = "emb_params"
SDXL_KEYS = ("clip_l", "clip_g")
DIFFUSERS_FILES = ("learned_embeds.safetensors", "learned_embeds_2.safetensors")
TOKEN_METADATA = "sdcompress.token"
ENCODERS = ("text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")
TOKEN_EMBEDDING_KEY = "text_model.embeddings.token_embedding.weight"
MAX_VECTORS = 75  # CLIP's 77 positions minus the start and end tokens
MIN_WIDTH = 16  # narrower lone tensors are not taken for embeddings (the tiny models' encoders are 32 wide)


@dataclass
class Embedding:
    """A token and its vectors: one `[N, width]` tensor per text encoder (two for SDXL)."""

    token: str
    vectors: list[torch.Tensor]
    source: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def sdxl(self) -> bool:
        return len(self.vectors) == 2

    @property
    def count(self) -> int:
        return int(self.vectors[0].shape[0])

    @property
    def widths(self) -> list[int]:
        return [int(v.shape[-1]) for v in self.vectors]

    def describe(self) -> str:
        """`SDXL (32 + 64 wide)` or `SD 1/2 (768 wide)`: what the vectors fit, for error sentences."""
        kind = "SDXL" if self.sdxl else "SD 1/2"
        return f"{kind} ({' + '.join(map(str, self.widths))} wide)"


def token_names(token: str, count: int) -> list[str]:
    """The tokenizer entries of an N-vector token, as diffusers names them: token, token_1, ..., token_{N-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


# ---------------------------------------------------------------------------- writing


def _lazy(t: torch.Tensor, dtype: torch.dtype | None) -> LazyTensor:
    return LazyTensor.of(t.detach().cpu().to(dtype or t.dtype).contiguous())


def a1111_tensors(emb: Embedding, dtype: torch.dtype | None = None) -> dict[str, LazyTensor]:
    if emb.sdxl:
        return {key: _lazy(v, dtype) for key, v in zip(SDXL_KEYS, emb.vectors, strict=True)}
    return {A1111_KEY: _lazy(emb.vectors[0], dtype)}


def write_a1111(
    path: Path, emb: Embedding, *, dtype: torch.dtype | None = None, overwrite: bool | Overwrite = False
) -> Path:
    """The A1111/ComfyUI file (`emb_params`, or `clip_l` + `clip_g` for SDXL), the token in its metadata."""
    metadata = {**emb.metadata, TOKEN_METADATA: emb.token, "sdcompress.vectors": str(emb.count)}
    write_safetensors(path, a1111_tensors(emb, dtype), metadata, overwrite=overwrite)
    return Path(path)


def write_diffusers_files(folder: Path, emb: Embedding, *, dtype: torch.dtype | None = None) -> list[Path]:
    """`learned_embeds.safetensors` (+ `_2` for SDXL) in an existing folder (a training output's temp dir)."""
    files = []
    for name, vectors in zip(DIFFUSERS_FILES, emb.vectors, strict=False):
        path = Path(folder) / name
        write_safetensors(path, {emb.token: _lazy(vectors, dtype)}, {"format": "pt"}, overwrite=True)
        files.append(path)
    return files


def write_diffusers(
    folder: Path, emb: Embedding, *, dtype: torch.dtype | None = None, overwrite: bool | Overwrite = False
) -> list[Path]:
    """The diffusers layout as a new folder, written atomically."""
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        names = [p.name for p in write_diffusers_files(tmp, emb, dtype=dtype)]
    return [Path(folder) / n for n in names]


# ---------------------------------------------------------------------------- reading


def _tensors(path: Path) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    f = SafetensorsFile(path)
    return f.state_dict(), dict(f.metadata)


def _as_rows(t: LazyTensor, what: str) -> torch.Tensor:
    """The `[N, width]` vectors of a tensor (dtype kept), checked by its header before anything is read."""
    shape = tuple(t.shape)
    rows = (1, *shape) if len(shape) == 1 else shape
    if len(rows) != 2 or not 1 <= rows[0] <= MAX_VECTORS or not t.dtype.is_floating_point:
        raise SdcError(
            f"{what} is not an embedding: it holds a {list(shape)} {t.dtype} tensor, not 1 to "
            f"{MAX_VECTORS} float vectors."
        )
    return t.load().reshape(rows)


def _diffusers_file(path: Path) -> tuple[str, torch.Tensor]:
    tensors, _ = _tensors(path)
    if len(tensors) != 1:
        raise SdcError(
            f"{path} holds {len(tensors)} tensors; a diffusers embedding file holds one, named after its token."
        )
    token, t = next(iter(tensors.items()))
    return token, _as_rows(t, str(path))


def _read_folder(folder: Path) -> Embedding:
    first = folder / DIFFUSERS_FILES[0]
    if not first.is_file():
        raise SdcError(
            f"{folder} holds no {DIFFUSERS_FILES[0]}; give an embedding file or a diffusers one's folder."
        )
    token, vectors = _diffusers_file(first)
    out = [vectors]
    second = folder / DIFFUSERS_FILES[1]
    if second.is_file():
        token_2, vectors_2 = _diffusers_file(second)
        if token_2 != token or vectors_2.shape[0] != vectors.shape[0]:
            raise SdcError(
                f"{first.name} ({token!r}, {vectors.shape[0]} vectors) and {second.name} ({token_2!r}, "
                f"{vectors_2.shape[0]} vectors) in {folder} do not belong together; give the folder of one embedding."
            )
        out.append(vectors_2)
    return Embedding(token, out, str(folder))


def _token_like(key: str, t: LazyTensor) -> bool:
    """A lone tensor is a diffusers embedding when its name is not a module's (`x.weight`) and it is a few
    vectors of a text encoder's width (the smallest, tiny test models', is 32); anything else is left to
    the model readers."""
    shape = tuple(t.shape)
    return (
        not re.search(r"\.(weight|bias|alpha)$", key)
        and 1 <= len(shape) <= 2
        and shape[-1] >= MIN_WIDTH
        and (len(shape) == 1 or shape[0] <= MAX_VECTORS)
    )


def read_embedding(path: str | Path) -> Embedding:
    """An embedding from an A1111/ComfyUI file, a diffusers file, or a folder holding the diffusers files."""
    p = Path(path)
    if p.is_dir():
        return _read_folder(p)
    if not p.is_file():
        raise SdcError(f"{p} does not exist; give an embedding file (.safetensors) or a folder of one.")
    if p.suffix.lower() != ".safetensors":
        raise SdcError(
            f"{p} is not a .safetensors file; sdcompress reads embeddings from safetensors only "
            "(no pickles): re-save it as safetensors."
        )
    tensors, metadata = _tensors(p)
    token = metadata.get(TOKEN_METADATA) or p.stem
    if set(tensors) == set(SDXL_KEYS):
        rows = [_as_rows(tensors[k], f"{p} ({k})") for k in SDXL_KEYS]
        if rows[0].shape[0] != rows[1].shape[0]:
            raise SdcError(
                f"{p} has {rows[0].shape[0]} clip_l vectors but {rows[1].shape[0]} clip_g vectors; "
                "an SDXL embedding has the same number for both encoders."
            )
        return Embedding(token, rows, str(p), metadata)
    if set(tensors) == {A1111_KEY}:
        return Embedding(token, [_as_rows(tensors[A1111_KEY], str(p))], str(p), metadata)
    if len(tensors) == 1 and _token_like(*next(iter(tensors.items()))):
        key, t = next(iter(tensors.items()))
        return Embedding(key, [_as_rows(t, str(p))], str(p), metadata)
    raise SdcError(
        f"{p} is not an embedding file: expected {A1111_KEY!r}, 'clip_l' + 'clip_g', or one tensor named "
        f"after its token, found {len(tensors)} tensors."
    )


def is_embedding(path: str | Path) -> bool:
    """True when `path` reads as an embedding (for `convert` and `merge` to route it); never raises."""
    p = Path(path)
    if p.is_dir() and (p / "model_index.json").exists():
        return False
    if not ((p.is_dir() and (p / DIFFUSERS_FILES[0]).is_file()) or p.suffix.lower() == ".safetensors"):
        return False
    try:
        read_embedding(p)
    except (SdcError, OSError):
        return False
    return True


# ---------------------------------------------------------------------------- fitting a model


def check_fits(emb: Embedding, widths: list[int], model_name: str, model_title: str) -> None:
    """Refuse an embedding for another family: the encoder count and each encoder's width must agree."""
    if len(widths) != len(emb.vectors):
        encoders = "two text encoders" if len(widths) == 2 else "one text encoder"
        raise SdcError(
            f"{emb.source or emb.token} is an embedding for {emb.describe()} but {model_name} is "
            f"{model_title} with {encoders}; use an embedding trained for this model family."
        )
    if widths != emb.widths:
        raise SdcError(
            f"{emb.source or emb.token} holds {' + '.join(map(str, emb.widths))}-wide vectors but "
            f"{model_name}'s text encoders take {' + '.join(map(str, widths))}; use an embedding trained "
            "for this model family."
        )


def check_new_token(tokenizer, token: str, count: int, where: str = "the tokenizer") -> list[str]:
    """The token's N names, refused when one is already a token of the vocabulary (or names a word of it).

    A token the tokenizer already knows would shadow that word in every prompt, and
    diffusers refuses to load it; CLIP keeps words with a `</w>` end mark, so
    `cat` is found as `cat</w>`.
    """
    if not token or any(c.isspace() for c in token):
        raise SdcError(f"--token {token!r} must be one word without spaces, such as '<my-thing>'.")
    vocab = tokenizer.get_vocab()
    names = token_names(token, count)
    other = f"<{re.sub(r'[^a-z0-9]+', '-', token.lower()).strip('-') or 'my-thing'}-v2>"
    for name in names:
        single = tokenizer(name, add_special_tokens=False).input_ids
        if name in vocab or name + "</w>" in vocab or name.lower() + "</w>" in vocab:
            raise SdcError(
                f"--token {name!r} is already in {where}'s vocabulary; choose a name it lacks, such as {other!r}."
            )
        if (
            len(single) == 1
            and single[0] != tokenizer.unk_token_id
            and name.lower() == tokenizer.decode(single)
        ):
            raise SdcError(
                f"--token {name!r} is already a word of {where}; choose a name it lacks, such as {other!r}."
            )
    return names


def _spec(model, index: int):
    return next(s for s in model.family.text_encoders if s.component == ENCODERS[index])


def _tokenizer(model, index: int):
    """The model's tokenizer for encoder `index`: its own folder, or the bundled CLIP vocabulary."""
    from transformers import CLIPTokenizer

    src = model.tokenizer_dirs.get(TOKENIZERS[index])
    if src is not None:
        return CLIPTokenizer.from_pretrained(str(src))
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp), pad_token=_spec(model, index).pad_token)
        return CLIPTokenizer.from_pretrained(tmp)


def _check_written(folder: Path, new_ids: dict[str, int]) -> None:
    """Read the written tokenizer back: each new token must get the id of its row, or the bake is wrong."""
    from transformers import CLIPTokenizer

    got = CLIPTokenizer.from_pretrained(str(folder)).convert_tokens_to_ids(list(new_ids))
    if got != list(new_ids.values()):
        raise RuntimeError(
            f"the extended tokenizer in {folder} gives ids {got}, expected {list(new_ids.values())}"
        )


def bake_embedding(model, emb: Embedding, workdir: Path):
    """The model with the token baked in: N more rows per token-embedding matrix, tokenizers that know them.

    The extended tokenizers are saved under `workdir` (the caller removes it after
    writing) and become the model's tokenizer folders, which the diffusers writer copies.
    """
    encoders = [c for c in ENCODERS if c in model.components]
    widths = [int(model.configs[c]["hidden_size"]) for c in encoders]
    check_fits(emb, widths, model.ref, model.family.title)
    components = {c: dict(sd) for c, sd in model.components.items()}
    configs = {c: dict(cfg) for c, cfg in model.configs.items()}
    tokenizer_dirs = dict(model.tokenizer_dirs)
    for index, (component, vectors) in enumerate(zip(encoders, emb.vectors, strict=True)):
        tokenizer = _tokenizer(model, index)
        names = check_new_token(tokenizer, emb.token, emb.count, f"{model.ref}'s {TOKENIZERS[index]}")
        matrix = components[component][TOKEN_EMBEDDING_KEY]
        if len(tokenizer) != matrix.shape[0]:
            raise SdcError(
                f"{model.ref}'s {TOKENIZERS[index]} has {len(tokenizer)} entries but its text encoder "
                f"{matrix.shape[0]} embedding rows; the new token's id would not be its row."
            )
        folder = Path(workdir) / TOKENIZERS[index]
        new_ids = {name: matrix.shape[0] + i for i, name in enumerate(names)}
        write_extended_tokenizer(folder, new_ids, src=model.tokenizer_dirs.get(TOKENIZERS[index]),
                                 pad_token=_spec(model, index).pad_token)  # fmt: skip
        _check_written(folder, new_ids)
        tokenizer_dirs[TOKENIZERS[index]] = folder
        components[component][TOKEN_EMBEDDING_KEY] = concat_rows([matrix, _lazy(vectors, matrix.dtype)])
        configs[component]["vocab_size"] = matrix.shape[0] + emb.count
    return dataclasses.replace(model, components=components, configs=configs, tokenizer_dirs=tokenizer_dirs)


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
