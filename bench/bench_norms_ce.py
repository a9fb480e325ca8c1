"""Norms and cross-entropy: ours (triton) against eager PyTorch, torch.compile and Liger-Kernel where installed.

GB/s counts the bytes that must move: forward reads x and writes y; forward+backward also reads x, dy and
writes dx (parameters are negligible). Cross-entropy reads the logits in forward and reads them and writes
their gradient in backward.
"""
import pytest
import torch
import torch.nn.functional as F

import kernels
from bench.conftest import optional_import

liger_ops = optional_import("liger_kernel.transformers")
PROVIDERS = ["triton", "eager", "compile", "liger"]
NORM_SHAPES = [(16384, 768), (16384, 1024), (16384, 1600), (8192, 4096), (4096, 16384)]
DTYPE = torch.bfloat16


def _require_liger(provider):
    if provider == "liger" and liger_ops is None:
        pytest.skip("Liger-Kernel is not installed")


def _norm_fn(op, provider, N):
    if provider == "liger":
        module = (liger_ops.LigerLayerNorm(N) if op == "layer_norm" else liger_ops.LigerRMSNorm(N, eps=1e-6)).to("cuda", DTYPE)
        return lambda x, w, b: module(x)
    if op == "layer_norm":
        ours, eager = kernels.layer_norm, (lambda x, w, b: F.layer_norm(x, (N,), w, b))
    else:
        ours, eager = (lambda x, w, b: kernels.rms_norm(x, w)), (lambda x, w, b: F.rms_norm(x, (N,), w, 1e-6))
    return {"triton": ours, "eager": eager, "compile": torch.compile(eager, fullgraph=True)}[provider]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("M,N", NORM_SHAPES)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def bench_norm(gpu_bench, benchmark, op, M, N, mode, provider):
    _require_liger(provider)
    benchmark.group = f"{op} {M}x{N} {mode}"
    x = torch.randn(M, N, device="cuda", dtype=DTYPE, requires_grad=mode != "forward")
    w = torch.randn(N, device="cuda", dtype=DTYPE, requires_grad=True)
    b = torch.randn(N, device="cuda", dtype=DTYPE, requires_grad=True)
    dy = torch.randn_like(x)
    fn = _norm_fn(op, provider, N)
    if mode == "forward":
        step, nbytes = (lambda: fn(x, w, b)), 2 * x.numel() * x.element_size()
    else:
        step, nbytes = (lambda: torch.autograd.grad(fn(x, w, b), (x, w), dy)), 5 * x.numel() * x.element_size()
    gpu_bench(step, gb_per_s=lambda t: nbytes / t / 1e9)


@pytest.mark.parametrize("provider", ["triton", "eager", "compile"])
@pytest.mark.parametrize("M,N", [(16384, 768), (8192, 1024), (8192, 1600)])
def bench_add_layer_norm(gpu_bench, benchmark, M, N, provider):
    """GPT-2's prenorm step: h = stream + branch (fp32 stream, bf16 branch), y = LayerNorm(h) in bf16 for the next
    matmul, forward and backward through both outputs. Bytes: branch, stream, h, y forward; dy, dh, h, dstream,
    dbranch backward."""
    benchmark.group = f"add_layer_norm {M}x{N} fp32 stream bf16 branch forward_backward"
    stream = torch.randn(M, N, device="cuda", requires_grad=True)
    branch = torch.randn(M, N, device="cuda", dtype=DTYPE, requires_grad=True)
    w = torch.randn(N, device="cuda", requires_grad=True)
    b = torch.randn(N, device="cuda", requires_grad=True)
    dy, dh = torch.randn(M, N, device="cuda", dtype=DTYPE), torch.randn(M, N, device="cuda")

    def eager(branch, stream):
        h = stream + branch
        return F.layer_norm(h, (N,), w, b).to(DTYPE), h

    fn = {"triton": lambda branch, stream: kernels.layer_norm(branch, w, b, residual=stream, out_dtype=DTYPE),
          "eager": eager, "compile": torch.compile(eager, fullgraph=True)}[provider]
    nbytes = M * N * (2 + 4 + 4 + 2) + M * N * (2 + 4 + 4 + 4 + 2)
    gpu_bench(lambda: torch.autograd.grad(fn(branch, stream), (branch, stream, w, b), (dy, dh)),
              gb_per_s=lambda t: nbytes / t / 1e9)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("V", [50257, 128256])
def bench_cross_entropy(gpu_bench, benchmark, V, provider):
    _require_liger(provider)
    N = 16384 if V < 100000 else 8192
    benchmark.group = f"cross_entropy {N}x{V} forward_backward"
    logits = torch.randn(N, V, device="cuda", dtype=DTYPE, requires_grad=True)
    target = torch.randint(0, V, (N,), device="cuda")
    if provider == "liger":
        fn = liger_ops.LigerCrossEntropyLoss()
    else:
        fn = {"triton": kernels.cross_entropy, "eager": F.cross_entropy, "compile": torch.compile(F.cross_entropy, fullgraph=True)}[provider]
    nbytes = 3 * logits.numel() * logits.element_size()
    gpu_bench(lambda: torch.autograd.grad(fn(logits, target), logits), gb_per_s=lambda t: nbytes / t / 1e9)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("C", [768, 1600])
def bench_linear_cross_entropy(gpu_bench, benchmark, C, provider):
    _require_liger(provider)
    N, V = 16384, 50257
    benchmark.group = f"linear_cross_entropy {N}x{C}x{V} forward_backward"
    x = torch.randn(N, C, device="cuda", dtype=DTYPE, requires_grad=True)
    w = (torch.randn(V, C, device="cuda", dtype=DTYPE) / C**0.5).requires_grad_()
    target = torch.randint(0, V, (N,), device="cuda")
    unfused = lambda x, w, t: F.cross_entropy(F.linear(x, w), t)
    if provider == "liger":
        loss_fn = liger_ops.LigerFusedLinearCrossEntropyLoss()
        fn = lambda x, w, t: loss_fn(w, x, t)
    else:
        fn = {"triton": kernels.linear_cross_entropy, "eager": unfused, "compile": torch.compile(unfused, fullgraph=True)}[provider]
    flops = 3 * 2 * N * C * V  # logits, dx, dW matmuls
    gpu_bench(lambda: torch.autograd.grad(fn(x, w, target), (x, w)), tflop_per_s=lambda t: flops / t / 1e12)


@pytest.mark.parametrize("provider", ["triton", "eager", "compile"])
def bench_linear_cross_entropy_fp32_master_head(gpu_bench, benchmark, provider):
    """The fine-tune's own head: bf16 hidden states, an fp32 master weight, under bf16 autocast (the head's matmuls
    in bf16, dW accumulated in fp32)."""
    N, C, V = 8192, 768, 50257
    benchmark.group = f"linear_cross_entropy {N}x{C}x{V} fp32 weight bf16 autocast forward_backward"
    x = torch.randn(N, C, device="cuda", dtype=DTYPE, requires_grad=True)
    w = (torch.randn(V, C, device="cuda") / C**0.5).requires_grad_()
    target = torch.randint(0, V, (N,), device="cuda")
    unfused = lambda x, w, t: F.cross_entropy(F.linear(x, w).float(), t)
    fn = {"triton": kernels.linear_cross_entropy, "eager": unfused, "compile": torch.compile(unfused, fullgraph=True)}[provider]

    def step():
        with torch.autocast("cuda", dtype=DTYPE):
            loss = fn(x, w, target)
        return torch.autograd.grad(loss, (x, w))

    gpu_bench(step, tflop_per_s=lambda t: 3 * 2 * N * C * V / t / 1e12)
