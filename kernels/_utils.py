"""Small shared helpers: when to run Triton, block sizes, launch checks.

A kernel runs in Triton when its input is on a CUDA device, or on the CPU while Triton's interpreter is on
(`TRITON_INTERPRET=1`, set before `triton` is imported). Everywhere else (CPU without the interpreter, MPS,
a machine without Triton) the public functions run a plain PyTorch path with the same semantics, so a model
that imports these kernels still runs anywhere.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # macOS, Windows, or a minimal install: only the PyTorch path is available
    HAS_TRITON = False

    class _TritonStub:
        """Stands in for `triton` / `triton.language` so the kernel files import; their kernels never run."""

        constexpr = int
        float32 = int64 = None

        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(n - 1, 0).bit_length()

    triton = tl = _TritonStub()

__all__ = ["HAS_TRITON", "triton", "tl", "interpreting", "device_runs_triton", "use_triton", "check_triton_device", "num_programs",
           "needs_int64_columns", "exceeds_int32", "col_offsets"]

INT32_MAX = 2**31 - 1


def interpreting() -> bool:
    """True when Triton's interpreter runs kernels on the CPU (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_runs_triton(device: torch.device) -> bool:
    """Whether the Triton kernels run on `device`: CUDA, or the CPU under the interpreter."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on `x`'s device; otherwise callers take the PyTorch path."""
    return device_runs_triton(x.device)


def check_triton_device(op: str, *tensors: torch.Tensor) -> None:
    """One-line error for a custom op called directly on tensors that Triton cannot run on."""
    for t in tensors:
        if t is not None and not use_triton(t):
            raise RuntimeError(
                f"{op}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got a tensor on "
                f"{t.device}; call the public function in `kernels`, which falls back to PyTorch"
            )
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"{op}: tensors are on different devices: {sorted(map(str, devices))}")


def num_programs(device: torch.device, per_sm: int = 2) -> int:
    """Size of a persistent grid: a few programs per SM on a GPU, a handful in the CPU interpreter."""
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def needs_int64_columns(n_cols: int, *strides: int) -> bool:
    """Whether a kernel's column term (col * stride, col < n_cols) can pass int32 for one of these strides: the
    host then compiles the kernel's COL_INT64 variant, and the common case keeps 32-bit offset math."""
    return any((n_cols - 1) * abs(s) > INT32_MAX for s in strides)


def exceeds_int32(value: int) -> bool:
    """Whether an element offset passes 2^31 - 1 (read at call time, so tests can lower the limit)."""
    return value > INT32_MAX


@triton.jit
def col_offsets(cols, stride, COL_INT64: tl.constexpr):
    """cols * stride, in int64 when the host says the column term can pass 2^31 (needs_int64_columns)."""
    if COL_INT64:
        return cols.to(tl.int64) * stride
    else:
        return cols * stride
