"""fastlm: a compact GPT-2 on the Triton kernels in `kernels`.

    model = fastlm.GPT.from_pretrained("gpt2.safetensors")        # or fastlm.GPT(fastlm.GPTConfig.preset("gpt2"))
    tok = fastlm.get_tokenizer()
    idx = torch.tensor([tok.encode("Hello")])
    print(tok.decode(model.generate(idx, 20, temperature=0.8, top_k=200)[0].tolist()))
"""
import importlib

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "Tokenizer", "WeightsError", "get_tokenizer"]

# Imported on first use, so that `python -m fastlm.finetune --help` (which imports this package first) parses
# its command line without importing torch.
_HOME = {"GPT": "fastlm.model", "GPTConfig": "fastlm.config", "Tokenizer": "fastlm.tokenizer",
         "get_tokenizer": "fastlm.tokenizer", "WeightsError": "fastlm.weights"}


def __getattr__(name: str):
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
