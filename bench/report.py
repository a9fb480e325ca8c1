"""Turn pytest-benchmark JSON into the markdown tables the README shows.

    pytest bench --benchmark-only --benchmark-json bench/results/h100-2026-11-22.json
    python -m bench.report bench/results/h100-2026-11-22.json > bench/results/h100-2026-11-22.md

Per benchmark group, one row per provider: the median time, its speed relative to eager PyTorch (eager time /
this time: above 1 is faster) and to the fastest other provider, TFLOP/s or GB/s with the fraction of the
device's peak, tokens/s where measured, and peak memory.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

# Dense bf16 tensor-core peak (TFLOP/s) and HBM bandwidth (GB/s), from the vendors' data sheets.
DEVICE_PEAKS = {"H200": (989.0, 4800.0), "H100": (989.0, 3350.0), "A100": (312.0, 2039.0)}


def device_peaks(name: str) -> tuple[float, float] | None:
    for key, peaks in DEVICE_PEAKS.items():
        if key in name:
            return peaks
    return None


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def render(data: dict) -> str:
    groups = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench["group"] or bench["name"]].append(bench)
    device = next((b["extra_info"].get("device") for b in data["benchmarks"] if b["extra_info"].get("device")), "unknown device")
    peaks = device_peaks(device)
    commit = data.get("commit_info", {}).get("id", "")[:10]
    lines = [f"Device: {device}; run {data.get('datetime', '?')[:19]}; commit {commit or '?'}; "
             f"pytest-benchmark {data.get('version', '?')}", ""]
    for group in sorted(groups):
        rows = groups[group]
        medians = {b["params"].get("provider", b["name"]): b["stats"]["median"] for b in rows}
        eager = medians.get("eager")
        lines += [f"### {group}", "", "| provider | median ms | vs eager | vs best other | throughput | tokens/s | peak MiB | resident MiB |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for b in sorted(rows, key=lambda b: b["stats"]["median"]):
            provider = b["params"].get("provider", b["name"])
            others = [m for p, m in medians.items() if p != provider]
            info = b["extra_info"]
            if "tflop_per_s" in info:
                share = f" ({info['tflop_per_s'] / peaks[0]:.0%} of peak)" if peaks else ""
                throughput = f"{info['tflop_per_s']:.1f} TFLOP/s{share}"
            elif "gb_per_s" in info:
                share = f" ({info['gb_per_s'] / peaks[1]:.0%} of peak)" if peaks else ""
                throughput = f"{info['gb_per_s']:.0f} GB/s{share}"
            else:
                throughput = "-"
            tokens = f"{info['tokens_per_s']:,.0f}" if "tokens_per_s" in info else "-"
            lines.append(f"| {provider} | {b['stats']['median'] * 1e3:.3f} | {_ratio(eager, b['stats']['median'])} | "
                         f"{_ratio(min(others) if others else None, b['stats']['median'])} | {throughput} | {tokens} | "
                         f"{info.get('peak_memory_mib', '-')} | {info.get('resident_memory_mib', '-')} |")
        lines.append("")
    return "\n".join(lines)


def merge(runs: list[dict]) -> dict:
    """Several pytest-benchmark JSON files of one session (one per group) as one: the first file's metadata, every
    file's benchmarks."""
    return {**runs[0], "benchmarks": [b for run in runs for b in run.get("benchmarks", [])]}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m bench.report RESULTS.json [MORE.json ...] > RESULTS.md", file=sys.stderr)
        raise SystemExit(2)
    runs = []
    for path in argv:
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            raise SystemExit(2)
    print(render(merge(runs)))


if __name__ == "__main__":
    main()
