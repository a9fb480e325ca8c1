"""The GPU fine-tuning step, run on the CPU in its GPU configuration (triton backend under the interpreter, bf16
autocast, fp32 master weights): what precision each matmul runs in, and what backward allocates.

The interpreter's bf16 tl.dot is wrong (shared/NOTES.md), so these tests check dtypes and allocations, not values;
the values are checked in fp32 against transformers in test_model.py."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels.fused_linear_cross_entropy as flce
from fastlm import GPT, GPTConfig
from kernels._utils import use_triton
from tests.conftest import DEVICE

pytestmark = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEVICE)), reason="needs CUDA or TRITON_INTERPRET=1")
CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=384, block_size=32)
MATMULS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm, torch.ops.aten.baddbmm}


class Matmuls(TorchDispatchMode):
    """(operand dtypes, operand shapes) of every matmul dispatched under it."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in MATMULS:
            a, b = args[:2] if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm) else args[1:3]
            self.calls.append(((a.dtype, b.dtype), (tuple(a.shape), tuple(b.shape))))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def head_matmuls(monkeypatch):
    """Matmuls inside the fused LM head (a custom op hides its insides from a mode around the caller)."""
    calls = []
    real = flce._chunks

    def spy(*args):
        with Matmuls(calls):
            return real(*args)

    monkeypatch.setattr(flce, "_chunks", spy)
    return calls


def head_sized_fp32(calls):
    V = CONFIG.vocab_size
    return [c for c in calls if torch.float32 in c[0] and any(V in shape for shape in c[1])]


@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_configuration_runs_every_head_matmul_in_bf16(compiled, head_matmuls):
    torch.manual_seed(0)
    model = GPT(CONFIG, backend="triton").to(DEVICE)  # fp32 master weights, as python -m fastlm.finetune keeps them
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    forward = torch.compile(model) if compiled else model
    idx = torch.randint(0, CONFIG.vocab_size, (2, 17), device=DEVICE)
    outside = []
    with Matmuls(outside) if not compiled else contextlib.nullcontext():  # a dispatch mode would not see compiled code
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = forward(idx[:, :-1], idx[:, 1:])
        loss.backward()
    optimizer.step()
    assert loss.dtype == torch.float32
    assert head_matmuls, "the fused head ran"
    assert all(c[0] == (torch.bfloat16, torch.bfloat16) for c in head_matmuls), head_matmuls
    assert not head_sized_fp32(head_matmuls + outside), "an fp32 matmul of the head's size"
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    if not compiled:
        assert outside and all(torch.float32 not in c[0] for c in outside), [c for c in outside if torch.float32 in c[0]]


def test_the_hidden_states_reach_the_head_in_bf16_from_one_norm_kernel(monkeypatch):
    """ln_f adds the last block's output to the fp32 stream and normalises it in one kernel, writing bf16 for the
    head under autocast; the head then casts nothing of (N, C)."""
    import kernels

    seen = []
    real = kernels.layer_norm

    def spy(x, *args, **kwargs):
        out = real(x, *args, **kwargs)
        seen.append((x.dtype, kwargs.get("residual").dtype if kwargs.get("residual") is not None else None,
                     (out[0] if isinstance(out, tuple) else out).dtype))
        return out

    monkeypatch.setattr(kernels, "layer_norm", spy)
    model = GPT(CONFIG, backend="triton").to(DEVICE)
    idx = torch.randint(0, CONFIG.vocab_size, (2, 9), device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        model(idx[:, :-1], idx[:, 1:])
    # ln_1 of block 0 normalises the fp32 embeddings; every later norm adds a bf16 branch to the fp32 stream
    assert seen[0] == (torch.float32, None, torch.bfloat16)
    assert seen[1:] == [(torch.bfloat16, torch.float32, torch.bfloat16)] * (2 * CONFIG.n_layer)
