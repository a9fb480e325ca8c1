"""python -m fastlm.generate --weights gpt2.safetensors --prompt "..."   (prints the continuation as it is produced)

Every flag is checked, and the model's limits too (the prompt must fit its context; --max-new-tokens is capped at
what is left of it, said once on stderr), before anything is printed. The command line is parsed before torch is
imported, so --help is instant.

--prompt-dir applies a soft prompt (prompt tuning: `python -m fastlm.finetune --prompt-tokens N` writes one in
OUT/prompt, and PEFT's save_pretrained of a GPT-2 prompt-tuning model writes the same files): its N virtual tokens
go before --prompt's tokens, as PEFT's model puts them, and take N positions of the context.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from fastlm.cli import BACKEND_CHOICES, fail, parse_args

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class GenerateConfig:
    """Sample text from a GPT-2 checkpoint, printing tokens as they are produced."""

    weights: str | None = field(default=None, metadata={"help": "a .safetensors file or a directory with model.safetensors", "required": True})
    prompt: str = field(default="\n", metadata={"help": "text to continue (default: a new line)"})
    max_new_tokens: int = field(default=100, metadata={"help": "tokens to generate, at most what the model's context leaves after the prompt"})
    temperature: float = field(default=0.8, metadata={"help": "0 for greedy decoding"})
    top_k: int = field(default=200, metadata={"help": "sample among the k most likely tokens (0: all)"})
    top_p: float | None = field(default=None, metadata={"help": "nucleus sampling: the smallest set with this probability, in (0, 1]"})
    num_samples: int = field(default=1, metadata={"help": "independent continuations of the prompt"})
    seed: int = field(default=1337, metadata={"help": "random seed"})
    device: str = field(default="auto", metadata={"help": "cuda, cpu, ... (auto: cuda when available)"})
    dtype: str = field(default="auto", metadata={"help": "the dtype the weights are loaded in, and the model computes in (auto: bfloat16 on CUDA, float32 elsewhere)", "choices": DTYPE_CHOICES})
    backend: str = field(default="auto", metadata={"help": "kernels: triton, torch, or auto", "choices": BACKEND_CHOICES})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer.json or a directory (default: the bundled GPT-2 BPE)"})
    prompt_dir: str | None = field(default=None, metadata={"help": "a soft prompt to put before --prompt: a prompt-tuning directory (adapter_config.json + adapter_model.safetensors, from fine-tuning's --prompt-tokens or PEFT)"})


def validate(cfg: GenerateConfig) -> None:
    """The flags on their own; one ValueError naming the flag."""
    if cfg.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must not be negative, got {cfg.max_new_tokens}")
    if cfg.temperature < 0:
        raise ValueError(f"--temperature must not be negative (0: greedy), got {cfg.temperature}")
    if cfg.top_k < 0:
        raise ValueError(f"--top-k must be 0 (off) or positive, got {cfg.top_k}")
    if cfg.top_p is not None and not 0 < cfg.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if cfg.num_samples < 1:
        raise ValueError(f"--num-samples must be at least 1, got {cfg.num_samples}")


class _Printer:
    """Prints decoded text as tokens arrive, holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out, self.ids, self.shown = tokenizer, out or sys.stdout, [], 0

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.shown:])
            self.out.flush()
            self.shown = len(text)


def run(cfg: GenerateConfig) -> None:
    """Load, check everything, then print the samples."""
    validate(cfg)
    import torch

    from fastlm.model import GPT
    from fastlm.prompt_tuning import load_prompt, num_virtual_tokens
    from fastlm.runtime import check_backend, resolve_device
    from fastlm.tokenizer import get_tokenizer

    device = resolve_device(cfg.device)
    check_backend(cfg.backend, device)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype = dtypes.get(cfg.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = get_tokenizer(cfg.tokenizer)
    prompt = tokenizer.encode(cfg.prompt)
    if not prompt:
        raise ValueError("--prompt is empty: give at least one character")
    model = GPT.from_pretrained(cfg.weights, backend=cfg.backend, device=device, dtype=dtype).eval()
    if cfg.prompt_dir is not None:
        load_prompt(model, cfg.prompt_dir)  # errors name the file
    virtual = num_virtual_tokens(model)
    context = model.config.block_size
    if max(prompt) >= model.config.vocab_size:
        raise ValueError(f"--prompt: the model's vocabulary of {model.config.vocab_size} does not cover its tokens "
                         f"(GPT-2 has 50257): not a model for this tokenizer")
    if virtual + len(prompt) >= context:
        after = f", after {virtual} virtual tokens (--prompt-dir)" if virtual else ""
        raise ValueError(f"--prompt is {len(prompt)} tokens{after}: the model's context of {context} leaves no room to generate")
    new_tokens = min(cfg.max_new_tokens, context - virtual - len(prompt))
    if new_tokens < cfg.max_new_tokens:
        print(f"note: --max-new-tokens {cfg.max_new_tokens} capped at {new_tokens}: the model's context is {context} "
              f"tokens, {len(prompt)} of them the prompt's" + (f" and {virtual} the soft prompt's" if virtual else ""),
              file=sys.stderr)
    eos = tokenizer.eot_token if tokenizer.eot_token < model.config.vocab_size else None

    torch.manual_seed(cfg.seed)
    idx = torch.tensor([prompt], device=device)
    for sample in range(cfg.num_samples):
        if cfg.num_samples > 1:
            print(f"--- sample {sample + 1}")
        sys.stdout.write(cfg.prompt)
        printer = _Printer(tokenizer)
        for token in model.generate_stream(idx, new_tokens, cfg.temperature, cfg.top_k or None, cfg.top_p, eos_token_id=eos):
            printer.add(int(token[0, 0]))
        print()


def main(argv=None) -> None:
    cfg = parse_args(GenerateConfig, argv, prog="python -m fastlm.generate")
    try:
        run(cfg)
    except (ValueError, OSError, RuntimeError) as e:  # WeightsError is a ValueError: bad input, said in one line
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


if __name__ == "__main__":
    main()
