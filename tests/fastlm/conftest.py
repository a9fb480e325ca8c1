"""Fixtures of the fastlm tests: a small random GPT-2 from transformers (the reference) saved in its layouts, and
a tiny GPT-2-vocabulary checkpoint with a corpus for fine-tuning runs."""
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
