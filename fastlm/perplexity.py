"""Perplexity and bits per byte of a text under a GPT-2, by strided sliding windows: what `python -m fastlm.evaluate`
(fastlm.evaluate, the command) computes.

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

Per document (per_document=True, `--per-document`): the same windows and the same scored tokens, but each token
attends only to its own document, with positions from 0 at the document's start (fastlm.packing's boundaries,
as `finetune --pack` trains: a document begins after each <|endoftext|>, which is its first token, and ends by
predicting the next <|endoftext|>). A token then has as context the tokens of its document before it within its
window (up to seq_len; at least all of them or seq_len - stride + 1, as above), never the previous document's;
tokens and bytes are those of the default mode, so the two perplexities compare directly.

The hidden states come from GPT.hidden_states (bfloat16 autocast on CUDA by default); the LM head and the
summed cross-entropy are GPT.loss with an fp32 head, whichever backend runs (on triton the logits are never
built). Sums accumulate in fp64 on the device and are read back once, at the end.
"""
from __future__ import annotations

import gzip
import json
import math
from functools import lru_cache
from typing import Callable

import torch
from torch import Tensor

from fastlm.model import GPT
from fastlm.packing import document_boundaries
from fastlm.prompt_tuning import check_window, prompt_of, text_room
from fastlm.tokenizer import ASSETS

EOT = 50256  # GPT-2's <|endoftext|>


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


def _summed_nll(model: GPT, x: Tensor, y: Tensor, packing: dict) -> Tensor:
    """Sum of -ln p(y | x) over the targets != -100, fp32. x, y: (B, T); packing: the documents' boundaries."""
    # an fp32 head and loss: a 16-bit sum of a few thousand nats is off in the second decimal
    return model.loss(model.hidden_states(x, prompt=prompt_of(model), **packing), y, reduction="sum", fp32_head=True)


@torch.no_grad()
def evaluate(model: GPT, ids: Tensor, seq_len: int | None = None, stride: int | None = None, batch_size: int = 1,
             autocast_dtype: torch.dtype | None = None, token_bytes: Tensor | None = None,
             progress: Callable[[int, int], None] | None = None, per_document: bool = False, eot: int = EOT) -> dict:
    """Strided-window perplexity of `model` on the token ids (n,) (see the module docstring).

    Args:
        seq_len: most tokens of context per prediction (default: the model's context, at most 1024).
        stride: tokens the window advances by, 1 <= stride <= seq_len (default: seq_len // 2).
        batch_size: windows per forward pass; the result does not depend on it (beyond fp32 rounding).
        autocast_dtype: e.g. torch.bfloat16 to run the model body under autocast; None: the weights' dtype.
        token_bytes: (vocab,) byte length of each token id for bits per byte (default: GPT-2's).
        progress: called as progress(windows done, windows in all) after each batch (it may sync to show it).
        per_document: each token sees only its own document (see the module docstring); eot: the token that
            separates documents (GPT-2's <|endoftext|>).

    Returns a dict: perplexity, bits_per_byte, loss (nats per token), nll (nats), tokens (n - 1), bytes,
    seq_len, stride, windows, mode ("per-document" or "stream"), documents (how many the text holds).
    """
    ids = torch.as_tensor(ids).flatten().long()
    n = ids.numel()
    seq_len = min(text_room(model), 1024) if seq_len is None else seq_len  # a soft prompt goes before every window
    stride = max(1, seq_len // 2) if stride is None else stride
    if seq_len > model.config.block_size:
        raise ValueError(f"seq_len {seq_len} is longer than the model's context of {model.config.block_size} tokens")
    check_window(model, seq_len, "seq_len")
    if per_document and prompt_of(model) is not None:
        raise ValueError("per_document scoring does not combine with a soft prompt (one prompt goes before each window)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    spans = windows(n, seq_len, stride)
    token_bytes = gpt2_token_bytes() if token_bytes is None else token_bytes
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= min(len(token_bytes), model.config.vocab_size):
        raise ValueError(f"token id {high if low >= 0 else low} is outside the vocabulary (the model's "
                         f"{model.config.vocab_size}, the byte table's {len(token_bytes)})")
    n_bytes = int(token_bytes[ids[1:].cpu()].sum())
    host_ids = ids.cpu()
    documents = int((host_ids == eot).sum()) + 1

    device = model.lm_head.weight.device
    ids = ids.to(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    done = 0
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
            packing = {}
            if per_document:  # the boundaries from the host's copy of the ids: nothing is read back from the device
                host_x = host_ids[torch.tensor([b for b, _, _ in batch])[:, None] + torch.arange(T)]
                cu_seqlens, position_ids = document_boundaries(host_x, eot)
                packing = dict(cu_seqlens=cu_seqlens.to(device), position_ids=position_ids.to(device))
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                total += _summed_nll(model, x, y, packing).double()
            done += len(batch)
            if progress is not None:
                progress(done, len(spans))
    finally:
        model.train(was_training)
    nll, tokens = total.item(), n - 1
    perplexity = math.exp(nll / tokens) if nll / tokens < 709 else math.inf  # math.exp overflows past 709
    return dict(perplexity=perplexity, bits_per_byte=nll / math.log(2) / n_bytes if n_bytes else None,
                loss=nll / tokens, nll=nll, tokens=tokens, bytes=n_bytes, seq_len=seq_len, stride=stride, windows=len(spans),
                mode="per-document" if per_document else "stream", documents=documents)


def text_ids(documents: list[str], tokenizer) -> Tensor:
    """Token ids of the documents joined by <|endoftext|> (none after the last; empty documents skipped)."""
    ids: list[int] = []
    for doc_ids in tokenizer.encode_batch([doc for doc in documents if doc]):
        if ids:
            ids.append(tokenizer.eot_token)
        ids.extend(doc_ids)
    return torch.tensor(ids, dtype=torch.long)
