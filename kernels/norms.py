"""Fused LayerNorm and RMSNorm over the last dimension, forward and backward.

    LayerNorm:  y = (x - mean) * rstd * w + b,   mean = sum(x) / N,  rstd = 1 / sqrt(sum((x - mean)^2) / N + eps)
    RMSNorm:    y = x * rstd * w,                rstd = 1 / sqrt(sum(x^2) / N + eps)
    RMSNorm with cast_before_weight (Hugging Face Llama): y = w * round_to_dtype(x)(x * rstd), in the promoted dtype

Backward, with xhat = (x - mean) * rstd (mean = 0 for RMSNorm) and g = dy * w:
    dx = rstd * (g - xhat * sum(g * xhat) / N - sum(g) / N)      (RMSNorm drops the last term)
    dw = sum_rows(dy * xhat),   db = sum_rows(dy)

Statistics are fp32 and only mean and rstd (fp32, one per row) are kept for backward. Forward: a program
normalises BLOCK_M rows held in registers; rows wider than MAX_FUSED_N stream over column blocks (Chan's
parallel variance merge, then a second pass to normalise). Backward: a persistent grid; each program sums
dw/db for its rows in fp32 and writes one partial row, and the partials are summed in a fixed order, so
results are identical run to run (no atomics).

Fused residual add (`residual=`): the forward reads x and the residual once, writes h = residual + x (the
residual stream, in its own dtype) and y = norm(h) in a requested dtype (`out_dtype`, e.g. bf16 for the matmul
that follows under autocast, while the stream stays fp32); the backward adds h's own gradient (from the stream's
later use) to the norm's, and writes it once per dtype that needs it. A weight or bias that does not require grad
gets no partial sums and no reduction. This is flash-attention's `layer_norm_fn(x, w, b, residual, prenorm=True)`.

Limits: any width N >= 1 and any number of rows; x of any shape (..., N) and strides (a 2-D strided view
goes to the kernel without a copy); fp32, fp16, bf16, output in x's dtype unless out_dtype says otherwise. On a CPU tensor without the
Triton interpreter, `layer_norm`/`rms_norm` run `layer_norm_ref`/`rms_norm_ref` (plain PyTorch).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels._utils import check_triton_device, col_offsets, needs_int64_columns, num_programs, tl, triton, use_triton

# Widest row kept whole in registers (no register spills on sm_80/sm_90: see the AOT test); wider rows loop over
# COLUMN_BLOCK-wide blocks. Backward holds x, dy, w and two accumulators, so less.
MAX_FUSED_N = {"forward": 16384, "backward": 4096}
COLUMN_BLOCK = 4096
# A program's tile: narrow rows are packed BLOCK_M to a tile of up to ROW_TILE elements, and each thread holds
# ELEMENTS_PER_THREAD of them. Few threads per row keep the per-row reductions (shuffles, a shared-memory round)
# and the per-row bookkeeping small beside the elementwise work; the backward's accumulators need the registers.
ROW_TILE = {"forward": 2048, "backward": 1024}
ELEMENTS_PER_THREAD = {"forward": 32, "backward": 16}
# Triton spreads a narrow tile's threads along its columns, so each thread holds state for every row of the tile
# (row pointers, statistics; the backward carries them through its loop): at most this many rows a tile.
MAX_ROWS = {"forward": 8, "backward": 4}
BACKWARD_WARPS_PER_SM = 16  # the backward's persistent grid: enough resident warps to keep loads in flight


# -----------------------------------------------------------------------------
@triton.jit
def _tile_mask(row_mask, cols, N, EVEN_N: tl.constexpr):
    if EVEN_N:  # every column is real: only rows are masked, so loads and stores stay whole vectors
        return row_mask[:, None]
    else:
        return row_mask[:, None] & (cols < N)[None, :]


@triton.jit
def _norm_fwd_kernel(
    X, R, Y, H, W, B,             # pointers: input, residual (M, N) strided; output, sum x + r (M, N) contiguous; weight, bias
    Mean, Rstd,                   # fp32 (M,): per-row statistics kept for backward
    stride_xm, stride_xn,         # input strides
    stride_rm, stride_rn,         # residual strides
    M, N, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SINGLE_PASS: tl.constexpr,    # BLOCK_N >= N: the whole row lives in registers
    EVEN_N: tl.constexpr,         # N is a multiple of BLOCK_N: no column masks
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,   # normalise h = x + r (rounded to H's dtype) and write h
    CAST_BEFORE_WEIGHT: tl.constexpr,  # Llama: round (h - mean) * rstd to H's dtype before the weight multiplies
    COL_INT64: tl.constexpr,      # column offsets (cols * stride) in int64
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows = rows.to(tl.int64)  # int64: row * stride overflows int32 past 2^31 elements
    X_rows = X + rows[:, None] * stride_xm
    R_rows = R + rows[:, None] * stride_rm
    Y_rows = Y + rows[:, None] * N
    H_rows = H + rows[:, None] * N
    inv_n = 1.0 / N
    if SINGLE_PASS:
        cols = tl.arange(0, BLOCK_N)
        mask = _tile_mask(row_mask, cols, N, EVEN_N)
        x = tl.load(X_rows + col_offsets(cols, stride_xn, COL_INT64)[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(R_rows + col_offsets(cols, stride_rn, COL_INT64)[None, :], mask=mask, other=0.0)
            h = (x + r.to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H_rows + cols[None, :], h, mask=mask)
            x = h.to(tl.float32)
        if IS_RMS:
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)
            xc = x  # padding columns load as 0
        else:
            mean = tl.sum(x, axis=1) * inv_n
            xc = x - mean[:, None]
            if not EVEN_N:
                xc = tl.where(mask, xc, 0.0)
        rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) * inv_n + eps)
        y = xc * rstd[:, None]
        if CAST_BEFORE_WEIGHT:
            y = y.to(H.dtype.element_ty).to(tl.float32)
        if HAS_WEIGHT:
            if EVEN_N:
                w = tl.load(W + cols)
            else:
                w = tl.load(W + cols, mask=cols < N, other=0.0)
            if HAS_BIAS:
                if EVEN_N:
                    b = tl.load(B + cols)
                else:
                    b = tl.load(B + cols, mask=cols < N, other=0.0)
                y = y * w.to(tl.float32)[None, :] + b.to(tl.float32)[None, :]
            else:
                y = y * w.to(tl.float32)[None, :]
        elif HAS_BIAS:  # F.layer_norm takes a bias without a weight
            if EVEN_N:
                b = tl.load(B + cols)
            else:
                b = tl.load(B + cols, mask=cols < N, other=0.0)
            y = y + b.to(tl.float32)[None, :]
        tl.store(Y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Pass 1: per-block mean and M2, merged across blocks (Chan et al.), stable for large means; h is written.
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = _tile_mask(row_mask, cols, N, EVEN_N)
            x = tl.load(X_rows + col_offsets(cols, stride_xn, COL_INT64)[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(R_rows + col_offsets(cols, stride_rn, COL_INT64)[None, :], mask=mask, other=0.0)
                h = (x + r.to(tl.float32)).to(H.dtype.element_ty)
                tl.store(H_rows + cols[None, :], h, mask=mask)
                x = h.to(tl.float32)
            if IS_RMS:
                m2 += tl.sum(x * x, axis=1)
            else:
                n_seen = start * 1.0  # as fp32
                n_block = tl.minimum(N - start, BLOCK_N) * 1.0
                block_mean = tl.sum(x, axis=1) / n_block
                xc = x - block_mean[:, None]
                if not EVEN_N:
                    xc = tl.where(mask, xc, 0.0)
                delta = block_mean - mean
                n_total = n_seen + n_block
                mean += delta * (n_block / n_total)
                m2 += tl.sum(xc * xc, axis=1) + delta * delta * (n_seen * n_block / n_total)
        rstd = tl.math.rsqrt(m2 * inv_n + eps)
        # Pass 2: normalise (re-reading h, which this program wrote, when there is a residual).
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = _tile_mask(row_mask, cols, N, EVEN_N)
            if HAS_RESIDUAL:
                x = tl.load(H_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(X_rows + col_offsets(cols, stride_xn, COL_INT64)[None, :], mask=mask, other=0.0).to(tl.float32)
            y = (x - mean[:, None]) * rstd[:, None]
            if CAST_BEFORE_WEIGHT:
                y = y.to(H.dtype.element_ty).to(tl.float32)
            if HAS_WEIGHT:
                y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            if HAS_BIAS:
                y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            tl.store(Y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@triton.jit
def _norm_bwd_kernel(
    DY, X, W, Mean, Rstd,         # pointers: output grad (M, N) strided, normalised input (M, N) strided, weight, fp32 stats
    DH,                           # grad of the sum h (M, N) contiguous, added to dx (HAS_DH)
    DX, DX2,                      # input grads (M, N) contiguous: DX in the normalised input's dtype, DX2 in another
    DW_partial, DB_partial,       # fp32 (num_programs, N): one partial sum per program
    stride_dym, stride_dyn, stride_xm, stride_xn,
    M, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr,
    EVEN_N: tl.constexpr,         # N is a multiple of BLOCK_N: no column masks
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,  # only the parameter gradients that are needed
    HAS_DH: tl.constexpr, STORE_DX2: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr,  # dW from xhat rounded to X's dtype, as the forward multiplied it
    COL_INT64: tl.constexpr,      # column offsets (cols * stride) in int64
):
    # Padding columns and rows load x = dy = 0, so they add nothing to c1, c2, dW or dB: no masking of values.
    pid = tl.program_id(0)
    partial_row = pid.to(tl.int64) * N
    num_row_blocks = tl.cdiv(M, BLOCK_M)
    inv_n = 1.0 / N
    if SINGLE_PASS:
        cols = tl.arange(0, BLOCK_N)
        x_cols = col_offsets(cols, stride_xn, COL_INT64)[None, :]
        dy_cols = col_offsets(cols, stride_dyn, COL_INT64)[None, :]
        if HAS_WEIGHT:
            if EVEN_N:
                w = tl.load(W + cols).to(tl.float32)
            else:
                w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
        # Per-row partial sums, reduced over rows once at the end: no cross-warp reduction per iteration.
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Row pointers advance by a fixed int64 step (no 64-bit multiply per row); offsets within a block stay small.
    block_rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    step = tl.num_programs(0).to(tl.int64) * BLOCK_M
    X_rows = X + block_rows * stride_xm
    DY_rows = DY + block_rows * stride_dym
    DH_rows = DH + block_rows * N
    DX_rows = DX + block_rows * N
    DX2_rows = DX2 + block_rows * N
    for row_block in range(pid, num_row_blocks, tl.num_programs(0)):
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        if IS_RMS:
            mean_rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
        else:
            mean_rstd = tl.load(Mean + rows, mask=row_mask, other=0.0) * rstd
        if SINGLE_PASS:
            mask = _tile_mask(row_mask, cols, N, EVEN_N)
            x = tl.load(X_rows + x_cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY_rows + dy_cols, mask=mask, other=0.0).to(tl.float32)
            xhat = x * rstd[:, None] - mean_rstd[:, None]
            if HAS_WEIGHT:
                g = dy * w[None, :]
            else:
                g = dy
            # dx = rstd * (g - xhat * c1 - c2) with c1 = mean(g * xhat), c2 = mean(g): two FMAs per element
            a = tl.sum(g * xhat, axis=1) * (inv_n * rstd)
            if IS_RMS:
                dx = g * rstd[:, None] - xhat * a[:, None]
            else:
                b = tl.sum(g, axis=1) * (inv_n * rstd)
                dx = g * rstd[:, None] - (xhat * a[:, None] + b[:, None])
            if HAS_DH:
                dx += tl.load(DH_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX_rows + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            if STORE_DX2:
                tl.store(DX2_rows + cols[None, :], dx.to(DX2.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                if CAST_BEFORE_WEIGHT:
                    xhat = xhat.to(X.dtype.element_ty).to(tl.float32)
                dw_acc += dy * xhat
            if COMPUTE_DB:
                db_acc += dy
        else:
            c1 = tl.zeros([BLOCK_M], dtype=tl.float32)
            c2 = tl.zeros([BLOCK_M], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = _tile_mask(row_mask, cols, N, EVEN_N)
                x = tl.load(X_rows + col_offsets(cols, stride_xn, COL_INT64)[None, :], mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY_rows + col_offsets(cols, stride_dyn, COL_INT64)[None, :], mask=mask, other=0.0).to(tl.float32)
                xhat = x * rstd[:, None] - mean_rstd[:, None]
                if HAS_WEIGHT:
                    dy = dy * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
                c1 += tl.sum(dy * xhat, axis=1)
                c2 += tl.sum(dy, axis=1)
            a = c1 * (inv_n * rstd)
            b = c2 * (inv_n * rstd)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = _tile_mask(row_mask, cols, N, EVEN_N)
                x = tl.load(X_rows + col_offsets(cols, stride_xn, COL_INT64)[None, :], mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY_rows + col_offsets(cols, stride_dyn, COL_INT64)[None, :], mask=mask, other=0.0).to(tl.float32)
                xhat = x * rstd[:, None] - mean_rstd[:, None]
                if HAS_WEIGHT:
                    g = dy * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
                else:
                    g = dy
                if IS_RMS:
                    dx = g * rstd[:, None] - xhat * a[:, None]
                else:
                    dx = g * rstd[:, None] - (xhat * a[:, None] + b[:, None])
                if HAS_DH:
                    dx += tl.load(DH_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                tl.store(DX_rows + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
                if STORE_DX2:
                    tl.store(DX2_rows + cols[None, :], dx.to(DX2.dtype.element_ty), mask=mask)
                # Only this program touches its partial row, so read-add-write is race-free and deterministic.
                if COMPUTE_DW:
                    if CAST_BEFORE_WEIGHT:
                        xhat = xhat.to(X.dtype.element_ty).to(tl.float32)
                    partial = DW_partial + partial_row + cols
                    tl.store(partial, tl.load(partial, mask=cols < N) + tl.sum(dy * xhat, axis=0), mask=cols < N)
                if COMPUTE_DB:
                    partial = DB_partial + partial_row + cols
                    tl.store(partial, tl.load(partial, mask=cols < N) + tl.sum(dy, axis=0), mask=cols < N)
        X_rows += step * stride_xm
        DY_rows += step * stride_dym
        DH_rows += step * N
        DX_rows += step * N
        DX2_rows += step * N
    if SINGLE_PASS:
        if COMPUTE_DW:
            tl.store(DW_partial + partial_row + cols, tl.sum(dw_acc, axis=0), mask=cols < N)
        if COMPUTE_DB:
            tl.store(DB_partial + partial_row + cols, tl.sum(db_acc, axis=0), mask=cols < N)


# -----------------------------------------------------------------------------
def launch_config(N: int, backward: bool = False) -> dict:
    """Block sizes and warps for rows of width N."""
    direction = "backward" if backward else "forward"
    single_pass = N <= MAX_FUSED_N[direction]
    block_n = triton.next_power_of_2(N) if single_pass else COLUMN_BLOCK
    block_m = min(max(1, ROW_TILE[direction] // block_n), MAX_ROWS[direction]) if single_pass else 1
    num_warps = min(max(block_m * block_n // (32 * ELEMENTS_PER_THREAD[direction]), 1), 16)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_PASS=single_pass, EVEN_N=N % block_n == 0, num_warps=num_warps)


def _dense(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _as_rows(t: Tensor) -> Tensor:
    """(..., N) -> (M, N), a view whenever the strides allow it (the kernels take any 2-D strides)."""
    return t.reshape(-1, t.shape[-1])


def _sum_dtype(x: Tensor, residual: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, residual.dtype)  # as `residual + x`: an fp32 stream stays fp32


@torch.library.custom_op("fastlm::layer_norm_fwd", mutates_args=())
def _norm_fwd(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor], eps: float, is_rms: bool,
    out_dtype: Optional[torch.dtype], cast_before_weight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = norm(x [+ residual]) in out_dtype (default: the normalised input's), the sum h (an empty tensor without
    a residual), and fp32 mean and rstd per row. cast_before_weight: the normalised rows are rounded to the
    normalised input's dtype before the weight and bias apply (Hugging Face Llama's RMSNorm)."""
    check_triton_device("fastlm::layer_norm_fwd", x, weight, bias, residual)
    return _launch_norm_fwd(x, weight, bias, residual, eps, is_rms, out_dtype, cast_before_weight)


def _launch_norm_fwd(x, weight, bias, residual, eps, is_rms, out_dtype, cast_before_weight):
    weight, bias = _dense(weight), _dense(bias)  # the kernels index parameters as contiguous
    x2 = _as_rows(x)
    M, N = x2.shape
    h_dtype = x.dtype if residual is None else _sum_dtype(x, residual)
    y = torch.empty(x.shape, dtype=out_dtype or h_dtype, device=x.device)
    h = torch.empty(x.shape if residual is not None else (0,), dtype=h_dtype, device=x.device)
    r2 = x2 if residual is None else _as_rows(residual)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M > 0:
        cfg = launch_config(N)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
        _norm_fwd_kernel[grid](
            x2, r2, y, x2 if residual is None else h, x2 if weight is None else weight, x2 if bias is None else bias,
            mean, rstd, x2.stride(0), x2.stride(1), r2.stride(0), r2.stride(1), M, N, eps,
            IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
            CAST_BEFORE_WEIGHT=cast_before_weight, COL_INT64=needs_int64_columns(N, x2.stride(1), r2.stride(1)), **cfg,
        )
    return y, h, mean, rstd


@_norm_fwd.register_fake
def _(x, weight, bias, residual, eps, is_rms, out_dtype, cast_before_weight):
    M = x.numel() // x.shape[-1]
    h_dtype = x.dtype if residual is None else _sum_dtype(x, residual)
    y = torch.empty_like(x, dtype=out_dtype or h_dtype, memory_format=torch.contiguous_format)
    h = x.new_empty(x.shape if residual is not None else (0,), dtype=h_dtype)
    stats = x.new_empty(M, dtype=torch.float32)
    return y, h, stats, stats.clone()


@torch.library.custom_op("fastlm::layer_norm_bwd", mutates_args=())
def _norm_bwd(
    dy: Tensor, dh: Optional[Tensor], x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, is_rms: bool,
    has_bias: bool, grad_weight: bool, grad_bias: bool, dx2_dtype: Optional[torch.dtype], cast_before_weight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the normalised input x (plus dh, the sum's own gradient, when given), in x's dtype and, with
    dx2_dtype, the same values in that dtype (else an empty tensor); then dweight and dbias, made only when asked
    for (grad_weight, grad_bias; an empty tensor otherwise, which autograd maps to None)."""
    check_triton_device("fastlm::layer_norm_bwd", dy, dh, x, weight)
    return _launch_norm_bwd(dy, dh, x, weight, mean, rstd, is_rms, has_bias, grad_weight, grad_bias, dx2_dtype,
                            cast_before_weight)


def _launch_norm_bwd(dy, dh, x, weight, mean, rstd, is_rms, has_bias, grad_weight, grad_bias, dx2_dtype,
                     cast_before_weight):
    weight = _dense(weight)
    x2, dy2 = _as_rows(x), _as_rows(dy)
    dh2 = None if dh is None else _as_rows(dh.contiguous())
    M, N = x2.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dx2 = torch.empty(x.shape if dx2_dtype is not None else (0,), dtype=dx2_dtype or x.dtype, device=x.device)
    cfg = launch_config(N, backward=True)
    per_sm = max(1, BACKWARD_WARPS_PER_SM // cfg["num_warps"])
    programs = max(1, min(num_programs(x.device, per_sm), triton.cdiv(M, cfg["BLOCK_M"])))
    compute_dw, compute_db = grad_weight and weight is not None, grad_bias and has_bias
    # Partials start at zero: programs with no rows, and the streaming path, rely on it.
    dw_partial = torch.zeros((programs, N) if compute_dw else (1,), dtype=torch.float32, device=x.device)
    db_partial = torch.zeros((programs, N) if compute_db else (1,), dtype=torch.float32, device=x.device)
    if M > 0:
        _norm_bwd_kernel[(programs,)](
            dy2, x2, x2 if weight is None else weight, mean, rstd, x2 if dh2 is None else dh2, dx,
            dx if dx2_dtype is None else dx2, dw_partial, db_partial,
            dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1), M, N,
            IS_RMS=is_rms, HAS_WEIGHT=weight is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
            HAS_DH=dh is not None, STORE_DX2=dx2_dtype is not None, CAST_BEFORE_WEIGHT=cast_before_weight,
            COL_INT64=needs_int64_columns(N, x2.stride(1), dy2.stride(1)), **cfg,
        )
    param_dtype = x.dtype if weight is None else weight.dtype
    dw = dw_partial.sum(0).to(param_dtype) if compute_dw else x.new_empty(0, dtype=param_dtype)
    db = db_partial.sum(0).to(param_dtype) if compute_db else x.new_empty(0, dtype=param_dtype)
    return dx, dx2, dw, db


@_norm_bwd.register_fake
def _(dy, dh, x, weight, mean, rstd, is_rms, has_bias, grad_weight, grad_bias, dx2_dtype, cast_before_weight):
    N = x.shape[-1]
    param_dtype = x.dtype if weight is None else weight.dtype
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dx2 = x.new_empty(x.shape if dx2_dtype is not None else (0,), dtype=dx2_dtype or x.dtype)
    dw = x.new_empty(N if grad_weight and weight is not None else 0, dtype=param_dtype)
    db = x.new_empty(N if grad_bias and has_bias else 0, dtype=param_dtype)
    return dx, dx2, dw, db


def _norm_setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, is_rms, out_dtype, ctx.cast_before_weight = inputs
    _, h, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # an unused h gets no zero-filled gradient
    ctx.save_for_backward(x if residual is None else h, weight, mean, rstd)
    ctx.has_bias, ctx.is_rms, ctx.has_residual = bias is not None, is_rms, residual is not None
    ctx.dtypes = (x.dtype, None if residual is None else residual.dtype)


def _norm_backward(ctx, dy, dh, _dmean, _drstd):
    normalised, weight, mean, rstd = ctx.saved_tensors
    if not ctx.has_residual:
        dh = None  # the empty placeholder output's gradient (a tracer may still hand one in)
    if dy is None:
        dy = torch.zeros_like(normalised)
    need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
    # The sum's dtype is the residual's or x's; the other one, if it differs and needs a gradient, gets a copy.
    x_dtype, r_dtype = ctx.dtypes
    other = x_dtype if need_x and normalised.dtype != x_dtype else (r_dtype if need_r and r_dtype not in (None, normalised.dtype) else None)
    d, d2, dw, db = _norm_bwd(dy, dh, normalised, weight, mean, rstd, ctx.is_rms, ctx.has_bias, need_w, need_b, other,
                              ctx.cast_before_weight)
    by_dtype = {d.dtype: d, **({d2.dtype: d2} if other is not None else {})}
    dx = by_dtype[x_dtype] if need_x else None
    dr = by_dtype[r_dtype] if ctx.has_residual and need_r else None
    return dx, dw if need_w and weight is not None else None, db if need_b and ctx.has_bias else None, dr, None, None, None, None


_norm_fwd.register_autograd(_norm_backward, setup_context=_norm_setup_context)


# -----------------------------------------------------------------------------
def _check_args(name: str, x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None) -> None:
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    for label, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (x.shape[-1],):
            raise ValueError(f"{name}: {label} has shape {tuple(p.shape)}, expected ({x.shape[-1]},) for x of shape {tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"{name}: residual has shape {tuple(residual.shape)}, expected x's {tuple(x.shape)}")


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
               residual: Tensor | None = None, out_dtype: torch.dtype | None = None):
    """Drop-in for `F.layer_norm(x, (N,), weight, bias, eps)` over the last dim. x: (..., N).

    With `residual` (same shape): returns (y, h) with h = residual + x (dtype promoted as `+` would: an fp32
    residual stream stays fp32) and y = layer_norm(h), in one pass over x and residual; both gradients flow.
    out_dtype: y's dtype (default: that of the normalised input), e.g. bfloat16 for a matmul under autocast.
    """
    _check_args("layer_norm", x, weight, bias, residual)
    if not use_triton(x):
        return _norm_ref(x, residual, out_dtype, lambda h: layer_norm_ref(h, weight, bias, eps))
    y, h, _, _ = _norm_fwd(x, weight, bias, residual, eps, False, out_dtype, False)
    return y if residual is None else (y, h)


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6, residual: Tensor | None = None,
             out_dtype: torch.dtype | None = None, cast_before_weight: bool = False):
    """Drop-in for `F.rms_norm(x, (N,), weight, eps)` over the last dim. x: (..., N). `residual` and `out_dtype`
    as in layer_norm.

    cast_before_weight=True gives Hugging Face Llama's numerics: `weight * (x.float() * rsqrt(mean(x.float()^2) +
    eps)).to(x.dtype)`, i.e. normalised in fp32, rounded to x's dtype (h's, with a residual), then multiplied by
    the weight; y's dtype is then torch.promote_types(weight.dtype, x.dtype) unless out_dtype says otherwise. The
    rounding's backward is the identity; dweight sums dy times the rounded rows.
    """
    _check_args("rms_norm", x, weight, None, residual)
    if cast_before_weight and out_dtype is None:
        h_dtype = x.dtype if residual is None else _sum_dtype(x, residual)
        out_dtype = h_dtype if weight is None else torch.promote_types(weight.dtype, h_dtype)
    if not use_triton(x):
        return _norm_ref(x, residual, out_dtype, lambda h: rms_norm_ref(h, weight, eps, cast_before_weight))
    y, h, _, _ = _norm_fwd(x, weight, None, residual, eps, True, out_dtype, cast_before_weight)
    return y if residual is None else (y, h)


def _norm_ref(x: Tensor, residual: Tensor | None, out_dtype: torch.dtype | None, norm):
    h = x if residual is None else residual + x
    y = norm(h)
    y = y if out_dtype is None else y.to(out_dtype)
    return y if residual is None else (y, h)


def layer_norm_ref(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Plain PyTorch LayerNorm, the fallback off Triton and the reference in tests."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm_ref(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6, cast_before_weight: bool = False) -> Tensor:
    """Plain PyTorch RMSNorm with fp32 statistics, output in x's dtype; with cast_before_weight, Hugging Face
    Llama's expression (rounded to x's dtype before the weight; output dtype promoted with the weight's)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if cast_before_weight:
        y = y.to(x.dtype)
        return y if weight is None else weight * y
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` over the last dim running the Triton kernel; same arguments, parameters and state_dict keys."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True, device=None, dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"LayerNorm: only the last dimension can be normalised, got normalized_shape={self.normalized_shape}")

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` over the last dim running the Triton kernel; same arguments, parameters and state_dict keys.

    As in `nn.RMSNorm`, eps=None means torch.finfo(x.dtype).eps. cast_before_weight=True: Hugging Face Llama's
    numerics (see rms_norm).
    """

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True, device=None, dtype=None,
                 *, cast_before_weight: bool = False):
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"RMSNorm: only the last dimension can be normalised, got normalized_shape={self.normalized_shape}")
        self.cast_before_weight = cast_before_weight

    def forward(self, x: Tensor) -> Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        return rms_norm(x, self.weight, eps, cast_before_weight=self.cast_before_weight)
