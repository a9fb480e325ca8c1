"""Softmax cross-entropy over a vocabulary, and a fused LM head + cross-entropy that never builds the logits.

For a row of logits x (V entries), target t, label smoothing s and z-loss weight z:
    lse  = log(sum_j exp(x_j))                                          (online, in fp32, over BLOCK_V blocks)
    loss = lse - (1 - s) * x_t - (s / V) * sum_j x_j + z * lse^2
    dloss/dx_j = softmax_j * (1 + 2 z lse) - (1 - s) * [j == t] - s / V
Rows whose target is `ignore_index` give loss 0 and gradient 0; "mean" divides by the number of other rows, as
F.cross_entropy does, except that a batch with every row ignored gives 0 (torch gives nan). The z-loss
(PaLM) keeps log Z near 0; z = 0 is exactly F.cross_entropy. A target outside [0, V) that is not
ignore_index gives a nan loss (no host sync is made to raise an error).

cross_entropy: the forward reads the logits once and keeps only lse (fp32, one per row); the backward reads
them once more and writes the gradient, the only logits-sized buffer it allocates.

linear_cross_entropy(x, W, target, b) = cross_entropy(x @ W.T + b, target) for an LM head: rows are taken in
chunks, each chunk's logits are built, turned into their gradient in place, and folded into dx, dW (fp32
accumulator) and db, so peak extra memory is one chunk of logits plus the gradients themselves, never N x V.
Only the gradients that autograd will ask for are made: the wrapper reads, at call time, which of x, W and b
require grad (none under torch.no_grad()), and a frozen head (LoRA, training only the last blocks) costs
no dW matmul (a third of the head's FLOPs) and no (V, C) fp32 accumulator; a loss with no gradient needed
skips the logits' gradient altogether. With reduction "mean"/"sum" the needed gradients are made during the
forward (the upstream gradient only scales them); with "none" the backward recomputes the logits chunk by
chunk, for the gradients in ctx.needs_input_grad only.

Limits: logits (N, V) with any strides, any V >= 1; x (N, C) and W (V, C) in fp32/fp16/bf16 (W is cast to x's
dtype for the matmul, gradients come back in each input's dtype). Off Triton (CPU without the interpreter)
cross_entropy runs cross_entropy_ref and linear_cross_entropy runs the same chunks in plain PyTorch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._utils import check_triton_device, tl, triton, use_triton

MAX_BLOCK_V = 8192
REDUCTIONS = ("mean", "sum", "none")


# -----------------------------------------------------------------------------
@triton.jit
def _cross_entropy_fwd_kernel(
    Logits, Target,               # pointers: logits (N, V) strided, int targets (N,)
    Loss, Lse,                    # fp32 (N,): per-row loss, per-row log-sum-exp (kept for backward)
    stride_lm, stride_lv,         # logits strides
    V, ignore_index, label_smoothing, z_loss,
    BLOCK_V: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(Target + row)
    row_ptr = Logits + row * stride_lm
    m = tl.full([], float("-inf"), tl.float32)  # running max
    s = tl.zeros([], dtype=tl.float32)           # running sum of exp(x - m)
    x_target = tl.zeros([], dtype=tl.float32)
    x_sum = tl.zeros([], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols * stride_lv, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        x_target += tl.sum(tl.where(cols == target, x, 0.0), axis=0)
        if HAS_SMOOTHING:
            x_sum += tl.sum(tl.where(cols < V, x, 0.0), axis=0)
    lse = m + tl.log(s)
    loss = lse - (1.0 - label_smoothing) * x_target + z_loss * lse * lse
    if HAS_SMOOTHING:
        loss -= label_smoothing * x_sum / V
    ignored = target == ignore_index
    loss = tl.where(ignored, 0.0, loss)
    loss = tl.where(ignored | ((target >= 0) & (target < V)), loss, float("nan"))
    tl.store(Loss + row, loss)
    tl.store(Lse + row, lse)


@triton.jit
def _cross_entropy_bwd_kernel(
    DLogits, Logits, Target, Lse, DLoss,  # pointers: grad out (N, V) (may equal Logits), logits, targets, fp32 lse, fp32 dloss
    stride_dm, stride_dv, stride_lm, stride_lv, stride_dloss,
    V, ignore_index, label_smoothing, z_loss,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    target = tl.load(Target + row)
    lse = tl.load(Lse + row)
    dloss = tl.load(DLoss + row * stride_dloss).to(tl.float32)
    dloss = tl.where(target == ignore_index, 0.0, dloss)
    x = tl.load(Logits + row * stride_lm + cols * stride_lv, mask=mask, other=0.0).to(tl.float32)
    p = tl.exp(x - lse)
    grad = p * (1.0 + 2.0 * z_loss * lse) - label_smoothing / V
    grad = tl.where(cols == target, grad - (1.0 - label_smoothing), grad)
    tl.store(DLogits + row * stride_dm + cols * stride_dv, (grad * dloss).to(DLogits.dtype.element_ty), mask=mask)


# -----------------------------------------------------------------------------
def launch_config(V: int) -> dict:
    """Vocabulary block and warps for rows of V logits, shared by the forward and backward kernels."""
    block_v = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    return dict(BLOCK_V=block_v, num_warps=min(max(block_v // 512, 1), 16))


def _ce_fwd_launch(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float, z_loss: float):
    N, V = logits.shape
    target = target.contiguous()  # the kernels index targets as contiguous
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N > 0:
        _cross_entropy_fwd_kernel[(N,)](
            logits, target, loss, lse, logits.stride(0), logits.stride(1),
            V, ignore_index, label_smoothing, z_loss, HAS_SMOOTHING=label_smoothing > 0, **launch_config(V),
        )
    return loss, lse


def _ce_bwd_launch(dloss: Tensor, logits: Tensor, target: Tensor, lse: Tensor, out: Tensor,
                   ignore_index: int, label_smoothing: float, z_loss: float) -> Tensor:
    N, V = logits.shape
    target = target.contiguous()
    cfg = launch_config(V)
    if N > 0:
        _cross_entropy_bwd_kernel[(N, triton.cdiv(V, cfg["BLOCK_V"]))](
            out, logits, target, lse, dloss, out.stride(0), out.stride(1), logits.stride(0), logits.stride(1),
            dloss.stride(0), V, ignore_index, label_smoothing, z_loss, **cfg,
        )
    return out


@torch.library.custom_op("fastlm::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd(
    logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float, z_loss: float
) -> tuple[Tensor, Tensor]:
    check_triton_device("fastlm::cross_entropy_fwd", logits, target)
    return _ce_fwd_launch(logits, target, ignore_index, label_smoothing, z_loss)


@_cross_entropy_fwd.register_fake
def _(logits, target, ignore_index, label_smoothing, z_loss):
    loss = logits.new_empty(logits.shape[0], dtype=torch.float32)
    return loss, torch.empty_like(loss)


@torch.library.custom_op("fastlm::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd(
    dloss: Tensor, logits: Tensor, target: Tensor, lse: Tensor, ignore_index: int, label_smoothing: float, z_loss: float
) -> Tensor:
    check_triton_device("fastlm::cross_entropy_bwd", dloss, logits, target)
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return _ce_bwd_launch(dloss, logits, target, lse, out, ignore_index, label_smoothing, z_loss)


@_cross_entropy_bwd.register_fake
def _(dloss, logits, target, lse, ignore_index, label_smoothing, z_loss):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _ce_setup_context(ctx, inputs, output):
    logits, target, ctx.ignore_index, ctx.label_smoothing, ctx.z_loss = inputs
    ctx.save_for_backward(logits, target, output[1])


def _ce_backward(ctx, dloss, _dlse):
    logits, target, lse = ctx.saved_tensors
    dlogits = _cross_entropy_bwd(dloss, logits, target, lse, ctx.ignore_index, ctx.label_smoothing, ctx.z_loss)
    return dlogits, None, None, None, None


_cross_entropy_fwd.register_autograd(_ce_backward, setup_context=_ce_setup_context)


# -----------------------------------------------------------------------------
def _check_args(name: str, logits: Tensor, target: Tensor, reduction: str, label_smoothing: float) -> None:
    if logits.dim() != 2:
        raise ValueError(f"{name}: logits must be (N, V), got shape {tuple(logits.shape)}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"{name}: target must be ({logits.shape[0]},) to match logits {tuple(logits.shape)}, got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: target must be int64 or int32 class indices, got {target.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1], got {label_smoothing}")


def _reduce(row_losses: Tensor, target: Tensor, ignore_index: int, reduction: str, dtype: torch.dtype) -> Tensor:
    """Reduce fp32 per-row losses; "mean" divides by the non-ignored rows (at least 1)."""
    if reduction == "none":
        return row_losses.to(dtype)
    total = row_losses.sum()
    if reduction == "mean":
        total = total / (target != ignore_index).sum().clamp(min=1)
    return total.to(dtype)


def cross_entropy(
    logits: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, z_loss: float = 0.0,
) -> Tensor:
    """Drop-in for `F.cross_entropy(logits, target, ...)` with logits (N, V) and target (N,), plus a z-loss.

    Returns a scalar ("mean", "sum") or (N,) ("none") in logits' dtype.
    """
    _check_args("cross_entropy", logits, target, reduction, label_smoothing)
    if not use_triton(logits):
        return cross_entropy_ref(logits, target, ignore_index, reduction, label_smoothing, z_loss)
    row_losses, _ = _cross_entropy_fwd(logits, target, ignore_index, label_smoothing, z_loss)
    return _reduce(row_losses, target, ignore_index, reduction, logits.dtype)


def cross_entropy_ref(
    logits: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, z_loss: float = 0.0,
) -> Tensor:
    """Plain PyTorch (fp32) with the same semantics: the fallback off Triton and a reference in tests."""
    logits32 = logits.float()
    row_losses = F.cross_entropy(logits32, target, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        row_losses = row_losses + torch.where(target != ignore_index, z_loss * torch.logsumexp(logits32, -1).square(), 0.0)
    return _reduce(row_losses, target, ignore_index, reduction, logits.dtype)


# -----------------------------------------------------------------------------
def chunk_rows(N: int, C: int, V: int) -> int:
    """Rows per chunk of the fused LM head: a chunk's logits (rows x V) are about as large as x (N x C)."""
    return max(1, min(N, triton.next_power_of_2(triton.cdiv(N, triton.cdiv(V, C)))))


def _chunk_logits_grad(logits: Tensor, target: Tensor, row_grad: Optional[Tensor], ignore_index: int,
                       label_smoothing: float, z_loss: float) -> tuple[Tensor, Tensor]:
    """Per-row losses of one chunk and, if row_grad is given, the logits' gradient written over `logits`."""
    if use_triton(logits):
        loss, lse = _ce_fwd_launch(logits, target, ignore_index, label_smoothing, z_loss)
        if row_grad is not None:
            _ce_bwd_launch(row_grad, logits, target, lse, logits, ignore_index, label_smoothing, z_loss)
        return loss, logits
    logits32 = logits.float()
    loss = cross_entropy_ref(logits32, target, ignore_index, "none", label_smoothing, z_loss)
    if row_grad is not None:  # the gradient formula of the module docstring, in plain PyTorch
        lse = torch.logsumexp(logits32, -1, keepdim=True)
        grad = torch.exp(logits32 - lse) * (1.0 + 2.0 * z_loss * lse) - label_smoothing / logits.shape[1]
        ignored = target == ignore_index
        onehot = torch.full_like(lse, label_smoothing - 1.0)
        grad.scatter_add_(1, target.masked_fill(ignored, 0).long()[:, None], onehot)
        logits.copy_(grad * torch.where(ignored, 0.0, row_grad)[:, None])
    return loss, logits


def _linear_ce_chunks(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, row_grad: Optional[Tensor],
                      ignore_index: int, label_smoothing: float, z_loss: float,
                      grad_x: bool, grad_weight: bool, grad_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row losses, and with row_grad (N,) the gradients of sum_i row_grad_i * loss_i for x, weight and bias.

    Only the gradients flagged grad_x / grad_weight / grad_bias are made (and their buffers allocated); the others,
    and all three without row_grad, come back as empty (0,) tensors.
    """
    N, C = x.shape
    V = weight.shape[0]
    w = weight.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    grad_bias = grad_bias and bias is not None
    if row_grad is None:
        grad_x = grad_weight = grad_bias = False
    want_grad = grad_x or grad_weight or grad_bias
    losses = torch.empty(N, dtype=torch.float32, device=x.device)
    dx = x.new_empty(x.shape if grad_x else (0,))
    dw_acc = torch.zeros((V, C) if grad_weight else (0,), dtype=torch.float32, device=x.device)
    db_acc = torch.zeros(V if grad_bias else 0, dtype=torch.float32, device=x.device)
    rows = chunk_rows(N, C, V)
    for start in range(0, N, rows):
        end = min(start + rows, N)
        x_chunk = x[start:end]
        logits = x_chunk @ w.T if b is None else torch.addmm(b, x_chunk, w.T)
        chunk_grad = row_grad[start:end] if want_grad else None
        losses[start:end], dlogits = _chunk_logits_grad(logits, target[start:end], chunk_grad, ignore_index, label_smoothing, z_loss)
        if grad_x:
            torch.mm(dlogits, w, out=dx[start:end])
        if grad_weight:
            if dlogits.dtype == torch.float32:
                dw_acc.addmm_(dlogits.T, x_chunk)
            else:  # half-precision product per chunk, summed across chunks in fp32
                dw_acc.add_(dlogits.T @ x_chunk)
        if grad_bias:
            db_acc.add_(dlogits.sum(0, dtype=torch.float32))
    return losses, dx, dw_acc.to(weight.dtype), db_acc.to(weight.dtype if bias is None else bias.dtype)


def _grad_shapes(x: Tensor, weight: Tensor, bias: Optional[Tensor], grad_x: bool, grad_weight: bool,
                 grad_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Fake (dx, dW, db) with the real ones' shapes, dtypes and (contiguous) strides; (0,) where not made."""
    bias_dtype = weight.dtype if bias is None else bias.dtype
    dx = x.new_empty(x.shape if grad_x else (0,))  # new_empty is contiguous whatever x's strides, as the real op's
    dw = weight.new_empty(weight.shape if grad_weight else (0,))
    db = x.new_empty(weight.shape[0] if grad_bias and bias is not None else 0, dtype=bias_dtype)
    return dx, dw, db


def _row_grad(grad: Tensor, target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """The upstream gradient of the reduced loss, spread to one fp32 weight per row (a stride-0 view if uniform)."""
    grad = grad.float()
    if reduction == "none":
        return grad
    if reduction == "mean":
        grad = grad / (target != ignore_index).sum().clamp(min=1)
    return grad.expand(target.shape[0])


@torch.library.custom_op("fastlm::linear_cross_entropy_fwd", mutates_args=())
def _linear_ce_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int, label_smoothing: float,
    z_loss: float, reduction: str, grad_x: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss (fp32) and, when reduction != "none", the gradients of that loss flagged by grad_x/grad_weight/grad_bias.

    Gradients not made (all three with "none", whose backward recomputes) are empty (0,) tensors.
    """
    if use_triton(x):
        check_triton_device("fastlm::linear_cross_entropy_fwd", x, weight, bias, target)
    precompute = reduction != "none" and (grad_x or grad_weight or grad_bias)
    row_grad = _row_grad(torch.ones((), device=x.device), target, ignore_index, reduction) if precompute else None
    with torch.autocast(x.device.type, enabled=False):  # the matmuls run in x's dtype, whatever the caller's autocast
        losses, dx, dw, db = _linear_ce_chunks(x, weight, bias, target, row_grad, ignore_index, label_smoothing, z_loss,
                                               grad_x, grad_weight, grad_bias)
    return _reduce(losses, target, ignore_index, reduction, torch.float32), dx, dw, db


@_linear_ce_fwd.register_fake
def _(x, weight, bias, target, ignore_index, label_smoothing, z_loss, reduction, grad_x, grad_weight, grad_bias):
    loss = x.new_empty(x.shape[:1] if reduction == "none" else (), dtype=torch.float32)
    made = (reduction != "none" and flag for flag in (grad_x, grad_weight, grad_bias))
    return loss, *_grad_shapes(x, weight, bias, *made)


@torch.library.custom_op("fastlm::linear_cross_entropy_bwd", mutates_args=())
def _linear_ce_bwd(
    row_grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
    label_smoothing: float, z_loss: float, grad_x: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The flagged gradients of sum_i row_grad_i * loss_i, recomputing each chunk's logits; the others empty (0,)."""
    with torch.autocast(x.device.type, enabled=False):
        _, dx, dw, db = _linear_ce_chunks(x, weight, bias, target, row_grad, ignore_index, label_smoothing, z_loss,
                                          grad_x, grad_weight, grad_bias)
    return dx, dw, db


@_linear_ce_bwd.register_fake
def _(row_grad, x, weight, bias, target, ignore_index, label_smoothing, z_loss, grad_x, grad_weight, grad_bias):
    return _grad_shapes(x, weight, bias, grad_x, grad_weight, grad_bias)


def _linear_ce_setup_context(ctx, inputs, output):
    x, weight, bias, target, ignore_index, label_smoothing, z_loss, reduction, *flags = inputs
    ctx.args = (ignore_index, label_smoothing, z_loss)
    ctx.reduction = reduction
    needed = tuple(ctx.needs_input_grad[:3])
    ctx.made = tuple(f and reduction != "none" for f in flags)
    ctx.missing = tuple(n and not m for n, m in zip(needed, ctx.made))  # only if the op was called with fewer flags
    inputs_for_recompute = (x, weight, bias, target) if any(ctx.missing) else ()
    ctx.save_for_backward(*output[1:], *inputs_for_recompute)


def _linear_ce_backward(ctx, grad, _ddx, _ddw, _ddb):
    made, saved = ctx.saved_tensors[:3], ctx.saved_tensors[3:]
    needed = ctx.needs_input_grad[:3]
    grads = [g * grad.to(g.dtype) if n and m else None for g, n, m in zip(made, needed, ctx.made)]
    if any(ctx.missing):
        x, weight, bias, target = saved
        row_grad = _row_grad(grad, target, ctx.args[0], ctx.reduction)
        recomputed = _linear_ce_bwd(row_grad, x, weight, bias, target, *ctx.args, *ctx.missing)
        grads = [r if miss else g for g, r, miss in zip(grads, recomputed, ctx.missing)]
    return *grads, None, None, None, None, None, None, None, None


_linear_ce_fwd.register_autograd(_linear_ce_backward, setup_context=_linear_ce_setup_context)


def linear_cross_entropy(
    x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
) -> Tensor:
    """`F.cross_entropy(x @ weight.T + bias, target, ...)` without building the (N, V) logits.

    x: (N, C) hidden states, weight: (V, C) LM head, bias: (V,) or None, target: (N,). Returns a scalar
    ("mean", "sum") or (N,) ("none") in x's dtype.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: x must be (N, C) and weight (V, C), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear_cross_entropy: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    _check_args("linear_cross_entropy", x[:, :1], target, reduction, label_smoothing)
    # Only the gradients autograd will ask for: a frozen head (weight.requires_grad False) skips dW entirely.
    grad_x, grad_weight, grad_bias = (torch.is_grad_enabled() and t is not None and t.requires_grad
                                      for t in (x, weight, bias))
    loss = _linear_ce_fwd(x, weight, bias, target, ignore_index, label_smoothing, z_loss, reduction,
                          grad_x, grad_weight, grad_bias)[0]
    return loss.to(x.dtype)


def linear_cross_entropy_ref(
    x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
) -> Tensor:
    """The unfused path: full logits, then cross_entropy_ref. For tests and benchmarks."""
    logits = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return cross_entropy_ref(logits, target, ignore_index, reduction, label_smoothing, z_loss)
