"""Attention-probability dropout inside the kernels: kernels.attention(..., dropout_p=p).

The kernels draw the keep mask Z by Philox from a seed (drawn from torch's generator) and the score's coordinates,
and the backward regenerates it. `dropout_mask(seed, ...)` returns that mask, so every result here is checked
against an independent reference that applies the same mask explicitly: attention_ref(..., dropout_mask=Z),
softmax in fp32/fp64 PyTorch, P * Z / (1 - p) @ V.
"""
import math

import pytest
import torch

import kernels.flash_attention as fa
from kernels import attention
from kernels.flash_attention import attention_ref, draw_seed, dropout_mask
from tests.conftest import DEVICE, assert_close_to_ref
from tests.kernels.test_flash_attention import make_qkv


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _outputs_and_grads(out, inputs, dout):
    return [out, *torch.autograd.grad(out, inputs, dout)]


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kept_fraction_within_binomial_bounds(p):
    """The fraction kept over a (2, 3, 70, 90) mask is within 5 binomial sigmas of 1 - p, overall and per head, and
    rows, columns, heads and batch entries do not repeat each other (the counter covers every coordinate)."""
    seed = draw_seed(DEVICE, _seeded(0))
    mask = dropout_mask(seed, 2, 3, 70, 90, p)
    assert mask.shape == (2, 3, 70, 90) and mask.dtype == torch.bool
    for kept, n in [(mask.sum().item(), mask.numel()), *((m.sum().item(), m.numel()) for m in mask.flatten(0, 1))]:
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(kept - n * (1 - p)) <= 5 * sigma, f"kept {kept} of {n}, expected {n * (1 - p):.0f} +- {5 * sigma:.0f}"
    assert not torch.equal(mask[0], mask[1]) and not torch.equal(mask[:, 0], mask[:, 1])
    assert not torch.equal(mask[..., 0, :], mask[..., 1, :]) and not torch.equal(mask[..., 0], mask[..., 1])


# (B, H, Hkv, T, S, D): T == S, GQA with T != S (a cache), T > S, a padded head dim, MQA with one query.
CASES = [(1, 2, 2, 40, 40, 16), (2, 4, 2, 33, 70, 32), (1, 2, 1, 70, 45, 16), (1, 2, 1, 1, 37, 80)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,Hkv,T,S,D", CASES)
def test_matches_the_explicit_mask_reference(B, H, Hkv, T, S, D, dtype, causal):
    """Output and every gradient equal to attention_ref with the kernel's own mask (2x-eager rule against fp64).

    Kills a backward whose counter differs from the forward's (tried: the dK/dV kernel drawing for head + 1 fails
    here, dk off by 0.4; the dQ kernel drawing for row + 1 fails, dq off by 0.6)."""
    p = 0.3
    q, k, v, dout = make_qkv(B, H, Hkv, T, S, D, dtype)
    mask = dropout_mask(draw_seed(DEVICE, _seeded(7)), B, H, T, S, p)
    ours = _outputs_and_grads(attention(q, k, v, causal, dropout_p=p, generator=_seeded(7)), (q, k, v), dout)
    eager = _outputs_and_grads(attention_ref(q, k, v, causal, dropout_p=p, dropout_mask=mask), (q, k, v), dout)
    up = lambda t: t.detach().double().requires_grad_()
    q64, k64, v64 = up(q), up(k), up(v)
    ref = _outputs_and_grads(attention_ref(q64, k64, v64, causal, dropout_p=p, dropout_mask=mask), (q64, k64, v64), dout.double())
    for name, o, r, e in zip(["out", "dq", "dk", "dv"], ours, ref, eager):
        assert o.dtype == dtype
        assert_close_to_ref(o, r, e, name)


def test_same_seed_bit_identical_different_seeds_differ():
    q, k, v, dout = make_qkv(1, 2, 1, 45, 45, 16, torch.float16)
    run = lambda seed: _outputs_and_grads(attention(q, k, v, dropout_p=0.2, generator=_seeded(seed)), (q, k, v), dout)
    first, again, other = run(1), run(1), run(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(not torch.equal(a, b) for a, b in zip(first, other))
    masks = [dropout_mask(draw_seed(DEVICE, _seeded(s)), 1, 2, 45, 45, 0.2) for s in (1, 2)]
    assert not torch.equal(*masks)


def test_torch_rng_advances_and_manual_seed_reproduces():
    """Without a generator the seed comes from torch's default one: consecutive calls draw different masks, and
    torch.manual_seed replays them."""
    q, k, v, _ = make_qkv(1, 1, 1, 30, 30, 16, torch.float32)
    torch.manual_seed(123)
    first, second = attention(q, k, v, dropout_p=0.2), attention(q, k, v, dropout_p=0.2)
    assert not torch.equal(first, second)
    torch.manual_seed(123)
    assert torch.equal(attention(q, k, v, dropout_p=0.2), first)


def test_zero_dropout_is_the_plain_kernel(monkeypatch):
    """p = 0 launches every kernel with DROPOUT=False and no seed, draws nothing from torch's generator, and gives
    bit for bit the results of the kernels without dropout (the same as dropout_p left out)."""
    launched = []

    class Spy:  # records DROPOUT and the Seed argument, then launches the real kernel
        def __init__(self, kernel):
            self.kernel, self.seed_index = kernel, kernel.arg_names.index("Seed")

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append((kwargs["DROPOUT"], args[self.seed_index]))
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        monkeypatch.setattr(fa, name, Spy(getattr(fa, name)))
    q, k, v, dout = make_qkv(1, 2, 1, 40, 40, 16, torch.float32)
    state = torch.get_rng_state()
    zero = _outputs_and_grads(attention(q, k, v, dropout_p=0.0), (q, k, v), dout)
    assert torch.equal(torch.get_rng_state(), state), "p = 0 must not draw from the generator"
    assert launched == [(False, None)] * 3
    plain = _outputs_and_grads(attention(q, k, v), (q, k, v), dout)
    assert all(torch.equal(a, b) for a, b in zip(zero, plain))


def test_torch_compile_fullgraph_with_dropout():
    """torch.compile(fullgraph=True) with dropout: the same results as eager for the same generator state (Inductor's
    own RNG is turned off with fallback_random, so both draw the seed from torch's generator), and different
    masks on consecutive compiled calls."""
    import torch._inductor.config as inductor_config

    q, k, v, dout = make_qkv(1, 2, 1, 37, 37, 16, torch.float32)
    fn = lambda q, k, v: attention(q, k, v, True, dropout_p=0.25)
    compiled = torch.compile(fn, fullgraph=True)
    with inductor_config.patch(fallback_random=True):
        torch.manual_seed(5)
        eager = _outputs_and_grads(fn(q, k, v), (q, k, v), dout)
        torch.manual_seed(5)
        ours = _outputs_and_grads(compiled(q, k, v), (q, k, v), dout)
        again = compiled(q, k, v)
    for e, c in zip(eager, ours):
        torch.testing.assert_close(c, e, atol=0, rtol=0)
    assert not torch.equal(again, ours[0])


def test_bad_dropout_arguments_raise_clear_errors():
    q, k, v, _ = make_qkv(1, 1, 1, 4, 4, 16, torch.float32)
    for p in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="dropout_p must be in"):
            attention(q, k, v, dropout_p=p)
    with pytest.raises(ValueError, match="needs a seed"):
        fa._attention_fwd(q, k, v, True, 0.25, 0.1, None)
