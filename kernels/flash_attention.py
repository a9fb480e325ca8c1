"""Fused scaled-dot-product attention (flash-attention style), forward and backward, dense or variable-length.

For one (sequence, head), with q (T, D), k and v (S, D), scale c (default 1/sqrt(D)) and dropout probability p:
    P = softmax(c * q @ k.T + mask)     O = (P * Z / (1 - p)) @ v     lse_i = log(sum_j exp(c * q_i . k_j + mask_ij))
where Z is the dropout keep mask (all ones when p = 0). Causal: query i sees keys j <= i + (S - T), the mask
aligned to the bottom-right. For T == S this is the usual lower triangle (SDPA's is_causal); for T < S it is what
new tokens attending to a KV cache need, and it differs from SDPA's is_causal, which aligns the mask to the
top-left. A query that sees no key (T > S, causal) gets output 0 and zero gradients, as SDPA does.

Forward: a program owns BLOCK_M queries of one head and streams over BLOCK_N keys with an online softmax in fp32
(exp2; the running max is taken over raw scores and scaled once per row, so each score costs one FMA before its
exp2), P is never stored. The loop runs without masks over key blocks every query of the block sees in full, and
masked only over the diagonal and the ragged tail, where padded keys get p = 0 exactly. Only lse (fp32) is kept.
Backward (FA2): delta_i = dO_i . O_i, then P is recomputed from lse:
    dV = (P * Z').T @ dO    dP = (dO @ V.T) * Z'    dS = P * (dP - delta)    dQ = c * dS @ K    dK = c * dS.T @ Q
(Z' = Z / (1 - p)). One kernel owns a block of keys and sums dK, dV over every query of every head that shares it
(grouped-query attention); another owns a block of queries and sums dQ. No atomics: gradients are bit-identical
run to run. Padded queries and keys (past T or S, or past a sequence's end) get p = 0 explicitly wherever they meet
a real row (lse = +inf for padded queries, a mask for padded keys), never a value that a zero operand has to cancel;
only a padded key's own rows of dK/dV, which are never stored, are left as they come.

Dropout: Z_ij is drawn by Philox (tl.philox, 10 rounds) keyed by a 64-bit seed, with the counter (j // 8, i, head,
sequence): one call gives 16 bits to each of 8 consecutive keys, kept when they are >= round(p * 2^16) (so the keep
probability is 1 - p to within 2^-17). It is a pure function of the score's coordinates, so the backward regenerates
the forward's mask whatever its tiles, and nothing is stored. `attention` draws the seed on q's device from
torch's generator (torch.randint: no host sync, reproducible under torch.manual_seed, and the generator advances,
so consecutive calls differ); `dropout_mask` returns the mask itself, for tests. p = 0 is a constexpr: the kernels
compile as without dropout. With dropout some 16-bit tiles are smaller (the random bits take registers), and the
Philox rounds make the main loops about 3x as many instructions (static counts; bench/bench_attention.py times it).

Variable length (kernels/varlen_flash_attention.py): the same kernels with IS_VARLEN, reading each sequence's
start and length from cu_seqlens; a sequence is a row range of q (total_q, H, D) and of k, v (total_k, Hkv, D).

Layout: the dense output is (B, H, T, D) laid out as (B, T, H, D) in memory (strides (T*H*D, D, H*D, 1)), so a
model's y.transpose(1, 2).reshape(B, T, H * D) is a view, not a copy; the backward reads out and dO by their strides.
On sm_90 (Hopper) with 16-bit inputs whose strides TMA accepts, the forward reads q, k, v through host tensor
descriptors (TMA); elsewhere (sm_80, the interpreter) it loads with cp.async. Tiles are per architecture.

Limits: q (B, H, T, D), k and v (B, Hkv, S, D) with H a multiple of Hkv (GQA/MQA read k/v in place), the layout of
F.scaled_dot_product_attention; any T, S >= 1; D <= 256 (padded to a power of two internally); any strides
(views split from a fused qkv projection go in without a copy) whose row stride is below 2^31 / 256 elements;
fp32, fp16, bf16, all three the same dtype; B and H at most 65535; scale > 0. Offsets are int64 where they can
exceed int32 (batch and head offsets always; a block's first row times its row stride when the host finds
(rows - 1) * row stride > 2^31 - 1, the INT64 variant); inside a block they are int32. fp32 matmuls use full-precision
FMA, not TF32. No arbitrary masks. Off Triton (CPU without the interpreter) `attention` runs `attention_ref`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._utils import check_triton_device, exceeds_int32, tl, triton, use_triton

try:  # host tensor descriptors (TMA on Hopper): triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

LOG2E = 1.4426950408889634
MAX_ROW_STRIDE = 2**31 // 256  # in-block offsets (up to 256 rows x the row stride) are int32


# -----------------------------------------------------------------------------
@triton.jit
def _load(ptrs, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptrs, mask=mask, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _seq_bounds(CuSeqlens, b, n, IS_VARLEN: tl.constexpr):
    """(first row, length) of sequence b: from cu_seqlens (varlen), else (0, n)."""
    if IS_VARLEN:
        start = tl.load(CuSeqlens + b)
        return start, tl.load(CuSeqlens + b + 1) - start
    else:
        return n * 0, n


@triton.jit
def _row_offset(row, stride, INT64: tl.constexpr):
    """row * stride, in int64 when the host says a tensor's offsets may pass 2^31."""
    if INT64:
        return tl.cast(row, tl.int64) * stride  # tl.cast: `row` may be a plain int (a loop from 0 in the interpreter)
    else:
        return row * stride


@triton.jit
def _tma_rows(desc, b, h, first, row, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Rows [row, row + BLOCK) of head h of sequence b through a tensor descriptor, as (BLOCK, BLOCK_D): dense
    (B, H, T, D) reads zeros past T; varlen (total, H, D) starts at the sequence's first row `first`."""
    if IS_VARLEN:
        return desc.load([first + row, h, 0]).reshape([BLOCK, BLOCK_D])
    else:
        return desc.load([b, h, row, 0]).reshape([BLOCK, BLOCK_D])


@triton.jit
def _dropout_keep(seed, rows, col0, h, b, threshold, BLOCK_C: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """Whether each score (row, col0 + c) of head h of sequence b is kept, as a (rows, BLOCK_C) mask, or
    (BLOCK_C, rows) with KEYS_FIRST (the dK/dV kernel's transposed tile). One Philox call, counter
    (col // 8, row, h, b), gives 128 bits: 16 for each of the keys 8g..8g+7 of a row, kept when >= threshold."""
    BLOCK_R: tl.constexpr = rows.shape[0]
    groups = col0 // 8 + tl.arange(0, BLOCK_C // 8)
    if KEYS_FIRST:
        r0, r1, r2, r3 = tl.philox(seed, groups[:, None], rows[None, :], h, b)
    else:
        r0, r1, r2, r3 = tl.philox(seed, groups[None, :], rows[:, None], h, b)
    lo = tl.join(tl.join(r0, r1), tl.join(r2, r3)) & 0xFFFF  # [..., a, c]: word (0, 2, 1, 3)[2a + c]
    hi = tl.join(tl.join(r0, r1), tl.join(r2, r3)) >> 16
    keep = tl.join(lo.to(tl.int32, bitcast=True) >= threshold, hi.to(tl.int32, bitcast=True) >= threshold)
    if KEYS_FIRST:  # (BLOCK_C // 8, BLOCK_R, 2, 2, 2): key 8g + 4a + 2c + e
        return tl.reshape(tl.permute(keep, (0, 2, 3, 4, 1)), (BLOCK_C, BLOCK_R))
    else:
        return tl.reshape(keep, (BLOCK_R, BLOCK_C))


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,             # running output, softmax denominator, max (log2 units); query block
    K, V, k_offs, v_offs,         # k/v of this head at key 0 (pointers, or descriptors with USE_TMA); in-block offsets
    stride_ks, stride_vs, b, hk, k_start,
    lo, hi, rows, offs_n, d_mask, S, diag, qk_scale,
    seed, h, drop_threshold,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
    PAD_D: tl.constexpr, DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, USE_TMA: tl.constexpr,
    INT64: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < S)[:, None] & d_mask[None, :]
        if USE_TMA:
            k = _tma_rows(K, b, hk, k_start, start_n, BLOCK_N, BLOCK_D, IS_VARLEN)
        else:
            k = _load(K + _row_offset(start_n, stride_ks, INT64) + k_offs, kv_mask, MASKED or PAD_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # raw scores: the scale is applied once, below
        if MASKED:  # padded keys and, when causal, keys after the diagonal: -inf, so p = 0 exactly
            valid = (cols < S)[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None] + diag)
            qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # qk_scale > 0: the max of raw scores, scaled
        if MASKED:
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_TMA:
            v = _tma_rows(V, b, hk, k_start, start_n, BLOCK_N, BLOCK_D, IS_VARLEN)
        else:
            v = _load(V + _row_offset(start_n, stride_vs, INT64) + v_offs, kv_mask, MASKED or PAD_D)
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, rows, start_n, h, b, drop_threshold, BLOCK_N, False), p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, Lse,              # q (B, H, T, D), k/v (B, Hkv, S, D), out (B, H, T, D), all strided; fp32 lse
    CuSeqlensQ, CuSeqlensK,       # varlen: int32 (batch + 1) first row of each sequence in q and in k/v
    Seed,                         # dropout: int64 Philox key
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_lb, stride_lh,         # lse (B, H, T) strides; rows are contiguous
    H, T, S, GROUP,               # GROUP = H // Hkv query heads per key/value head; T, S unused when varlen
    scale, drop_threshold, drop_scale,  # softmax scale; dropout: keep if 16 random bits >= threshold; 1 / (1 - p)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr,
    USE_TMA: tl.constexpr,        # Q, K, V are tensor descriptors (sm_90)
    INT64: tl.constexpr,          # block starts times row strides may pass 2^31
    DOT_PRECISION: tl.constexpr,
):
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, T = _seq_bounds(CuSeqlensQ, b, T, IS_VARLEN)
    k_start, S = _seq_bounds(CuSeqlensK, b, S, IS_VARLEN)
    start_m = tl.program_id(0) * BLOCK_M
    if IS_VARLEN:
        if start_m >= T:  # this sequence is shorter than the longest
            return
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    bq = b.to(tl.int64)
    hk = h // GROUP
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    d_mask = offs_d < HEAD_DIM
    row_mask = rows < T
    if USE_TMA:
        q = _tma_rows(Q, b, h, q_start, start_m, BLOCK_M, BLOCK_D, IS_VARLEN)
        k_offs = 0
        v_offs = 0
    else:
        Q += bq * stride_qb + h.to(tl.int64) * stride_qh + (q_start + start_m).to(tl.int64) * stride_qt
        K += bq * stride_kb + hk.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_ks
        V += bq * stride_vb + hk.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vs
        q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        k_offs = offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
        v_offs = offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
    qk_scale = scale * 1.4426950408889634  # scores in log2 units: exp(x) = exp2(x * log2(e))
    if DROPOUT:
        seed = tl.load(Seed)
    else:
        seed = 0

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
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, k_offs, v_offs, stride_ks, stride_vs, b, hk, k_start,
                                    0, lo, rows, offs_n, d_mask, S, diag, qk_scale, seed, h, drop_threshold,
                                    BLOCK_N, BLOCK_D, CAUSAL, False, PAD_D, DROPOUT, IS_VARLEN, USE_TMA, INT64, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, k_offs, v_offs, stride_ks, stride_vs, b, hk, k_start,
                                    lo, hi, rows, offs_n, d_mask, S, diag, qk_scale, seed, h, drop_threshold,
                                    BLOCK_N, BLOCK_D, CAUSAL, True, PAD_D, DROPOUT, IS_VARLEN, USE_TMA, INT64, DOT_PRECISION)
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    if DROPOUT:
        out = acc * (drop_scale / l_safe)[:, None]
    else:
        out = acc / l_safe[:, None]
    lse = tl.where(seen, m_i + tl.log2(l_safe), float("-inf"))  # log2 units
    O += bq * stride_ob + h.to(tl.int64) * stride_oh + (q_start + start_m).to(tl.int64) * stride_ot
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    Lse += bq * stride_lb + h.to(tl.int64) * stride_lh + q_start
    tl.store(Lse + rows, lse, mask=row_mask)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, Delta,                 # pointers: out (B, H, T, D) and its grad, both strided; fp32 delta, lse's layout
    CuSeqlensQ,                   # varlen: int32 (batch + 1)
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_lb, stride_lh,
    T,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, T = _seq_bounds(CuSeqlensQ, b, T, IS_VARLEN)
    start_m = tl.program_id(0) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    mask = (rows < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    bq = b.to(tl.int64)
    first = (q_start + start_m).to(tl.int64)  # the block's first row, int64: only in-block offsets are int32
    O += bq * stride_ob + h.to(tl.int64) * stride_oh + first * stride_ot
    DO += bq * stride_dob + h.to(tl.int64) * stride_doh + first * stride_dot
    o = tl.load(O + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + bq * stride_lb + h.to(tl.int64) * stride_lh + first + offs_m, delta, mask=rows < T)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,                 # fp32 accumulators and this program's key/value block (BLOCK_N, BLOCK_D)
    Q, DO, Lse, Delta,            # the first query head of this key/value head, at its row 0
    stride_qh, stride_doh, stride_lh, GROUP,  # ... and the GROUP heads that share it, one after another
    q_offs, do_offs, stride_qt, stride_dot,  # in-block offsets of q and dO (BLOCK_M, D)
    first, n_blocks, split, jump,  # query blocks first + i * BLOCK_M for i < n_blocks, shifted by jump from i = split on
    cols, start_n, offs_m, d_mask, T, diag, qk_scale,  # this program's keys, start_n + arange(BLOCK_N)
    seed, h0, b, drop_threshold, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, PAD_D: tl.constexpr,
    DROPOUT: tl.constexpr, GQA: tl.constexpr, INT64: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # GQA: one loop over (head, query block) pairs, not a loop over heads around one over blocks (nested loops cost
    # ~40 registers on sm_90); without GQA (GROUP == 1) the heads' bookkeeping compiles away.
    g = 0
    i = 0
    for it in range(0, n_blocks * GROUP):
        if not GQA:
            i = it
        start_m = first + i * BLOCK_M
        if MASKED:  # one loop for the diagonal blocks and the ragged last block (one copy of the code)
            start_m = tl.where(i < split, start_m, start_m + jump)
        rows = start_m + offs_m
        row_mask = rows < T
        mask = row_mask[:, None] & d_mask[None, :]
        if GQA:
            Q_g = Q + g.to(tl.int64) * stride_qh
            DO_g = DO + g.to(tl.int64) * stride_doh
            Lse_g = Lse + g.to(tl.int64) * stride_lh
            Delta_g = Delta + g.to(tl.int64) * stride_lh
        else:
            Q_g, DO_g, Lse_g, Delta_g = Q, DO, Lse, Delta
        q = _load(Q_g + _row_offset(start_m, stride_qt, INT64) + q_offs, mask, MASKED or PAD_D)
        if MASKED:  # padded queries: lse = +inf makes their p exactly 0
            lse = tl.load(Lse_g + rows, mask=row_mask, other=float("inf"))
        else:
            lse = tl.load(Lse_g + rows)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse[None, :])
        if MASKED:
            if CAUSAL:
                p_t = tl.where(cols[:, None] <= rows[None, :] + diag, p_t, 0.0)
        do = _load(DO_g + _row_offset(start_m, stride_dot, INT64) + do_offs, mask, MASKED or PAD_D)
        if DROPOUT:
            keep = _dropout_keep(seed, rows, start_n, h0 + g, b, drop_threshold, BLOCK_N, True)
            dv = tl.dot(tl.where(keep, p_t, 0.0).to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        else:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if MASKED:
            delta = tl.load(Delta_g + rows, mask=row_mask, other=0.0)
        else:
            delta = tl.load(Delta_g + rows)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if DROPOUT:
            dp_t = tl.where(keep, dp_t * drop_scale, 0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
        if GQA:
            i += 1
            next_head = i == n_blocks
            i = tl.where(next_head, 0, i)
            g += next_head.to(tl.int32)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta,      # inputs as in forward, grad of out (strided), fp32 lse and delta (lse's layout)
    DK, DV,                       # grads, k's shape, strided (stride_dk*)
    CuSeqlensQ, CuSeqlensK, Seed,  # as in _attn_fwd_kernel
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_lb, stride_lh,
    T, S, GROUP, scale, drop_threshold, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr,
    GQA: tl.constexpr,            # GROUP > 1: sum over the query heads that share this key/value head
    INT64: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    hkv = tl.program_id(1)
    b = tl.program_id(2)
    q_start, T = _seq_bounds(CuSeqlensQ, b, T, IS_VARLEN)
    k_start, S = _seq_bounds(CuSeqlensK, b, S, IS_VARLEN)
    start_n = tl.program_id(0) * BLOCK_N
    if IS_VARLEN:
        if start_n >= S:
            return
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    bq = b.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    cols = start_n + offs_n
    d_mask = offs_d < HEAD_DIM
    kv_mask = (cols < S)[:, None] & d_mask[None, :]
    first_k = (k_start + start_n).to(tl.int64)
    K += bq * stride_kb + hkv.to(tl.int64) * stride_kh + first_k * stride_ks
    V += bq * stride_vb + hkv.to(tl.int64) * stride_vh + first_k * stride_vs
    k = tl.load(K + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    q_offs = offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    do_offs = offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634
    if DROPOUT:
        seed = tl.load(Seed)
    else:
        seed = 0
    diag = S - T
    full_blocks_end = T // BLOCK_M * BLOCK_M
    if CAUSAL:
        # Query blocks before m_lo see none of these keys; from m_full on every query sees all of them.
        m_lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
        m_full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
    else:
        m_lo = 0
        m_full = 0
    n_diag = tl.cdiv(tl.minimum(m_full, T) - m_lo, BLOCK_M)  # m_lo <= m_full; m_lo < T (every key is seen)
    n_full = tl.maximum(full_blocks_end - m_full, 0) // BLOCK_M
    tail = tl.maximum(m_full, full_blocks_end)
    n_tail = tl.cdiv(tl.maximum(T - tail, 0), BLOCK_M)  # 0 or 1
    h0 = hkv * GROUP
    first_q = q_start.to(tl.int64)
    Q += bq * stride_qb + h0.to(tl.int64) * stride_qh + first_q * stride_qt
    DO += bq * stride_dob + h0.to(tl.int64) * stride_doh + first_q * stride_dot
    Lse += bq * stride_lb + h0.to(tl.int64) * stride_lh + q_start
    Delta += bq * stride_lb + h0.to(tl.int64) * stride_lh + q_start
    # The diagonal and the ragged last query block (masked), then the query blocks that see every key.
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, Lse, Delta, stride_qh, stride_doh, stride_lh, GROUP,
                                  q_offs, do_offs, stride_qt, stride_dot,
                                  m_lo, n_diag + n_tail, n_diag, tail - (m_lo + n_diag * BLOCK_M),
                                  cols, start_n, offs_m, d_mask, T, diag, qk_scale, seed, h0, b, drop_threshold, drop_scale,
                                  BLOCK_M, BLOCK_N, CAUSAL, True, PAD_D, DROPOUT, GQA, INT64, DOT_PRECISION)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, Lse, Delta, stride_qh, stride_doh, stride_lh, GROUP,
                                  q_offs, do_offs, stride_qt, stride_dot,
                                  m_full, n_full, n_full, 0,
                                  cols, start_n, offs_m, d_mask, T, diag, qk_scale, seed, h0, b, drop_threshold, drop_scale,
                                  BLOCK_M, BLOCK_N, CAUSAL, False, PAD_D, DROPOUT, GQA, INT64, DOT_PRECISION)
    if DROPOUT:
        dv = dv * drop_scale
    DK += bq * stride_dkb + hkv.to(tl.int64) * stride_dkh + first_k * stride_dks
    DV += bq * stride_dkb + hkv.to(tl.int64) * stride_dkh + first_k * stride_dks
    out = offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta,        # fp32 accumulator; this program's query block, its dO, lse (log2 units), delta
    K, V, k_offs, v_offs, stride_ks, stride_vs,  # k/v of this head at key 0; in-block offsets (BLOCK_N, D)
    lo, hi, rows, offs_n, d_mask, S, diag, qk_scale,
    seed, h, b, drop_threshold, drop_scale,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, PAD_D: tl.constexpr,
    DROPOUT: tl.constexpr, INT64: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < S)[:, None] & d_mask[None, :]
        k = _load(K + _row_offset(start_n, stride_ks, INT64) + k_offs, kv_mask, MASKED or PAD_D)
        v = _load(V + _row_offset(start_n, stride_vs, INT64) + v_offs, kv_mask, MASKED or PAD_D)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        if MASKED:  # padded keys (past S) and, when causal, keys after the diagonal: p = 0 exactly
            valid = (cols < S)[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None] + diag)
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            dp = tl.where(_dropout_keep(seed, rows, start_n, h, b, drop_threshold, BLOCK_N, False), dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta,      # as in _attn_bwd_dkdv_kernel
    DQ,                           # grad, q's shape, strided (stride_dq*)
    CuSeqlensQ, CuSeqlensK, Seed,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_lb, stride_lh,
    T, S, GROUP, scale, drop_threshold, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, INT64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, T = _seq_bounds(CuSeqlensQ, b, T, IS_VARLEN)
    k_start, S = _seq_bounds(CuSeqlensK, b, S, IS_VARLEN)
    start_m = tl.program_id(0) * BLOCK_M
    if IS_VARLEN:
        if start_m >= T:
            return
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    bq = b.to(tl.int64)
    hk = h // GROUP
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    d_mask = offs_d < HEAD_DIM
    row_mask = rows < T
    mask = row_mask[:, None] & d_mask[None, :]
    first_q = (q_start + start_m).to(tl.int64)
    Q += bq * stride_qb + h.to(tl.int64) * stride_qh + first_q * stride_qt
    DO += bq * stride_dob + h.to(tl.int64) * stride_doh + first_q * stride_dot
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    lse_delta = bq * stride_lb + h.to(tl.int64) * stride_lh + q_start + rows
    lse = tl.load(Lse + lse_delta, mask=row_mask, other=float("inf"))  # padded queries: p = 0
    delta = tl.load(Delta + lse_delta, mask=row_mask, other=0.0)
    K += bq * stride_kb + hk.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_ks
    V += bq * stride_vb + hk.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vs
    k_offs = offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
    v_offs = offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634
    if DROPOUT:
        seed = tl.load(Seed)
    else:
        seed = 0
    diag = S - T
    full_blocks_end = S // BLOCK_N * BLOCK_N
    if CAUSAL:
        hi = tl.maximum(tl.minimum(S, start_m + BLOCK_M + diag), 0)
        lo = tl.minimum(tl.maximum(start_m + diag + 1, 0) // BLOCK_N * BLOCK_N, full_blocks_end)
    else:
        hi = S
        lo = full_blocks_end
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, k_offs, v_offs, stride_ks, stride_vs,
                            0, lo, rows, offs_n, d_mask, S, diag, qk_scale, seed, h, b, drop_threshold, drop_scale,
                            BLOCK_N, CAUSAL, False, PAD_D, DROPOUT, INT64, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, k_offs, v_offs, stride_ks, stride_vs,
                            lo, hi, rows, offs_n, d_mask, S, diag, qk_scale, seed, h, b, drop_threshold, drop_scale,
                            BLOCK_N, CAUSAL, True, PAD_D, DROPOUT, INT64, DOT_PRECISION)
    DQ += bq * stride_dqb + h.to(tl.int64) * stride_dqh + first_q * stride_dqt
    tl.store(DQ + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd, (dq * scale).to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def _dropout_mask_kernel(
    Mask,                         # int8 (B, H, T, S) contiguous: 1 where a score is kept
    Seed, H, T, S, drop_threshold,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    h = tl.program_id(1)
    b = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    seed = tl.load(Seed)
    Mask += (b.to(tl.int64) * H + h) * T * S
    for start_n in range(0, S, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, rows, start_n, h, b, drop_threshold, BLOCK_N, False)
        tl.store(Mask + rows[:, None].to(tl.int64) * S + cols[None, :], keep.to(tl.int8),
                 mask=(rows < T)[:, None] & (cols < S)[None, :])


# -----------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per architecture, kernel and padded head dim (an entry at 64 serves 16
# and 32 too unless they have their own; a "padded" entry serves head dims below the power of two, e.g. 80 in 128),
# for 16-bit operands. Each entry compiles for its architecture without
# register spills in every flag combination it serves, on triton 3.6 and 3.9 (tests/kernels/test_aot_compile.py);
# GPT-2's sm_90 entries (D = 64, 128) were chosen by their static instruction count (bench/static_counts.py,
# bench/results/), the others as the largest tile that does not spill. Timing them on a GPU is still to come.
# fp32 runs its matmuls as exact FMA loops (no tensor cores): the accuracy path, in small tiles, the same everywhere.
_CONFIGS_16BIT = {
    80: {
        ("fwd", 64): (128, 64, 8, 2), ("fwd", 128): (128, 64, 8, 2), ("fwd", 128, "padded"): (128, 32, 8, 2),
        ("fwd", 256): (64, 32, 8, 1),
        ("dkdv", 64): (32, 128, 8, 2), ("dkdv", 128): (64, 64, 8, 2), ("dkdv", 256): (32, 32, 8, 1),
        ("dq", 32): (64, 64, 4, 2), ("dq", 64): (128, 64, 8, 2), ("dq", 128): (64, 64, 4, 2), ("dq", 256): (32, 32, 8, 1),
    },
    90: {
        ("fwd", 64): (128, 128, 8, 2), ("fwd", 128): (128, 128, 8, 2), ("fwd", 256): (64, 32, 8, 1),
        ("dkdv", 64): (64, 64, 4, 2), ("dkdv", 128): (32, 128, 8, 2), ("dkdv", 256): (32, 32, 8, 1),
        ("dq", 64): (64, 64, 4, 3), ("dq", 128): (128, 64, 8, 2), ("dq", 256): (32, 16, 8, 2),
    },
}
# Where those tiles would spill: the forward on sm_90 through pointers (no TMA: a head dim that is not a power of two,
# or strides TMA refuses), and kernels with dropout (its random bits take registers); the dropout entry wins.
_CONFIGS_16BIT_POINTERS = {80: {}, 90: {("fwd", 128): (128, 64, 8, 2)}}
_CONFIGS_16BIT_DROPOUT = {
    80: {("fwd", 128): (64, 64, 4, 2), ("dq", 64): (128, 32, 8, 2), ("dq", 128): (64, 64, 8, 2)},
    90: {("fwd", 256): (64, 16, 4, 1), ("dkdv", 128): (32, 64, 8, 2), ("dq", 128): (128, 32, 8, 2)},
}
_CONFIGS_FP32 = {
    ("fwd", 64): (64, 32, 4, 2), ("fwd", 128): (64, 32, 8, 2), ("fwd", 256): (32, 32, 8, 1),
    ("dkdv", 64): (32, 64, 8, 2), ("dkdv", 128): (32, 32, 8, 2), ("dkdv", 256): (16, 32, 8, 1),
    ("dq", 64): (64, 32, 8, 2), ("dq", 128): (32, 32, 8, 2), ("dq", 256): (32, 16, 8, 1),
}
ARCHS = (80, 90)


def device_capability(device: torch.device) -> int:
    """The tile table a device uses: 90 for Hopper and later, 80 for Ampere, Ada and the interpreter."""
    if device.type != "cuda":
        return 80
    major, minor = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def launch_config(kernel: str, head_dim: int, dtype: torch.dtype, arch: int = 80, dropout: bool = False,
                  tma: bool = False) -> dict:
    """Block sizes, warps and pipeline stages for one kernel ("fwd", "dkdv", "dq", "preprocess") on sm_<arch>; with
    dropout (its random bits take registers) and for an sm_90 forward without TMA some 16-bit tiles differ."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if kernel == "preprocess":
        return dict(BLOCK_D=block_d, BLOCK_M=64 if block_d <= 64 else 16, num_warps=4)
    keys = [(kernel, block_d, "padded")] if head_dim != block_d else []
    keys += [(kernel, block_d), (kernel, max(block_d, 64))]
    lookup = lambda table: next((table[k] for k in keys if k in table), None)
    if dtype == torch.float32:
        entry = _CONFIGS_FP32[keys[-1]]
    else:
        entry = lookup(_CONFIGS_16BIT[arch])
        if kernel == "fwd" and arch >= 90 and not tma:
            entry = lookup(_CONFIGS_16BIT_POINTERS[arch]) or entry
        if dropout:
            entry = lookup(_CONFIGS_16BIT_DROPOUT[arch]) or entry
    block_m, block_n, num_warps, num_stages = entry
    return dict(BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for fp16/bf16 operands


def _dropout_args(dropout_p: float) -> tuple[int, float]:
    """(threshold on 16 random bits, 1 / (1 - p)): a score is kept when its bits are >= threshold, so the keep
    probability is 1 - p with p rounded to a multiple of 2^-16 (at most 7.7e-6 off)."""
    return int(round(dropout_p * 2**16)), 1.0 / (1.0 - dropout_p)


# -----------------------------------------------------------------------------
# Launchers shared by the dense op and the variable-length one (kernels/varlen_flash_attention.py). Every tensor
# arrives as a 4-D (batch, heads, rows, D) strided view; a varlen tensor (total, heads, D) is viewed with batch
# stride 0 and the kernels add each sequence's first row from cu_seqlens. lse and delta are (batch, H, rows)-strided
# fp32 with contiguous rows: `lse_strides` = (stride_lb, stride_lh).

def _strides4(t: Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t.dim() == 4 else (0, t.stride(1), t.stride(0), t.stride(2))


def check_row_strides(op: str, **tensors: Tensor) -> None:
    """Row and column strides must keep in-block offsets (up to 256 rows or columns) within int32; batch and head
    offsets, and every block's start, are int64 in the kernels (or int64 when `needs_int64` says so)."""
    for name, t in tensors.items():
        _, _, row, col = _strides4(t)
        if max(abs(row), abs(col)) >= MAX_ROW_STRIDE:
            raise ValueError(f"{op}: {name}'s row/column strides {row}, {col} (elements) must be below the kernels' "
                             f"int32 limit of 2^31 / 256 = {MAX_ROW_STRIDE}")


def needs_int64(*tensors: Tensor) -> bool:
    """Whether a block start times a row stride can pass int32 for one of these tensors: the largest block start is
    at most rows - 1, so the kernels' INT64 variant is compiled exactly when (rows - 1) * |row stride| > 2^31 - 1."""
    return any(exceeds_int32((t.shape[-3 if t.dim() == 3 else 2] - 1) * abs(_strides4(t)[2])) for t in tensors)


def uses_tma(*tensors: Tensor) -> bool:
    """16-bit tensors that TMA can read: a power-of-two head dim, contiguous rows, 16-byte aligned base and strides."""
    def ok(t: Tensor) -> bool:
        D = t.shape[-1]
        return (t.dtype in (torch.float16, torch.bfloat16) and D >= 16 and D & (D - 1) == 0 and t.stride(-1) == 1
                and t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]))
    return TensorDescriptor is not None and all(ok(t) for t in tensors)


def descriptor(t: Tensor, block_rows: int) -> "TensorDescriptor":
    """A host tensor descriptor over (B, H, rows, D) or varlen (total, H, D), loading (block_rows, D) of one head."""
    D = t.shape[-1]
    block = [1, 1, block_rows, D] if t.dim() == 4 else [block_rows, 1, D]
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)


def launch_forward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, lse_strides: tuple[int, int],
                   grid_batch: int, max_t: int, max_s: int, causal: bool, scale: float, dropout_p: float,
                   seed: Tensor | None, cu_seqlens_q: Tensor | None = None, cu_seqlens_k: Tensor | None = None) -> None:
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]  # (B, H, T, D) or varlen (total, H, D)
    varlen = cu_seqlens_q is not None
    strides = (*_strides4(q), *_strides4(k), *_strides4(v))
    int64 = needs_int64(q, k, v, out)
    arch = device_capability(q.device)
    use_tma = arch >= 90 and uses_tma(q, k, v)
    cfg = launch_config("fwd", D, q.dtype, arch, dropout_p > 0, use_tma)
    threshold, drop_scale = _dropout_args(dropout_p)
    grid = (triton.cdiv(max_t, cfg["BLOCK_M"]), H, grid_batch)
    qkv = (q, k, v)
    if use_tma:
        qkv = tuple(descriptor(t, cfg[block]) for t, block in ((q, "BLOCK_M"), (k, "BLOCK_N"), (v, "BLOCK_N")))
    _attn_fwd_kernel[grid](
        *qkv, out, lse, cu_seqlens_q, cu_seqlens_k, seed,
        *strides, *_strides4(out), *lse_strides,
        H, max_t, max_s, H // Hkv, scale, threshold, drop_scale,
        HEAD_DIM=D, CAUSAL=causal, DROPOUT=dropout_p > 0, IS_VARLEN=varlen, USE_TMA=use_tma, INT64=int64,
        DOT_PRECISION=_dot_precision(q.dtype), **cfg,
    )


def launch_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, lse_strides: tuple[int, int],
                    dq: Tensor, dk: Tensor, dv: Tensor, grid_batch: int, max_t: int, max_s: int, causal: bool,
                    scale: float, dropout_p: float, seed: Tensor | None, cu_seqlens_q: Tensor | None = None,
                    cu_seqlens_k: Tensor | None = None) -> None:
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
    varlen = cu_seqlens_q is not None
    arch = device_capability(q.device)
    threshold, drop_scale = _dropout_args(dropout_p)
    delta = torch.empty_like(lse)
    cfg = launch_config("preprocess", D, q.dtype, arch)
    _attn_bwd_preprocess_kernel[(triton.cdiv(max_t, cfg["BLOCK_M"]), H, grid_batch)](
        out, dout, delta, cu_seqlens_q, *_strides4(out), *_strides4(dout), *lse_strides, max_t,
        HEAD_DIM=D, IS_VARLEN=varlen, **cfg)
    common = dict(HEAD_DIM=D, CAUSAL=causal, DROPOUT=dropout_p > 0, IS_VARLEN=varlen, INT64=needs_int64(q, k, v, dout),
                  DOT_PRECISION=_dot_precision(q.dtype))
    strides = (*_strides4(q), *_strides4(k), *_strides4(v), *_strides4(dout))
    cfg = launch_config("dkdv", D, q.dtype, arch, dropout_p > 0)
    _attn_bwd_dkdv_kernel[(triton.cdiv(max_s, cfg["BLOCK_N"]), Hkv, grid_batch)](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, seed, *strides, *_strides4(dk),
        *lse_strides, max_t, max_s, H // Hkv, scale, threshold, drop_scale, GQA=H != Hkv, **common, **cfg)
    cfg = launch_config("dq", D, q.dtype, arch, dropout_p > 0)
    _attn_bwd_dq_kernel[(triton.cdiv(max_t, cfg["BLOCK_M"]), H, grid_batch)](
        q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, seed, *strides,
        *_strides4(dq), *lse_strides, max_t, max_s, H // Hkv, scale, threshold, drop_scale, **common, **cfg)


# -----------------------------------------------------------------------------
def _new_output(q: Tensor) -> Tensor:
    """The output (B, H, T, D), laid out (B, T, H, D) in memory: the model's (B, T, C) reshape is then a view."""
    B, H, T, D = q.shape
    return q.new_empty_strided((B, H, T, D), (T * H * D, D, H * D, 1))  # not a view: a tensor of its own


def check_seed(op: str, dropout_p: float, seed: Tensor | None) -> None:
    if dropout_p > 0 and (seed is None or seed.dtype != torch.int64 or seed.numel() < 1):
        raise ValueError(f"{op}: dropout_p > 0 needs a seed (an int64 tensor with one element)")


@torch.library.custom_op("fastlm::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, dropout_p: float = 0.0,
                   seed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    check_triton_device("fastlm::attention_fwd", q, k, v, seed)
    check_seed("fastlm::attention_fwd", dropout_p, seed)
    B, H, T, D = q.shape
    out = _new_output(q)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    launch_forward(q, k, v, out, lse, (H * T, T), B, T, k.shape[2], causal, scale, dropout_p, seed)
    return out, lse


@_attention_fwd.register_fake
def _(q, k, v, causal, scale, dropout_p=0.0, seed=None):
    B, H, T, D = q.shape
    return _new_output(q), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("fastlm::attention_bwd", mutates_args=())
def _attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                   scale: float, dropout_p: float = 0.0, seed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    check_triton_device("fastlm::attention_bwd", dout, q, k, v, out, lse, seed)
    check_seed("fastlm::attention_bwd", dropout_p, seed)
    check_row_strides("fastlm::attention_bwd", dout=dout, out=out)
    B, H, T, D = q.shape
    if out.shape != q.shape or lse.shape != (B, H, T) or not lse.is_contiguous():
        raise ValueError(f"fastlm::attention_bwd: out must be q's shape {tuple(q.shape)} (any strides) and lse a "
                         f"contiguous ({B}, {H}, {T}), as attention_fwd returns them; got {tuple(out.shape)}, "
                         f"{tuple(lse.shape)} with strides {lse.stride()}")
    dq = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=q.device)
    launch_backward(dout, q, k, v, out, lse, (H * T, T), dq, dk, dv, B, T, k.shape[2], causal, scale, dropout_p, seed)
    return dq, dk, dv


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, causal, scale, dropout_p=0.0, seed=None):
    contiguous = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)
    return contiguous(q), contiguous(k), contiguous(v)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, ctx.causal, ctx.scale, ctx.dropout_p, seed = inputs
    ctx.save_for_backward(q, k, v, *output, seed)


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse, seed = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(dout, q, k, v, out, lse, ctx.causal, ctx.scale, ctx.dropout_p, seed)
    return dq, dk, dv, None, None, None, None


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup_context)


# -----------------------------------------------------------------------------
def check_scale_and_dropout(name: str, scale: float, dropout_p: float) -> None:
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name}: scale must be a positive number, got {scale}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"{name}: dropout_p must be in [0, 1), got {dropout_p!r}")


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """A fresh 64-bit Philox seed on `device`, drawn from torch's generator (no host sync; advances it)."""
    return torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64, device=device, generator=generator)


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
    if q.shape[0] > 65535 or q.shape[1] > 65535:  # CUDA grid axes 1 and 2 are capped at 65535
        raise ValueError(f"attention: batch {q.shape[0]} and heads {q.shape[1]} must each be at most 65535")
    check_row_strides("attention", q=q, k=k, v=v)


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None,
              dropout_p: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """Scaled-dot-product attention. q: (B, H, T, D); k, v: (B, Hkv, S, D); returns (B, H, T, D) in q's dtype.

    Equals `F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)` when T == S;
    when T != S the causal mask is aligned to the bottom-right (query i sees keys up to S - T + i).
    dropout_p: attention-probability dropout (pass 0 in evaluation, as with SDPA); its Philox seed is drawn on
    q's device from `generator` (default: torch's default generator for that device), with no host sync.
    """
    _check_args(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    check_scale_and_dropout("attention", scale, dropout_p)
    if q.numel() == 0 or k.shape[2] == 0 or not use_triton(q):
        return attention_ref(q, k, v, causal, scale, dropout_p)
    seed = draw_seed(q.device, generator) if dropout_p > 0 else None
    return _attention_fwd(q, k, v, causal, scale, float(dropout_p), seed)[0]


def attention_ref(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None,
                  dropout_p: float = 0.0, dropout_mask: Tensor | None = None) -> Tensor:
    """SDPA with the same semantics (bottom-right causal mask): the fallback off Triton and the test reference.

    With dropout_mask (B, H, T, S) bool, that mask is applied explicitly (kept probabilities scaled by 1/(1-p)),
    in the math of SDPA's own math backend; otherwise dropout_p goes to SDPA, which draws its own mask.
    """
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if dropout_mask is not None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        if gqa:
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        scores = (q @ k.transpose(-2, -1)).float() * scale
        if causal:
            scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T), float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no key: zeros, as the kernel
        probs = probs * dropout_mask / (1.0 - dropout_p)
        return (probs.to(q.dtype) @ v)
    if causal and T != S:  # plain `if`s on the shapes: under torch.compile they guard, and SDPA gets Python bools
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=True if gqa else False)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p, scale=scale, enable_gqa=True if gqa else False)


def dropout_mask(seed: Tensor, batch: int, heads: int, T: int, S: int, dropout_p: float) -> Tensor:
    """The keep mask (batch, heads, T, S) bool that the kernels draw for `seed` and `dropout_p`, for tests: entry
    [b, h, i, j] is query i, key j of head h of sequence b (a varlen sequence's scores are its [:T_b, :S_b])."""
    mask = torch.empty((batch, heads, T, S), dtype=torch.int8, device=seed.device)
    threshold, _ = _dropout_args(dropout_p)
    _dropout_mask_kernel[(triton.cdiv(T, 32), heads, batch)](mask, seed, heads, T, S, threshold, BLOCK_M=32, BLOCK_N=32)
    return mask.bool()
