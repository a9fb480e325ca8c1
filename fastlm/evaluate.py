"""python -m fastlm.evaluate --weights gpt2.safetensors --data text.txt: perplexity and bits per byte of a text.

The text is tokenised whole (documents joined by `<|endoftext|>`, with none after the last: the text is what
is evaluated, not a document boundary after it) into ids[0..n). Every token after the first is predicted
exactly once, with up to `seq_len` tokens of context, by strided sliding windows (Hugging Face's "Perplexity of
fixed-length models" with max_length = seq_len + 1: the context and the token after it): the window at `begin`
feeds ids[begin:end] and predicts ids[begin+1:end+1], with
end = min(begin + seq_len, n - 1), for begin = 0, stride, 2 * stride, ... until a window reaches the last
token. A window scores only the targets the previous one did not (its last end - prev_end), so after the
first window each scored token sees between seq_len - stride + 1 and seq_len tokens of context; stride ==
seq_len is plain non-overlapping chunks, stride 1 gives every token after the first window the full context
(and costs one forward pass per token).

    nll            = sum over the n - 1 predicted tokens of -ln p(token | its context)     (nats)
    perplexity     = exp(nll / (n - 1))
    bits_per_byte  = nll / ln 2 / bytes

where `bytes` is the length in UTF-8 bytes of the text that the predicted tokens ids[1:] decode to: the sum
of their GPT-2 byte-level BPE byte strings, which is the text's UTF-8 length less the first token's bytes
(exact even when a token holds part of a multi-byte character). A `<|endoftext|>` between two documents
is part of that text and counts its 13 bytes. Normalised by bytes rather than tokens, bits per byte compares
models with different tokenizers.

The hidden states come from GPT.hidden_states (bfloat16 autocast on CUDA by default); the LM head and the
summed cross-entropy are GPT.loss with an fp32 head, whichever backend runs (on triton the logits are never
built). Sums accumulate in fp64 on the device and are read back once, at the end.
"""
from __future__ import annotations

import gzip
import json
import math
import time
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import Tensor

from fastlm.cli import fail, parse_args
from fastlm.data import DataError, read_documents
from fastlm.model import BACKENDS, GPT
from fastlm.runtime import AUTOCAST_CHOICES, autocast_dtype, check_backend, resolve_device, sequence_length
from fastlm.tokenizer import ASSETS, get_tokenizer


@dataclass
class EvaluateConfig:
    """Perplexity and bits per byte of a GPT-2 checkpoint on a text (strided sliding windows)."""

    weights: str | None = field(default=None, metadata={"help": "GPT-2 .safetensors file or directory (required)"})
    data: str | None = field(default=None, metadata={"help": ".txt file, directory of .txt files, or .jsonl with a 'text' field (required)"})
    seq_len: int | None = field(default=None, metadata={"help": "most tokens of context per prediction (default: the model's context, at most 1024)"})
    stride: int | None = field(default=None, metadata={"help": "tokens the window advances by, in [1, seq-len] (default: seq-len // 2)"})
    batch_size: int = field(default=4, metadata={"help": "windows per forward pass (does not change the result)"})
    device: str = field(default="auto", metadata={"help": "cuda, cpu, ... (auto: cuda when available)"})
    autocast: str = field(default="auto", metadata={"help": "the model body under autocast in this dtype (auto: bfloat16 on CUDA, off elsewhere); the head and loss stay fp32", "choices": AUTOCAST_CHOICES})
    backend: str = field(default="auto", metadata={"help": "kernels: triton, torch, or auto", "choices": BACKENDS})
    json: bool = field(default=False, metadata={"help": "print one JSON object instead of the human-readable line"})

    RENAMED_FLAGS = {"--dtype": "--autocast"}


# -----------------------------------------------------------------------------
def windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) per window for n tokens: inputs ids[begin:end], targets ids[begin+1:end+1], of
    which the last `scored` are counted. The scored targets of all windows are ids[1:n], each once."""
    if n < 2:
        raise ValueError(f"need at least 2 tokens to predict one, got {n}")
    if seq_len < 1 or not 1 <= stride <= seq_len:
        raise ValueError(f"need seq_len >= 1 and 1 <= stride <= seq_len, got seq_len={seq_len}, stride={stride}")
    out, prev_end = [], 0
    for begin in range(0, n - 1, stride):
        end = min(begin + seq_len, n - 1)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n - 1:
            break
    return out


@lru_cache(maxsize=1)
def gpt2_token_bytes() -> Tensor:
    """(50257,) int64: the UTF-8 byte length of each GPT-2 token. GPT-2's vocabulary spells a token's bytes one
    character per byte (its bytes_to_unicode map), so the length of the spelling is the byte count;
    <|endoftext|> is spelled as itself, 13 bytes."""
    with gzip.open(ASSETS / "encoder.json.gz", "rt", encoding="utf-8") as f:
        encoder = json.load(f)
    lengths = torch.zeros(len(encoder), dtype=torch.int64)
    for spelling, token in encoder.items():
        lengths[token] = len(spelling)
    return lengths


def _batches(spans: list[tuple[int, int, int]], batch_size: int):
    """Consecutive windows of the same length, at most batch_size at a time (only the last can be shorter)."""
    batch = []
    for span in spans:
        if batch and (len(batch) == batch_size or span[1] - span[0] != batch[0][1] - batch[0][0]):
            yield batch
            batch = []
        batch.append(span)
    if batch:
        yield batch


def _summed_nll(model: GPT, x: Tensor, y: Tensor) -> Tensor:
    """Sum of -ln p(y | x) over the targets != -100, fp32. x, y: (B, T)."""
    # an fp32 head and loss: a 16-bit sum of a few thousand nats is off in the second decimal
    return model.loss(model.hidden_states(x), y, reduction="sum", fp32_head=True)


@torch.no_grad()
def evaluate(model: GPT, ids: Tensor, seq_len: int | None = None, stride: int | None = None, batch_size: int = 1,
             autocast_dtype: torch.dtype | None = None, token_bytes: Tensor | None = None) -> dict:
    """Strided-window perplexity of `model` on the token ids (n,) (see the module docstring).

    Args:
        seq_len: most tokens of context per prediction (default: the model's context, at most 1024).
        stride: tokens the window advances by, 1 <= stride <= seq_len (default: seq_len // 2).
        batch_size: windows per forward pass; the result does not depend on it (beyond fp32 rounding).
        autocast_dtype: e.g. torch.bfloat16 to run the model body under autocast; None: the weights' dtype.
        token_bytes: (vocab,) byte length of each token id for bits per byte (default: GPT-2's).

    Returns a dict: perplexity, bits_per_byte, loss (nats per token), nll (nats), tokens (n - 1), bytes,
    seq_len, stride, windows.
    """
    ids = torch.as_tensor(ids).flatten().long()
    n = ids.numel()
    seq_len = min(model.config.block_size, 1024) if seq_len is None else seq_len
    stride = max(1, seq_len // 2) if stride is None else stride
    if seq_len > model.config.block_size:
        raise ValueError(f"seq_len {seq_len} is longer than the model's context of {model.config.block_size} tokens")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    spans = windows(n, seq_len, stride)
    token_bytes = gpt2_token_bytes() if token_bytes is None else token_bytes
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= min(len(token_bytes), model.config.vocab_size):
        raise ValueError(f"token id {high if low >= 0 else low} is outside the vocabulary (the model's "
                         f"{model.config.vocab_size}, the byte table's {len(token_bytes)})")
    n_bytes = int(token_bytes[ids[1:].cpu()].sum())

    device = model.lm_head.weight.device
    ids = ids.to(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(spans, batch_size):
            T = batch[0][1] - batch[0][0]
            begins = torch.tensor([b for b, _, _ in batch], device=device)
            scored = torch.tensor([s for _, _, s in batch], device=device)
            rows = ids[begins[:, None] + torch.arange(T + 1, device=device)]  # (B, T + 1)
            x, y = rows[:, :-1], rows[:, 1:].clone()
            y[torch.arange(T, device=device)[None, :] < (T - scored)[:, None]] = -100  # scored by an earlier window
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                total += _summed_nll(model, x, y).double()
    finally:
        model.train(was_training)
    nll, tokens = total.item(), n - 1
    perplexity = math.exp(nll / tokens) if nll / tokens < 709 else math.inf  # math.exp overflows past 709
    return dict(perplexity=perplexity, bits_per_byte=nll / math.log(2) / n_bytes if n_bytes else None,
                loss=nll / tokens, nll=nll, tokens=tokens, bytes=n_bytes, seq_len=seq_len, stride=stride, windows=len(spans))


def text_ids(documents: list[str], tokenizer) -> Tensor:
    """Token ids of the documents joined by <|endoftext|> (none after the last; empty documents skipped)."""
    ids: list[int] = []
    for doc_ids in tokenizer.encode_batch([doc for doc in documents if doc]):
        if ids:
            ids.append(tokenizer.eot_token)
        ids.extend(doc_ids)
    return torch.tensor(ids, dtype=torch.long)


# -----------------------------------------------------------------------------
def validate(cfg: EvaluateConfig) -> None:
    if cfg.weights is None:
        raise ValueError("--weights is required: a GPT-2 .safetensors file or a directory holding model.safetensors")
    if cfg.data is None:
        raise ValueError("--data is required: a .txt file, a directory of .txt files, or a .jsonl file with a 'text' field")
    if cfg.seq_len is not None and cfg.seq_len < 1:
        raise ValueError(f"--seq-len must be positive, got {cfg.seq_len}")
    if cfg.stride is not None and cfg.stride < 1:
        raise ValueError(f"--stride must be positive, got {cfg.stride}")
    if cfg.seq_len is not None and cfg.stride is not None and cfg.stride > cfg.seq_len:
        raise ValueError(f"--stride {cfg.stride} is larger than --seq-len {cfg.seq_len}: some tokens would never be scored")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {cfg.batch_size}")


def run(cfg: EvaluateConfig) -> dict:
    """Evaluate as configured; returns the result (main prints it)."""
    validate(cfg)
    device = resolve_device(cfg.device)
    check_backend(cfg.backend, device)
    autocast = autocast_dtype(cfg.autocast, device)
    tokenizer = get_tokenizer()
    ids = text_ids(read_documents(cfg.data), tokenizer)
    if len(ids) < 2:
        raise DataError(f"{cfg.data}: the text is {len(ids)} token(s); perplexity needs at least 2")
    # fp32 weights whatever the file holds; autocast gives the low precision
    model = GPT.from_pretrained(cfg.weights, backend=cfg.backend, device=device, dtype=torch.float32)
    seq_len = sequence_length(model, tokenizer, cfg.seq_len)
    stride = cfg.stride or max(1, seq_len // 2)
    if stride > seq_len:
        raise ValueError(f"--stride {stride} is larger than --seq-len {seq_len}: some tokens would never be scored")
    start = time.perf_counter()
    result = evaluate(model, ids, seq_len, stride, cfg.batch_size, autocast)
    result["seconds"] = round(time.perf_counter() - start, 3)
    result.update(weights=cfg.weights, data=cfg.data, autocast=str(autocast).removeprefix("torch.") if autocast else "off")
    return result


def main(argv=None) -> None:
    cfg = parse_args(EvaluateConfig, argv, prog="python -m fastlm.evaluate")
    try:
        result = run(cfg)
    except (ValueError, OSError) as e:  # WeightsError and DataError are ValueErrors too: bad input, said in one line
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if cfg.json:  # strict JSON: an infinite perplexity (a hopeless model) is null
        print(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in result.items()}))
    else:
        print(f"perplexity {result['perplexity']:.4f} (loss {result['loss']:.4f} nats/token), "
              f"{result['bits_per_byte']:.4f} bits per byte; {result['tokens']:,} tokens, {result['bytes']:,} bytes; "
              f"seq-len {result['seq_len']}, stride {result['stride']}, {result['windows']:,} windows, {result['seconds']:.1f} s")


if __name__ == "__main__":
    main()
