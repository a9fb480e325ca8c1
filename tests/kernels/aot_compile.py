"""Compile every Triton kernel, in every configuration its launcher can pick, ahead of time for a GPU target.

Needs no GPU: `python -m tests.kernels.aot_compile FAMILY ARCH` (TRITON_INTERPRET unset) prints one JSON line
per compiled kernel with its shared memory, or the compiler's error. test_aot_compile.py runs it in a
subprocess, because the interpreter replaces the kernels in the test process itself.
"""
from __future__ import annotations

import importlib
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
FLOAT_ARGS = {"eps", "label_smoothing", "z_loss"}
# Specialisation as Triton's launcher does it for contiguous inputs: a stride of 1 becomes a constant, and
# pointers (and, for attention, row strides: multiples of D) are known to be 16-aligned.
UNIT_STRIDES = {"stride_xn", "stride_rn", "stride_dyn", "stride_lv", "stride_dv", "stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_dod"}
ALIGNED_INTS = {"stride_qb", "stride_qh", "stride_qt", "stride_kb", "stride_kh", "stride_ks", "stride_vb", "stride_vh",
                "stride_vs", "stride_ob", "stride_oh", "stride_ot", "stride_dob", "stride_doh", "stride_dot"}
POINTERS = {
    "_norm_fwd_kernel": dict(X=DATA, R=DATA, Y=DATA, H=DATA, W=DATA, B=DATA, Mean="*fp32", Rstd="*fp32"),
    "_norm_bwd_kernel": dict(DY=DATA, X=DATA, W=DATA, Mean="*fp32", Rstd="*fp32", DH=DATA, DX=DATA, DX2=DATA,
                             DW_partial="*fp32", DB_partial="*fp32"),
    "_cross_entropy_fwd_kernel": dict(Logits=DATA, Target="*i64", Loss="*fp32", Lse="*fp32"),
    "_cross_entropy_bwd_kernel": dict(DLogits=DATA, Logits=DATA, Target="*i64", Lse="*fp32", DLoss="*fp32"),
    "_attn_fwd_kernel": dict(Q=DATA, K=DATA, V=DATA, O=DATA, Lse="*fp32"),
    "_attn_bwd_preprocess_kernel": dict(O=DATA, DO=DATA, Delta="*fp32"),
    "_attn_bwd_dkdv_kernel": dict(Q=DATA, K=DATA, V=DATA, DO=DATA, Lse="*fp32", Delta="*fp32", DK=DATA, DV=DATA),
    "_attn_bwd_dq_kernel": dict(Q=DATA, K=DATA, V=DATA, DO=DATA, Lse="*fp32", Delta="*fp32", DQ=DATA),
}
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def norm_specs():
    """Every width class the launcher distinguishes, for LayerNorm, RMSNorm and no-affine, in each dtype; and the
    fused residual add as GPT-2 runs it under autocast (a 16-bit branch and output, an fp32 stream and sum), at the
    width classes of GPT-2's sizes and a streaming one."""
    widths = [2**k for k in range(15)] + [ln.MAX_FUSED_N["forward"] + 1]
    affine = [dict(IS_RMS=False, HAS_WEIGHT=True), dict(IS_RMS=True, HAS_WEIGHT=True), dict(IS_RMS=False, HAS_WEIGHT=False)]
    forward = [{**a, "HAS_BIAS": a["HAS_WEIGHT"] and not a["IS_RMS"], "HAS_RESIDUAL": False, "CAST_BEFORE_WEIGHT": False}
               for a in affine]
    backward = [{**a, "COMPUTE_DW": a["HAS_WEIGHT"], "COMPUTE_DB": a["HAS_WEIGHT"] and not a["IS_RMS"],
                 "HAS_DH": False, "STORE_DX2": False, "CAST_BEFORE_WEIGHT": False} for a in affine]
    mixed_fwd = dict(IS_RMS=False, HAS_WEIGHT=True, HAS_BIAS=True, HAS_RESIDUAL=True, CAST_BEFORE_WEIGHT=False,
                     _pointers=dict(R="*fp32", H="*fp32"))
    mixed_bwd = dict(IS_RMS=False, HAS_WEIGHT=True, COMPUTE_DW=True, COMPUTE_DB=True, HAS_DH=True, STORE_DX2=True,
                     CAST_BEFORE_WEIGHT=False, _pointers=dict(DY="*{dtype}", X="*fp32", DH="*fp32", DX="*fp32", DX2="*{dtype}"))
    # Llama's RMSNorm (cast_before_weight): a 16-bit model, and 16-bit activations with an fp32 weight (fp32 output).
    llama_fwd = dict(IS_RMS=True, HAS_WEIGHT=True, HAS_BIAS=False, HAS_RESIDUAL=False, CAST_BEFORE_WEIGHT=True)
    llama_bwd = dict(IS_RMS=True, HAS_WEIGHT=True, COMPUTE_DW=True, COMPUTE_DB=False, HAS_DH=False, STORE_DX2=False,
                     CAST_BEFORE_WEIGHT=True)
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


def cross_entropy_specs():
    vocabs = [2**k for k in range(14)] + [ce.MAX_BLOCK_V + 1]
    configs = {tuple(sorted(ce.launch_config(v).items())) for v in vocabs}
    for cfg, dtype in itertools.product(sorted(configs), DTYPES):
        for smoothing in (False, True):
            yield ce._cross_entropy_fwd_kernel, dtype, {**dict(cfg), "HAS_SMOOTHING": smoothing}
        yield ce._cross_entropy_bwd_kernel, dtype, dict(cfg)


def attention_specs():
    """Each head-dim class (powers of two and a padded one) and causal flag, for all four kernels, in bf16 and
    fp32 (their tile tables differ); fp16 shares bf16's tiles and is compiled at GPT-2's head dim."""
    import torch

    kernels = {"fwd": attn._attn_fwd_kernel, "preprocess": attn._attn_bwd_preprocess_kernel,
               "dkdv": attn._attn_bwd_dkdv_kernel, "dq": attn._attn_bwd_dq_kernel}
    cases = [*itertools.product([16, 32, 64, 80, 128, 256], ["bf16", "fp32"]), (64, "fp16")]
    for head_dim, dtype in cases:
        torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
        for name, kernel in kernels.items():
            cfg = {**attn.launch_config(name, head_dim, torch_dtype), "HEAD_DIM": head_dim}
            if name == "preprocess":
                yield kernel, dtype, cfg
                continue
            for causal in (False, True):
                yield kernel, dtype, {**cfg, "CAUSAL": causal, "DOT_PRECISION": attn._dot_precision(torch_dtype)}


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
    record = dict(kernel=kernel.__name__, dtype=dtype, arch=arch, **cfg, **options, **({"pointers": overrides} if overrides else {}))
    pointers = {**POINTERS[kernel.__name__], **overrides}
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in UNIT_STRIDES:
            cfg[name] = 1
        if name in cfg:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = f"*{dtype}" if pointers[name] == DATA else pointers[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
            if name in ALIGNED_INTS:
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
    jobs = [(k.fn.__module__, k.__name__, dtype, dict(cfg), arch) for k, dtype, cfg in FAMILIES[family]()]
    with ProcessPoolExecutor(workers) as pool:
        for record in pool.map(compile_one, jobs):
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
