"""The GPT-2 byte-level BPE tokenizer, bundled (fastlm/assets/gpt2-bpe: OpenAI's published vocabulary, gzipped).

Built with Hugging Face `tokenizers` exactly as GPT-2's: the GPT-2 pre-tokenisation regex over bytes mapped to
unicode, 50000 merges, 50257 ids; `<|endoftext|>` (50256) is a special token, so the text "<|endoftext|>" encodes
to that one id, as Hugging Face's GPT2TokenizerFast does.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

ASSETS = Path(__file__).parent / "assets" / "gpt2-bpe"
EOT = "<|endoftext|>"


class Tokenizer:
    """encode(str) -> list[int], decode(list[int]) -> str, encode_batch, eot_token, vocab_size."""

    def __init__(self, tokenizer: _HFTokenizer):
        self._tok = tokenizer
        eot = tokenizer.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"tokenizer has no {EOT} token")
        self.eot_token = eot
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def decode_batch(self, batch) -> list[str]:
        return self._tok.decode_batch([list(ids) for ids in batch], skip_special_tokens=False)


def _from_bpe_files(vocab: Path, merges: Path) -> Tokenizer:
    """vocab.json + merges.txt (or OpenAI's encoder.json + vocab.bpe), either of them possibly gzipped."""
    opener = lambda p: gzip.open(p, "rt", encoding="utf-8") if p.suffix == ".gz" else open(p, encoding="utf-8")
    with opener(vocab) as f:
        ids = json.load(f)
    with opener(merges) as f:
        pairs = [tuple(line.split()) for line in f.read().splitlines() if line and not line.startswith("#version")]
    tok = _HFTokenizer(models.BPE(ids, pairs))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return Tokenizer(tok)


def get_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """The bundled GPT-2 tokenizer, or one from `path`: a tokenizer.json, or a directory holding tokenizer.json,
    vocab.json + merges.txt (Hugging Face's names) or encoder.json + vocab.bpe (OpenAI's)."""
    if path is None:
        return _from_bpe_files(ASSETS / "encoder.json.gz", ASSETS / "vocab.bpe.gz")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such tokenizer file or directory")
    if path.is_file():
        if path.suffix != ".json":
            raise ValueError(f"{path}: expected a tokenizer.json (or a directory with vocab.json and merges.txt)")
        try:
            return Tokenizer(_HFTokenizer.from_file(str(path)))
        except Exception as e:
            raise ValueError(f"{path}: not a tokenizers JSON file ({str(e).splitlines()[0]})") from None
    if (path / "tokenizer.json").is_file():
        return get_tokenizer(path / "tokenizer.json")
    for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
        if (path / vocab).is_file() and (path / merges).is_file():
            try:
                return _from_bpe_files(path / vocab, path / merges)
            except Exception as e:
                raise ValueError(f"{path}: unreadable {vocab}/{merges} ({str(e).splitlines()[0]})") from None
    raise ValueError(f"{path}: no tokenizer.json, vocab.json + merges.txt, or encoder.json + vocab.bpe here")
