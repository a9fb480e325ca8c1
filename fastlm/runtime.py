"""Choices the three commands make the same way: the device, the autocast precision, the backend, the context;
and how a training run hears SIGINT and SIGTERM."""
from __future__ import annotations

import signal
import threading
import time

import torch

from fastlm.cli import AUTOCAST_CHOICES
from kernels._utils import device_runs_triton


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


# -----------------------------------------------------------------------------
class Aborted(BaseException):
    """A second SIGINT/SIGTERM: stop at once. A BaseException, like KeyboardInterrupt, so that nothing on the way
    out mistakes it for an error to report; a save it interrupts removes its temporary file (fastlm.files)."""

    def __init__(self, signum: int, saved_step: int | None):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.saved_step = saved_step  # the step of the checkpoint left in place


class StopSignals:
    """While training: the first SIGINT or SIGTERM only asks the loop to stop (`received` is set; the loop finishes
    its step and saves a checkpoint), a second one raises Aborted wherever the program is.

    Under torchrun (relayed=True) a Ctrl-C reaches each worker twice, from the terminal and from the agent that
    passes it on, within moments: a repeat within `relay_window` seconds of the first signal counts as the same
    request. Handlers can only be installed in the main thread; elsewhere this does nothing.
    """

    def __init__(self, relayed: bool = False, saved_step: int | None = None, relay_window: float = 1.0):
        self.relayed, self.relay_window = relayed, relay_window
        self.received: int | None = None
        self.saved_step = saved_step  # the loop's last checkpoint, for the message of an abort
        self._at, self._previous = 0.0, {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received, self._at = signum, time.monotonic()
        elif not (self.relayed and time.monotonic() - self._at < self.relay_window):
            raise Aborted(signum, self.saved_step)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""
