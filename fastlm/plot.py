"""The loss curve of a fine-tuning run as a PNG: train loss raw (faint) and smoothed, validation loss, per step.

`write_loss_plot(metrics, path)` takes metrics.jsonl's records ({"step", "loss", ...} per step, "val_loss" on
evaluation steps). The smoothed curve is an exponential moving average with bias correction (as Adam's moment
estimates and TensorBoard's smoothing):

    m_0 = 0,   m_t = (1 - alpha) * m_{t-1} + alpha * x_t,   smoothed_t = m_t / (1 - (1 - alpha)^t)

i.e. at every point the average of the losses so far weighted (1 - alpha)^age, so the first points are not
dragged towards 0. alpha suits the run's length (an average over about a twentieth of the run, 5 to 200
steps). matplotlib is an optional dependency (`fastlm[plot]`), imported only when a plot is drawn, through its
object API on the Agg canvas (no pyplot state, no display). The file is written to a temporary name and
renamed, so a reader never sees half a PNG.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from fastlm.files import atomic_write

PLOT_HINT = "the loss plot needs matplotlib: pip install 'fastlm[plot]'"


def default_alpha(num_points: int) -> float:
    """EMA weight for a run of num_points losses: the alpha of a span of num_points / 20 steps, in [5, 200]."""
    span = min(200, max(5, num_points // 20))
    return 2.0 / (span + 1)


def ema(values: list[float], alpha: float) -> list[float]:
    """Bias-corrected exponential moving average (see the module docstring). Non-finite values (a diverged step)
    are left out of the average and give nan at their own position."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"ema: alpha must be in (0, 1], got {alpha}")
    out, m, weight = [], 0.0, 0.0  # weight = 1 - (1 - alpha)^t over the finite values so far
    for x in values:
        if not math.isfinite(x):
            out.append(math.nan)
            continue
        m = (1.0 - alpha) * m + alpha * x
        weight = (1.0 - alpha) * weight + alpha
        out.append(m / weight)
    return out


def write_loss_plot(metrics: list[dict], path: str | os.PathLike, title: str = "Fine-tuning loss") -> bool:
    """Draw train loss (raw and smoothed) and validation loss against step into the PNG at `path`.

    Returns False, writing nothing, when matplotlib is not installed (the caller can print PLOT_HINT);
    True once the file is written. Raises ValueError when no record has a loss to draw.
    """
    records = sorted((m for m in metrics if "step" in m), key=lambda m: m["step"])
    train = [(m["step"], float(m["loss"])) for m in records if m.get("loss") is not None]
    val = [(m["step"], float(m["val_loss"])) for m in records if m.get("val_loss") is not None]
    if not train and not val:
        raise ValueError("write_loss_plot: no record has a 'loss' or 'val_loss' to draw")
    try:
        import matplotlib  # noqa: F401  (optional: fastlm[plot])
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False

    fig = Figure(figsize=(8, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)  # renders to a PNG in memory: no GUI backend, no global pyplot state
    ax = fig.add_subplot()
    if train:
        steps, losses = zip(*train)
        alpha = default_alpha(len(losses))
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss")
        ax.plot(steps, ema(list(losses), alpha), color="tab:blue", linewidth=1.8, label=f"train loss, smoothed (EMA, alpha {alpha:.2g})")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, color="tab:orange", marker="o", markersize=4, linewidth=1.5, label="validation loss")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    return True
