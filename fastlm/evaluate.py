"""python -m fastlm.evaluate --weights gpt2.safetensors --data text.txt: perplexity and bits per byte of a text.

The command: its flags (EvaluateConfig), their checks, and main(), which parses the command line before it imports
torch (so --help is instant). What is computed, and how, is fastlm.perplexity: by default the text as one stream
(a token's context may run back into the previous document); with --per-document, each document on its own (the
same tokens scored, each seeing only its own document); the output says which. On a run that takes a while, a
progress line on stderr every few seconds (windows done, elapsed, left); the result goes to stdout.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field

from fastlm.cli import AUTOCAST_CHOICES, BACKEND_CHOICES, fail, parse_args

PROGRESS_EVERY = 5.0  # seconds between progress lines (the first after as long)


@dataclass
class EvaluateConfig:
    """Perplexity and bits per byte of a GPT-2 checkpoint on a text (strided sliding windows)."""

    weights: str | None = field(default=None, metadata={"help": "GPT-2 .safetensors file or directory", "required": True})
    data: str | None = field(default=None, metadata={"help": ".txt file, directory of .txt files, or .jsonl with a 'text' field (this or --choices)"})
    choices: str | None = field(default=None, metadata={"help": "multiple-choice accuracy instead of perplexity: a .jsonl file with one {\"text\", \"choices\", \"label\"} object per line (see fastlm.choices)"})
    prompt_dir: str | None = field(default=None, metadata={"help": "apply a soft prompt: a prompt-tuning directory (adapter_config.json + adapter_model.safetensors, from fine-tuning's --prompt-tokens or PEFT)"})
    seq_len: int | None = field(default=None, metadata={"help": "most tokens of context per prediction (default: the model's context, at most 1024)"})
    stride: int | None = field(default=None, metadata={"help": "tokens the window advances by, in [1, seq-len] (default: seq-len // 2)"})
    batch_size: int = field(default=4, metadata={"help": "windows per forward pass (does not change the result)"})
    device: str = field(default="auto", metadata={"help": "cuda, cpu, ... (auto: cuda when available)"})
    autocast: str = field(default="auto", metadata={"help": "the model body under autocast in this dtype (auto: bfloat16 on CUDA, off elsewhere); the head and loss stay fp32", "choices": AUTOCAST_CHOICES})
    backend: str = field(default="auto", metadata={"help": "kernels: triton, torch, or auto", "choices": BACKEND_CHOICES})
    per_document: bool = field(default=False, metadata={"help": "score each document on its own: no context from the document before it (the same tokens scored; default: the text as one stream, context running across documents)"})
    json: bool = field(default=False, metadata={"help": "print one JSON object instead of the human-readable line"})

    RENAMED_FLAGS = {"--dtype": "--autocast"}


# -----------------------------------------------------------------------------
def validate(cfg: EvaluateConfig) -> None:
    if cfg.weights is None:
        raise ValueError("--weights is required: a GPT-2 .safetensors file or a directory holding model.safetensors")
    if cfg.data is None and cfg.choices is None:
        raise ValueError("--data is required: a .txt file, a directory of .txt files, or a .jsonl file with a 'text' field "
                         "(or --choices FILE.jsonl for multiple-choice accuracy)")
    if cfg.data is not None and cfg.choices is not None:
        raise ValueError("--data and --choices: give one of them (perplexity of a text, or multiple-choice accuracy)")
    if cfg.choices is not None and (cfg.seq_len is not None or cfg.stride is not None or cfg.per_document):
        raise ValueError("--choices scores whole rows: --seq-len, --stride and --per-document are for --data")
    if cfg.prompt_dir is not None and cfg.per_document:
        raise ValueError("--per-document does not combine with --prompt-dir (one soft prompt goes before each window)")
    if cfg.seq_len is not None and cfg.seq_len < 1:
        raise ValueError(f"--seq-len must be positive, got {cfg.seq_len}")
    if cfg.stride is not None and cfg.stride < 1:
        raise ValueError(f"--stride must be positive, got {cfg.stride}")
    if cfg.seq_len is not None and cfg.stride is not None and cfg.stride > cfg.seq_len:
        raise ValueError(f"--stride {cfg.stride} is larger than --seq-len {cfg.seq_len}: some tokens would never be scored")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {cfg.batch_size}")


def run(cfg: EvaluateConfig, progress_stream=None) -> dict:
    """Evaluate as configured; returns the result (main prints it). progress_stream: where progress lines go on a
    long run (main: stderr; None: nowhere)."""
    validate(cfg)
    import torch

    from fastlm.choices import read_choices, score_choices
    from fastlm.data import DataError, read_documents
    from fastlm.model import GPT
    from fastlm.perplexity import evaluate, text_ids
    from fastlm.prompt_tuning import check_window, load_prompt, text_room
    from fastlm.runtime import autocast_dtype, check_backend, resolve_device, sequence_length
    from fastlm.tokenizer import get_tokenizer

    device = resolve_device(cfg.device)
    check_backend(cfg.backend, device)
    autocast = autocast_dtype(cfg.autocast, device)
    tokenizer = get_tokenizer()
    if cfg.choices is not None:
        rows = read_choices(cfg.choices)
    else:
        ids = text_ids(read_documents(cfg.data), tokenizer)
        if len(ids) < 2:
            raise DataError(f"{cfg.data}: the text is {len(ids)} token(s); perplexity needs at least 2")
    # fp32 weights whatever the file holds; autocast gives the low precision
    model = GPT.from_pretrained(cfg.weights, backend=cfg.backend, device=device, dtype=torch.float32)
    if cfg.prompt_dir is not None:
        load_prompt(model, cfg.prompt_dir)  # errors name the file
    if cfg.choices is not None:
        start = time.perf_counter()
        result = score_choices(model, tokenizer, rows, cfg.batch_size, autocast)
        result.update(seconds=round(time.perf_counter() - start, 3), weights=cfg.weights, choices=cfg.choices,
                      prompt_dir=cfg.prompt_dir, autocast=str(autocast).removeprefix("torch.") if autocast else "off")
        return result
    seq_len = sequence_length(model, tokenizer, cfg.seq_len or min(text_room(model), 1024))
    check_window(model, seq_len)
    stride = cfg.stride or max(1, seq_len // 2)
    if stride > seq_len:
        raise ValueError(f"--stride {stride} is larger than --seq-len {seq_len}: some tokens would never be scored")
    start = time.perf_counter()
    progress = _Progress(progress_stream, start, device) if progress_stream is not None else None
    result = evaluate(model, ids, seq_len, stride, cfg.batch_size, autocast, progress=progress,
                      per_document=cfg.per_document, eot=tokenizer.eot_token)
    result["seconds"] = round(time.perf_counter() - start, 3)
    result.update(weights=cfg.weights, data=cfg.data, autocast=str(autocast).removeprefix("torch.") if autocast else "off")
    return result


class _Progress:
    """Every PROGRESS_EVERY seconds: windows done of all, elapsed and left. On a GPU the count is made true by a
    sync, one per line (the loop itself never waits)."""

    def __init__(self, stream, start: float, device):
        self.stream, self.start, self.device, self.last = stream, start, device, start

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.last < PROGRESS_EVERY or done == total:
            return
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            now = time.perf_counter()
        elapsed = now - self.start
        self.stream.write(f"evaluate: {done:,}/{total:,} windows, elapsed {elapsed:.0f} s, "
                          f"left about {elapsed / done * (total - done):.0f} s\n")
        self.stream.flush()
        self.last = now


def main(argv=None) -> None:
    cfg = parse_args(EvaluateConfig, argv, prog="python -m fastlm.evaluate")
    try:
        result = run(cfg, progress_stream=sys.stderr)
    except (ValueError, OSError) as e:  # WeightsError and DataError are ValueErrors too: bad input, said in one line
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if cfg.json:  # strict JSON: an infinite perplexity (a hopeless model) is null
        print(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in result.items()}))
    elif cfg.choices is not None:
        from fastlm.choices import describe

        print(f"{describe(result)}; {result['seconds']:.1f} s" + (f"; soft prompt {cfg.prompt_dir}" if cfg.prompt_dir else ""))
    else:
        print(f"perplexity {result['perplexity']:.4f} (loss {result['loss']:.4f} nats/token), "
              f"{result['bits_per_byte']:.4f} bits per byte; {result['tokens']:,} tokens, {result['bytes']:,} bytes; "
              f"seq-len {result['seq_len']}, stride {result['stride']}, {result['windows']:,} windows, {result['seconds']:.1f} s; "
              + (f"per document: each of the {result['documents']:,} documents without context from the one before"
                 if result["mode"] == "per-document" else
                 f"one stream: context runs across the {result['documents']:,} documents (--per-document: each alone)"))


if __name__ == "__main__":
    main()
