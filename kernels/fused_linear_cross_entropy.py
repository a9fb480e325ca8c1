"""Fused LM head + softmax cross-entropy: F.cross_entropy(x @ W.T + b, target) without building the (N, V) logits.

The rows of x are taken in chunks; for each chunk c:
    logits_c = x_c @ W.T + b                        (in the compute dtype, in one buffer that every chunk reuses)
    loss_r, lse_r                                   (fp32, per row: kernels/softmax_cross_entropy.py)
    logits_c <- d(sum_r w_r loss_r) / dlogits_c     (in place)
    dx_c = logits_c @ W,   dW += logits_c.T @ x_c,   db += colsum(logits_c)      (dW and db in fp32)

Precision. The matmuls run in the autocast dtype when autocast is on for x's device (what F.linear does under
autocast), otherwise in x's dtype; W and b are cast to it inside the op, and the gradients come back in each
input's own dtype from fp32 accumulators, so an fp32 master head gets an fp32 dW that was never rounded to 16
bits. On CUDA a 16-bit product is added to the fp32 dW by one addmm with an fp32 output; elsewhere a chunk's
product is made in 16 bits and then added. The loss is fp32 under autocast (as F.cross_entropy's is there),
otherwise in x's dtype.

Gradients. Only those needed are made: the wrapper reads which of x, W and b require grad (none under
no_grad), so a frozen head costs no dW matmul and no (V, C) accumulator. With reduction "mean" or "sum" they
are made during the forward, as gradients of the *sum* of the row losses (a row's logits gradient is
softmax - onehot, at most 1 in magnitude, which fp16 holds without underflow), kept by the autograd function
(never returned, so autograd materialises nothing for them), and the backward multiplies them in place by
the upstream gradient (over the number of counted rows for "mean"). So a 2^15 loss scale, or a mean over
16K tokens, reaches an fp16 gradient before it is rounded, not after. With "none" the backward recomputes
each chunk's logits with the per-row upstream gradient folded into their gradient.

Chunks. `chunk_size` rows (default: as many as keep one chunk's logits within DEFAULT_CHUNK_BYTES, balanced
across the chunks: GPT-2 at 8192 tokens in bf16 takes 4 chunks of 2048 rows). Every chunk reads and updates
the whole dW accumulator once, so a few large chunks move far less memory than many small ones; the budget
bounds the one logits buffer they share. That buffer's rows are padded to a multiple of 64 elements (50257 ->
50304), so the cross-entropy kernels read them 128 bits at a time whatever V is.

Limits: x (N, C), W (V, C), b (V,) or None, fp32/fp16/bf16, any strides; target (N,) int64/int32. The backward
scales the forward's gradients in place, so the graph through one call can be backpropagated once (a second
backward with retain_graph=True raises). Off Triton the same chunks run in plain PyTorch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._utils import check_triton_device, triton, use_triton
from kernels.softmax_cross_entropy import (check_options, check_target, cross_entropy_ref, logits_grad_,
                                           reduce_losses, row_losses)

DEFAULT_CHUNK_BYTES = 256 * 2**20  # one chunk's logits in the compute dtype
ROW_PAD = 64                       # logits buffer row stride: a multiple of this many elements


def default_chunk_size(N: int, V: int, dtype: torch.dtype, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk: the fewest chunks whose logits each fit budget_bytes, with the rows spread evenly."""
    row_bytes = triton.cdiv(V, ROW_PAD) * ROW_PAD * torch.empty((), dtype=dtype).element_size()
    chunks = triton.cdiv(N, max(1, budget_bytes // row_bytes))
    return max(1, triton.cdiv(N, max(1, chunks)))


# -----------------------------------------------------------------------------
_FP32_ADDMM = {}  # device type -> whether addmm with an fp32 output takes 16-bit operands there


def _accumulate(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32) += a @ b, with a and b in the compute dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    device = acc.device.type
    if _FP32_ADDMM.get(device, device == "cuda"):
        try:
            torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
            _FP32_ADDMM[device] = True
            return
        except (RuntimeError, NotImplementedError):  # an older PyTorch: no mixed-dtype addmm
            _FP32_ADDMM[device] = False
    acc.add_(a @ b)


def _chunks(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, row_grad: Optional[Tensor],
            ignore_index: int, label_smoothing: float, z_loss: float, compute_dtype: torch.dtype, chunk_size: int,
            grad_x: bool, grad_weight: bool, grad_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fp32 per-row losses and, with row_grad (N,), the flagged gradients of sum_i row_grad_i * loss_i in each
    input's dtype; gradients not made (all three without row_grad) are empty (0,) tensors."""
    N, C = x.shape
    V = weight.shape[0]
    grad_bias = grad_bias and bias is not None
    if row_grad is None:
        grad_x = grad_weight = grad_bias = False
    any_grad = grad_x or grad_weight or grad_bias
    w = weight.to(compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    losses = torch.empty(N, dtype=torch.float32, device=x.device)
    dx = torch.empty((N, C) if grad_x else (0,), dtype=compute_dtype, device=x.device)
    dw = torch.zeros((V, C) if grad_weight else (0,), dtype=torch.float32, device=x.device)
    db = torch.zeros(V if grad_bias else 0, dtype=torch.float32, device=x.device)
    rows = max(1, min(chunk_size, N))
    buffer = torch.empty(rows, triton.cdiv(V, ROW_PAD) * ROW_PAD, dtype=compute_dtype, device=x.device)
    for start in range(0, N, rows):
        end = min(start + rows, N)
        x_chunk = x[start:end].to(compute_dtype)
        logits = buffer[: end - start, :V]
        if b is None:
            torch.mm(x_chunk, w.t(), out=logits)
        else:
            torch.addmm(b, x_chunk, w.t(), out=logits)
        chunk_losses, lse = row_losses(logits, target[start:end], ignore_index, label_smoothing, z_loss)
        losses[start:end] = chunk_losses
        if not any_grad:
            continue
        logits_grad_(logits, target[start:end], lse, row_grad[start:end], ignore_index, label_smoothing, z_loss)
        if grad_x:
            torch.mm(logits, w, out=dx[start:end])
        if grad_weight:
            _accumulate(dw, logits.t(), x_chunk)
        if grad_bias:
            db.add_(logits.sum(0, dtype=torch.float32))
    bias_dtype = weight.dtype if bias is None else bias.dtype
    return losses, dx.to(x.dtype), dw.to(weight.dtype), db.to(bias_dtype)


def _grad_shapes(x: Tensor, weight: Tensor, bias: Optional[Tensor], grad_x: bool, grad_weight: bool,
                 grad_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Fake (dx, dW, db): the real ones' shapes, dtypes and (contiguous) strides; (0,) where not made."""
    bias_dtype = weight.dtype if bias is None else bias.dtype
    dx = x.new_empty(x.shape if grad_x else (0,))  # new_empty is contiguous whatever x's strides, as the real op's
    dw = weight.new_empty(weight.shape if grad_weight else (0,))
    db = x.new_empty(weight.shape[0] if grad_bias and bias is not None else 0, dtype=bias_dtype)
    return dx, dw, db


@torch.library.custom_op("fastlm::linear_cross_entropy_fwd", mutates_args=())
def _linear_ce_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int, label_smoothing: float,
    z_loss: float, reduction: str, compute_dtype: torch.dtype, chunk_size: int,
    grad_x: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fp32 loss and, when reduction != "none", the flagged gradients of the *summed* row losses (see the module
    docstring); the others are empty (0,) tensors."""
    if use_triton(x):
        check_triton_device("fastlm::linear_cross_entropy_fwd", x, weight, bias, target)
    made = reduction != "none" and (grad_x or grad_weight or grad_bias)
    row_grad = torch.ones((), dtype=torch.float32, device=x.device).expand(x.shape[0]) if made else None
    with torch.autocast(x.device.type, enabled=False):  # the compute dtype is chosen by the caller
        losses, dx, dw, db = _chunks(x, weight, bias, target, row_grad, ignore_index, label_smoothing, z_loss,
                                     compute_dtype, chunk_size, grad_x, grad_weight, grad_bias)
    return reduce_losses(losses, target, ignore_index, reduction, torch.float32), dx, dw, db


@_linear_ce_fwd.register_fake
def _(x, weight, bias, target, ignore_index, label_smoothing, z_loss, reduction, compute_dtype, chunk_size,
      grad_x, grad_weight, grad_bias):
    loss = x.new_empty(x.shape[:1] if reduction == "none" else (), dtype=torch.float32)
    return loss, *_grad_shapes(x, weight, bias, *(reduction != "none" and f for f in (grad_x, grad_weight, grad_bias)))


@torch.library.custom_op("fastlm::linear_cross_entropy_bwd", mutates_args=())
def _linear_ce_bwd(
    row_grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
    label_smoothing: float, z_loss: float, compute_dtype: torch.dtype, chunk_size: int,
    grad_x: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The flagged gradients of sum_i row_grad_i * loss_i, recomputing each chunk's logits; the others empty (0,)."""
    if use_triton(x):
        check_triton_device("fastlm::linear_cross_entropy_bwd", row_grad, x, weight, bias, target)
    with torch.autocast(x.device.type, enabled=False):
        _, dx, dw, db = _chunks(x, weight, bias, target, row_grad, ignore_index, label_smoothing, z_loss,
                                compute_dtype, chunk_size, grad_x, grad_weight, grad_bias)
    return dx, dw, db


@_linear_ce_bwd.register_fake
def _(row_grad, x, weight, bias, target, ignore_index, label_smoothing, z_loss, compute_dtype, chunk_size,
      grad_x, grad_weight, grad_bias):
    return _grad_shapes(x, weight, bias, grad_x, grad_weight, grad_bias)


class _LinearCrossEntropy(torch.autograd.Function):
    """Autograd around the two ops. The forward's gradients are saved here, never returned, so the backward may
    scale them in place: no (V, C) or (N, C) buffer is made in backward beyond the gradients themselves."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, ignore_index, label_smoothing, z_loss, reduction, compute_dtype,
                chunk_size, grad_x, grad_weight, grad_bias):
        options = (ignore_index, label_smoothing, z_loss, compute_dtype, chunk_size)
        loss, dx, dw, db = _linear_ce_fwd(x, weight, bias, target, *options[:3], reduction, *options[3:],
                                          grad_x, grad_weight, grad_bias)
        ctx.options, ctx.reduction, ctx.backpropagated = options, reduction, False
        if reduction == "none":
            ctx.save_for_backward(x, weight, bias, target)
        else:
            ctx.save_for_backward(target, dx, dw, db)
        return loss

    @staticmethod
    def backward(ctx, grad):
        needed = ctx.needs_input_grad[:3]
        if ctx.reduction == "none":
            x, weight, bias, target = ctx.saved_tensors
            grads = _linear_ce_bwd(grad.float(), x, weight, bias, target, *ctx.options, *needed)
            return *(g if n else None for g, n in zip(grads, needed)), *(None,) * 10
        if not torch.compiler.is_compiling():
            if ctx.backpropagated:
                raise RuntimeError("linear_cross_entropy: backward through this call ran already (it scales the "
                                   "forward's gradients in place); compute the loss again instead of retain_graph=True")
            ctx.backpropagated = True
        target, *made = ctx.saved_tensors
        scale = grad.float()
        if ctx.reduction == "mean":
            scale = scale / (target != ctx.options[0]).sum().clamp(min=1)
        return *(g.mul_(scale) if n else None for g, n in zip(made, needed)), *(None,) * 10


# -----------------------------------------------------------------------------
def _check_args(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], reduction: str,
                label_smoothing: float, chunk_size: Optional[int]) -> None:
    name = "linear_cross_entropy"
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: x must be (N, C) and weight (V, C), got {tuple(x.shape)} and {tuple(weight.shape)}")
    for label, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name}: {label} must be a floating-point tensor, got {t.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name}: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_target(name, target, x.shape[0], f"x {tuple(x.shape)}")
    check_options(name, reduction, label_smoothing)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{name}: chunk_size must be a positive number of rows, got {chunk_size!r}")


def linear_cross_entropy(
    x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0, chunk_size: Optional[int] = None,
) -> Tensor:
    """`F.cross_entropy(x @ weight.T + bias, target, ...)` without building the (N, V) logits.

    Args:
        x: (N, C) hidden states. weight: (V, C) LM head. bias: (V,) or None. target: (N,) class indices.
        chunk_size: rows per chunk (default: from DEFAULT_CHUNK_BYTES of logits); larger chunks move less memory
            for dW and hold more logits at once.

    Returns a scalar ("mean", "sum") or (N,) ("none"): fp32 under autocast, otherwise in x's dtype.
    """
    _check_args(x, weight, target, bias, reduction, label_smoothing, chunk_size)
    autocast = torch.is_autocast_enabled(x.device.type)
    compute_dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    if chunk_size is None:
        chunk_size = default_chunk_size(x.shape[0], weight.shape[0], compute_dtype)
    # Only the gradients autograd will ask for: a frozen head (weight.requires_grad False) skips dW entirely.
    grad_x, grad_weight, grad_bias = (torch.is_grad_enabled() and t is not None and t.requires_grad
                                      for t in (x, weight, bias))
    loss = _LinearCrossEntropy.apply(x, weight, bias, target, ignore_index, label_smoothing, z_loss, reduction,
                                     compute_dtype, chunk_size, grad_x, grad_weight, grad_bias)
    return loss if autocast else loss.to(x.dtype)


def linear_cross_entropy_ref(
    x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
) -> Tensor:
    """The unfused path: the whole (N, V) logits, then cross_entropy_ref. For tests and benchmarks."""
    logits = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return cross_entropy_ref(logits, target, ignore_index, reduction, label_smoothing, z_loss)
