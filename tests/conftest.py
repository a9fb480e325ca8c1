"""Test harness: without a GPU, Triton kernels run on CPU tensors in Triton's interpreter.

TRITON_INTERPRET must be set before the kernels are defined, so it is set here, before any test module
imports `kernels`. On a machine with CUDA the tests run the compiled kernels on the GPU instead.
"""
import hashlib
import os
import tempfile
from pathlib import Path

import pytest
import torch

# Inductor's graph cache does not hash a custom op's fake implementation: after a kernel file changes, a stale
# entry can assume the old output strides. One cache directory per version of kernels/ avoids that.
_KERNELS = hashlib.sha256(b"".join(p.read_bytes() for p in sorted((Path(__file__).parents[1] / "kernels").glob("*.py"))))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"fastlm-inductor-{_KERNELS.hexdigest()[:12]}"))

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# Per-dtype absolute floor for "at most 2x eager's own error against an fp32 reference" (../STYLE.md).
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_close_to_ref(out: torch.Tensor, ref: torch.Tensor, eager: torch.Tensor, name: str = "output") -> None:
    """`out` (kernel) may be at most 2x as far from `ref` (fp32/fp64) as `eager` (PyTorch, same dtype), plus a floor."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    ref = ref.double()
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    eager_err = (eager.double() - ref).abs().max().item() if out.numel() else 0.0
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    bound = 2 * eager_err + FLOOR[out.dtype] * scale
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (eager's error {eager_err:.3g})"


def requires_cuda(reason: str = "needs a CUDA GPU"):
    """Skip without CUDA (saying why) and mark the test `gpu`, so `pytest -m gpu` runs exactly the GPU checks."""
    def mark(test):
        return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason=reason)(test))
    return mark
