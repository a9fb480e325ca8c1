"""Fused LayerNorm and RMSNorm over the last dimension, forward and backward.

    LayerNorm:  y = (x - mean) * rstd * w + b,   mean = sum(x) / N,  rstd = 1 / sqrt(sum((x - mean)^2) / N + eps)
    RMSNorm:    y = x * rstd * w,                rstd = 1 / sqrt(sum(x^2) / N + eps)

Backward, with xhat = (x - mean) * rstd (mean = 0 for RMSNorm) and g = dy * w:
    dx = rstd * (g - xhat * sum(g * xhat) / N - sum(g) / N)      (RMSNorm drops the last term)
    dw = sum_rows(dy * xhat),   db = sum_rows(dy)

Statistics are fp32 and only mean and rstd (fp32, one per row) are kept for backward. Forward: a program
normalises BLOCK_M rows held in registers; rows wider than MAX_FUSED_N stream over column blocks (Chan's
parallel variance merge, then a second pass to normalise). Backward: a persistent grid; each program sums
dw/db for its rows in fp32 and writes one partial row, and the partials are summed in a fixed order, so
results are identical run to run (no atomics).

Limits: any width N >= 1 and any number of rows; x of any shape (..., N) and strides (a 2-D strided view
goes to the kernel without a copy); fp32, fp16, bf16, output in x's dtype. On a CPU tensor without the
Triton interpreter, `layer_norm`/`rms_norm` run `layer_norm_ref`/`rms_norm_ref` (plain PyTorch).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels._utils import check_triton_device, num_programs, tl, triton, use_triton

# Widest row kept whole in registers (16 warps, no register spills on sm_80/sm_90: see the AOT test);
# wider rows loop over COLUMN_BLOCK-wide blocks. Backward holds x, dy, w and two accumulators, so less.
MAX_FUSED_N = {"forward": 16384, "backward": 4096}
COLUMN_BLOCK = 4096
ROW_TILE = 2048  # narrow rows are packed BLOCK_M to a program, up to this many elements


# -----------------------------------------------------------------------------
@triton.jit
def _norm_fwd_kernel(
    X, Y, W, B,                   # pointers: input (M, N) strided, output (M, N) contiguous, weight (N,), bias (N,)
    Mean, Rstd,                   # fp32 (M,): per-row statistics kept for backward
    stride_xm, stride_xn,         # input strides
    M, N, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SINGLE_PASS: tl.constexpr,    # BLOCK_N >= N: the whole row lives in registers
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows = rows.to(tl.int64)  # int64: row * stride overflows int32 past 2^31 elements
    X_rows = X + rows[:, None] * stride_xm
    Y_rows = Y + rows[:, None] * N
    if SINGLE_PASS:
        cols = tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols < N)[None, :]
        x = tl.load(X_rows + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
        if IS_RMS:
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        else:
            mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
        y = xc * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Pass 1: per-block mean and M2, merged across blocks (Chan et al.), stable for large means.
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols < N)[None, :]
            x = tl.load(X_rows + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
            if IS_RMS:
                m2 += tl.sum(x * x, axis=1)
            else:
                n_seen = start * 1.0  # as fp32
                n_block = tl.minimum(N - start, BLOCK_N) * 1.0
                block_mean = tl.sum(x, axis=1) / n_block
                xc = tl.where(mask, x - block_mean[:, None], 0.0)
                delta = block_mean - mean
                n_total = n_seen + n_block
                mean += delta * (n_block / n_total)
                m2 += tl.sum(xc * xc, axis=1) + delta * delta * (n_seen * n_block / n_total)
        rstd = 1.0 / tl.sqrt(m2 / N + eps)
        # Pass 2: normalise.
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols < N)[None, :]
            x = tl.load(X_rows + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean[:, None]) * rstd[:, None]
            if HAS_WEIGHT:
                y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            if HAS_BIAS:
                y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            tl.store(Y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@triton.jit
def _norm_bwd_kernel(
    DY, X, W, Mean, Rstd,         # pointers: output grad (M, N) strided, input (M, N) strided, weight, fp32 stats
    DX,                           # input grad (M, N) contiguous
    DW_partial, DB_partial,       # fp32 (num_programs, N): one partial sum per program
    stride_dym, stride_dyn, stride_xm, stride_xn,
    M, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0)
    num_row_blocks = tl.cdiv(M, BLOCK_M)
    if SINGLE_PASS:
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row_block in range(pid, num_row_blocks, tl.num_programs(0)):
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows = rows.to(tl.int64)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        if IS_RMS:
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        else:
            mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        X_rows = X + rows[:, None] * stride_xm
        DY_rows = DY + rows[:, None] * stride_dym
        DX_rows = DX + rows[:, None] * N
        if SINGLE_PASS:
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(X_rows + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY_rows + cols[None, :] * stride_dyn, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            if HAS_WEIGHT:
                g = dy * w[None, :]
            else:
                g = dy
            c1 = tl.sum(g * xhat, axis=1) / N
            if IS_RMS:
                dx = (g - xhat * c1[:, None]) * rstd[:, None]
            else:
                c2 = tl.sum(g, axis=1) / N
                dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            tl.store(DX_rows + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_WEIGHT:
                dw_acc += tl.sum(dy * xhat, axis=0)
            if HAS_BIAS:
                db_acc += tl.sum(dy, axis=0)
        else:
            c1 = tl.zeros([BLOCK_M], dtype=tl.float32)
            c2 = tl.zeros([BLOCK_M], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = row_mask[:, None] & (cols < N)[None, :]
                x = tl.load(X_rows + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY_rows + cols[None, :] * stride_dyn, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
                if HAS_WEIGHT:
                    dy = dy * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
                c1 += tl.sum(dy * xhat, axis=1)
                c2 += tl.sum(dy, axis=1)
            c1 = c1 / N
            c2 = c2 / N
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = row_mask[:, None] & (cols < N)[None, :]
                x = tl.load(X_rows + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY_rows + cols[None, :] * stride_dyn, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
                if HAS_WEIGHT:
                    g = dy * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
                else:
                    g = dy
                if IS_RMS:
                    dx = (g - xhat * c1[:, None]) * rstd[:, None]
                else:
                    dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
                tl.store(DX_rows + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
                # Only this program touches its partial row, so read-add-write is race-free and deterministic.
                if HAS_WEIGHT:
                    partial = DW_partial + pid * N + cols
                    tl.store(partial, tl.load(partial, mask=cols < N) + tl.sum(dy * xhat, axis=0), mask=cols < N)
                if HAS_BIAS:
                    partial = DB_partial + pid * N + cols
                    tl.store(partial, tl.load(partial, mask=cols < N) + tl.sum(dy, axis=0), mask=cols < N)
    if SINGLE_PASS:
        if HAS_WEIGHT:
            tl.store(DW_partial + pid * N + cols, dw_acc, mask=col_mask)
        if HAS_BIAS:
            tl.store(DB_partial + pid * N + cols, db_acc, mask=col_mask)


# -----------------------------------------------------------------------------
def launch_config(N: int, backward: bool = False) -> dict:
    """Block sizes and warps for rows of width N."""
    single_pass = N <= MAX_FUSED_N["backward" if backward else "forward"]
    block_n = triton.next_power_of_2(N) if single_pass else COLUMN_BLOCK
    block_m = max(1, ROW_TILE // block_n) if single_pass else 1
    num_warps = min(max(block_m * block_n // 256, 1), 32)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_PASS=single_pass, num_warps=num_warps)


def _dense(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _as_rows(t: Tensor) -> Tensor:
    """(..., N) -> (M, N), a view whenever the strides allow it (the kernels take any 2-D strides)."""
    return t.reshape(-1, t.shape[-1])


@torch.library.custom_op("fastlm::layer_norm_fwd", mutates_args=())
def _norm_fwd(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, is_rms: bool
) -> tuple[Tensor, Tensor, Tensor]:
    check_triton_device("fastlm::layer_norm_fwd", x, weight, bias)
    weight, bias = _dense(weight), _dense(bias)  # the kernels index parameters as contiguous
    x2 = _as_rows(x)
    M, N = x2.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M > 0:
        cfg = launch_config(N)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
        _norm_fwd_kernel[grid](
            x2, y, x2 if weight is None else weight, x2 if bias is None else bias, mean, rstd,
            x2.stride(0), x2.stride(1), M, N, eps,
            IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **cfg,
        )
    return y, mean, rstd


@_norm_fwd.register_fake
def _(x, weight, bias, eps, is_rms):
    M = x.numel() // x.shape[-1]
    stats = x.new_empty(M, dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, stats.clone()


@torch.library.custom_op("fastlm::layer_norm_bwd", mutates_args=())
def _norm_bwd(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, has_bias: bool, is_rms: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dx, dweight, dbias; an absent weight or bias gets an empty gradient (autograd maps it to None)."""
    check_triton_device("fastlm::layer_norm_bwd", dy, x, weight)
    weight = _dense(weight)
    x2, dy2 = _as_rows(x), _as_rows(dy)
    M, N = x2.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    cfg = launch_config(N, backward=True)
    programs = max(1, min(num_programs(x.device), triton.cdiv(M, cfg["BLOCK_M"])))
    has_weight = weight is not None
    # Partials start at zero: programs with no rows, and the streaming path, rely on it.
    dw_partial = torch.zeros((programs, N) if has_weight else (1,), dtype=torch.float32, device=x.device)
    db_partial = torch.zeros((programs, N) if has_bias else (1,), dtype=torch.float32, device=x.device)
    if M > 0:
        _norm_bwd_kernel[(programs,)](
            dy2, x2, x2 if weight is None else weight, mean, rstd, dx, dw_partial, db_partial,
            dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1), M, N,
            IS_RMS=is_rms, HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, **cfg,
        )
    param_dtype = x.dtype if weight is None else weight.dtype
    dw = dw_partial.sum(0).to(param_dtype) if has_weight else x.new_empty(0, dtype=param_dtype)
    db = db_partial.sum(0).to(param_dtype) if has_bias else x.new_empty(0, dtype=param_dtype)
    return dx, dw, db


@_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, has_bias, is_rms):
    N = x.shape[-1]
    param_dtype = x.dtype if weight is None else weight.dtype
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dw = x.new_empty(N if weight is not None else 0, dtype=param_dtype)
    db = x.new_empty(N if has_bias else 0, dtype=param_dtype)
    return dx, dw, db


def _norm_setup_context(ctx, inputs, output):
    x, weight, bias, eps, is_rms = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias, ctx.is_rms = bias is not None, is_rms


def _norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _norm_bwd(dy, x, weight, mean, rstd, ctx.has_bias, ctx.is_rms)
    return dx, dw if weight is not None else None, db if ctx.has_bias else None, None, None


_norm_fwd.register_autograd(_norm_backward, setup_context=_norm_setup_context)


# -----------------------------------------------------------------------------
def _check_args(name: str, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    for label, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (x.shape[-1],):
            raise ValueError(f"{name}: {label} has shape {tuple(p.shape)}, expected ({x.shape[-1]},) for x of shape {tuple(x.shape)}")


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Drop-in for `F.layer_norm(x, (N,), weight, bias, eps)` over the last dim. x: (..., N)."""
    _check_args("layer_norm", x, weight, bias)
    if not use_triton(x):
        return layer_norm_ref(x, weight, bias, eps)
    return _norm_fwd(x, weight, bias, eps, False)[0]


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Drop-in for `F.rms_norm(x, (N,), weight, eps)` over the last dim. x: (..., N)."""
    _check_args("rms_norm", x, weight, None)
    if not use_triton(x):
        return rms_norm_ref(x, weight, eps)
    return _norm_fwd(x, weight, None, eps, True)[0]


def layer_norm_ref(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Plain PyTorch LayerNorm, the fallback off Triton and the reference in tests."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm_ref(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Plain PyTorch RMSNorm with fp32 statistics, output in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
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

    As in `nn.RMSNorm`, eps=None means torch.finfo(x.dtype).eps.
    """

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True, device=None, dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"RMSNorm: only the last dimension can be normalised, got normalized_shape={self.normalized_shape}")

    def forward(self, x: Tensor) -> Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        return rms_norm(x, self.weight, eps)
