"""Compile every Triton kernel, in every configuration its launcher can pick, ahead of time for a GPU target.

Needs no GPU: `python -m tests.kernels.aot_compile FAMILY ARCH` (TRITON_INTERPRET unset) prints one JSON line
per compiled kernel with its shared memory, or the compiler's error. test_aot_compile.py runs it in a
subprocess, because the interpreter replaces the kernels in the test process itself.
"""
from __future__ import annotations

import importlib
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels.flash_attention as attn
import kernels.norms as ln
import kernels.softmax_cross_entropy as ce

DTYPES = ["fp32", "fp16", "bf16"]
DATA = "data"  # a pointer to the op's input dtype
FLOAT_ARGS = {"eps", "label_smoothing", "z_loss", "scale", "drop_scale"}
# Specialisation as Triton's launcher does it for contiguous inputs: a stride of 1 becomes a constant, and
# pointers (and, for attention, row strides: multiples of D) are known to be 16-aligned.
UNIT_STRIDES = {"stride_xn", "stride_rn", "stride_dyn", "stride_lv", "stride_dv", "stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_dod",
                "stride_dkd", "stride_dqd"}
ALIGNED_INTS = {"stride_qb", "stride_qh", "stride_qt", "stride_kb", "stride_kh", "stride_ks", "stride_vb", "stride_vh",
                "stride_vs", "stride_ob", "stride_oh", "stride_ot", "stride_dob", "stride_doh", "stride_dot",
                "stride_dkb", "stride_dkh", "stride_dks", "stride_dqb", "stride_dqh", "stride_dqt"}
POINTERS = {
    "_norm_fwd_kernel": dict(X=DATA, R=DATA, Y=DATA, H=DATA, W=DATA, B=DATA, Mean="*fp32", Rstd="*fp32"),
    "_norm_bwd_kernel": dict(DY=DATA, X=DATA, W=DATA, Mean="*fp32", Rstd="*fp32", DH=DATA, DX=DATA, DX2=DATA,
                             DW_partial="*fp32", DB_partial="*fp32"),
    "_cross_entropy_fwd_kernel": dict(Logits=DATA, Target="*i64", Loss="*fp32", Lse="*fp32"),
    "_cross_entropy_bwd_kernel": dict(DLogits=DATA, Logits=DATA, Target="*i64", Lse="*fp32", DLoss="*fp32"),
    "_attn_fwd_kernel": dict(Q=DATA, K=DATA, V=DATA, O=DATA, Lse="*fp32", CuSeqlensQ="*i32", CuSeqlensK="*i32", Seed="*i64"),
    "_attn_bwd_preprocess_kernel": dict(O=DATA, DO=DATA, Delta="*fp32", CuSeqlensQ="*i32"),
    "_attn_bwd_dkdv_kernel": dict(Q=DATA, K=DATA, V=DATA, DO=DATA, Lse="*fp32", Delta="*fp32", DK=DATA, DV=DATA,
                                  CuSeqlensQ="*i32", CuSeqlensK="*i32", Seed="*i64"),
    "_attn_bwd_dq_kernel": dict(Q=DATA, K=DATA, V=DATA, DO=DATA, Lse="*fp32", Delta="*fp32", DQ=DATA,
                                CuSeqlensQ="*i32", CuSeqlensK="*i32", Seed="*i64"),
    "_dropout_mask_kernel": dict(Mask="*i8", Seed="*i64"),
}
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def norm_specs():
    """Every width class the launcher distinguishes, for LayerNorm, RMSNorm and no-affine, in each dtype; and the
    fused residual add as GPT-2 runs it under autocast (a 16-bit branch and output, an fp32 stream and sum), at the
    width classes of GPT-2's sizes and a streaming one."""
    widths = [2**k for k in range(15)] + [ln.MAX_FUSED_N["forward"] + 1]
    affine = [dict(IS_RMS=False, HAS_WEIGHT=True), dict(IS_RMS=True, HAS_WEIGHT=True), dict(IS_RMS=False, HAS_WEIGHT=False)]
    forward = [{**a, "HAS_BIAS": a["HAS_WEIGHT"] and not a["IS_RMS"], "HAS_RESIDUAL": False, "CAST_BEFORE_WEIGHT": False,
                "COL_INT64": False} for a in affine]
    backward = [{**a, "COMPUTE_DW": a["HAS_WEIGHT"], "COMPUTE_DB": a["HAS_WEIGHT"] and not a["IS_RMS"],
                 "HAS_DH": False, "STORE_DX2": False, "CAST_BEFORE_WEIGHT": False, "COL_INT64": False} for a in affine]
    mixed_fwd = dict(IS_RMS=False, HAS_WEIGHT=True, HAS_BIAS=True, HAS_RESIDUAL=True, CAST_BEFORE_WEIGHT=False,
                     COL_INT64=False, _pointers=dict(R="*fp32", H="*fp32"))
    mixed_bwd = dict(IS_RMS=False, HAS_WEIGHT=True, COMPUTE_DW=True, COMPUTE_DB=True, HAS_DH=True, STORE_DX2=True,
                     CAST_BEFORE_WEIGHT=False, COL_INT64=False,
                     _pointers=dict(DY="*{dtype}", X="*fp32", DH="*fp32", DX="*fp32", DX2="*{dtype}"))
    # Llama's RMSNorm (cast_before_weight): a 16-bit model, and 16-bit activations with an fp32 weight (fp32 output).
    llama_fwd = dict(IS_RMS=True, HAS_WEIGHT=True, HAS_BIAS=False, HAS_RESIDUAL=False, CAST_BEFORE_WEIGHT=True,
                     COL_INT64=False)
    llama_bwd = dict(IS_RMS=True, HAS_WEIGHT=True, COMPUTE_DW=True, COMPUTE_DB=False, HAS_DH=False, STORE_DX2=False,
                     CAST_BEFORE_WEIGHT=True, COL_INT64=False)
    llama_fp32_weight = {"_norm_fwd_kernel": dict(W="*fp32", Y="*fp32"), "_norm_bwd_kernel": dict(W="*fp32", DY="*fp32")}
    for kernel, backward_pass, flags, mixed, llama in [(ln._norm_fwd_kernel, False, forward, mixed_fwd, llama_fwd),
                                                       (ln._norm_bwd_kernel, True, backward, mixed_bwd, llama_bwd)]:
        configs = {tuple(sorted(ln.launch_config(n, backward_pass).items())) for n in widths}
        for cfg, flag, dtype in itertools.product(sorted(configs), flags, DTYPES):
            yield kernel, dtype, {**dict(cfg), **flag}
        gpt2 = {tuple(sorted(ln.launch_config(n, backward_pass).items())) for n in (768, 1024, 1600, 4096, 16385)}
        for cfg, dtype in itertools.product(sorted(gpt2), ["fp16", "bf16"]):
            yield kernel, dtype, {**dict(cfg), **mixed, "_pointers": dict(mixed["_pointers"])}
        llama_widths = {tuple(sorted(ln.launch_config(n, backward_pass).items())) for n in (2048, 4096, 8192, 16385)}
        for cfg in sorted(llama_widths):
            yield kernel, "bf16", {**dict(cfg), **llama}
            yield kernel, "fp16", {**dict(cfg), **llama, "_pointers": dict(llama_fp32_weight[kernel.__name__])}
        # int64 column offsets (a column stride past 2^31 / N), with strided columns, at a narrow, a wide and a
        # streaming width
        for n, dtype in itertools.product((768, 4096, 16385), ("bf16", "fp32")):
            yield kernel, dtype, {**ln.launch_config(n, backward_pass), **flags[0], "COL_INT64": True,
                                  "_strided": ["stride_dyn", "stride_xn"] if backward_pass else ["stride_xn", "stride_rn"]}


def cross_entropy_specs():
    """Every block class, with rows 16-byte aligned (row strides divisible by 16: vector loads, the fused head's
    padded buffer) and not (scalar loads, e.g. V = 50257 contiguous); the int64 column offsets at GPT-2's config."""
    vocabs = [2**k for k in range(14)] + [ce.BLOCK_V + 1]
    configs = {tuple(sorted(ce.launch_config(v).items())) for v in vocabs}
    aligned_rows = {"_cross_entropy_fwd_kernel": ["stride_lm"], "_cross_entropy_bwd_kernel": ["stride_lm", "stride_dm"]}
    for cfg, dtype, aligned in itertools.product(sorted(configs), DTYPES, (True, False)):
        flags = {**dict(cfg), "ALIGNED": aligned, "COL_INT64": False}
        for kernel in (ce._cross_entropy_fwd_kernel, ce._cross_entropy_bwd_kernel):
            spec = {**flags, "_divisible": aligned_rows[kernel.__name__] if aligned else []}
            for smoothing in ((False, True) if kernel is ce._cross_entropy_fwd_kernel else (None,)):
                yield kernel, dtype, spec if smoothing is None else {**spec, "HAS_SMOOTHING": smoothing}
    gpt2 = {**ce.launch_config(50257), "ALIGNED": False, "COL_INT64": True, "_strided": ["stride_lv", "stride_dv"]}
    for dtype in ("bf16", "fp32"):
        yield ce._cross_entropy_fwd_kernel, dtype, {**gpt2, "HAS_SMOOTHING": True, "_strided": ["stride_lv"]}
        yield ce._cross_entropy_bwd_kernel, dtype, {**gpt2, "_strided": list(gpt2["_strided"])}


def attention_specs(arch: int):
    """Every tile configuration the launcher picks on sm_<arch> (tile tables are per architecture, and some tiles
    differ with dropout or without TMA): each head-dim class (powers of two and a padded one) for all four kernels,
    in bf16 and fp32 (their tables differ; fp32 at one head dim per tile class and the padded one; fp16 shares
    bf16's and is compiled at GPT-2's head dim, plain and with dropout). Causal, dropout, variable length, int64
    offsets and grouped-query heads add code: a bf16 configuration compiles four flag sets
    that between them take every flag both ways and are the calls that matter: GPT-2's plain causal call; causal
    varlen with GQA (packed fine-tuning); the same with dropout; non-causal dense with dropout, GQA and int64
    offsets. fp32 (slow to compile: FMA loops) compiles one of the four per head dim, in turn. On sm_90 the
    forward reads through TMA descriptors where the launcher does (16-bit, power-of-two head dims; (B, H, rows, D)
    dense, (total, H, D) varlen), and its pointer fallback compiles at GPT-2's head dims, plain and with dropout;
    the test-only dropout mask kernel compiles once."""
    import torch

    kernels = {"fwd": attn._attn_fwd_kernel, "preprocess": attn._attn_bwd_preprocess_kernel,
               "dkdv": attn._attn_bwd_dkdv_kernel, "dq": attn._attn_bwd_dq_kernel}
    flag_sets = [dict(CAUSAL=True, DROPOUT=False, IS_VARLEN=False, INT64=False, GQA=False),
                 dict(CAUSAL=True, DROPOUT=False, IS_VARLEN=True, INT64=False, GQA=True),
                 dict(CAUSAL=True, DROPOUT=True, IS_VARLEN=True, INT64=False, GQA=False),
                 dict(CAUSAL=False, DROPOUT=True, IS_VARLEN=False, INT64=True, GQA=True)]
    cases = [*itertools.product([16, 32, 64, 80, 128, 256], ["bf16"]), *((d, "fp32") for d in (16, 64, 80, 128, 256)),
             (64, "fp16")]
    for i, (head_dim, dtype) in enumerate(cases):
        torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
        tma = arch >= 90 and dtype != "fp32" and head_dim & (head_dim - 1) == 0
        variants = {"bf16": flag_sets, "fp16": flag_sets[::2], "fp32": [flag_sets[i % len(flag_sets)]]}[dtype]
        for name, kernel in kernels.items():
            if name == "preprocess":
                varlen = i % 2 == 1
                cfg = {**attn.launch_config(name, head_dim, torch_dtype, arch), "HEAD_DIM": head_dim}
                yield kernel, dtype, {**cfg, "IS_VARLEN": varlen, **({} if varlen else {"CuSeqlensQ": None})}
                continue
            fallback = [dict(f, USE_TMA=False) for f in flag_sets[::2]] if name == "fwd" and tma and dtype == "bf16" and head_dim in (64, 128) else []
            for flags in variants + fallback:
                use_tma = flags.get("USE_TMA", tma) if name == "fwd" else False
                cfg = {**attn.launch_config(name, head_dim, torch_dtype, arch, flags["DROPOUT"], use_tma), "HEAD_DIM": head_dim}
                spec = {**cfg, **flags, "DOT_PRECISION": attn._dot_precision(torch_dtype)}
                if name != "dkdv":
                    del spec["GQA"]
                if not spec["IS_VARLEN"]:
                    spec.update(CuSeqlensQ=None, CuSeqlensK=None)
                if not spec["DROPOUT"]:
                    spec["Seed"] = None
                if name == "fwd":
                    spec["USE_TMA"] = use_tma
                    if use_tma:  # descriptors as attn.descriptor builds them: (B, H, rows, D) or varlen (total, H, D)
                        block = lambda rows: f"[{rows}, 1, {cfg['BLOCK_D']}]" if spec["IS_VARLEN"] else f"[1, 1, {rows}, {cfg['BLOCK_D']}]"
                        rows = dict(Q=cfg["BLOCK_M"], K=cfg["BLOCK_N"], V=cfg["BLOCK_N"])
                        spec["_pointers"] = {t: f"tensordesc<{{dtype}}{block(n)}>" for t, n in rows.items()}
                yield kernel, dtype, spec
    yield attn._dropout_mask_kernel, "fp32", dict(BLOCK_M=32, BLOCK_N=32)


FAMILIES = {"layer_norm": norm_specs, "cross_entropy": cross_entropy_specs, "attention": attention_specs}


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and stack bytes (spills) of a compiled kernel, from cuobjdump in Triton's wheel."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK):(\d+)", out))
    return dict(registers=int(usage["REG"]), stack=int(usage["STACK"]))


def compile_one(job):
    module, name, dtype, cfg, arch = job
    kernel = getattr(importlib.import_module(module), name)
    options = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    overrides = {k: v.format(dtype=dtype) for k, v in cfg.pop("_pointers", {}).items()}  # pointers of another dtype
    divisible = set(cfg.pop("_divisible", ()))  # ints this config has divisible by 16 (aligned rows)
    strided = set(cfg.pop("_strided", ()))      # column strides this config leaves as runtime ints (not 1)
    record = dict(kernel=kernel.__name__, dtype=dtype, arch=arch, **cfg, **options, **({"pointers": overrides} if overrides else {}))
    pointers = {**POINTERS[kernel.__name__], **overrides}
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in UNIT_STRIDES and name not in strided:
            cfg[name] = 1
        if name in cfg:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = f"*{dtype}" if pointers[name] == DATA else pointers[name]
            if not signature[name].startswith("tensordesc"):  # a host tensor descriptor takes no alignment attribute
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
            if name in ALIGNED_INTS or name in divisible:
                attrs[(index,)] = [["tt.divisibility", 16]]
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=cfg, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
        record.update(shared=compiled.metadata.shared, **resource_usage(compiled.asm["cubin"]), ok=True)
    except Exception as e:  # reported, and failed, by the test
        record.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
    return record


def main(family: str, arch: int, workers: int = 2) -> None:
    # Kernels travel to the worker processes by name: the JIT wrappers do not pickle.
    specs = FAMILIES[family]
    specs = specs(arch) if "arch" in inspect.signature(specs).parameters else specs()  # per-architecture tile tables
    jobs = [(k.fn.__module__, k.__name__, dtype, dict(cfg), arch) for k, dtype, cfg in specs]
    with ProcessPoolExecutor(workers) as pool:
        for record in pool.map(compile_one, jobs):
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
