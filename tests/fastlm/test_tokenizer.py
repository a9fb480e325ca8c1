"""The bundled GPT-2 tokenizer: published encodings, transformers' GPT-2 tokenizer on mixed text, other sources."""
import gzip
import shutil

import pytest

from fastlm import get_tokenizer
from fastlm.tokenizer import ASSETS

TEXT = "héllo wörld — 日本語 🤖 Ωmega\n\ttabs   and  spaces, \"quotes\" it's 1234.5<|endoftext|>next document"


def test_known_encodings():
    tok = get_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" The quick brown fox jumps over the lazy dog.") == [383, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
    assert tok.eot_token == 50256 and tok.vocab_size == 50257
    assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]


def unzipped_assets(directory):
    for name in ("encoder.json", "vocab.bpe"):
        with gzip.open(ASSETS / f"{name}.gz", "rb") as src:
            (directory / name).write_bytes(src.read())
    return directory / "encoder.json", directory / "vocab.bpe"


def test_mixed_unicode_matches_transformers_and_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers' GPT-2 tokenizer is the reference")
    vocab, merges = unzipped_assets(tmp_path)
    ref = transformers.GPT2Tokenizer(str(vocab), str(merges))  # positional: v4 and v5 name them differently
    tok = get_tokenizer()
    assert tok.encode(TEXT) == ref(TEXT).input_ids
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.encode_batch([TEXT, "Hello world"]) == [tok.encode(TEXT), [15496, 995]]
    assert tok.decode_batch([[15496, 995]]) == ["Hello world"]


def test_other_sources(tmp_path):
    (tmp_path / "hf").mkdir()
    vocab, merges = unzipped_assets(tmp_path)
    shutil.copy(vocab, tmp_path / "hf" / "vocab.json")
    shutil.copy(merges, tmp_path / "hf" / "merges.txt")
    bundled = get_tokenizer()
    assert get_tokenizer(tmp_path / "hf").encode(TEXT) == bundled.encode(TEXT)
    bundled._tok.save(str(tmp_path / "tokenizer.json"))
    assert get_tokenizer(tmp_path / "tokenizer.json").encode(TEXT) == bundled.encode(TEXT)


def test_bad_sources_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such tokenizer"):
        get_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        get_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a tokenizers JSON file"):
        get_tokenizer(tmp_path / "tokenizer.json")
