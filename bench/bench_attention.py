"""Attention: ours (triton) against PyTorch's SDPA backends (flash, cuDNN, memory-efficient), eager and compile;
attention-probability dropout against SDPA's; packed documents (varlen) against the dense kernel and SDPA with a
block-diagonal mask.

Shapes follow GPT-2-style training: B*T = 16384 tokens, H*D = 2048, T = 1024..8192, head dim 64 and 128.
TFLOP/s counts 4*B*H*T*T*D for the forward (halved when causal) and 2.5x that for the backward; for packed
documents only the work inside documents counts (4*H*D*sum_b T_b^2 / 2, causal), whatever a provider computes.
"""
import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels

PROVIDERS = ["triton", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "eager", "compile"]
SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}
DTYPE = torch.bfloat16


def eager_attention(q, k, v, causal):
    """Attention as plain PyTorch ops: the (T, T) scores are materialised."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        T = q.shape[-2]
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def attention_fn(provider):
    if provider == "triton":
        return kernels.attention
    if provider in SDPA_BACKENDS:
        def sdpa(q, k, v, causal, backend=SDPA_BACKENDS[provider]):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return sdpa
    if provider == "eager":
        return eager_attention
    return torch.compile(eager_attention, fullgraph=True)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("T", [1024, 2048, 4096, 8192])
def bench_attention(gpu_bench, benchmark, T, D, causal, mode, provider):
    B, H = 16384 // T, 2048 // D
    if provider in ("eager", "compile") and T > 4096:
        pytest.skip("eager attention materialises (B, H, T, T) scores: out of memory past T = 4096")
    benchmark.group = f"attention T={T} D={D} {'causal' if causal else 'full'} {mode}"
    make = lambda: torch.randn(B, H, T, D, device="cuda", dtype=DTYPE, requires_grad=mode != "forward")
    q, k, v = make(), make(), make()
    dout = torch.randn(B, H, T, D, device="cuda", dtype=DTYPE)
    fn = attention_fn(provider)
    flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0) * (1.0 if mode == "forward" else 3.5)
    if mode == "forward":
        step = lambda: fn(q, k, v, causal)
    else:
        step = lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), dout)
    try:
        step()
    except RuntimeError as e:  # e.g. cuDNN attention unavailable in this build
        pytest.skip(f"{provider} cannot run this shape here: {str(e).splitlines()[0][:200]}")
    gpu_bench(step, tflop_per_s=lambda t: flops / t / 1e12)


# -----------------------------------------------------------------------------
# Dropout on the attention probabilities (GPT-2's attn_pdrop = 0.1): ours at p = 0.1 against ours at p = 0 (the cost
# of the in-kernel Philox mask) and SDPA's dropout: the math backend (scores materialised, a mask drawn by torch) and
# the flash backend (FlashAttention-2's in-kernel dropout).
DROPOUT_PROVIDERS = ["triton", "triton_p0", "sdpa_flash", "sdpa_math"]


@pytest.mark.parametrize("provider", DROPOUT_PROVIDERS)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("T", [1024, 4096])
def bench_attention_dropout(gpu_bench, benchmark, T, D, mode, provider):
    B, H, p = 16384 // T, 2048 // D, 0.1
    benchmark.group = f"attention dropout p={p} T={T} D={D} causal {mode}"
    make = lambda: torch.randn(B, H, T, D, device="cuda", dtype=DTYPE, requires_grad=mode != "forward")
    q, k, v = make(), make(), make()
    dout = torch.randn(B, H, T, D, device="cuda", dtype=DTYPE)
    if provider.startswith("triton"):
        p_run = 0.0 if provider == "triton_p0" else p
        fn = lambda: kernels.attention(q, k, v, causal=True, dropout_p=p_run)
    else:
        backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_math": SDPBackend.MATH}[provider]

        def fn():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
    flops = 4 * B * H * T * T * D * 0.5 * (1.0 if mode == "forward" else 3.5)
    step = fn if mode == "forward" else (lambda: torch.autograd.grad(fn(), (q, k, v), dout))
    try:
        step()
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        pytest.skip(f"{provider} cannot run this shape here: {str(e).splitlines()[0][:200]}")
    gpu_bench(step, tflop_per_s=lambda t: flops / t / 1e12)


# -----------------------------------------------------------------------------
# Packed documents, as instruction fine-tuning data comes: lengths drawn uniformly from 32..1024 tokens, packed into
# rows of 4096 (the last document of a row cut to fit), 4 rows. Ours varlen; our dense causal kernel over the same
# rows (what packing without boundaries costs; it attends across documents); SDPA with the block-diagonal causal mask
# (the correct result with a dense kernel: PyTorch picks its backend for a boolean mask).
VARLEN_PROVIDERS = ["varlen", "dense", "sdpa_block_diagonal"]


def document_lengths(rows: int, row_len: int, shortest: int = 32, longest: int = 1024, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    lengths = []
    for _ in range(rows):
        left = row_len
        while left:
            lengths.append(min(rng.randint(shortest, longest), left))
            left -= lengths[-1]
    return lengths


@pytest.mark.parametrize("provider", VARLEN_PROVIDERS)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("D", [64, 128])
def bench_varlen_attention(gpu_bench, benchmark, D, mode, provider):
    rows, T, H = 4, 4096, 2048 // D
    lengths = document_lengths(rows, T)
    benchmark.group = f"varlen attention {rows}x{T} tokens, documents 32..1024, D={D} causal {mode}"
    make = lambda: torch.randn(rows * T, H, D, device="cuda", dtype=DTYPE, requires_grad=mode != "forward")
    q, k, v = make(), make(), make()
    dout = torch.randn(rows * T, H, D, device="cuda", dtype=DTYPE)
    dense = lambda t: t.view(rows, T, H, D).transpose(1, 2)  # (B, H, T, D) views of the packed tokens
    if provider == "varlen":
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device="cuda")
        fn = lambda: kernels.varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
    elif provider == "dense":
        fn = lambda: kernels.attention(dense(q), dense(k), dense(v), causal=True).transpose(1, 2).reshape(rows * T, H, D)
    else:
        doc = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"), torch.tensor(lengths, device="cuda"))
        doc = doc.view(rows, T)
        causal = torch.ones(T, T, dtype=torch.bool, device="cuda").tril()
        mask = ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]  # (rows, 1, T, T)
        fn = lambda: F.scaled_dot_product_attention(dense(q), dense(k), dense(v), attn_mask=mask).transpose(1, 2).reshape(rows * T, H, D)
    flops = 4 * H * D * sum(n * n for n in lengths) * 0.5 * (1.0 if mode == "forward" else 3.5)
    step = fn if mode == "forward" else (lambda: torch.autograd.grad(fn(), (q, k, v), dout))
    try:
        step()
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        pytest.skip(f"{provider} cannot run this shape here: {str(e).splitlines()[0][:200]}")
    gpu_bench(step, tflop_per_s=lambda t: flops / t / 1e12, documents=len(lengths))
