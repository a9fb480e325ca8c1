"""Training text: read, tokenised once into a cached uint16 memmap, split, and served as random windows.

A corpus is a .txt file (one document), a directory of .txt files (one document each, sorted by path), or a
.jsonl file with a "text" field per line; with no path, the documentation that ships with Python
(`pydoc_data.topics`, about 140K GPT-2 tokens) so a first run needs no download. Documents are joined by
`<|endoftext|>` and tokenised with the bundled GPT-2 tokenizer; the ids are cached as a uint16 file named by a
hash of the text, so the next run with the same data skips tokenisation.

The validation split is whole documents drawn at random (seeded) from across the corpus until they hold at
least `val_fraction` of the tokens (a document that would make it more than 1.5 times that is passed over), so
training and validation text come from the same distribution; the rest, in corpus order, is the training split.
A corpus of one document (a single .txt file), or one whose documents cannot make up the fraction that way, has
the last `val_fraction` of its tokens held out instead.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastlm.files import atomic_write
from fastlm.tokenizer import Tokenizer

CACHE_VERSION = "gpt2-bpe-v1"  # bump when tokenisation changes, so stale caches are not reused


class DataError(ValueError):
    """Unusable training data; the message names the file (and line)."""


def read_documents(path: str | os.PathLike | None) -> list[str]:
    if path is None:
        from pydoc_data.topics import topics

        return [topics[name] for name in sorted(topics)]
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    documents = _read_documents(path)
    if not any(doc.strip() for doc in documents):
        raise DataError(f"{path}: no text in it (" + ("its files are empty)" if path.is_dir() else "the file is empty)"))
    return documents


def _read_documents(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"{path}: no .txt files in this directory")
        return [_read_text(f) for f in files]
    if path.suffix == ".jsonl":
        docs = []
        for number, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'{path}:{number}: expected an object with a "text" string')
            docs.append(record["text"])
        return docs
    return [_read_text(path)]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastlm" / "tokens"


def tokenize(documents: list[str], tokenizer: Tokenizer, cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, str]:
    """All documents as one uint16 token array (each followed by <|endoftext|>), and its content hash."""
    digest = hashlib.sha256(CACHE_VERSION.encode())
    for doc in documents:
        digest.update(hashlib.sha256(doc.encode("utf-8")).digest())
    key = digest.hexdigest()[:32]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    file = cache / f"{key}.u16"
    if file.is_file():
        return np.memmap(file, dtype=np.uint16, mode="r"), key
    ids = []
    for doc_ids in tokenizer.encode_batch(documents):
        ids.extend(doc_ids)
        ids.append(tokenizer.eot_token)
    if tokenizer.vocab_size > 2**16:
        raise DataError(f"a vocabulary of {tokenizer.vocab_size} does not fit the uint16 token cache")
    array = np.asarray(ids, dtype=np.uint16)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write(file, array.tofile)  # concurrent runs each write whole files; the last rename wins
    except OSError:
        pass  # an unwritable cache (or a full disk) only costs tokenising again next time
    return array, key


@dataclass
class Splits:
    train: torch.Tensor  # int64 token ids
    val: torch.Tensor
    key: str             # content hash of the corpus
    how: str             # what the validation split is, in words


def split(tokens: np.ndarray, key: str, seq_len: int, val_fraction: float, source: str, eot: int | None = None,
          seed: int = 0) -> Splits:
    """Training and validation token ids (see the module docstring). Documents are the spans that end with `eot`
    (as tokenize leaves them); eot=None holds out the last tokens."""
    n = len(tokens)
    n_val = max(int(n * val_fraction), seq_len + 1)
    if n - n_val < seq_len + 1 or n == 0:
        raise DataError(f"{source}: {n} token{'' if n == 1 else 's'} is too little data for --seq-len {seq_len} "
                        f"(need at least {2 * (seq_len + 1)}); add text or lower --seq-len")
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    if eot is not None:
        ends = ((ids == eot).nonzero().flatten() + 1).tolist()
        if not ends or ends[-1] != n:
            ends.append(n)
        starts = [0] + ends[:-1]
        order = torch.randperm(len(ends), generator=torch.Generator().manual_seed(seed)).tolist()
        chosen, held = [], 0
        for i in order:
            if held >= n_val:
                break
            if held + ends[i] - starts[i] <= 1.5 * n_val:
                chosen.append(i)
                held += ends[i] - starts[i]
        if len(ends) > 1 and n_val <= held <= n - (seq_len + 1):
            val = torch.zeros(n, dtype=torch.bool)
            for i in chosen:
                val[starts[i]:ends[i]] = True
            return Splits(train=ids[~val], val=ids[val], key=key,
                          how=f"{len(chosen)} of {len(ends)} documents drawn at random (seed {seed})")
    return Splits(train=ids[: n - n_val], val=ids[n - n_val :], key=key, how=f"the last {n_val:,} tokens")


def random_windows(data: torch.Tensor, count: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` random windows: inputs (count, seq_len) and next-token targets (count, seq_len)."""
    starts = torch.randint(len(data) - seq_len, (count,), generator=generator)
    rows = starts[:, None] + torch.arange(seq_len + 1)
    windows = data[rows]
    return windows[:, :-1], windows[:, 1:]


def eval_windows(data: torch.Tensor, count: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` evenly spaced windows over the validation split: the same every evaluation."""
    starts = torch.linspace(0, len(data) - seq_len - 1, steps=count).long()
    windows = data[starts[:, None] + torch.arange(seq_len + 1)]
    return windows[:, :-1], windows[:, 1:]
