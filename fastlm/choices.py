"""Multiple-choice scoring by continuation log-probability: label words for prompt-based classification ("<review>
It was" -> " great" / " terrible"), or any continuations of a text.

A row is {"text": the filled template, "choices": [continuations], "label": index of the right one}. Each choice c
is scored by the log-probability the model gives its tokens after the text's:

    logprob(c)  = sum over c's tokens t_i of ln p(t_i | text's tokens, t_1 .. t_i-1)
    per token   = logprob(c) / (number of c's tokens)

and the row's prediction is the choice with the highest total (ties: the first), and, length-normalised, the one
with the highest per-token mean (which does not favour short continuations). Accuracy is the fraction of rows whose
prediction is the label, with the counts.

Tokenization: a choice is appended to the text verbatim, and its tokens are those of `text + choice` after the
longest run of leading tokens that tokenization shares with the text's own: the continuation as the tokenizer
reads it after the text. Write label words with the space GPT-2 puts before a word, " great": after "It was" that
is the single token " great". A text that ends in whitespace gives its trailing space to the continuation, so
"It was " + "great" scores the same " great" token after "It was" (GPT-2 would otherwise read the lone space as a
token of its own); "It was" + "great" scores "great" glued to "was", usually not what is meant. An empty text (or
one that merges into the choice's first token) is conditioned on <|endoftext|> alone, as GPT-2 starts a document.

The model runs GPT.hidden_states (with its soft prompt, if it has one, before every sequence) and GPT.loss with an
fp32 head on the choices' positions only, so on triton the (tokens x vocab) logits are never built. The sequences
(one per row and choice, the text's tokens and then the choice's) go through the model batch_size at a time, the
longest first, right-padded (causal attention: padding after a token never changes what it sees). A text and
choice, with the virtual tokens, must fit the model's context: a longer row is an error naming it, never cut.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastlm.data import DataError
from fastlm.model import GPT
from fastlm.prompt_tuning import num_virtual_tokens, prompt_of

KEYS = ("text", "choices", "label")


# -----------------------------------------------------------------------------
def check_row(row, where: str) -> dict:
    """The row's text, choices and label, checked; every problem is one DataError starting with `where`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: not a JSON object with {', '.join(KEYS)}")
    missing = [key for key in KEYS if key not in row]
    if missing:
        raise DataError(f"{where}: no {missing[0]!r} (each row needs text, choices and label)")
    text, choices, label = row["text"], row["choices"], row["label"]
    if not isinstance(text, str):
        raise DataError(f"{where}: 'text' must be a string, got {type(text).__name__}")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of strings")
    if not choices:
        raise DataError(f"{where}: 'choices' is empty: give at least one continuation")
    empty = next((i for i, c in enumerate(choices) if not c), None)
    if empty is not None:
        raise DataError(f"{where}: choice {empty} is an empty string: it has no tokens to score")
    if isinstance(label, bool) or not isinstance(label, int):
        raise DataError(f"{where}: 'label' must be an integer (the index of the right choice), got {label!r}")
    if not 0 <= label < len(choices):
        raise DataError(f"{where}: label {label} is out of range for {len(choices)} choices (0..{len(choices) - 1})")
    return {"text": text, "choices": list(choices), "label": label}


def read_choices(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSONL file, one JSON object per line (blank lines skipped), each checked by check_row. Errors
    are one-line DataErrors naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: a directory, not a .jsonl file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({str(e).splitlines()[0]})") from None
        rows.append(check_row(row, f"{path}:{number}"))
    if not rows:
        raise DataError(f"{path}: no rows (one JSON object per line with text, choices and label)")
    return rows


def split_tokens(tokenizer, text: str, choice: str) -> tuple[list[int], list[int]]:
    """(context, continuation) token ids: `text + choice` split after the tokens it shares with `text` alone (see
    the module docstring); an empty context becomes [<|endoftext|>]."""
    whole = tokenizer.encode(text + choice)
    alone = tokenizer.encode(text)
    shared = 0
    while shared < min(len(alone), len(whole) - 1) and alone[shared] == whole[shared]:
        shared += 1
    context = whole[:shared] or [tokenizer.eot_token]
    return context, whole[shared:]


# -----------------------------------------------------------------------------
@torch.no_grad()
def score_choices(model: GPT, tokenizer, rows: list[dict], batch_size: int = 16,
                  autocast_dtype: torch.dtype | None = None) -> dict:
    """Score every row's choices (see the module docstring), with the model's soft prompt if it has one.

    Args:
        rows: dicts with text, choices, label (read_choices gives them; each is checked, "row i" naming it).
        batch_size: sequences (row x choice) per forward pass; the result does not depend on it beyond fp32 rounding.
        autocast_dtype: e.g. torch.bfloat16 for the model body under autocast; the head and losses stay fp32.

    Returns a dict: rows, correct, accuracy, correct_norm, accuracy_norm (length-normalised), chance (the accuracy
    of a uniform guess), and per_row: for each row its logprobs (per choice, summed over its tokens), tokens (per
    choice), choice and choice_norm (the predictions) and label.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rows = [check_row(row, f"row {i}") for i, row in enumerate(rows)]
    if not rows:
        raise DataError("no rows to score")
    n_virtual, context = num_virtual_tokens(model), model.config.block_size
    items = []  # (row, choice, context ids + continuation ids, continuation length)
    for r, row in enumerate(rows):
        for c, choice in enumerate(row["choices"]):
            ctx, cont = split_tokens(tokenizer, row["text"], choice)
            seq = ctx + cont
            if max(seq) >= model.config.vocab_size:
                raise ValueError(f"row {r}: token id {max(seq)} is outside the model's vocabulary of "
                                 f"{model.config.vocab_size}: not a model for this tokenizer")
            if n_virtual + len(seq) - 1 > context:
                raise ValueError(f"row {r}: the text and choice {c} are {len(seq)} tokens" +
                                 (f", with {n_virtual} virtual tokens" if n_virtual else "") +
                                 f": more than the model's context of {context} takes (it scores all but the last "
                                 f"as input); shorten the text")
            items.append((r, c, seq, len(cont)))

    device = model.lm_head.weight.device
    prompt = prompt_of(model)
    pad = tokenizer.eot_token % model.config.vocab_size
    logprobs = [[0.0] * len(row["choices"]) for row in rows]
    order = sorted(range(len(items)), key=lambda i: -len(items[i][2]))  # similar lengths together: little padding
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = [items[i] for i in order[start:start + batch_size]]
            T = len(batch[0][2]) - 1
            x = torch.full((len(batch), T), pad, dtype=torch.long)
            y = torch.full((len(batch), T), -100, dtype=torch.long)
            for b, (_, _, seq, n_cont) in enumerate(batch):
                x[b, :len(seq) - 1] = torch.tensor(seq[:-1])
                y[b, len(seq) - 1 - n_cont:len(seq) - 1] = torch.tensor(seq[-n_cont:])
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                h = model.hidden_states(x, prompt=prompt)  # (B, T, C)
            scored = y != -100
            losses = model.loss(h[scored][None], y[scored][None], reduction="none", fp32_head=True)  # (tokens,)
            owner = torch.arange(len(batch), device=device)[:, None].expand(-1, T)[scored]
            sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, owner, -losses.double())
            for (r, c, _, _), value in zip(batch, sums.tolist()):
                logprobs[r][c] = value
    finally:
        model.train(was_training)

    per_row, correct, correct_norm = [], 0, 0
    lengths = [[0] * len(row["choices"]) for row in rows]
    for r, c, _, n_cont in items:
        lengths[r][c] = n_cont
    for row, scores, counts in zip(rows, logprobs, lengths):
        means = [s / n for s, n in zip(scores, counts)]
        choice, choice_norm = scores.index(max(scores)), means.index(max(means))
        correct += choice == row["label"]
        correct_norm += choice_norm == row["label"]
        per_row.append(dict(logprobs=scores, tokens=counts, choice=choice, choice_norm=choice_norm, label=row["label"]))
    n = len(rows)
    return dict(rows=n, correct=correct, accuracy=correct / n, correct_norm=correct_norm,
                accuracy_norm=correct_norm / n, chance=sum(1 / len(row["choices"]) for row in rows) / n,
                per_row=per_row)


def describe(result: dict) -> str:
    """The one line `python -m fastlm.evaluate --choices` prints."""
    n = result["rows"]
    return (f"accuracy {result['accuracy']:.4f} ({result['correct']:,} of {n:,} rows), length-normalised "
            f"{result['accuracy_norm']:.4f} ({result['correct_norm']:,} of {n:,}); chance {result['chance']:.4f}")
