"""Choices the three commands make the same way: the device, the autocast precision, the backend, the context."""
from __future__ import annotations

import torch

from kernels._utils import device_runs_triton

AUTOCAST_CHOICES = ("auto", "bfloat16", "off")  # --autocast of the training and evaluation commands


def resolve_device(name: str) -> torch.device:
    """--device: auto is cuda when available; a device that does not exist here is a one-line ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device (try cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def autocast_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """--autocast: auto is bfloat16 on CUDA and off elsewhere; None means no autocast (fp32)."""
    if choice not in AUTOCAST_CHOICES:
        raise ValueError(f"--autocast must be one of {', '.join(AUTOCAST_CHOICES)}; got {choice!r}")
    return torch.bfloat16 if choice == "bfloat16" or (choice == "auto" and device.type == "cuda") else None


def check_backend(backend: str, device: torch.device) -> None:
    if backend == "triton" and not device_runs_triton(device):
        raise ValueError(f"--backend triton needs a CUDA device (or TRITON_INTERPRET=1 on the CPU); this run is on {device}")


def sequence_length(model, tokenizer, seq_len: int | None) -> int:
    """--seq-len for this model (default: its context, at most 1024), after checking it reads GPT-2's tokens."""
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the model's vocabulary of {model.config.vocab_size} is smaller than the GPT-2 tokenizer's "
                         f"{tokenizer.vocab_size}: not a GPT-2 vocabulary")
    seq_len = seq_len or min(model.config.block_size, 1024)
    if seq_len > model.config.block_size:
        raise ValueError(f"--seq-len {seq_len} is longer than the model's context of {model.config.block_size} tokens")
    return seq_len
