"""kernels.varlen_attention (packed sequences) against the dense reference run on each sequence alone: output and
every gradient under the 2x-eager rule, random length mixes (1, empty, across block boundaries), causal and not,
GQA, head dims up to 256, dropout against the explicit mask, torch.compile with no recompile for new lengths."""
import random

import pytest
import torch

import kernels.flash_attention as fa
from kernels import varlen_attention, varlen_attention_ref
from kernels.flash_attention import draw_seed, dropout_mask
from kernels.varlen_flash_attention import _varlen_attention_bwd, _varlen_attention_fwd
from tests.conftest import DEVICE, assert_close_to_ref, requires_cuda


def make_varlen(lengths_q, lengths_k, H, Hkv, D, dtype, seed=0):
    """q (sum lengths_q, H, D), k/v (sum lengths_k, Hkv, D), dO, and the int32 offsets."""
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_()
    cu = lambda lengths: torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    total_q, total_k = sum(lengths_q), sum(lengths_k)
    q, k, v = make(total_q, H, D), make(total_k, Hkv, D), make(total_k, Hkv, D)
    dout = torch.randn(total_q, H, D, generator=g).to(DEVICE, dtype)
    return q, k, v, dout, cu(lengths_q), cu(lengths_k)


def grads(out, inputs, dout):
    return [out, *torch.autograd.grad(out, inputs, dout)]


def check_against_reference(q, k, v, dout, cu_q, cu_k, causal, scale=None, dropout_p=0.0, mask=None, generator=None):
    """Ours, the reference in our dtype (eager) and in fp64; every output and gradient under the 2x rule."""
    max_q, max_k = (int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0 for cu in (cu_q, cu_k))
    ours = grads(varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, generator), (q, k, v), dout)
    eager = grads(varlen_attention_ref(q, k, v, cu_q, cu_k, causal, scale, dropout_p, mask), (q, k, v), dout)
    up = lambda t: t.detach().double().requires_grad_()
    q64, k64, v64 = up(q), up(k), up(v)
    ref = grads(varlen_attention_ref(q64, k64, v64, cu_q, cu_k, causal, scale, dropout_p, mask), (q64, k64, v64), dout.double())
    for name, o, r, e in zip(["out", "dq", "dk", "dv"], ours, ref, eager):
        assert o.dtype == q.dtype and o.shape == r.shape
        assert_close_to_ref(o, r, e, name)
    return ours


def _random_lengths(rng: random.Random, n: int, longest: int) -> list[int]:
    """Mostly short documents with a few empty ones and a few long ones (past a 64/128 block)."""
    return [rng.choice([0, 1, rng.randint(2, 40), rng.randint(2, 40), rng.randint(60, longest)]) for _ in range(n)]


# Length mixes: a single token; empty sequences between others (cu_seqlens with repeated entries); lengths on and
# around the 64/128 blocks; random mixes. fp32 and fp16 alternate (their tiles differ).
_rng = random.Random(19)
MIXES = [([1], torch.float32), ([0, 5, 0, 0, 70, 1], torch.float16), ([130, 3, 64, 65, 0], torch.float32),
         (_random_lengths(_rng, 6, 140), torch.float16), (_random_lengths(_rng, 6, 100), torch.float32)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths,dtype", MIXES, ids=lambda m: "-".join(map(str, m)) if isinstance(m, list) else str(m)[6:])
def test_packed_documents_match_each_document_alone(lengths, dtype, causal):
    """cu_seqlens_q == cu_seqlens_k (packed documents), GQA: 2 query heads on 1 key/value head."""
    q, k, v, dout, cu_q, cu_k = make_varlen(lengths, lengths, 2, 1, 32, dtype, seed=len(lengths))
    check_against_reference(q, k, v, dout, cu_q, cu_k, causal)


@pytest.mark.parametrize("causal,dtype", [(True, torch.float32), (False, torch.float16)])
def test_queries_and_keys_of_different_lengths(dtype, causal):
    """T_b != S_b per sequence (bottom-right causal mask: T_b <= S_b when causal, so every query sees a key), MQA,
    a padded head dim (D = 80)."""
    rng = random.Random(3)
    lengths_k = [rng.randint(1, 90) for _ in range(4)]
    lengths_q = [rng.randint(1, s) if causal else rng.randint(1, 90) for s in lengths_k]
    q, k, v, dout, cu_q, cu_k = make_varlen(lengths_q, lengths_k, 2, 1, 80, dtype)
    check_against_reference(q, k, v, dout, cu_q, cu_k, causal)


@pytest.mark.parametrize("D", [64, 128, 256])
def test_head_dims(D):
    q, k, v, dout, cu_q, cu_k = make_varlen([33, 1, 17], [33, 1, 17], 1, 1, D, torch.float32, seed=D)
    check_against_reference(q, k, v, dout, cu_q, cu_k, True, scale=0.3)


def test_queries_that_see_no_key_and_sequences_without_keys_give_zero():
    """T_b > S_b causal (the first T_b - S_b queries see nothing) and a sequence with queries but no keys: output
    and dq exactly 0 there, everything finite."""
    q, k, v, dout, cu_q, cu_k = make_varlen([6, 4, 3], [2, 0, 3], 2, 1, 16, torch.float32)
    out, dq, dk, dv = grads(varlen_attention(q, k, v, cu_q, cu_k, 6, 3, causal=True), (q, k, v), dout)
    blind = torch.tensor([True] * 4 + [False] * 2 + [True] * 4 + [False] * 3)
    assert torch.all(out[blind] == 0) and torch.all(dq[blind] == 0)
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))
    ref = varlen_attention_ref(q, k, v, cu_q, cu_k, True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal,dtype", [(True, torch.float32), (False, torch.float16)])
def test_dropout_matches_the_explicit_mask(dtype, causal):
    """Sequence b's keep mask is dropout_mask(seed, batch, H, max T, max S)[b, :, :T_b, :S_b]: output and every
    gradient equal the per-sequence reference with that mask applied explicitly."""
    lengths = [37, 0, 1, 70, 12]
    q, k, v, dout, cu_q, cu_k = make_varlen(lengths, lengths, 2, 1, 16, dtype)
    mask = dropout_mask(draw_seed(DEVICE, torch.Generator(device=DEVICE).manual_seed(4)), len(lengths), 2, 70, 70, 0.2)
    check_against_reference(q, k, v, dout, cu_q, cu_k, causal, dropout_p=0.2, mask=mask,
                            generator=torch.Generator(device=DEVICE).manual_seed(4))


def test_gradients_are_bit_identical_run_to_run():
    """Cannot fail in the interpreter (it runs programs one after another); on a GPU it catches atomics or any
    order-dependent accumulation."""
    q, k, v, dout, cu_q, cu_k = make_varlen([50, 7, 70], [50, 7, 70], 2, 1, 32, torch.float16)
    run = lambda: grads(varlen_attention(q, k, v, cu_q, cu_k, 70, 70), (q, k, v), dout)
    first = run()
    assert all(torch.equal(a, b) for a, b in zip(first, run()))


def test_torch_compile_reuses_the_graph_for_new_lengths():
    """torch.compile(fullgraph=True) with the lengths as tensors: equal to eager, forward and backward, and a new
    mix of lengths (same total, same number of sequences, same max_seqlen) compiles nothing new."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    fn = lambda q, k, v, cu: varlen_attention(q, k, v, cu, cu, 40, 40, causal=True)
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for i, lengths in enumerate([[40, 15, 2, 0], [10, 40, 0, 7], [1, 1, 40, 15]]):
        q, k, v, dout, cu, _ = make_varlen(lengths, lengths, 2, 1, 16, torch.float32, seed=i)
        eager = grads(fn(q, k, v, cu), (q, k, v), dout)
        ours = grads(compiled(q, k, v, cu), (q, k, v), dout)
        for e, c in zip(eager, ours):
            torch.testing.assert_close(c, e, atol=0, rtol=0)
    assert counter.frame_count == 1, f"recompiled for new lengths: {counter.frame_count} frames"


def test_opcheck():
    """The custom ops' fake, autograd and dispatch registrations, at a non-default scale, with GQA and dropout."""
    q, k, v, dout, cu_q, cu_k = make_varlen([5, 0, 11], [7, 3, 11], 2, 1, 16, torch.float32)
    seed = draw_seed(DEVICE, torch.Generator(device=DEVICE).manual_seed(0))
    torch.library.opcheck(_varlen_attention_fwd, (q, k, v, cu_q, cu_k, 11, 11, False, 0.3, 0.25, seed))
    with torch.no_grad():
        out, lse = _varlen_attention_fwd(q, k, v, cu_q, cu_k, 11, 11, False, 0.3, 0.25, seed)
    torch.library.opcheck(_varlen_attention_bwd, (dout, q.detach(), k.detach(), v.detach(), out, lse, cu_q, cu_k,
                                                  11, 11, False, 0.3, 0.25, seed))


def test_bad_arguments_raise_clear_errors():
    q, k, v, _, cu, _ = make_varlen([3, 4], [3, 4], 2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match=r"^varlen_attention: q, k, v must be \(total_q, H, D\)"):
        varlen_attention(q[None], k, v, cu, cu, 4, 4)
    with pytest.raises(ValueError, match="cu_seqlens_q must be a 1-D int32 tensor"):
        varlen_attention(q, k, v, cu.long(), cu, 4, 4)
    with pytest.raises(ValueError, match="same length"):
        varlen_attention(q, k, v, cu, cu[:2], 4, 4)
    with pytest.raises(ValueError, match="max_seqlen_k must be a Python int"):
        varlen_attention(q, k, v, cu, cu, 4, torch.tensor(4))
    with pytest.raises(ValueError, match="multiple of"):
        varlen_attention(q[:, :1].expand(-1, 3, -1), k[:, :1].expand(-1, 2, -1), v[:, :1].expand(-1, 2, -1), cu, cu, 4, 4)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        varlen_attention(q, k, v, cu, cu, 4, 4, dropout_p=1.0)
    big = torch.empty_strided((7, 2, 16), (fa.MAX_ROW_STRIDE, 16, 1), device="meta")
    with pytest.raises(ValueError, match="q's row/column strides"):
        varlen_attention(big, k.to("meta"), v.to("meta"), cu.to("meta"), cu.to("meta"), 4, 4)


def test_pytorch_fallback_off_triton(monkeypatch):
    monkeypatch.setattr("kernels._utils.interpreting", lambda: False)
    q, k, v, _, cu, _ = make_varlen([5, 0, 9], [5, 0, 9], 2, 1, 16, torch.float32)
    q, k, v, cu = q.cpu(), k.cpu(), v.cpu(), cu.cpu()
    torch.testing.assert_close(varlen_attention(q, k, v, cu, cu, 9, 9), varlen_attention_ref(q, k, v, cu, cu), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        _varlen_attention_fwd(q, k, v, cu, cu, 9, 9, True, 0.25)


@requires_cuda("bf16 (the interpreter's bf16 tl.dot is wrong) and real sizes run on a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_instruction_length_mix_on_gpu(D, dtype):
    """Documents of 32..1024 tokens packed into 4096-token rows (4 rows), 2048 / D heads, against the per-document
    fp64 reference under the 2x rule."""
    rng = random.Random(D)
    lengths = []
    for _ in range(4):
        row = []
        while sum(row) < 4096:
            row.append(min(rng.randint(32, 1024), 4096 - sum(row)))
        lengths += row
    H = 2048 // D
    q, k, v, dout, cu_q, cu_k = make_varlen(lengths, lengths, H, H, D, dtype)
    check_against_reference(q, k, v, dout, cu_q, cu_k, True)
