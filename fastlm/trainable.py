"""Choosing what trains: every parameter, the last N blocks, parameters named by patterns, or LoRA adapters.

Frozen parameters get requires_grad=False, so they receive no gradient, no optimizer state, and (for frozen
blocks before the first trained one) autograd keeps none of their activations. `choose_trainable` reads its
choice from any object with the fine-tuning flags' attributes (train_layers, trainable, lora_rank, lora_alpha,
lora_targets, lora_dropout), such as FinetuneConfig.
"""
from __future__ import annotations

from typing import Protocol

from fastlm import lora
from fastlm.model import GPT


class TrainableChoice(Protocol):
    train_layers: int | None   # the last N blocks and the final norm
    trainable: str | None      # comma-separated substrings of parameter names
    lora_rank: int             # 0: no LoRA
    lora_alpha: float | None   # default: the rank
    lora_targets: str          # comma-separated layer names (c_attn, c_proj, c_fc)
    lora_dropout: float


def choose_trainable(model: GPT, choice: TrainableChoice) -> str:
    """Freeze what the choice leaves out (LoRA freezes the base and adds adapters); returns what trains, in words.

    Errors are one-line ValueErrors naming the flag (--train-layers, --trainable, --lora-*).
    """
    if choice.lora_rank:
        targets = [t.strip() for t in choice.lora_targets.split(",") if t.strip()]
        lora.apply_lora(model, choice.lora_rank, choice.lora_alpha or float(choice.lora_rank), targets, choice.lora_dropout)
        return f"LoRA rank {choice.lora_rank} adapters on {', '.join(targets)}"
    patterns, what = [], []
    if choice.train_layers is not None:
        n = model.config.n_layer
        if choice.train_layers > n:
            raise ValueError(f"--train-layers {choice.train_layers}: the model has only {n} blocks")
        patterns += [f"transformer.h.{i}." for i in range(n - choice.train_layers, n)] + ["transformer.ln_f."]
        what.append(f"the last {choice.train_layers} blocks and ln_f")
    if choice.trainable:
        names = [name for name, _ in model.named_parameters(remove_duplicate=False)]  # lm_head.weight too (tied)
        for pattern in filter(None, (p.strip() for p in choice.trainable.split(","))):
            if not any(pattern in name for name in names):
                raise ValueError(f"--trainable {pattern!r} matches no parameter (names look like {names[2]})")
            patterns.append(pattern)
        what.append(f"parameters matching {choice.trainable}")
    if not patterns:
        return "every parameter"
    chosen = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if any(pat in name for pat in patterns)}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    return " and ".join(what)
