"""The offline CLIP tokenizer gives the published openai/clip-vit-large-patch14 ids."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer, CLIPTokenizer, CLIPTokenizerFast

from sdcompress.checkpoint.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    VOCAB_SIZE,
    byte_symbols,
    clip_merges,
    clip_vocab,
    write_clip_tokenizer,
)

# Ids from the published openai/clip-vit-large-patch14 tokenizer.
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


def test_vocabulary_layout() -> None:
    vocab = clip_vocab()
    assert len(vocab) == VOCAB_SIZE == 49408
    assert len(clip_merges()) == 49152 - 256 - 2
    symbols = byte_symbols()
    assert len(set(symbols)) == 256
    assert vocab["!"] == 0 and vocab["a"] == 64
    assert vocab["!</w>"] == 256
    assert vocab["a</w>"] == 320
    assert vocab[BOS_TOKEN] == 49406 and vocab[EOS_TOKEN] == 49407
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE))


@pytest.mark.parametrize("cls", [CLIPTokenizer, CLIPTokenizerFast, AutoTokenizer])
def test_ids_match_openai_clip(tmp_path: Path, cls) -> None:
    write_clip_tokenizer(tmp_path)
    tok = cls.from_pretrained(tmp_path, local_files_only=True)
    assert tok("a photo of a cat").input_ids == CAT_IDS
    assert len(tok) == VOCAB_SIZE
    assert tok.model_max_length == 77
    assert tok.pad_token == EOS_TOKEN and tok.pad_token_id == 49407
    padded = tok("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[:7] == CAT_IDS and set(padded[7:]) == {49407}
    assert tok.decode(tok("A photo of a cat").input_ids, skip_special_tokens=True) == "a photo of a cat"


def test_bang_padding_for_sd2_and_sdxl_second_encoder(tmp_path: Path) -> None:
    write_clip_tokenizer(tmp_path, pad_token="!", model_max_length=77)
    tok = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert tok.pad_token == "!" and tok.pad_token_id == 0
    padded = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert padded[:7] == CAT_IDS and set(padded[7:]) == {0}
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["pad_token"] == "!"


def test_files_and_speed(tmp_path: Path) -> None:
    write_clip_tokenizer(tmp_path / "warm")
    start = time.perf_counter()
    write_clip_tokenizer(tmp_path / "tok", model_max_length=64)
    assert time.perf_counter() - start < 0.5
    names = sorted(p.name for p in (tmp_path / "tok").iterdir())
    assert names == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    merges = (tmp_path / "tok" / "merges.txt").read_text().splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + 48894
    assert json.loads((tmp_path / "tok" / "vocab.json").read_text()) == clip_vocab()
    assert json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["model_max_length"] == 64


def test_unknown_pad_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pad token"):
        write_clip_tokenizer(tmp_path, pad_token="<pad>")
    assert not tmp_path.joinpath("vocab.json").exists()
