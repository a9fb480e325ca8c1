"""Choosing what trains: every parameter, the last N blocks, parameters named by patterns, LoRA adapters, or a
soft prompt (prompt tuning).

Frozen parameters get requires_grad=False, so they receive no gradient, no optimizer state, and (for frozen
blocks before the first trained one) autograd keeps none of their activations. `choose_trainable` reads its
choice from any object with the fine-tuning flags' attributes (train_layers, trainable, lora_rank, lora_alpha,
lora_targets, lora_dropout, and, when it has them, prompt_tokens and prompt_init_text), such as FinetuneConfig.

Prompt tuning (prompt_tokens N > 0): every model weight frozen and a new parameter, `soft_prompt.weight` (N, C),
the only one that trains (fastlm.prompt_tuning). It is part of the model's state_dict, so a checkpoint holds it and
a resumed run, which calls choose_trainable before loading the checkpoint's state, gets it back.
"""
from __future__ import annotations

from typing import Protocol

from fastlm import lora, prompt_tuning
from fastlm.model import GPT


class TrainableChoice(Protocol):
    train_layers: int | None   # the last N blocks and the final norm
    trainable: str | None      # comma-separated substrings of parameter names
    lora_rank: int             # 0: no LoRA
    lora_alpha: float | None   # default: the rank
    lora_targets: str          # comma-separated layer names (c_attn, c_proj, c_fc)
    lora_dropout: float
    prompt_tokens: int         # 0: no soft prompt (optional attribute: absent counts as 0)
    prompt_init_text: str | None  # the soft prompt starts from this text's token embeddings (absent or None: random)


def choose_trainable(model: GPT, choice: TrainableChoice, tokenizer=None) -> str:
    """Freeze what the choice leaves out (LoRA freezes the base and adds adapters; prompt tuning freezes the whole
    model and adds the soft prompt); returns what trains, in words. tokenizer: reads --prompt-init-text (default:
    the bundled GPT-2 BPE).

    Errors are one-line ValueErrors naming the flag (--train-layers, --trainable, --lora-*, --prompt-*).
    """
    prompt_tokens = getattr(choice, "prompt_tokens", 0) or 0
    init_text = getattr(choice, "prompt_init_text", None)
    if prompt_tokens:
        others = {"--lora-rank": choice.lora_rank, "--train-layers": choice.train_layers is not None,
                  "--trainable": choice.trainable}
        clash = next((flag for flag, given in others.items() if given), None)
        if clash:
            raise ValueError(f"--prompt-tokens trains a soft prompt on a frozen model: it cannot be combined with {clash}")
        return prompt_tuning.setup(model, prompt_tokens, init_text, tokenizer)
    if init_text is not None:
        raise ValueError("--prompt-init-text starts a soft prompt: it needs --prompt-tokens N")
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
