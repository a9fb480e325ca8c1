"""Variable-length (packed) attention: many sequences of different lengths in one batch, no padding, no attention
across sequences. flash-attention's varlen layout (`flash_attn_varlen_func`), run by the dense kernels of
kernels/flash_attention.py with IS_VARLEN.

Sequence b is rows cu_seqlens_q[b] : cu_seqlens_q[b + 1] of q (total_q, H, D) and rows cu_seqlens_k[b] :
cu_seqlens_k[b + 1] of k, v (total_k, Hkv, D); for its T_b queries and S_b keys, with scale c and dropout p:
    out_b = attention(q_b, k_b, v_b) = softmax(c * q_b @ k_b.T + mask) (* Z / (1 - p)) @ v_b
exactly the dense op on that sequence alone. Causal is bottom-right per sequence (query i sees keys
j <= i + S_b - T_b), as the dense kernel; for packed documents (cu_seqlens_q == cu_seqlens_k) that is the usual
lower triangle of each document. A query that sees no key gets 0, an empty sequence (repeated entries in
cu_seqlens) is nothing.

The grid is (cdiv(max_seqlen, BLOCK), heads, batch); a program whose block starts past its own sequence's end
returns at once, so a batch costs about sum_b T_b * S_b, not batch * max_seqlen^2. The kernels read each
sequence's start from cu_seqlens on the device: no host sync, and under torch.compile the lengths are data (a new
mix of lengths with the same number of sequences and the same max_seqlen reuses the compiled graph; keep the number
of sequences fixed too, e.g. by repeating cu_seqlens' last entry, and nothing recompiles). Grouped-query heads read
k/v in place, the backward is deterministic (no atomics: one program per key block sums dK/dV over every query of
every head that shares it), dropout draws the same Philox mask as the dense op for sequence b's [:T_b, :S_b].

Limits: the caller's contract, as flash-attention's and unchecked on the device (that would need a host sync):
cu_seqlens non-decreasing int32, starting at 0 and ending at total_q / total_k, and max_seqlen_q/k at least the
longest sequence (rows past it are not computed). The rest as kernels.attention: D <= 256, fp32/fp16/bf16 all the
same dtype, any row strides below 2^31 / 256 elements, batch and heads at most 65535. Off Triton (CPU without the
interpreter) `varlen_attention` runs `varlen_attention_ref`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels._utils import check_triton_device, use_triton
from kernels.flash_attention import (attention_ref, check_row_strides, check_scale_and_dropout, check_seed,
                                     draw_seed, launch_backward, launch_forward)


# -----------------------------------------------------------------------------
@torch.library.custom_op("fastlm::varlen_attention_fwd", mutates_args=())
def _varlen_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                          max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float, dropout_p: float = 0.0,
                          seed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    check_triton_device("fastlm::varlen_attention_fwd", q, k, v, cu_seqlens_q, cu_seqlens_k, seed)
    check_seed("fastlm::varlen_attention_fwd", dropout_p, seed)
    total_q, H, _ = q.shape
    out = q.new_empty(q.shape)
    lse = torch.empty((H, total_q), dtype=torch.float32, device=q.device)  # (H, total_q): lse strides (0, total_q)
    if total_q and k.shape[0]:
        launch_forward(q, k, v, out, lse, (0, total_q), cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k,
                       causal, scale, dropout_p, seed, cu_seqlens_q, cu_seqlens_k)
    else:  # no keys at all: every query sees nothing
        out.zero_()
        lse.fill_(float("-inf"))
    return out, lse


@_varlen_attention_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p=0.0, seed=None):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fastlm::varlen_attention_bwd", mutates_args=())
def _varlen_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                          causal: bool, scale: float, dropout_p: float = 0.0,
                          seed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    check_triton_device("fastlm::varlen_attention_bwd", dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seed)
    check_seed("fastlm::varlen_attention_bwd", dropout_p, seed)
    check_row_strides("fastlm::varlen_attention_bwd", dout=dout, out=out)
    total_q, H, _ = q.shape
    if out.shape != q.shape or lse.shape != (H, total_q) or not lse.is_contiguous():
        raise ValueError(f"fastlm::varlen_attention_bwd: out must be q's shape {tuple(q.shape)} and lse a contiguous "
                         f"({H}, {total_q}), as varlen_attention_fwd returns them; got {tuple(out.shape)}, "
                         f"{tuple(lse.shape)} with strides {lse.stride()}")
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    if total_q and k.shape[0]:
        launch_backward(dout, q, k, v, out, lse, (0, total_q), dq, dk, dv, cu_seqlens_q.shape[0] - 1, max_seqlen_q,
                        max_seqlen_k, causal, scale, dropout_p, seed, cu_seqlens_q, cu_seqlens_k)
    else:
        dq.zero_(), dk.zero_(), dv.zero_()
    return dq, dk, dv


@_varlen_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
      dropout_p=0.0, seed=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.causal, ctx.scale, ctx.dropout_p, seed = inputs
    ctx.save_for_backward(q, k, v, *output, cu_q, cu_k, seed)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k, seed = ctx.saved_tensors
    dq, dk, dv = _varlen_attention_bwd(dout, q, k, v, out, lse, cu_q, cu_k, ctx.max_seqlen_q, ctx.max_seqlen_k,
                                       ctx.causal, ctx.scale, ctx.dropout_p, seed)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_varlen_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# -----------------------------------------------------------------------------
def _check_args(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q,
                max_seqlen_k) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"varlen_attention: q, k, v must be (total_q, H, D), (total_k, Hkv, D), (total_k, Hkv, D); "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[2] != q.shape[2]:
        raise ValueError(f"varlen_attention: k and v must be (total_k, Hkv, D) with q's D; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"varlen_attention: q's {q.shape[1]} heads must be a multiple of k/v's {k.shape[1]} heads")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"varlen_attention: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not 1 <= q.shape[2] <= 256:
        raise ValueError(f"varlen_attention: head dim must be in [1, 256], got {q.shape[2]}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.dtype != torch.int32 or cu.shape[0] < 1:
            raise ValueError(f"varlen_attention: {name} must be a 1-D int32 tensor of batch + 1 offsets, got "
                             f"{cu.dtype if isinstance(cu, Tensor) else type(cu).__name__} of shape "
                             f"{tuple(cu.shape) if isinstance(cu, Tensor) else '-'}")
        if cu.device != q.device:
            raise ValueError(f"varlen_attention: {name} must be on q's device {q.device}, got {cu.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"varlen_attention: cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
                         f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(n, bool) or not isinstance(n, (int, torch.SymInt)) or n < 0:
            raise ValueError(f"varlen_attention: {name} must be a Python int >= 0 (the longest sequence), got {n!r}")
    if cu_seqlens_q.shape[0] - 1 > 65535 or q.shape[1] > 65535:
        raise ValueError(f"varlen_attention: batch {cu_seqlens_q.shape[0] - 1} and heads {q.shape[1]} must each be "
                         f"at most 65535")
    check_row_strides("varlen_attention", q=q, k=k, v=v)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, causal: bool = True, scale: float | None = None, dropout_p: float = 0.0,
                     generator: torch.Generator | None = None) -> Tensor:
    """Attention within each of the packed sequences. q: (total_q, H, D); k, v: (total_k, Hkv, D); cu_seqlens_q/k:
    int32 (batch + 1) offsets on q's device; max_seqlen_q/k: Python ints, at least the longest sequence's length.
    Returns (total_q, H, D) in q's dtype. causal, scale, dropout_p and generator as in `kernels.attention`."""
    _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    check_scale_and_dropout("varlen_attention", scale, dropout_p)
    if not use_triton(q):
        return varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, dropout_p)
    seed = draw_seed(q.device, generator) if dropout_p > 0 else None
    return _varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                                 float(dropout_p), seed)[0]


def varlen_attention_ref(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                         causal: bool = True, scale: float | None = None, dropout_p: float = 0.0,
                         dropout_mask: Tensor | None = None) -> Tensor:
    """`attention_ref` run on each sequence separately (a host loop over cu_seqlens: the fallback and the test
    reference, not fast). dropout_mask (batch, H, max T_b, max S_b) bool applies that mask, sequence b taking its
    [:T_b, :S_b], as `kernels.flash_attention.dropout_mask` draws it for the kernels."""
    out = q.new_zeros(q.shape)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(starts_q) - 1):
        (q0, q1), (k0, k1) = starts_q[b : b + 2], starts_k[b : b + 2]
        if q1 == q0 or k1 == k0:  # no queries, or no keys: nothing to compute (a query that sees no key is 0)
            continue
        seq = lambda t, a, z: t[a:z].transpose(0, 1)[None]  # (1, H, len, D)
        mask = None if dropout_mask is None else dropout_mask[b : b + 1, :, : q1 - q0, : k1 - k0]
        o = attention_ref(seq(q, q0, q1), seq(k, k0, k1), seq(v, k0, k1), causal, scale, dropout_p, mask)
        out[q0:q1] = o[0].transpose(0, 1).nan_to_num(0.0)
    return out
