"""python -m fastlm.generate --weights gpt2.safetensors --prompt "..."   (prints the continuation as it is produced)"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from fastlm.cli import fail, parse_args
from fastlm.model import BACKENDS, GPT
from fastlm.runtime import resolve_device
from fastlm.tokenizer import get_tokenizer
from fastlm.weights import WeightsError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GenerateConfig:
    """Sample text from a GPT-2 checkpoint, printing tokens as they are produced."""

    weights: str | None = field(default=None, metadata={"help": "a .safetensors file or a directory with model.safetensors"})
    prompt: str = field(default="\n", metadata={"help": "text to continue"})
    max_new_tokens: int = field(default=100, metadata={"help": "tokens to generate (prompt + new must fit the context)"})
    temperature: float = field(default=0.8, metadata={"help": "0 for greedy decoding"})
    top_k: int = field(default=200, metadata={"help": "sample among the k most likely tokens (0: all)"})
    top_p: float | None = field(default=None, metadata={"help": "nucleus sampling: the smallest set with this probability"})
    num_samples: int = field(default=1, metadata={"help": "independent continuations of the prompt"})
    seed: int = field(default=1337, metadata={"help": "random seed"})
    device: str = field(default="auto", metadata={"help": "cuda, cpu, ... (auto: cuda when available)"})
    dtype: str = field(default="auto", metadata={"help": "the dtype the weights are loaded in, and the model computes in: float32, bfloat16, float16 (auto: bfloat16 on CUDA, float32 elsewhere)"})
    backend: str = field(default="auto", metadata={"help": "kernels: triton, torch, or auto", "choices": BACKENDS})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer.json or a directory (default: the bundled GPT-2 BPE)"})


class _Printer:
    """Prints decoded text as tokens arrive, holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out, self.ids, self.shown = tokenizer, out, [], 0

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.shown:])
            self.out.flush()
            self.shown = len(text)


def main(argv=None) -> None:
    cfg = parse_args(GenerateConfig, argv, prog="python -m fastlm.generate")
    if cfg.weights is None:
        fail("--weights is required: a GPT-2 .safetensors file or a directory holding model.safetensors")
    if cfg.num_samples < 1:
        fail(f"--num-samples must be at least 1, got {cfg.num_samples}")
    if cfg.dtype != "auto" and cfg.dtype not in DTYPES:
        fail(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {cfg.dtype!r}")
    if cfg.top_k < 0:
        fail(f"--top-k must be 0 (off) or positive, got {cfg.top_k}")
    try:
        device = resolve_device(cfg.device)
        dtype = DTYPES.get(cfg.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
        tokenizer = get_tokenizer(cfg.tokenizer)
        model = GPT.from_pretrained(cfg.weights, backend=cfg.backend, device=device, dtype=dtype).eval()
        prompt = tokenizer.encode(cfg.prompt)
        if not prompt:
            fail("--prompt is empty: give at least one character")
        if max(prompt) >= model.config.vocab_size:
            fail(f"the model's vocabulary of {model.config.vocab_size} does not cover the prompt's tokens (GPT-2 has 50257)")
        torch.manual_seed(cfg.seed)
        idx = torch.tensor([prompt], device=device)
        for sample in range(cfg.num_samples):
            if cfg.num_samples > 1:
                print(f"--- sample {sample + 1}")
            sys.stdout.write(cfg.prompt)
            printer = _Printer(tokenizer)
            for token in model.generate_stream(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, cfg.top_p,
                                               eos_token_id=tokenizer.eot_token if tokenizer.eot_token < model.config.vocab_size else None):
                printer.add(int(token[0, 0]))
            print()
    except (WeightsError, ValueError, FileNotFoundError, RuntimeError) as e:
        fail(str(e).splitlines()[0])


if __name__ == "__main__":
    main()
