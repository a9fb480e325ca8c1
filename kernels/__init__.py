"""Triton kernels for transformer training: flash attention, fused norms, softmax cross-entropy, fused LM-head
cross-entropy.

Each op is a `torch.library` custom op with autograd (so `torch.compile(fullgraph=True)` sees it whole) and
runs in Triton on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; anywhere else the same functions
run plain PyTorch with the same semantics. One module per op: `kernels.flash_attention`,
`kernels.varlen_flash_attention` (packed sequences), `kernels.norms`, `kernels.softmax_cross_entropy`,
`kernels.fused_linear_cross_entropy`.
"""
from kernels.flash_attention import attention, attention_ref
from kernels.fused_linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from kernels.norms import LayerNorm, RMSNorm, layer_norm, layer_norm_ref, rms_norm, rms_norm_ref
from kernels.softmax_cross_entropy import cross_entropy, cross_entropy_ref
from kernels.varlen_flash_attention import varlen_attention, varlen_attention_ref

__all__ = [
    "attention", "attention_ref", "varlen_attention", "varlen_attention_ref",
    "LayerNorm", "RMSNorm", "layer_norm", "rms_norm", "layer_norm_ref", "rms_norm_ref",
    "cross_entropy", "linear_cross_entropy", "cross_entropy_ref", "linear_cross_entropy_ref",
]
