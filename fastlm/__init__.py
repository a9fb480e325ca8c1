"""fastlm: a compact GPT-2 on the Triton kernels in `kernels`.

    model = fastlm.GPT.from_pretrained("gpt2.safetensors")        # or fastlm.GPT(fastlm.GPTConfig.preset("gpt2"))
    tok = fastlm.get_tokenizer()
    idx = torch.tensor([tok.encode("Hello")])
    print(tok.decode(model.generate(idx, 20, temperature=0.8, top_k=200)[0].tolist()))
"""
from fastlm.config import GPTConfig
from fastlm.model import GPT
from fastlm.tokenizer import Tokenizer, get_tokenizer
from fastlm.weights import WeightsError

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "Tokenizer", "WeightsError", "get_tokenizer"]
