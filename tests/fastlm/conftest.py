"""Small random GPT-2s built with Hugging Face transformers, the reference these tests compare against."""
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is the GPT-2 reference (pip install -e '.[test]')")
transformers.logging.set_verbosity_error()


def make_hf_model(n_layer=2, n_head=2, n_embd=64, vocab_size=101, n_positions=64, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size,
                                     n_positions=n_positions, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random biases and norm parameters too, so a transposed or dropped tensor shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    return model


@pytest.fixture(scope="session")
def hf_model():
    return make_hf_model()


@pytest.fixture(scope="session")
def hf_dir(hf_model, tmp_path_factory):
    """A directory written by transformers' save_pretrained: transformer.* keys, config.json."""
    path = tmp_path_factory.mktemp("hf_gpt2")
    hf_model.save_pretrained(path)
    return path
