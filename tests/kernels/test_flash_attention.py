"""kernels.attention against SDPA: outputs and all three gradients, GQA, masks, strides, determinism, compile."""
import pytest
import torch
import torch.nn.functional as F

from kernels import attention
from kernels.flash_attention import _attention_bwd, _attention_fwd, attention_ref
from tests.conftest import DEVICE, HAS_CUDA, assert_close_to_ref, requires_cuda

# The interpreter's bf16 tl.dot is wrong (../shared/NOTES.md): bf16 runs on the GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
# (B, H, Hkv, T, S, D): a single token; odd T with GQA; MQA; T < S (a cache); T > S; D = 128; D = 80 padded; D = 256.
CASES = [
    (1, 1, 1, 1, 1, 16),
    (2, 4, 2, 67, 67, 32),
    (1, 2, 1, 100, 100, 64),
    (1, 2, 2, 67, 130, 64),
    (1, 2, 2, 130, 67, 16),
    (1, 1, 1, 33, 33, 128),
    (1, 2, 1, 45, 45, 80),
    (1, 1, 1, 40, 40, 256),
]


def make_qkv(B, H, Hkv, T, S, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_()
    return make(B, H, T, D), make(B, Hkv, S, D), make(B, Hkv, S, D), torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype)


def sdpa(q, k, v, causal):
    """The independent reference: SDPA with an explicit bottom-right mask when T != S."""
    return attention_ref(q, k, v, causal)


def out_and_grads(fn, q, k, v, dout, causal):
    out = fn(q, k, v, causal)
    return [out, *torch.autograd.grad(out, (q, k, v), dout)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Hkv,T,S,D", CASES)
def test_matches_sdpa(B, H, Hkv, T, S, D, dtype, causal):
    q, k, v, dout = make_qkv(B, H, Hkv, T, S, D, dtype)
    ours = out_and_grads(attention, q, k, v, dout, causal)
    eager = out_and_grads(sdpa, q, k, v, dout, causal)
    up = lambda t: t.detach().double().requires_grad_()
    ref = out_and_grads(sdpa, up(q), up(k), up(v), dout.double(), causal)
    for name, o, r, e in zip(["out", "dq", "dk", "dv"], ours, ref, eager):
        assert o.dtype == dtype
        assert_close_to_ref(o, r, e, name)


def test_causal_equals_sdpa_is_causal_when_t_equals_s():
    """For T == S the mask is SDPA's own is_causal, compared with SDPA itself (no mask built by us)."""
    q, k, v, _ = make_qkv(2, 4, 4, 50, 50, 32, torch.float32)
    torch.testing.assert_close(attention(q, k, v, causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


def test_bottom_right_mask_for_cached_keys():
    """T < S, causal: the last query sees every key, query i sees keys <= S - T + i (not SDPA's top-left)."""
    q, k, v, _ = make_qkv(1, 1, 1, 3, 8, 16, torch.float32)
    out = attention(q, k, v, causal=True)
    for i in range(3):
        visible = 8 - 3 + i + 1
        expected = F.scaled_dot_product_attention(q[:, :, i : i + 1], k[:, :, :visible], v[:, :, :visible])
        torch.testing.assert_close(out[:, :, i : i + 1], expected, atol=1e-5, rtol=1e-5)


def test_queries_that_see_no_key_give_zero():
    """T > S, causal: the first T - S queries see nothing; output and gradients are 0, never nan."""
    q, k, v, dout = make_qkv(1, 1, 1, 5, 2, 16, torch.float32)
    out, dq, dk, dv = out_and_grads(attention, q, k, v, dout, True)
    assert torch.all(out[:, :, :3] == 0) and torch.all(dq[:, :, :3] == 0)
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


def test_non_contiguous_views_from_a_fused_qkv_projection():
    """q, k, v split from one (B, T, 3, H, D) tensor and transposed: strided views, no copies."""
    B, T, H, D = 2, 37, 3, 32
    qkv = torch.randn(B, T, 3, H, D, device=DEVICE, requires_grad=True)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    dout = torch.randn(B, H, T, D, device=DEVICE)
    ours = torch.autograd.grad(attention(q, k, v), qkv, dout)[0]
    ref = torch.autograd.grad(sdpa(q, k, v, True), qkv, dout)[0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_gradients_are_bit_identical_run_to_run():
    q, k, v, dout = make_qkv(1, 4, 2, 70, 70, 32, torch.float16)
    first = out_and_grads(attention, q, k, v, dout, True)
    for _ in range(2):
        again = out_and_grads(attention, q, k, v, dout, True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_custom_scale():
    q, k, v, _ = make_qkv(1, 2, 2, 20, 20, 16, torch.float32)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=False, scale=0.3)
    torch.testing.assert_close(attention(q, k, v, causal=False, scale=0.3), ref, atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph_matches_eager():
    q, k, v, dout = make_qkv(1, 4, 2, 67, 67, 32, torch.float32)
    fn = lambda q, k, v, causal: attention(q, k, v, causal)
    eager = out_and_grads(fn, q, k, v, dout, True)
    compiled = out_and_grads(torch.compile(fn, fullgraph=True), q, k, v, dout, True)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, atol=0, rtol=0)


def test_opcheck():
    q, k, v, dout = make_qkv(1, 2, 1, 19, 23, 16, torch.float32)
    torch.library.opcheck(_attention_fwd, (q, k, v, True, 0.25))
    with torch.no_grad():
        out, lse = _attention_fwd(q, k, v, True, 0.25)
    torch.library.opcheck(_attention_bwd, (dout, q.detach(), k.detach(), v.detach(), out, lse, True, 0.25))


def test_bad_arguments_raise_clear_errors():
    q = torch.randn(1, 3, 4, 16, device=DEVICE)
    kv = torch.randn(1, 2, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of"):
        attention(q, kv, kv)
    with pytest.raises(ValueError, match=r"\(B, H, T, D\)"):
        attention(q[0], kv, kv)
    with pytest.raises(ValueError, match="share a dtype"):
        attention(q, q.half(), q)
    with pytest.raises(ValueError, match="head dim"):
        big = torch.randn(1, 1, 2, 320, device=DEVICE)
        attention(big, big, big)


def test_pytorch_fallback_off_triton(monkeypatch):
    monkeypatch.setattr("kernels._utils.interpreting", lambda: False)
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        _attention_fwd(q, k, v, True, 0.25)


@requires_cuda("real-size bf16/fp16 checks run on a GPU")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,D", [(1024, 64), (4096, 64), (8192, 64), (1024, 128), (4096, 128), (8192, 128)])
def test_real_sizes_on_gpu(T, D, dtype, causal):
    B = max(1, 16384 // T)
    test_matches_sdpa(B, 2048 // D, 2048 // D, T, T, D, dtype, causal)


def test_output_is_laid_out_for_the_models_reshape():
    """The output (B, H, T, D) sits in memory as (B, T, H, D): y.transpose(1, 2).reshape(B, T, H * D) is a view."""
    q, k, v, _ = make_qkv(2, 3, 3, 17, 17, 16, torch.float32)
    y = attention(q, k, v)
    assert y.transpose(1, 2).is_contiguous()
    flat = y.transpose(1, 2).reshape(2, 17, 48)
    assert flat.data_ptr() == y.data_ptr() and flat._base is not None, "the reshape must not copy"
    torch.testing.assert_close(y, attention_ref(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_backward_reads_out_and_grad_out_by_their_strides(causal):
    """The same out and dO values in other layouts (out contiguous (B, H, T, D), dO transposed) give the same
    gradients; an lse that is not the forward's layout is refused in one line."""
    q, k, v, dout = make_qkv(1, 2, 1, 37, 41, 32, torch.float32)
    q, k, v = q.detach(), k.detach(), v.detach()
    scale = 0.3
    out, lse = _attention_fwd(q, k, v, causal, scale)
    expected = _attention_bwd(dout, q, k, v, out, lse, causal, scale)
    dout_t = dout.transpose(2, 3).contiguous().transpose(2, 3)  # strides (.., 1, T)
    for o, d in [(out.contiguous(), dout), (out, dout_t), (out.contiguous(), dout_t)]:
        got = _attention_bwd(d, q, k, v, o, lse, causal, scale)
        for name, e, g in zip(["dq", "dk", "dv"], expected, got):
            torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")
    with pytest.raises(ValueError, match="lse a contiguous"):
        _attention_bwd(dout, q, k, v, out, lse.transpose(1, 2).contiguous().transpose(1, 2), causal, scale)
