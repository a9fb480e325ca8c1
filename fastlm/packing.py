"""Packed documents: the document boundaries of rows cut from a token stream, as GPT.forward takes them.

The stream is documents end to end, each followed by `<|endoftext|>` (fastlm.data.tokenize). A row of inputs
x (T,) predicts y = the stream shifted by one. Packed, each token attends only to its own document, and its
position restarts at the document's first token. The boundaries follow from the inputs alone: a new document
begins at each row's first token and at every input `<|endoftext|>`. That token is the end of the previous
document, and here it is the next document's first token (GPT-2 has one special token, used for both ends, as
transformers' GPT-2 tokenizer uses it for BOS and EOS). So in a packed row:

    a document  t_0 .. t_{n-1} <eot>   (n + 1 tokens in the stream) is fed as   <eot> t_0 .. t_{n-1}
    and predicts                                                                 t_0 .. t_{n-1} <eot>

Each of its tokens and its closing <|endoftext|> is predicted once, from its own document only: the first token
from the <|endoftext|> before it (not from the previous document's text), the last real token predicts the
<|endoftext|> that ends the document, and nothing predicts across a boundary. No token is padding and none is
masked out of the loss, so a row's loss is the token-weighted mean of its documents' losses.

A document that does not fit in the row, because it is longer than the row or it crosses the row's first or
last token, is cut there: the part inside the row is a document of its own, with positions from 0 (the row's
first input, a token of the document's middle, is the piece's first token). This is the same cut a window over
the stream makes today; only what each token sees changes. The first document of a stream has no
<|endoftext|> before it: its first token is an input only.

Both tensors are built on the host from CPU token ids (cu_seqlens needs a nonzero: a host operation) before the
batch goes to the device, so the model never reads them back.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def document_boundaries(x: Tensor, eot: int) -> tuple[Tensor, Tensor]:
    """(cu_seqlens, position_ids) of packed rows x (B, T) of CPU token ids: cu_seqlens (n_docs + 1,) int32 are
    the documents' offsets into the B * T flattened tokens (no document crosses a row), position_ids (B, T)
    int64 restart at 0 at each document's first token."""
    if x.dim() != 2 or x.device.type != "cpu":
        raise ValueError(f"document_boundaries: x must be (B, T) token ids on the CPU, got {tuple(x.shape)} on {x.device}")
    B, T = x.shape
    starts = x == eot
    starts[:, 0] = True
    cu_seqlens = torch.cat([starts.flatten().nonzero().flatten(), torch.tensor([B * T])]).to(torch.int32)
    column = torch.arange(T).expand(B, T)
    first = torch.where(starts, column, 0).cummax(dim=1).values  # each token's document's first column
    return cu_seqlens, column - first


def document_lengths(ids: np.ndarray | Tensor, eot: int) -> np.ndarray:
    """Tokens per document of a stream (each document with its closing <|endoftext|>; a last one without)."""
    ids = np.asarray(ids)
    ends = np.flatnonzero(ids == eot) + 1
    if len(ends) == 0 or ends[-1] != len(ids):
        ends = np.append(ends, len(ids))
    return np.diff(np.concatenate([[0], ends]))


def padding_waste(ids: np.ndarray | Tensor, eot: int, seq_len: int) -> float:
    """The fraction of the tokens that are padding when each document of the stream gets rows of its own,
    ceil(length / seq_len) rows of seq_len tokens (the alternative to packing)."""
    lengths = document_lengths(ids, eot)
    if lengths.sum() == 0:
        return 0.0
    rows = -(-lengths // seq_len)
    return float(1.0 - lengths.sum() / (rows.sum() * seq_len))
