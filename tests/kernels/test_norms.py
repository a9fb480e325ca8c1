"""kernels.layer_norm / rms_norm against PyTorch: outputs, every gradient, strides, modules, compile, opcheck."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import layer_norm, rms_norm
import kernels.norms as norms
from kernels.norms import MAX_FUSED_N, _norm_bwd, _norm_fwd
from kernels._utils import INT32_MAX
from tests.conftest import DEVICE, HAS_CUDA, assert_close_to_ref, requires_cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (1, 1): a single element; (3, 7, 129): odd leading dims; (300, 5): many narrow rows packed per program;
# (2, 771): GPT-2-like odd width; then rows that stream in backward only, and in both directions.
SHAPES = [(1, 1), (3, 7, 129), (300, 5), (2, 771), (3, MAX_FUSED_N["backward"] + 5), (2, MAX_FUSED_N["forward"] + 3)]
# Which parameters the norm has: LayerNorm with weight and bias, weight only, bias only (F.layer_norm allows it), none;
# RMSNorm with and without weight.
KINDS = ["ln", "ln_weight_only", "ln_bias_only", "ln_no_affine", "rms", "rms_no_weight"]


def make_inputs(shape, dtype, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = shape[-1]
    x = torch.randn(shape, generator=g) * 2 + 0.5
    w = torch.randn(N, generator=g) if kind in ("ln", "ln_weight_only", "rms") else None
    b = torch.randn(N, generator=g) if kind in ("ln", "ln_bias_only") else None
    to = lambda t: None if t is None else t.to(DEVICE, dtype).requires_grad_()
    return to(x), to(w), to(b), torch.randn(shape, generator=g).to(DEVICE, dtype)


def run_norm(fn_ln, fn_rms, kind, x, w, b):
    return fn_rms(x, w) if kind.startswith("rms") else fn_ln(x, w, b)


def torch_ln(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def torch_rms(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, 1e-6)


def outputs_and_grads(y, dy, inputs):
    params = [t for t in inputs if t is not None]
    return [y, *torch.autograd.grad(y, params, dy)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch(shape, dtype, kind):
    x, w, b, dy = make_inputs(shape, dtype, kind)
    ours = outputs_and_grads(run_norm(layer_norm, rms_norm, kind, x, w, b), dy, (x, w, b))
    eager = outputs_and_grads(run_norm(torch_ln, torch_rms, kind, x, w, b), dy, (x, w, b))
    up = lambda t: None if t is None else t.detach().double().requires_grad_()
    x64, w64, b64 = up(x), up(w), up(b)
    ref = outputs_and_grads(run_norm(torch_ln, torch_rms, kind, x64, w64, b64), dy.double(), (x64, w64, b64))
    assert ours[0].dtype == dtype
    for name, o, r, e in zip(["y", "dx", "dweight", "dbias"], ours, ref, eager):
        assert_close_to_ref(o, r, e, name)


@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_non_contiguous_inputs(kind):
    """Strided x and dy (a column slice, a transpose) go to the kernel without a copy and give the same result."""
    base = torch.randn(6, 2 * 129, device=DEVICE)
    x = base[:, ::2].requires_grad_()  # stride (258, 2)
    xt = torch.randn(129, 6, device=DEVICE).t().requires_grad_()  # stride (1, 6)
    w, b = torch.randn(129, device=DEVICE), torch.randn(129, device=DEVICE)
    for inp in (x, xt):
        dy = torch.randn(129, 6, device=DEVICE).t()
        ours = run_norm(layer_norm, rms_norm, kind, inp, w, b)
        ref = run_norm(torch_ln, torch_rms, kind, inp, w, b)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.autograd.grad(ours, inp, dy)[0], torch.autograd.grad(ref, inp, dy)[0], atol=1e-5, rtol=1e-5)


def test_strided_weight_and_bias():
    x = torch.randn(5, 40, device=DEVICE)
    wb = torch.randn(40, 2, device=DEVICE, requires_grad=True)
    w, b = wb[:, 0], wb[:, 1]  # stride 2
    for ours, ref in [(layer_norm(x, w, b), torch_ln(x, w, b)), (rms_norm(x, w), torch_rms(x, w))]:
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        dy = torch.randn_like(ours)
        torch.testing.assert_close(torch.autograd.grad(ours, wb, dy)[0], torch.autograd.grad(ref, wb, dy)[0], atol=1e-5, rtol=1e-5)


def test_weight_gradient_is_deterministic():
    x, w, b, dy = make_inputs((67, 771), torch.float32, "ln")  # 17 rows for each of the CPU's 4 backward programs
    grads = [torch.autograd.grad(layer_norm(x, w, b), (w, b), dy) for _ in range(3)]
    for g in grads[1:]:
        assert all(torch.equal(a, c) for a, c in zip(grads[0], g))


@pytest.mark.parametrize("kind", ["ln", "rms"])
@pytest.mark.parametrize("shape", [(37, 129), (9, 771), (5, MAX_FUSED_N["backward"] + 5)])
def test_parameter_gradients_sum_every_row_block(shape, kind, monkeypatch):
    """A backward grid of 2 programs, so that each sums several row blocks into its dW/dB partial (the CPU's
    default grid gives most shapes one block per program): packed rows (4 a block, the last block part empty), one
    row a block, and the streaming path's read-add-write partials; dy's rows strided unlike x's (each advances by its
    own stride); dx and every parameter gradient against fp64."""
    monkeypatch.setattr(norms, "num_programs", lambda device, per_sm=2: 2)
    x, w, b, dy = make_inputs(shape, torch.float32, kind)
    dy = torch.cat([dy, torch.zeros(*shape[:-1], 3, device=DEVICE)], -1)[..., : shape[-1]]  # row stride N + 3
    ours = outputs_and_grads(run_norm(layer_norm, rms_norm, kind, x, w, b), dy, (x, w, b))
    eager = outputs_and_grads(run_norm(torch_ln, torch_rms, kind, x, w, b), dy, (x, w, b))
    up = lambda t: None if t is None else t.detach().double().requires_grad_()
    x64, w64, b64 = up(x), up(w), up(b)
    ref = outputs_and_grads(run_norm(torch_ln, torch_rms, kind, x64, w64, b64), dy.double(), (x64, w64, b64))
    for name, o, r, e in zip(["y", "dx", "dweight", "dbias"], ours, ref, eager):
        assert_close_to_ref(o, r, e, name)


def test_int64_column_offsets_where_a_column_stride_could_overflow(monkeypatch):
    """The launchers compile the int64 column-offset variant exactly when (N - 1) * column stride passes 2^31
    (decided on meta tensors: no memory), and that variant computes the same values as the 32-bit one."""
    launched = []

    class Recorder:  # stands in for a kernel: keeps each launch's COL_INT64
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(kwargs["COL_INT64"])

    N = 771
    with monkeypatch.context() as m:
        m.setattr(norms, "_norm_fwd_kernel", Recorder())
        m.setattr(norms, "_norm_bwd_kernel", Recorder())
        for stride in (1, INT32_MAX // (N - 1), INT32_MAX // (N - 1) + 1):
            x = torch.empty_strided((3, N), (1, stride), device="meta")
            w = torch.empty(N, device="meta")
            _, _, mean, rstd = norms._launch_norm_fwd(x, w, w, None, 1e-5, False, None, False)
            norms._launch_norm_bwd(torch.empty(3, N, device="meta"), None, x, w, mean, rstd, False, True, True, True, None, False)
    assert launched == [False, False, False, False, True, True]
    # The int64 variant on real data (forced by a small limit), strided both ways, single-pass and streaming.
    for shape in [(6, 129), (3, MAX_FUSED_N["backward"] + 5)]:
        x, w, b, dy = make_inputs(shape, torch.float32, "ln")
        column_major = lambda t: t.detach().t().contiguous().t()  # the same values, column stride shape[0]
        xt, dyt = column_major(x).requires_grad_(), column_major(dy)
        results = []
        for limit in (INT32_MAX, 8):
            m_limit = pytest.MonkeyPatch()
            m_limit.setattr("kernels._utils.INT32_MAX", limit)
            try:
                results.append(outputs_and_grads(layer_norm(xt, w, b), dyt, (xt, w, b)))
            finally:
                m_limit.undo()
        for a, c in zip(*results):
            assert torch.equal(a, c)


def test_mixed_dtypes_fp32_params_half_input():
    """fp32 parameters with a bf16 input (autocast-style): output bf16, gradients in each tensor's dtype."""
    x = torch.randn(4, 96, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(96, device=DEVICE, requires_grad=True)
    b = torch.randn(96, device=DEVICE, requires_grad=True)
    y = layer_norm(x, w, b)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    ref = F.layer_norm(x.float(), (96,), w, b)
    assert y.dtype == dx.dtype == torch.bfloat16 and dw.dtype == db.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_torch_compile_fullgraph_matches_eager(kind):
    x, w, b, dy = make_inputs((3, 7, 129), torch.float32, kind)
    fn = lambda x, w, b: run_norm(layer_norm, rms_norm, kind, x, w, b)
    eager = outputs_and_grads(fn(x, w, b), dy, (x, w, b))
    compiled = outputs_and_grads(torch.compile(fn, fullgraph=True)(x, w, b), dy, (x, w, b))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, atol=0, rtol=0)


@pytest.mark.parametrize("is_rms", [False, True])
def test_opcheck(is_rms):
    x, w, b, dy = make_inputs((5, 33), torch.float32, "rms" if is_rms else "ln")
    r = torch.randn_like(x)
    for residual, out_dtype in [(None, None), (r, torch.float16)]:
        torch.library.opcheck(_norm_fwd, (x, w, None if is_rms else b, residual, 1e-5, is_rms, out_dtype, False))
    with torch.no_grad():
        _, _, mean, rstd = _norm_fwd(x, w, b, None, 1e-5, is_rms, None, False)
    for dh, dx2_dtype in [(None, None), (torch.randn_like(dy), torch.bfloat16)]:
        torch.library.opcheck(_norm_bwd, (dy, dh, x.detach(), w.detach(), mean, rstd, is_rms, not is_rms, True, False, dx2_dtype, False))


def test_modules_are_drop_ins():
    ours, theirs = kernels.LayerNorm(64), nn.LayerNorm(64)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert kernels.LayerNorm(64, bias=False).bias is None and "bias" not in kernels.LayerNorm(64, bias=False).state_dict()
    assert kernels.LayerNorm(64, elementwise_affine=False).weight is None
    assert kernels.RMSNorm(64).state_dict().keys() == nn.RMSNorm(64).state_dict().keys()
    for mine, ref in [(kernels.LayerNorm(64, bias=False), nn.LayerNorm(64, bias=False)), (kernels.RMSNorm(64, eps=1e-5), nn.RMSNorm(64, eps=1e-5))]:
        with torch.no_grad():
            ref.weight.normal_()
        mine.load_state_dict(ref.state_dict())
        mine, ref = mine.to(DEVICE), ref.to(DEVICE)
        x = torch.randn(2, 5, 64, device=DEVICE)
        torch.testing.assert_close(mine(x), ref(x), atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight has shape"):
        layer_norm(x, torch.ones(7, device=DEVICE))
    with pytest.raises(ValueError, match="non-empty last dimension"):
        rms_norm(torch.randn(4, 0, device=DEVICE))
    with pytest.raises(ValueError, match="only the last dimension"):
        kernels.LayerNorm((4, 8))


def test_empty_batch():
    x = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    y = layer_norm(x, torch.ones(16, device=DEVICE))
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16)


def test_pytorch_fallback_off_triton(monkeypatch):
    """Without CUDA or the interpreter, the functions run plain PyTorch and the raw ops say what they need."""
    monkeypatch.setattr("kernels._utils.interpreting", lambda: False)
    x, w, b = torch.randn(3, 50), torch.randn(50), torch.randn(50)
    torch.testing.assert_close(layer_norm(x, w, b), F.layer_norm(x, (50,), w, b), atol=0, rtol=0)
    torch.testing.assert_close(rms_norm(x, w), F.rms_norm(x, (50,), w, 1e-6), atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        _norm_fwd(x, w, b, None, 1e-5, False, None, False)


@requires_cuda("real-size bf16/fp16 checks run on a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16384, 768), (16384, 1600), (4096, 16384), (64, 65536)])
@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_real_sizes_on_gpu(shape, dtype, kind):
    test_matches_torch(shape, dtype, kind)


# -----------------------------------------------------------------------------
# The fused residual add: y, h = norm(x + residual), x + residual, as a transformer block's prenorm uses it.

RESIDUAL_DTYPES = [(torch.float32, torch.float32, None), (torch.bfloat16, torch.float32, torch.bfloat16),
                   (torch.float16, torch.float16, None), (torch.float16, torch.float32, torch.float16)]


@pytest.mark.parametrize("kind", ["ln", "rms"])
@pytest.mark.parametrize("x_dtype,r_dtype,out_dtype", RESIDUAL_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7, 129), (300, 5), (2, MAX_FUSED_N["backward"] + 5), (2, MAX_FUSED_N["forward"] + 3)])
def test_residual_add_matches_torch(shape, x_dtype, r_dtype, out_dtype, kind):
    """y (in out_dtype) and h = residual + x (in the promoted dtype), and the gradients of x, residual, weight and
    bias through both outputs, against the same computation in PyTorch and in float64."""
    x, w, b, _ = make_inputs(shape, x_dtype, kind)
    g = torch.Generator().manual_seed(1)
    r = (torch.randn(shape, generator=g) * 3).to(DEVICE, r_dtype).requires_grad_()
    w = w.detach().float().requires_grad_()
    b = None if b is None else b.detach().float().requires_grad_()
    h_dtype = torch.promote_types(x_dtype, r_dtype)
    dy = torch.randn(shape, generator=g).to(DEVICE, out_dtype or h_dtype)
    dh = torch.randn(shape, generator=g).to(DEVICE, h_dtype)

    def fused(x, r, w, b):
        return (rms_norm(x, w, residual=r, out_dtype=out_dtype) if kind == "rms"
                else layer_norm(x, w, b, residual=r, out_dtype=out_dtype))

    def torch_path(x, r, w, b):
        h = r + x
        y = torch_rms(h, w.to(h.dtype)) if kind == "rms" else torch_ln(h, w.to(h.dtype), None if b is None else b.to(h.dtype))
        return y.to(out_dtype or h.dtype), h

    def run(fn, x, r, w, b, dy, dh):
        y, h = fn(x, r, w, b)
        inputs = [t for t in (x, r, w, b) if t is not None]
        return [y, h, *torch.autograd.grad((y, h), inputs, (dy.to(y.dtype), dh.to(h.dtype)))]

    ours = run(fused, x, r, w, b, dy, dh)
    eager = run(torch_path, x, r, w, b, dy, dh)
    up = lambda t: None if t is None else t.detach().double().requires_grad_()
    ref = run(torch_path, up(x), up(r), up(w), up(b), dy.double(), dh.double())
    assert ours[0].dtype == (out_dtype or h_dtype) and ours[1].dtype == h_dtype
    assert ours[2].dtype == x_dtype and ours[3].dtype == r_dtype
    for name, o, rr, e in zip(["y", "h", "dx", "dresidual", "dweight", "dbias"], ours, ref, eager):
        assert_close_to_ref(o, rr, e, name)


def test_frozen_norm_parameters_get_no_gradient_work(monkeypatch):
    """A weight and bias that do not require grad (a frozen block) make no partial sums and no reduction."""
    import kernels.norms as norms

    made = []
    real = norms._norm_bwd

    def spy(*args):
        out = real(*args)
        made.append(tuple(t.numel() for t in out[2:]))
        return out

    monkeypatch.setattr(norms, "_norm_bwd", spy)
    x, w, b, dy = make_inputs((9, 40), torch.float32, "ln")
    for trainable in (True, False):
        w.grad = b.grad = None
        w.requires_grad_(trainable), b.requires_grad_(trainable)
        (layer_norm(x, w, b) * dy).sum().backward()
        assert (w.grad is not None) == trainable
    assert made == [(40, 40), (0, 0)]


# -----------------------------------------------------------------------------
# RMSNorm with Hugging Face Llama's numerics: normalise in fp32, round to x's dtype, then multiply by the weight.

def llama_rms_norm(x, w, eps=1e-6):
    """LlamaRMSNorm.forward, written out: `weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)` (fp64 x
    stays fp64, for the reference)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if w is None else w * y


def ulp(t, dtype):
    """The spacing of `dtype` at |t| (its smallest normal's below it)."""
    mantissa = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[dtype]
    _, exponent = torch.frexp(t.double().abs().clamp(min=torch.finfo(dtype).tiny))
    return torch.ldexp(torch.ones_like(t, dtype=torch.float64), exponent - 1 - mantissa)


# (x dtype, weight dtype or None): as Llama runs in bf16, an fp32 master weight (fp32 output), fp32, no weight.
LLAMA_DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                (torch.float16, torch.float32), (torch.float32, torch.float32), (torch.bfloat16, None)]


@pytest.mark.parametrize("x_dtype,w_dtype", LLAMA_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (300, 5), (3, 7, 129), (2, MAX_FUSED_N["forward"] + 3)])
def test_rms_norm_cast_before_weight_matches_llama(shape, x_dtype, w_dtype):
    """In 16 bits the forward equals Llama's expression in the same dtypes to within one ulp of each rounding, and
    exactly for nearly every element (an uncast product differs far more often); fp32 output and the gradients of
    x and the weight are within 2x eager's error against the same expression in float64."""
    if x_dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("Triton's interpreter truncates fp32 -> bf16 conversions (a GPU rounds to nearest even): bf16 "
                    "rounding is checked on a GPU, the same code in fp16 here")
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(DEVICE, x_dtype).requires_grad_()
    w = None if w_dtype is None else (torch.randn(shape[-1], generator=g) + 1).to(DEVICE, w_dtype).requires_grad_()
    out_dtype = x_dtype if w is None else torch.promote_types(x_dtype, w_dtype)
    dy = torch.randn(shape, generator=g).to(DEVICE, out_dtype)
    inputs = (x,) if w is None else (x, w)
    ours = outputs_and_grads(rms_norm(x, w, 1e-6, cast_before_weight=True), dy, inputs)
    eager = outputs_and_grads(llama_rms_norm(x, w), dy, inputs)
    assert ours[0].dtype == out_dtype
    up = lambda t: None if t is None else t.detach().double().requires_grad_()
    x64, w64 = up(x), up(w)
    ref = outputs_and_grads(llama_rms_norm(x64, w64), dy.double(), (x64,) if w is None else (x64, w64))
    if x_dtype == torch.float32:  # no rounding before the weight: fp32 statistics in another order
        assert_close_to_ref(ours[0], ref[0], eager[0], "y")
    else:
        y, y_eager = ours[0].double(), eager[0].double()
        scale = 1.0 if w is None else w.detach().double().abs()
        normalised = llama_rms_norm(x.detach(), None).double()  # Llama's rounded rows, before the weight
        allowed = ulp(normalised, x_dtype) * scale + ulp(y_eager, out_dtype)
        worst = ((y - y_eager).abs() / allowed).max().item()
        assert worst <= 1.0, f"y: {worst:.3g} ulps from Llama's expression"
        exact = (y == y_eager).double().mean().item()
        assert exact >= 0.99, f"y: only {exact:.1%} of the elements equal Llama's expression"
    for name, o, r, e in zip(["dx", "dweight"], ours[1:], ref[1:], eager[1:]):
        assert o.dtype == e.dtype, name
        assert_close_to_ref(o, r, e, name)
    if w_dtype == torch.float32 and x_dtype != torch.float32:  # dweight sums dy times the *rounded* rows, as autograd does
        rounded = llama_rms_norm(x.detach(), None).double()
        expected = (dy.double() * rounded).reshape(-1, shape[-1]).sum(0)
        torch.testing.assert_close(ours[2].double(), expected, rtol=1e-5, atol=1e-5)


def test_rms_norm_cast_before_weight_compiles_and_opchecks():
    x = torch.randn(5, 33, device=DEVICE, dtype=torch.float16, requires_grad=True)
    w = torch.randn(33, device=DEVICE, requires_grad=True)
    dy = torch.randn(5, 33, device=DEVICE)
    fn = lambda x, w: rms_norm(x, w, 1e-6, cast_before_weight=True)
    eager = outputs_and_grads(fn(x, w), dy, (x, w))
    compiled = outputs_and_grads(torch.compile(fn, fullgraph=True)(x, w), dy, (x, w))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, atol=0, rtol=0)
    module = kernels.RMSNorm(33, eps=1e-6, cast_before_weight=True).to(DEVICE)
    assert torch.equal(module(x.detach()), rms_norm(x.detach(), module.weight, 1e-6, cast_before_weight=True))
    torch.library.opcheck(_norm_fwd, (x, w, None, None, 1e-6, True, torch.float32, True))
    with torch.no_grad():
        _, _, mean, rstd = _norm_fwd(x, w, None, None, 1e-6, True, torch.float32, True)
    torch.library.opcheck(_norm_bwd, (dy, None, x.detach(), w.detach(), mean, rstd, True, False, True, False, None, True))


def test_rms_norm_cast_before_weight_fallback_off_triton(monkeypatch):
    monkeypatch.setattr("kernels._utils.interpreting", lambda: False)
    x, w = torch.randn(3, 50, dtype=torch.bfloat16), torch.randn(50)
    y = rms_norm(x, w, 1e-6, cast_before_weight=True)
    assert y.dtype == torch.float32 and torch.equal(y, llama_rms_norm(x, w))
