"""fastlm: a compact GPT-2 on the Triton kernels in `kernels`.

The model, weight loading, tokenizer, generation and the fine-tuning loop are being built on top of the
kernels (see README.md, "Status"); this package holds them as they land.
"""
__version__ = "0.1.0"
