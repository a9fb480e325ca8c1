"""Attention tile tuning: candidates pruned on the CPU by their compiled code, then timed in one GPU command.

    python -m bench.tune_attention prune [--arch 90] [--keep 6]        # CPU, no GPU: the candidate list
    python -m bench.tune_attention time --out DIR [--budget-s 420]     # GPU: one sweep, results written as it goes
    python -m bench.tune_attention time --out DIR --rehearse           # CPU rehearsal (interpreter, tiny shapes)

prune: for each tuned kernel (forward, dK/dV, dQ) at head dims 64 and 128, every (BLOCK_M, BLOCK_N, warps, stages)
of a small grid is compiled ahead of time for sm_<arch> from the launch GPT-2 really makes (bench/static_counts.py
records it on meta tensors, with the launcher's specialisation; on sm_90 the forward's TMA descriptors are rebuilt
for each tile). Configurations that fail to compile, spill, or do not fit in shared memory are dropped; the rest
are ranked by static warp-instructions per 1K scores in the main loop (a proxy: it ignores latency hiding, which
is what the clock decides), and the best `--keep` plus the current table entry are written to
bench/results/attention-candidates-sm<arch>-triton<version>.json. Compile with the GPU machine's triton version.

time: on the GPU, bf16 (fp16 in the CPU rehearsal), causal, GPT-2's call layout (q, k, v strided views of a fused (B, T, 3, H, D) projection),
B*T = 16384 tokens: D=64 (H=12) at T = 1024..8192 and D=128 (H=16) at T = 1024, 4096. For each candidate the
kernel's table entry in kernels/flash_attention.py is swapped in-process; the forward candidates are timed on the
forward, the dK/dV and dQ candidates on forward + backward (the other kernels at their current entries). Each
candidate is first checked for accuracy at one shape against fp32 SDPA in bf16 and fp16 (error at most 2x SDPA's
in the same dtype, + 1e-3), and baselines are SDPA's flash, cuDNN and efficient backends on the same tensors, in the same process.
Timing: triton.testing.do_bench (median of the repetitions, L2 cleared between them outside the timed region).
Every measurement is appended to DIR/attention-tuning.jsonl at once; DIR/attention-tuning.md at the end holds the
table (TFLOP/s, fraction of the dense bf16 peak, ratio to SDPA's best) and the winners per (kernel, D) as table
entries to paste into _CONFIGS_16BIT. A budget stops the sweep cleanly (what was measured stays).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUNED = {"fwd": "_attn_fwd_kernel", "dkdv": "_attn_bwd_dkdv_kernel", "dq": "_attn_bwd_dq_kernel"}
GRID = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages) tried per kernel; the dK/dV kernel's BLOCK_M is its query step
    "fwd": list(itertools.product((64, 128), (64, 128), (4, 8), (2, 3))),
    "dkdv": list(itertools.product((32, 64), (64, 128), (4, 8), (2, 3))),
    "dq": list(itertools.product((64, 128), (32, 64), (4, 8), (2, 3))),
}
HEAD_DIMS = (64, 128)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DENSE_BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense, no sparsity (vendor data sheets)


def candidates_path(arch: int, version: str) -> Path:
    return ROOT / "bench" / "results" / f"attention-candidates-sm{arch}-triton{version}.json"


# -----------------------------------------------------------------------------------------------------------------
# prune (CPU)

def _with_tile(launch, tile: tuple[int, int, int, int]):
    """A copy of a recorded launch compiled at another tile; TMA descriptors get the matching block shapes."""
    block_m, block_n, warps, stages = tile
    new = copy.deepcopy(launch)
    new.kwargs.update(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    for index, rows in ((0, block_m), (1, block_n), (2, block_n)):  # q, k, v come first in the forward
        arg = new.args[index]
        if isinstance(arg, tuple) and arg and arg[0] == "desc":
            block = list(arg[4])
            block[-2] = rows
            new.args[index] = (*arg[:4], block)
    new.case += " [{}x{} w{} s{}]".format(*tile)
    return new


def prune(arch: int, keep: int, workers: int) -> dict:
    import triton

    import kernels.flash_attention as attn
    from bench import static_counts as sc

    jobs, meta = [], []
    for head_dim in HEAD_DIMS:
        launches, _ = sc.record_launches(arch, only=f"^attention D={head_dim}$")
        current_table = attn._CONFIGS_16BIT[arch]
        for short, name in TUNED.items():
            launch = next(l for l in launches if l.name == name)
            current = tuple(current_table[(short, head_dim)])
            for tile in dict.fromkeys([current, *GRID[short]]):
                jobs.append((_with_tile(launch, tile), arch))
                meta.append(dict(kernel=short, head_dim=head_dim, tile=list(tile), current=tile == current))
    print(f"compiling {len(jobs)} configurations for sm_{arch} with triton {triton.__version__}", file=sys.stderr)
    with ProcessPoolExecutor(workers) as pool:
        records = list(pool.map(sc.compile_launch, jobs))
    result = dict(arch=arch, triton=triton.__version__, source=sc._source_version(), keep=keep, kernels={})
    for m, r in zip(meta, records):
        block_m, block_n = m["tile"][:2]
        entry = dict(tile=m["tile"], current=m["current"], ok=r["ok"])
        if r["ok"]:
            entry.update(registers=r["registers"], stack=r["stack"], shared=r["shared"],
                         per_1k_scores=round(r["instructions"] * r["num_warps"] / (block_m * block_n / 1024), 1),
                         **sc.occupancy(r))
            entry["fits"] = r["stack"] == 0 and r["shared"] <= SHARED_LIMIT[arch]
        else:
            entry.update(fits=False, error=r["error"].splitlines()[0][:200])
        result["kernels"].setdefault(f"{m['kernel']} D={m['head_dim']}", []).append(entry)
    for key, entries in result["kernels"].items():
        fitting = sorted((e for e in entries if e["fits"]), key=lambda e: e["per_1k_scores"])
        chosen = fitting[:keep] + [e for e in entries if e["current"] and e not in fitting[:keep]]
        for e in entries:
            e["candidate"] = any(e is c for c in chosen)
    return result


# -----------------------------------------------------------------------------------------------------------------
# time (GPU; or a CPU rehearsal of every code path)

def _shapes(rehearse: bool) -> list[dict]:
    if rehearse:
        return [dict(B=1, H=2, T=64, D=64), dict(B=1, H=2, T=64, D=128)]
    tokens = 16384
    return ([dict(B=tokens // T, H=12, T=T, D=64) for T in (1024, 2048, 4096, 8192)]
            + [dict(B=tokens // T, H=16, T=T, D=128) for T in (1024, 4096)])


def _flops(shape: dict, backward: bool) -> float:
    B, H, T, D = shape["B"], shape["H"], shape["T"], shape["D"]
    forward = 4 * B * H * T * T * D / 2  # two matmuls, causal: half the scores
    return forward * (3.5 if backward else 1.0)  # forward + backward (five matmuls): 3.5x the forward's


class Timer:
    def __init__(self, rehearse: bool):
        self.rehearse = rehearse

    def __call__(self, fn) -> float:
        """Milliseconds per call: the median of do_bench on a GPU; one timed call in the rehearsal."""
        if self.rehearse:
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def _inputs(shape: dict, device: str, dtype):
    import torch

    B, H, T, D = shape["B"], shape["H"], shape["T"], shape["D"]
    g = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(B, T, 3, H, D, generator=g).to(device, dtype).requires_grad_()
    dout = torch.randn(B, H, T, D, generator=g).to(device, dtype)
    return qkv, dout


def _split(qkv):
    return [t.transpose(1, 2) for t in qkv.unbind(2)]


def _run(provider: str, qkv, dout, backward: bool):
    """A closure running one provider's forward (and backward) on the fused projection's views."""
    import torch
    import torch.nn.functional as F

    import kernels

    def ours():
        return kernels.attention(*_split(qkv), causal=True)

    def sdpa(backend):
        from torch.nn.attention import sdpa_kernel

        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(*_split(qkv), is_causal=True)
        return run

    from torch.nn.attention import SDPBackend
    forward = ours if provider == "fastlm" else sdpa(getattr(SDPBackend, provider))

    def step():
        qkv.grad = None
        out = forward()
        if backward:
            torch.autograd.grad(out, qkv, dout)
        return out
    return step


def _accuracy(shape: dict, device: str, dtype) -> tuple[float, float, float]:
    """(our max error, SDPA's max error in the same dtype, tolerance) of the output and qkv's gradient against fp32
    SDPA."""
    import torch
    import torch.nn.functional as F

    import kernels

    qkv, dout = _inputs(shape, device, dtype)
    ref_qkv = qkv.detach().float().requires_grad_()
    ref = F.scaled_dot_product_attention(*_split(ref_qkv), is_causal=True)
    ref_grad, = torch.autograd.grad(ref, ref_qkv, dout.float())

    def error(fn):
        out = fn(*_split(qkv))
        grad, = torch.autograd.grad(out, qkv, dout)
        return max((out.float() - ref).abs().max().item(), (grad.float() - ref_grad).abs().max().item())

    ours = error(lambda q, k, v: kernels.attention(q, k, v, causal=True))
    theirs = error(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    return ours, theirs, 2 * theirs + 1e-3


def time_sweep(out_dir: Path, budget_s: float, rehearse: bool, candidates_file: Path | None) -> None:
    import torch
    import triton

    import kernels.flash_attention as attn

    start = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "attention-tuning.jsonl"
    log_path.write_text("")  # one sweep per file: a rerun into the same directory starts it afresh
    device = "cpu" if rehearse else "cuda"
    if not rehearse and not torch.cuda.is_available():
        raise SystemExit("tune_attention time: no CUDA device (use --rehearse on a CPU)")
    arch = attn.device_capability(torch.device(device))
    path = candidates_file or candidates_path(90 if rehearse else arch, triton.__version__)
    if rehearse and not path.is_file():  # any committed list exercises the code paths
        path = next(iter(sorted(path.parent.glob("attention-candidates-sm90-*.json"))), path)
    if not path.is_file():
        raise SystemExit(f"tune_attention time: {path}: no candidate list; run `python -m bench.tune_attention prune "
                         f"--arch {90 if rehearse else arch}` with this triton version first")
    listing = json.loads(path.read_text())
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu (rehearsal)"
    peak = next((v for k, v in DENSE_BF16_PEAK_TFLOPS.items() if k in gpu), None)
    timer = Timer(rehearse)
    # bf16 is timed; accuracy is checked in bf16 and fp16. The interpreter's bf16 tl.dot is wrong (shared/NOTES.md),
    # so the rehearsal runs fp16 throughout.
    dtype = torch.float16 if rehearse else torch.bfloat16
    check_dtypes = (torch.float16,) if rehearse else (torch.bfloat16, torch.float16)
    rows: list[dict] = []

    def record(**row):
        row.update(device=gpu, torch=torch.__version__, triton=triton.__version__, elapsed_s=round(time.monotonic() - start, 1))
        rows.append(row)
        with log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def out_of_time() -> bool:
        return time.monotonic() - start > budget_s

    shapes = _shapes(rehearse)
    for shape in shapes:  # baselines first: they anchor every ratio
        for backward in (False, True):
            qkv, dout = _inputs(shape, device, dtype)
            for provider in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "fastlm"):
                try:
                    ms = timer(_run(provider, qkv, dout, backward))
                except RuntimeError as e:  # a backend this device or build lacks
                    record(kind="baseline", provider=provider, backward=backward, **shape, error=str(e).splitlines()[0][:200])
                    continue
                record(kind="baseline", provider=provider, backward=backward, **shape, ms=ms,
                       tflops=_flops(shape, backward) / ms / 1e9)
    table = attn._CONFIGS_16BIT[arch]
    for key, entries in listing["kernels"].items():
        short, head_dim = key.split(" D=")[0], int(key.split(" D=")[1])
        entries = [e for e in entries if e["candidate"]][: 1 if rehearse else None]
        original = table[(short, head_dim)]
        try:
            for entry in entries:
                if out_of_time():
                    record(kind="stopped", reason=f"budget of {budget_s} s reached before {key} {entry['tile']}")
                    return _summarise(rows, out_dir, peak)
                table[(short, head_dim)] = tuple(entry["tile"])
                mine = [s for s in shapes if s["D"] == head_dim]
                try:
                    errors = {str(d).removeprefix("torch."): _accuracy(mine[0], device, d) for d in check_dtypes}
                except Exception as e:  # noqa: BLE001 - a candidate that fails at run time is a result, not a crash
                    record(kind="candidate", kernel=short, head_dim=head_dim, tile=entry["tile"], error=f"{type(e).__name__}: {e}"[:300])
                    continue
                accurate = all(ours <= tolerance for ours, _, tolerance in errors.values())
                for shape in mine:
                    qkv, dout = _inputs(shape, device, dtype)
                    backward = short != "fwd"
                    ms = timer(_run("fastlm", qkv, dout, backward))
                    record(kind="candidate", kernel=short, head_dim=head_dim, tile=entry["tile"], current=entry["current"],
                           static_per_1k_scores=entry["per_1k_scores"], accurate=accurate,
                           errors={d: dict(ours=e[0], sdpa=e[1]) for d, e in errors.items()}, backward=backward, **shape, ms=ms,
                           tflops=_flops(shape, backward) / ms / 1e9)
        finally:
            table[(short, head_dim)] = original
    record(kind="done")
    _summarise(rows, out_dir, peak)


def _summarise(rows: list[dict], out_dir: Path, peak: float | None) -> None:
    """The markdown table: baselines per shape, then each kernel's candidates (total time over the shapes), and the
    winners as table entries."""
    baselines = [r for r in rows if r.get("kind") == "baseline" and "ms" in r]
    shape_key = lambda r: (r["D"], r["T"], r["B"], r["H"], r["backward"])
    best_sdpa = {}
    for r in baselines:
        if r["provider"] != "fastlm":
            k = shape_key(r)
            best_sdpa[k] = min(best_sdpa.get(k, math.inf), r["ms"])
    device = rows[0]["device"] if rows else "?"
    lines = [f"# Attention tuning sweep on {device}", "",
             f"torch {rows[0]['torch'] if rows else '?'}, triton {rows[0]['triton'] if rows else '?'}; bf16, causal, "
             "GPT-2's strided qkv views, B*T = 16384 tokens. Timed with triton.testing.do_bench (median).", "",
             "| provider | D | T | B | pass | ms | TFLOP/s | of peak | vs best SDPA |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in baselines:
        ratio = best_sdpa.get(shape_key(r), math.nan) / r["ms"]
        of_peak = f"{r['tflops'] / peak:.0%}" if peak else "?"
        lines.append(f"| {r['provider']} | {r['D']} | {r['T']} | {r['B']} | {'fwd+bwd' if r['backward'] else 'fwd'} | "
                     f"{r['ms']:.3f} | {r['tflops']:.0f} | {of_peak} | {ratio:.2f}x |")
    lines += ["", "| kernel | D | tile (BM, BN, warps, stages) | static /1K | accurate | total ms over shapes | vs current |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    winners = {}
    totals: dict[tuple, dict] = {}
    for r in rows:
        if r.get("kind") == "candidate" and "ms" in r:
            t = totals.setdefault((r["kernel"], r["D"], tuple(r["tile"])), dict(ms=0.0, n=0, row=r))
            t["ms"] += r["ms"]
            t["n"] += 1
    for (kernel, D, tile), t in sorted(totals.items()):
        current = next((v["ms"] for (k2, d2, _), v in totals.items() if k2 == kernel and d2 == D and v["row"]["current"]), math.nan)
        lines.append(f"| {kernel} | {D} | {tile} | {t['row']['static_per_1k_scores']} | {t['row']['accurate']} | "
                     f"{t['ms']:.3f} ({t['n']} shapes) | {current / t['ms']:.2f}x |")
        if t["row"]["accurate"] and t["ms"] < winners.get((kernel, D), (math.inf,))[0]:
            winners[(kernel, D)] = (t["ms"], tile)
    lines += ["", "Winners (table entries for kernels/flash_attention.py `_CONFIGS_16BIT`):", ""]
    lines += [f"- (\"{k}\", {d}): {tile}" for (k, d), (_, tile) in sorted(winners.items())]
    (out_dir / "attention-tuning.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune", help="CPU: compile the tile grid, keep the best by static count")
    p.add_argument("--arch", type=int, choices=(80, 90), default=90)
    p.add_argument("--keep", type=int, default=6, help="candidates kept per kernel and head dim (plus the current)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--out", help="default: bench/results/attention-candidates-sm<arch>-triton<version>.json")
    t = sub.add_parser("time", help="GPU: time the candidates and SDPA's backends")
    t.add_argument("--out", required=True, help="a directory for attention-tuning.jsonl / .md")
    t.add_argument("--budget-s", type=float, default=420.0, help="stop starting new candidates after this (default 420)")
    t.add_argument("--candidates", help="a prune result (default: the committed one for this GPU and triton)")
    t.add_argument("--rehearse", action="store_true", help="on the CPU under the interpreter, tiny shapes, one candidate each")
    args = parser.parse_args(argv)
    if args.command == "prune":
        if os.environ.get("TRITON_INTERPRET", "0") != "0":
            parser.error("prune compiles for a GPU: unset TRITON_INTERPRET")
        import triton

        result = prune(args.arch, args.keep, args.workers)
        path = Path(args.out) if args.out else candidates_path(args.arch, triton.__version__)
        from fastlm.files import atomic_write_text

        atomic_write_text(path, json.dumps(result, indent=1) + "\n")  # a killed prune leaves the old list whole
        kept = {k: [e["tile"] for e in v if e["candidate"]] for k, v in result["kernels"].items()}
        print(f"wrote {path}: " + "; ".join(f"{k}: {len(v)}" for k, v in kept.items()), file=sys.stderr)
    else:
        if args.rehearse:
            os.environ.setdefault("TRITON_INTERPRET", "1")
            if "kernels" in sys.modules:
                parser.error("--rehearse must set TRITON_INTERPRET before kernels is imported")
        time_sweep(Path(args.out), args.budget_s, args.rehearse, Path(args.candidates) if args.candidates else None)


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    main()
