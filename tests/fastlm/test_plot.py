"""fastlm.plot: a decodable PNG written atomically, the smoothing against its closed form, and a quiet False
without matplotlib."""
import math
import random
import struct
import sys

import pytest

from fastlm.plot import PLOT_HINT, default_alpha, ema, write_loss_plot


def run_metrics(steps=60, seed=0):
    """Records as fastlm.finetune writes them: a falling, noisy loss, val_loss every 20 steps."""
    rng, records = random.Random(seed), []
    for step in range(1, steps + 1):
        noise = rng.gauss(0.0, 0.3)
        record = dict(step=step, loss=4.0 * math.exp(-step / 30) + 2.0 + noise, lr=3e-4, tokens_per_s=1000.0)
        if step % 20 == 0:
            record["val_loss"] = 4.0 * math.exp(-step / 30) + 2.2
        records.append(record)
    return records


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13, "the first chunk is IHDR"
    return struct.unpack(">II", data[16:24])  # width, height


def test_ema_equals_the_weighted_average_of_the_values_so_far():
    values = [5.0, 3.0, 4.5, 2.0, 2.5, 1.0, 7.0]
    for alpha in (0.1, 0.5, 1.0):
        expected = []
        for t in range(len(values)):
            weights = [(1 - alpha) ** (t - i) for i in range(t + 1)]
            expected.append(sum(w * v for w, v in zip(weights, values)) / sum(weights))
        assert ema(values, alpha) == pytest.approx(expected, rel=1e-12)
    assert ema([3.0], 0.1) == pytest.approx([3.0], rel=1e-12), "bias correction: the first point is the first value, not 0.1 of it"
    smoothed = ema([1.0, float("nan"), 3.0], 0.5)
    assert smoothed[0] == pytest.approx(1.0) and math.isnan(smoothed[1]) and smoothed[2] == pytest.approx((0.5 * 1 + 3) / 1.5)
    assert default_alpha(10) == pytest.approx(2 / 6) and default_alpha(2000) == pytest.approx(2 / 101)
    with pytest.raises(ValueError, match="alpha"):
        ema([1.0], 0.0)


def test_writes_a_png_and_replaces_it_atomically(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional extra fastlm[plot]")
    import matplotlib.image
    from matplotlib.figure import Figure

    path = tmp_path / "loss.png"
    assert write_loss_plot(run_metrics(), path) is True
    first = path.read_bytes()
    width, height = png_size(first)
    assert width > 0 and height > 0
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width) and pixels.std() > 0, "a drawing, not a blank image"

    inode = path.stat().st_ino
    assert write_loss_plot(run_metrics(steps=200, seed=1), path) is True
    assert path.stat().st_ino != inode, "renamed over the old file, not rewritten in place"
    assert path.read_bytes() != first and png_size(path.read_bytes())[0] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"], "no temporary file left behind"

    def crash_half_way(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise KeyboardInterrupt

    before = path.read_bytes()
    monkeypatch.setattr(Figure, "savefig", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        write_loss_plot(run_metrics(), path)
    assert path.read_bytes() == before, "an interrupted write leaves the previous plot whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]


def test_records_without_validation_or_with_a_diverged_step_still_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional extra fastlm[plot]")
    records = [dict(step=s, loss=float("inf") if s == 3 else 3.0 / s) for s in range(1, 6)]
    assert write_loss_plot(records, tmp_path / "a.png") is True
    assert write_loss_plot([dict(step=1, val_loss=2.0)], tmp_path / "b.png") is True
    with pytest.raises(ValueError, match="no record has a 'loss'"):
        write_loss_plot([], tmp_path / "c.png")


def test_without_matplotlib_returns_false_and_writes_nothing(tmp_path, monkeypatch):
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes `import` raise ImportError
    assert write_loss_plot(run_metrics(), tmp_path / "loss.png") is False
    assert list(tmp_path.iterdir()) == []
    assert "pip install 'fastlm[plot]'" in PLOT_HINT
