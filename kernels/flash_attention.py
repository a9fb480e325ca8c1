"""Fused scaled-dot-product attention (flash-attention style), forward and backward.

For one (batch, head), with q (T, D), k and v (S, D) and scale c (default 1/sqrt(D)):
    P = softmax(c * q @ k.T + mask)      O = P @ v        lse_i = log(sum_j exp(c * q_i . k_j + mask_ij))
Causal: query i sees keys j <= i + (S - T), the mask aligned to the bottom-right. For T == S this is the usual
lower triangle (SDPA's is_causal); for T < S it is what new tokens attending to a KV cache need, and it
differs from SDPA's is_causal, which aligns the mask to the top-left. A query that sees no key (T > S,
causal) gets output 0 and zero gradients, as SDPA does with a fully masked row.

Forward: a program owns BLOCK_M queries of one head and streams over BLOCK_N keys with an online softmax in
fp32 (scores in log2 units, exp2), so P is never stored; the loop runs unmasked over key blocks every query
of the block sees, and masked only over the diagonal and the ragged tail. Only lse (fp32, B*H*T) is kept.
Backward (FA2): delta_i = dO_i . O_i, then P is recomputed from lse:
    dV = P.T @ dO      dP = dO @ V.T      dS = P * (dP - delta)      dQ = c * dS @ K      dK = c * dS.T @ Q
One kernel owns a block of keys and sums dK, dV over every query of every head that shares it (grouped-query
attention); another owns a block of queries and sums dQ. No atomics: gradients are bit-identical run to run.

The output is (B, H, T, D) laid out as (B, T, H, D) in memory (strides (T*H*D, D, H*D, 1)), so a model's
y.transpose(1, 2).reshape(B, T, H * D) is a view, not a copy; the backward reads out and dO by their strides.

Limits: q (B, H, T, D), k and v (B, Hkv, S, D) with H a multiple of Hkv (GQA/MQA read k/v in place), the
layout of F.scaled_dot_product_attention; any T, S >= 1; D <= 256 (padded to a power of two internally);
any strides (views split from a fused qkv projection go in without a copy); fp32, fp16, bf16, all three the
same dtype; B*H <= 65535 and T*stride(T) < 2^31 within one head (offsets inside a head are int32). fp32 matmuls use full-precision FMA, not TF32. No dropout and no arbitrary masks. Off Triton
(CPU without the interpreter) `attention` runs `attention_ref` (SDPA with the same mask).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._utils import check_triton_device, tl, triton, use_triton

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# -----------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,             # running output, softmax denominator, max (log2 units); query block
    K, V, stride_ks, stride_kd, stride_vs, stride_vd,
    lo, hi, offs_m, offs_n, offs_d, d_mask, S, diag, qk_scale,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            kv_mask = cols < S
        else:
            kv_mask = offs_n < BLOCK_N  # always true: folds away
        k_t = tl.load(K + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd, mask=kv_mask[None, :] & d_mask[:, None], other=0.0)
        qk = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            valid = kv_mask[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask[:, None] & d_mask[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, Lse,              # pointers: q (B, H, T, D), k/v (B, Hkv, S, D), out (B, H, T, D) strided; fp32 lse (B, H, T)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, T, S, GROUP,               # GROUP = H // Hkv query heads per key/value head
    scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + (h // GROUP) * stride_kh
    V += b * stride_vb + (h // GROUP) * stride_vh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_mask = offs_m < T
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    qk_scale = scale * 1.4426950408889634  # scores in log2 units: exp(x) = exp2(x * log2(e))

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = S - T  # query i sees keys j <= i + diag when causal
    full_blocks_end = S // BLOCK_N * BLOCK_N
    if CAUSAL:
        hi = tl.maximum(tl.minimum(S, start_m + BLOCK_M + diag), 0)
        lo = tl.minimum(tl.maximum(start_m + diag + 1, 0) // BLOCK_N * BLOCK_N, full_blocks_end)
    else:
        hi = S
        lo = full_blocks_end
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
                                    0, lo, offs_m, offs_n, offs_d, d_mask, S, diag, qk_scale,
                                    BLOCK_N, CAUSAL, False, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
                                    lo, hi, offs_m, offs_n, offs_d, d_mask, S, diag, qk_scale,
                                    BLOCK_N, CAUSAL, True, DOT_PRECISION)
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    O += b * stride_ob + h * stride_oh
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    tl.store(Lse + bh.to(tl.int64) * T + offs_m, lse, mask=row_mask)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, Delta,                 # pointers: out (B, H, T, D) and its grad, both strided; fp32 delta (B, H, T)
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, T,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    DO += b * stride_dob + h * stride_doh
    O += b * stride_ob + h * stride_oh
    o = tl.load(O + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,                 # fp32 accumulators and this program's key/value block (BLOCK_N, BLOCK_D)
    Q, DO, Lse, Delta, stride_qt, stride_qd, stride_dot, stride_dod,
    lo, hi, offs_n, offs_m_base, offs_d, d_mask, T, diag, qk_scale,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Query rows past T load as zeros (q, dO, lse, delta), so they add exactly zero to dK and dV: only the
    # causal mask needs applying, and only on the diagonal blocks.
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m_base
        row_mask = rows < T
        q_t = tl.load(Q + rows[None, :] * stride_qt + offs_d[:, None] * stride_qd, mask=row_mask[None, :] & d_mask[:, None], other=0.0)
        lse = tl.load(Lse + rows, mask=row_mask, other=0.0)
        p_t = tl.exp2(tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale - lse[None, :] * 1.4426950408889634)
        if MASKED:
            p_t = tl.where(offs_n[:, None] <= rows[None, :] + diag, p_t, 0.0)
        do = tl.load(DO + rows[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        delta = tl.load(Delta + rows, mask=row_mask, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta,      # pointers: inputs as in forward, grad of out (strided), fp32 lse and delta (B, H, T)
    DK, DV,                       # grads (B, Hkv, S, D) contiguous
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, HKV, T, S, GROUP, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hkv = (bhk % HKV).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m_base = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    kv_mask = (offs_n < S)[:, None] & d_mask[None, :]
    k = tl.load(K + b * stride_kb + hkv * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + hkv * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634
    diag = S - T
    if CAUSAL:
        # Queries before m_lo see none of these keys; from m_full on they see all of them.
        m_lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
        m_full = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M, T)
    else:
        m_lo = 0
        m_full = 0
    for g in range(0, GROUP):
        h = hkv * GROUP + g
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DO + b * stride_dob + h * stride_doh
        Lse_h = Lse + (b * H + h) * T
        Delta_h = Delta + (b * H + h) * T
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, Lse_h, Delta_h, stride_qt, stride_qd, stride_dot, stride_dod,
                                      m_lo, m_full, offs_n, offs_m_base, offs_d, d_mask, T, diag, qk_scale,
                                      BLOCK_M, True, DOT_PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, Lse_h, Delta_h, stride_qt, stride_qd, stride_dot, stride_dod,
                                      tl.maximum(m_full, m_lo), T, offs_n, offs_m_base, offs_d, d_mask, T, diag, qk_scale,
                                      BLOCK_M, False, DOT_PRECISION)
    out = bhk.to(tl.int64) * S * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta,        # fp32 accumulator; this program's query block, its dO, lse and delta
    K, V, stride_ks, stride_kd, stride_vs, stride_vd,
    lo, hi, offs_m, offs_n_base, offs_d, d_mask, S, diag, qk_scale,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Key rows past S load as zeros: their dS multiplies a zero k, so only the causal mask is needed.
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n_base
        kv_mask = (cols < S)[None, :] & d_mask[:, None]
        k_t = tl.load(K + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd, mask=kv_mask, other=0.0)
        v_t = tl.load(V + cols[None, :] * stride_vs + offs_d[:, None] * stride_vd, mask=kv_mask, other=0.0)
        p = tl.exp2(tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale - lse[:, None] * 1.4426950408889634)
        if MASKED:
            p = tl.where(cols[None, :] <= offs_m[:, None] + diag, p, 0.0)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta,      # as in _attn_bwd_dkdv_kernel
    DQ,                           # grad (B, H, T, D) contiguous
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, T, S, GROUP, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n_base = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_mask = offs_m < T
    mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    lse = tl.load(Lse + bh.to(tl.int64) * T + offs_m, mask=row_mask, other=0.0)
    delta = tl.load(Delta + bh.to(tl.int64) * T + offs_m, mask=row_mask, other=0.0)
    K += b * stride_kb + (h // GROUP) * stride_kh
    V += b * stride_vb + (h // GROUP) * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634
    diag = S - T
    if CAUSAL:
        hi = tl.maximum(tl.minimum(S, start_m + BLOCK_M + diag), 0)
        lo = tl.minimum(tl.maximum(start_m + diag + 1, 0) // BLOCK_N * BLOCK_N, hi)
    else:
        hi = S
        lo = S
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
                            0, lo, offs_m, offs_n_base, offs_d, d_mask, S, diag, qk_scale, BLOCK_N, False, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
                            lo, hi, offs_m, offs_n_base, offs_d, d_mask, S, diag, qk_scale, BLOCK_N, True, DOT_PRECISION)
    tl.store(DQ + bh.to(tl.int64) * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=mask)


# -----------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, padded head dim and operand bytes. The 16-bit entries
# compile for sm_80 and sm_90 without register spills (tests/kernels/test_aot_compile.py). fp32 runs its
# matmuls as exact FMA loops (no tensor cores), which spill at any useful tile: it is the accuracy path, not a
# fast one. Tuning these numbers on a GPU is measured work, not guessed.
_CONFIGS = {
    # 16-bit operands (fp16, bf16)
    ("fwd", 64, 2): (128, 64, 8, 3), ("fwd", 128, 2): (128, 64, 8, 3), ("fwd", 256, 2): (64, 32, 8, 1),
    ("dkdv", 64, 2): (32, 128, 8, 3), ("dkdv", 128, 2): (32, 64, 8, 2), ("dkdv", 256, 2): (32, 32, 8, 1),
    ("dq", 64, 2): (128, 32, 4, 3), ("dq", 128, 2): (128, 32, 8, 2), ("dq", 256, 2): (32, 32, 8, 1),
    # fp32 operands: twice the bytes per element, so smaller tiles
    ("fwd", 64, 4): (64, 32, 4, 2), ("fwd", 128, 4): (64, 32, 8, 2), ("fwd", 256, 4): (32, 32, 8, 1),
    ("dkdv", 64, 4): (32, 64, 8, 2), ("dkdv", 128, 4): (32, 32, 8, 2), ("dkdv", 256, 4): (16, 32, 8, 1),
    ("dq", 64, 4): (64, 32, 8, 2), ("dq", 128, 4): (32, 32, 8, 2), ("dq", 256, 4): (32, 16, 8, 1),
}


def launch_config(kernel: str, head_dim: int, dtype: torch.dtype) -> dict:
    """Block sizes, warps and pipeline stages for one kernel ("fwd", "dkdv", "dq", "preprocess")."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if kernel == "preprocess":
        return dict(BLOCK_D=block_d, BLOCK_M=64 if block_d <= 64 else 16, num_warps=4)
    block_m, block_n, num_warps, num_stages = _CONFIGS[(kernel, max(block_d, 64), 4 if dtype == torch.float32 else 2)]
    return dict(BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for fp16/bf16 operands


def _strides(t: Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())


def _new_output(q: Tensor) -> Tensor:
    """The output (B, H, T, D), laid out (B, T, H, D) in memory: the model's (B, T, C) reshape is then a view."""
    B, H, T, D = q.shape
    return q.new_empty_strided((B, H, T, D), (T * H * D, D, H * D, 1))  # not a view: a tensor of its own


@torch.library.custom_op("fastlm::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    check_triton_device("fastlm::attention_fwd", q, k, v)
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out = _new_output(q)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    cfg = launch_config("fwd", D, q.dtype)
    grid = (triton.cdiv(T, cfg["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out), H, T, S, H // Hkv, scale,
        HEAD_DIM=D, CAUSAL=causal, DOT_PRECISION=_dot_precision(q.dtype), **cfg,
    )
    return out, lse


@_attention_fwd.register_fake
def _(q, k, v, causal, scale):
    B, H, T, D = q.shape
    return _new_output(q), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("fastlm::attention_bwd", mutates_args=())
def _attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    check_triton_device("fastlm::attention_bwd", dout, q, k, v, out, lse)
    B, H, T, D = q.shape
    if out.shape != q.shape or lse.shape != (B, H, T) or not lse.is_contiguous():
        raise ValueError(f"fastlm::attention_bwd: out must be q's shape {tuple(q.shape)} (any strides) and lse a "
                         f"contiguous ({B}, {H}, {T}), as attention_fwd returns them; got {tuple(out.shape)}, "
                         f"{tuple(lse.shape)} with strides {lse.stride()}")
    Hkv, S = k.shape[1], k.shape[2]
    dq = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, S, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, Hkv, S, D), dtype=v.dtype, device=q.device)
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    cfg = launch_config("preprocess", D, q.dtype)
    _attn_bwd_preprocess_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), B * H)](
        out, dout, delta, *_strides(out), *_strides(dout), H, T, HEAD_DIM=D, **cfg)
    common = dict(HEAD_DIM=D, CAUSAL=causal, DOT_PRECISION=_dot_precision(q.dtype))
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout))
    cfg = launch_config("dkdv", D, q.dtype)
    _attn_bwd_dkdv_kernel[(triton.cdiv(S, cfg["BLOCK_N"]), B * Hkv)](
        q, k, v, dout, lse, delta, dk, dv, *strides, H, Hkv, T, S, H // Hkv, scale, **common, **cfg)
    cfg = launch_config("dq", D, q.dtype)
    _attn_bwd_dq_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), B * H)](
        q, k, v, dout, lse, delta, dq, *strides, H, T, S, H // Hkv, scale, **common, **cfg)
    return dq, dk, dv


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, causal, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format), torch.empty_like(v, memory_format=torch.contiguous_format)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, ctx.causal, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, *output)


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(dout, q, k, v, out, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup_context)


# -----------------------------------------------------------------------------
def _check_args(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be (B, H, T, D), (B, Hkv, S, D), (B, Hkv, S, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"attention: k and v must be (B, Hkv, S, D) matching q's B and D; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: q's {q.shape[1]} heads must be a multiple of k/v's {k.shape[1]} heads")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not 1 <= q.shape[3] <= 256:
        raise ValueError(f"attention: head dim must be in [1, 256], got {q.shape[3]}")
    if q.shape[0] * q.shape[1] > 65535:  # B*H is a CUDA grid axis, capped at 65535
        raise ValueError(f"attention: batch x heads = {q.shape[0] * q.shape[1]} exceeds 65535; split the batch")


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None) -> Tensor:
    """Scaled-dot-product attention. q: (B, H, T, D); k, v: (B, Hkv, S, D); returns (B, H, T, D) in q's dtype.

    Equals `F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)` when T == S;
    when T != S the causal mask is aligned to the bottom-right (query i sees keys up to S - T + i).
    """
    _check_args(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if q.numel() == 0 or k.shape[2] == 0 or not use_triton(q):
        return attention_ref(q, k, v, causal, scale)
    return _attention_fwd(q, k, v, causal, scale)[0]


def attention_ref(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None) -> Tensor:
    """SDPA with the same semantics (bottom-right causal mask): the fallback off Triton and the test reference."""
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if causal and T != S:  # plain `if`s on the shapes: under torch.compile they guard, and SDPA gets Python bools
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True if gqa else False)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True if gqa else False)
