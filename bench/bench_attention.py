"""Attention: ours (triton) against PyTorch's SDPA backends (flash, cuDNN, memory-efficient), eager and compile.

Shapes follow GPT-2-style training: B*T = 16384 tokens, H*D = 2048, T = 1024..8192, head dim 64 and 128.
TFLOP/s counts 4*B*H*T*T*D for the forward (halved when causal) and 2.5x that for the backward.
"""
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
