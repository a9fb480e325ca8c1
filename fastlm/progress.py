"""What a fine-tuning run shows and records as it goes: the progress line, metrics.jsonl, and loss.png (plot.py).

metrics.jsonl holds one JSON object per step ({"step", "loss", "lr", "tokens_per_s"}, and "val_loss" on
evaluation steps), rewritten whole (atomically) at every logging point, so it is never half a line. It is strict
JSON: a loss that is nan or infinite (the step a run diverged, where it stops) is written as null.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from fastlm.files import atomic_write_text
from fastlm.plot import PLOT_HINT, write_loss_plot


class Progress:
    """A one-line bar on a terminal, plain log lines otherwise; on stdout, with the run's other lines, so that
    `> train.log` keeps them all (errors go to stderr)."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream = total, stream or sys.stdout
        self.tty = self.stream.isatty()
        self.closed = False

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, elapsed: float, seconds_left: float,
               val_loss=None) -> None:
        val = f" val {val_loss:.4f}" if val_loss is not None else ""
        times = f"elapsed {_clock(elapsed)} left {_clock(seconds_left)}"
        if self.tty:
            filled = int(30 * step / self.total)
            bar = "#" * filled + "." * (30 - filled)
            self.stream.write(f"\rstep {step}/{self.total} [{bar}] loss {loss:.4f}{val} lr {lr:.2e} {tokens_per_s:,.0f} tok/s {times} ")
        else:
            self.stream.write(f"step {step}/{self.total} loss {loss:.4f}{val} lr {lr:.2e} {tokens_per_s:,.0f} tok/s {times}\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        """A line of its own, without breaking the bar."""
        self.stream.write(("\n" if self.tty else "") + message + "\n")
        self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End the bar's line (once), so that what is printed next starts a line of its own."""
        if self.tty and not self.closed:
            self.stream.write("\n")
            self.stream.flush()
        self.closed = True


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
    return records


def write_metrics(path: Path, metrics: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(_finite_or_null(m), allow_nan=False) + "\n" for m in metrics))


def _finite_or_null(record: dict) -> dict:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def plot_losses(metrics: list[dict], path: Path, progress: Progress) -> bool:
    """Rewrite loss.png; False (after saying why, once) when it cannot be drawn, so the run goes on without it."""
    try:
        if write_loss_plot(metrics, path):
            return True
        progress.note(f"no loss.png: {PLOT_HINT}")
    except Exception as e:  # noqa: BLE001 -- a plot is never worth stopping a training run for
        progress.note(f"no loss.png: matplotlib failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return False
