"""Softmax cross-entropy over a vocabulary (N, V) logits, forward and backward in Triton.

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

The two launchers are also the per-chunk step of the fused LM head (kernels/fused_linear_cross_entropy.py):
`row_losses` and `logits_grad_` (which writes the gradient over the logits).

Limits: logits (N, V) with any strides, any V >= 1, fp32/fp16/bf16. Off Triton (CPU without the interpreter)
cross_entropy runs cross_entropy_ref (plain PyTorch, same semantics).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._utils import check_triton_device, col_offsets, needs_int64_columns, tl, triton, use_triton

BLOCK_V = 4096         # logits per row block: a row of 50257 takes 13 blocks (6% padding in the last), 128256 takes 32
VEC = 8                # logits each thread owns contiguously in a block: one 128-bit load of a 16-bit row
ELEMENTS_PER_THREAD = 16
REDUCTIONS = ("mean", "sum", "none")
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E): one FMA and the hardware's ex2
# The running max starts here, not at -inf, so that exp2(m - m_new) of a run that has only seen padding (-inf)
# is exp2(0) rather than nan; FLOOR * LOG2E stays finite in fp32.
FLOOR = tl.constexpr(-1.0e38)


# -----------------------------------------------------------------------------
# Each thread keeps a running max and sum for the VEC logits it owns in every row block, updated with in-thread
# reductions only; the threads' partial results are merged once per row. A 16-byte aligned row (the fused head pads
# its rows for that) is laid out [BLOCK_V // VEC, VEC], a thread owning contiguous runs read by vector loads; any
# other row [VEC, BLOCK_V // VEC], a thread owning every T-th logit, read by coalesced scalar loads (laid out the
# aligned way, Triton would spread each run over 8 threads and the reductions would need shuffles). Full blocks
# load without masks; the last, partial block is masked on the real V, so padding columns are never read.

@triton.jit
def _block_lanes(BLOCK_V: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr):
    """Column offsets of a row block, [BLOCK_V // VEC, VEC] (aligned) or [VEC, BLOCK_V // VEC]; reduce over
    axis 1 or 0 respectively to stay within a thread."""
    if ALIGNED:
        return tl.arange(0, BLOCK_V // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    else:
        return tl.arange(0, VEC)[:, None] * (BLOCK_V // VEC) + tl.arange(0, BLOCK_V // VEC)[None, :]


@triton.jit
def _online_lse_update(m, s, x, AXIS: tl.constexpr):
    """Merge a block x (natural units, fp32) into the per-thread running max m and sum s of exp(x - m)."""
    m_new = tl.maximum(m, tl.max(x, axis=AXIS))
    m_new_2 = m_new * LOG2E
    s = s * tl.exp2(m * LOG2E - m_new_2) + tl.sum(tl.exp2(x * LOG2E - tl.expand_dims(m_new_2, AXIS)), axis=AXIS)
    return m_new, s


@triton.jit
def _cross_entropy_fwd_kernel(
    Logits, Target,               # pointers: logits (N, V) strided, int targets (N,)
    Loss, Lse,                    # fp32 (N,): per-row loss, per-row log-sum-exp (kept for backward)
    stride_lm, stride_lv,         # logits strides
    V, ignore_index, label_smoothing, z_loss,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr,
    ALIGNED: tl.constexpr,        # rows start 16-byte aligned and are contiguous: vector loads
    HAS_SMOOTHING: tl.constexpr,
    COL_INT64: tl.constexpr,      # column offsets (cols * stride) in int64
):
    AXIS: tl.constexpr = 1 if ALIGNED else 0
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(Target + row).to(tl.int64)
    row_ptr = Logits + row * stride_lm
    lanes = _block_lanes(BLOCK_V, VEC, ALIGNED)
    m = tl.full([BLOCK_V // VEC], FLOOR, tl.float32)
    s = tl.zeros([BLOCK_V // VEC], dtype=tl.float32)
    x_sum = tl.zeros(lanes.shape, dtype=tl.float32)
    full = (V // BLOCK_V) * BLOCK_V
    for start in range(0, full, BLOCK_V):
        x = tl.load(row_ptr + col_offsets(start + lanes, stride_lv, COL_INT64)).to(tl.float32)
        m, s = _online_lse_update(m, s, x, AXIS)
        if HAS_SMOOTHING:
            x_sum += x
    if full < V:
        cols = full + lanes
        x = tl.load(row_ptr + col_offsets(cols, stride_lv, COL_INT64), mask=cols < V, other=float("-inf")).to(tl.float32)
        m, s = _online_lse_update(m, s, x, AXIS)
        if HAS_SMOOTHING:
            x_sum += tl.where(cols < V, x, 0.0)
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp2((m - m_row) * LOG2E), axis=0))
    # The target logit is read once, not found by a reduction over the row.
    valid = (target >= 0) & (target < V)
    x_target = tl.load(row_ptr + target * stride_lv, mask=valid, other=0.0).to(tl.float32)
    loss = lse - (1.0 - label_smoothing) * x_target + z_loss * lse * lse
    if HAS_SMOOTHING:
        loss -= label_smoothing * tl.sum(tl.sum(x_sum, axis=1), axis=0) / V
    ignored = target == ignore_index
    loss = tl.where(ignored, 0.0, loss)
    loss = tl.where(ignored | valid, loss, float("nan"))
    tl.store(Loss + row, loss)
    tl.store(Lse + row, lse)


@triton.jit
def _cross_entropy_bwd_kernel(
    DLogits, Logits, Target, Lse, DLoss,  # pointers: grad out (N, V) (may equal Logits), logits, targets, fp32 lse, fp32 dloss
    stride_dm, stride_dv, stride_lm, stride_lv, stride_dloss,
    V, ignore_index, label_smoothing, z_loss,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr,
    ALIGNED: tl.constexpr,        # both rows start 16-byte aligned and are contiguous: vector loads and stores
    COL_INT64: tl.constexpr,      # column offsets (cols * stride) in int64
):
    # grad_j = dloss * (softmax_j * (1 + 2 z lse) - s / V) - dloss * (1 - s) * [j == t]: one FMA per logit; the
    # target's extra term is written once, after the row.
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(Target + row).to(tl.int64)
    lse = tl.load(Lse + row)
    dloss = tl.load(DLoss + row * stride_dloss).to(tl.float32)
    dloss = tl.where(target == ignore_index, 0.0, dloss)
    valid = (target >= 0) & (target < V)
    in_row = Logits + row * stride_lm
    out_row = DLogits + row * stride_dm
    x_target = tl.load(in_row + target * stride_lv, mask=valid, other=0.0).to(tl.float32)  # before DLogits overwrites it
    # In place (DLogits is Logits: the fused head), another warp's store in the loop may hit the target's column:
    # every thread has its x_target before any thread stores (one bar.sync per row).
    tl.debug_barrier()
    scale = dloss * (1.0 + 2.0 * z_loss * lse)
    shift = -dloss * label_smoothing / V
    lse_2 = lse * LOG2E
    lanes = _block_lanes(BLOCK_V, VEC, ALIGNED)
    full = (V // BLOCK_V) * BLOCK_V
    for start in range(0, full, BLOCK_V):
        x = tl.load(in_row + col_offsets(start + lanes, stride_lv, COL_INT64)).to(tl.float32)
        grad = tl.exp2(x * LOG2E - lse_2) * scale + shift
        tl.store(out_row + col_offsets(start + lanes, stride_dv, COL_INT64), grad.to(DLogits.dtype.element_ty))
    if full < V:
        cols = full + lanes
        x = tl.load(in_row + col_offsets(cols, stride_lv, COL_INT64), mask=cols < V, other=0.0).to(tl.float32)
        grad = tl.exp2(x * LOG2E - lse_2) * scale + shift
        tl.store(out_row + col_offsets(cols, stride_dv, COL_INT64), grad.to(DLogits.dtype.element_ty), mask=cols < V)
    # Every thread's store of the row is done (and visible) before the target's value replaces its entry.
    tl.debug_barrier()
    grad_target = tl.exp2(x_target * LOG2E - lse_2) * scale + shift - dloss * (1.0 - label_smoothing)
    tl.store(out_row + target * stride_dv, grad_target.to(DLogits.dtype.element_ty), mask=valid)


# -----------------------------------------------------------------------------
def launch_config(V: int) -> dict:
    """Vocabulary block and warps for rows of V logits, shared by the forward and backward kernels."""
    block_v = max(VEC, min(triton.next_power_of_2(V), BLOCK_V))
    return dict(BLOCK_V=block_v, VEC=VEC, num_warps=min(max(block_v // (32 * ELEMENTS_PER_THREAD), 1), 16))


def rows_aligned(*tensors: Tensor) -> bool:
    """Whether every row of these (N, V) tensors starts 16-byte aligned and is contiguous, as Triton's launcher sees
    it (a 16-aligned pointer and a row stride divisible by 16): the kernels then use vector loads."""
    return all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 and t.stride(1) == 1 for t in tensors)


def _launch_fwd(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float, z_loss: float):
    N, V = logits.shape
    target = target.contiguous()  # the kernels index targets as contiguous
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N > 0:
        _cross_entropy_fwd_kernel[(N,)](
            logits, target, loss, lse, logits.stride(0), logits.stride(1),
            V, ignore_index, label_smoothing, z_loss, HAS_SMOOTHING=label_smoothing > 0,
            ALIGNED=rows_aligned(logits), COL_INT64=needs_int64_columns(V, logits.stride(1)), **launch_config(V),
        )
    return loss, lse


def _launch_bwd(dloss: Tensor, logits: Tensor, target: Tensor, lse: Tensor, out: Tensor,
                   ignore_index: int, label_smoothing: float, z_loss: float) -> Tensor:
    N, V = logits.shape
    target = target.contiguous()
    cfg = launch_config(V)
    if N > 0:
        _cross_entropy_bwd_kernel[(N,)](
            out, logits, target, lse, dloss, out.stride(0), out.stride(1), logits.stride(0), logits.stride(1),
            dloss.stride(0), V, ignore_index, label_smoothing, z_loss,
            ALIGNED=rows_aligned(logits, out), COL_INT64=needs_int64_columns(V, logits.stride(1), out.stride(1)), **cfg,
        )
    return out


@torch.library.custom_op("fastlm::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd(
    logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float, z_loss: float
) -> tuple[Tensor, Tensor]:
    check_triton_device("fastlm::cross_entropy_fwd", logits, target)
    return _launch_fwd(logits, target, ignore_index, label_smoothing, z_loss)


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
    return _launch_bwd(dloss, logits, target, lse, out, ignore_index, label_smoothing, z_loss)


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
def check_target(name: str, target: Tensor, rows: int, what: str) -> None:
    """target must be (rows,) integer class indices; `what` names the tensor it must match, for the message."""
    if tuple(target.shape) != (rows,):
        raise ValueError(f"{name}: target must be ({rows},) to match {what}, got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: target must be int64 or int32 class indices, got {target.dtype}")


def check_options(name: str, reduction: str, label_smoothing: float) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1], got {label_smoothing}")


def reduce_losses(losses: Tensor, target: Tensor, ignore_index: int, reduction: str, dtype: torch.dtype) -> Tensor:
    """Reduce fp32 per-row losses; "mean" divides by the non-ignored rows (at least 1)."""
    if reduction == "none":
        return losses.to(dtype)
    total = losses.sum()
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
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy: logits must be (N, V), got shape {tuple(logits.shape)}")
    check_target("cross_entropy", target, logits.shape[0], f"logits {tuple(logits.shape)}")
    check_options("cross_entropy", reduction, label_smoothing)
    if not use_triton(logits):
        return cross_entropy_ref(logits, target, ignore_index, reduction, label_smoothing, z_loss)
    losses, _ = _cross_entropy_fwd(logits, target, ignore_index, label_smoothing, z_loss)
    return reduce_losses(losses, target, ignore_index, reduction, logits.dtype)


def cross_entropy_ref(
    logits: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, z_loss: float = 0.0,
) -> Tensor:
    """Plain PyTorch (fp32) with the same semantics: the fallback off Triton and a reference in tests."""
    logits32 = logits.float()
    losses = F.cross_entropy(logits32, target, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        losses = losses + torch.where(target != ignore_index, z_loss * torch.logsumexp(logits32, -1).square(), 0.0)
    return reduce_losses(losses, target, ignore_index, reduction, logits.dtype)


# -----------------------------------------------------------------------------
# The per-chunk step of the fused LM head: per-row losses, then the logits' gradient in place.

def row_losses(logits: Tensor, target: Tensor, ignore_index: int = -100, label_smoothing: float = 0.0,
               z_loss: float = 0.0) -> tuple[Tensor, Tensor]:
    """fp32 per-row losses (0 for ignored rows) and log-sum-exps of logits (N, V), in Triton where it runs."""
    if use_triton(logits):
        return _launch_fwd(logits, target, ignore_index, label_smoothing, z_loss)
    # the loss formula of the module docstring in plain PyTorch, with one logits-sized temporary (logsumexp's)
    V = logits.shape[1]
    logits32 = logits.float()
    lse = torch.logsumexp(logits32, -1)
    ignored = target == ignore_index
    valid = ignored | ((target >= 0) & (target < V))
    x_target = logits32.gather(1, torch.where(valid & ~ignored, target, 0).long()[:, None])[:, 0]
    losses = lse - (1.0 - label_smoothing) * x_target + z_loss * lse * lse
    if label_smoothing:
        losses = losses - label_smoothing * logits32.sum(-1) / V
    losses = torch.where(ignored, 0.0, losses)
    return torch.where(valid, losses, float("nan")), lse


def logits_grad_(logits: Tensor, target: Tensor, lse: Tensor, row_grad: Tensor, ignore_index: int = -100,
                 label_smoothing: float = 0.0, z_loss: float = 0.0) -> Tensor:
    """Overwrite logits (N, V) with d(sum_i row_grad_i * loss_i)/dlogits (rows of ignored targets: 0); returns it.

    row_grad: (N,) fp32 (a stride-0 view for a uniform weight); lse from row_losses.
    """
    if use_triton(logits):
        return _launch_bwd(row_grad, logits, target, lse, logits, ignore_index, label_smoothing, z_loss)
    # the gradient formula of the module docstring, in plain PyTorch, in place (fp32 logits) or in one fp32 copy
    V = logits.shape[1]
    lse = lse[:, None]
    grad = logits.float()
    grad.sub_(lse).exp_().mul_(1.0 + 2.0 * z_loss * lse).sub_(label_smoothing / V)
    ignored = target == ignore_index
    grad.scatter_add_(1, target.masked_fill(ignored, 0).long()[:, None], torch.full_like(lse, label_smoothing - 1.0))
    grad.mul_(torch.where(ignored, 0.0, row_grad)[:, None])
    return logits if grad is logits else logits.copy_(grad)
