"""Fixtures of the fastlm tests: a small random GPT-2 from transformers (the reference) saved in its layouts, and
a tiny GPT-2-vocabulary checkpoint with corpora for fine-tuning runs (one document, or many short ones)."""
import json

import pytest

transformers = pytest.importorskip("transformers", reason="transformers is the GPT-2 reference (pip install -e '.[test]')")

from tests.fastlm.helpers import TEXT, make_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def hf_model():
    return make_hf_model()


@pytest.fixture(scope="session")
def hf_dir(hf_model, tmp_path_factory):
    """A directory written by transformers' save_pretrained: transformer.* keys, config.json."""
    path = tmp_path_factory.mktemp("hf_gpt2")
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny GPT-2 with the real 50257-token vocabulary, as transformers saves it."""
    path = tmp_path_factory.mktemp("tiny_gpt2")
    make_hf_model(n_layer=2, n_head=2, n_embd=32, vocab_size=50257, n_positions=64).save_pretrained(path)
    return path


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def documents(tmp_path):
    """A .jsonl corpus of 60 documents of 1 to 6 sentences (some 15 to 90 tokens, so a window of 32 holds several
    documents and cuts some)."""
    sentences = [s.strip() + "." for s in TEXT.split(".") if s.strip()]
    path = tmp_path / "documents.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(sentences[i:i + 1 + i % 6])}) + "\n" for i in range(60)))
    return path
