"""kernels.linear_cross_entropy against the unfused F.linear + F.cross_entropy: losses, every gradient, the
gradients it makes (and does not), memory, compile, opcheck."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
import kernels.fused_linear_cross_entropy as flce
from kernels import linear_cross_entropy
from kernels.fused_linear_cross_entropy import _linear_ce_bwd, _linear_ce_fwd
from tests.conftest import DEVICE, assert_close_to_ref, requires_cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
F32 = torch.float32


def linear_inputs(N, C, V, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(V, C, generator=g) / C**0.5).to(DEVICE, dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(DEVICE, dtype).requires_grad_() if bias else None
    target = torch.randint(0, V, (N,), generator=g)
    target[N // 2] = -100 if N > 1 else target[0]
    return x, w, b, target.to(DEVICE)


def linear_loss_and_grads(fn, x, w, b, target, upstream, **kw):
    loss = fn(x, w, b, target, **kw)
    params = [t for t in (x, w, b) if t is not None and t.requires_grad]
    return [loss, *torch.autograd.grad(loss, params, upstream.to(loss.dtype))]


def unfused(x, w, b, target, **kw):
    return F.cross_entropy(F.linear(x, w, b), target, **kw)


def fused(x, w, b, target, **kw):
    return linear_cross_entropy(x, w, target, b, **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C,V,bias", [(37, 16, 1000, True), (9, 8, 50257, False), (1, 3, 5, True)])
def test_linear_matches_unfused(N, C, V, bias, dtype, reduction):
    """Several chunks (chunk_size < N) for the first two shapes; gradients for x, weight and bias."""
    x, w, b, target = linear_inputs(N, C, V, dtype, bias)
    upstream = torch.randn(N if reduction == "none" else (), device=DEVICE)
    kw = dict(reduction=reduction, label_smoothing=0.1)
    fused_kw = dict(kw, chunk_size=max(1, N // 4))
    ours = linear_loss_and_grads(fused, x, w, b, target, upstream, **fused_kw)
    eager = linear_loss_and_grads(unfused, x, w, b, target, upstream, **kw)
    up = lambda t: None if t is None else t.detach().double().requires_grad_()
    ref = linear_loss_and_grads(unfused, up(x), up(w), up(b), target, upstream.double(), **kw)
    assert ours[0].dtype == dtype
    for name, o, r, e in zip(["loss", "dx", "dweight", "dbias"], ours, ref, eager):
        assert_close_to_ref(o, r, e, name)


# -----------------------------------------------------------------------------
# Only the gradients autograd asks for: frozen head (LoRA, last-N-blocks fine-tuning), frozen input, no_grad.

class MatmulCounter(TorchDispatchMode):
    """FLOPs of every matmul, the in-place addmm_ of the fp32 dW accumulator included (FlopCounterMode misses
    it), and the shapes of the new buffers made (not views of an op's inputs), to see whether a (V, C) one was."""

    MATMULS = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)

    def __init__(self):
        super().__init__()
        self.flops, self.shapes = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in self.MATMULS:
            a, b = args[:2] if func.overloadpacket is torch.ops.aten.mm else args[1:3]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        out = func(*args, **kwargs)
        tensors = lambda ts: [t for t in ts if isinstance(t, torch.Tensor)]
        seen = {t.untyped_storage().data_ptr() for t in tensors([*args, *kwargs.values()])}
        outs = tensors(out if isinstance(out, (tuple, list)) else [out])
        self.shapes.update(tuple(t.shape) for t in outs if t.untyped_storage().data_ptr() not in seen)
        return out


@pytest.fixture
def chunk_calls(monkeypatch):
    """Spies on the chunk loop behind both linear ops: per call, which of dx, dW, db it made, its matmul FLOPs and
    the shapes it allocated. (The custom op hides its insides from a dispatch mode around the caller.)"""
    calls = []
    real = flce._chunks

    def spy(*args):
        with MatmulCounter() as counter:
            out = real(*args)
        calls.append(dict(made=tuple(g.numel() > 0 for g in out[1:]), flops=counter.flops, shapes=counter.shapes))
        return out

    monkeypatch.setattr(flce, "_chunks", spy)
    return calls


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("frozen", ["weight", "x"])
def test_linear_partial_grads_match_reference(frozen, reduction, chunk_calls):
    """A frozen input gets no gradient and none is made; the others match an fp64 reference (several chunks)."""
    x, w, b, target = linear_inputs(9, 8, 300, torch.float32, True)
    inputs = dict(x=x, weight=w, bias=b)
    inputs[frozen] = inputs[frozen].detach()
    upstream = torch.randn(9 if reduction == "none" else (), device=DEVICE)
    kw = dict(reduction=reduction, label_smoothing=0.1)
    loss = fused(*inputs.values(), target, chunk_size=4, **kw)
    loss.backward(upstream)
    ref64 = {k: t.detach().double().requires_grad_(k != frozen) for k, t in inputs.items()}
    ref_loss = unfused(*ref64.values(), target, **kw)
    ref_loss.backward(upstream.double())
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5)
    for name, t in inputs.items():
        if name == frozen:
            assert t.grad is None
        else:
            torch.testing.assert_close(t.grad.double(), ref64[name].grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")
    needed = tuple(name != frozen for name in inputs)
    assert [c["made"] for c in chunk_calls] == ([needed] if reduction != "none" else [(False,) * 3, needed])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_frozen_weight_skips_dw_matmul_and_accumulator(reduction, chunk_calls, monkeypatch):
    """The saving itself: with a frozen head, no dW matmul and no (V, C) buffer; a trainable head shows both.

    One matmul unit is 2*N*C*V FLOPs: logits, dx and dW are one each, and "none" builds the logits twice.
    Runs the PyTorch chunk path (the matmuls are the same torch calls on the Triton path).
    """
    monkeypatch.setattr("kernels._utils.interpreting", lambda: False)
    N, C, V = 16, 8, 64
    x, w, b, target = linear_inputs(N, C, V, torch.float32, True)
    unit = 2 * N * C * V
    recompute = int(reduction == "none")
    for trainable in (True, False):
        chunk_calls.clear()
        fused(x, w.detach().requires_grad_(trainable), b, target, reduction=reduction).sum().backward()
        assert sum(c["flops"] for c in chunk_calls) == (2 + trainable + recompute) * unit
        assert any((V, C) in c["shapes"] for c in chunk_calls) == trainable, "the (V, C) fp32 dW accumulator"
        assert [c["made"] for c in chunk_calls][-1] == (True, trainable, True)


def test_linear_no_grad_computes_loss_only(chunk_calls):
    x, w, b, target = linear_inputs(20, 8, 300, torch.float32, True)
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, target, b)
        _, dx, dw, db = _linear_ce_fwd(x, w, b, target, -100, 0.0, 0.0, "mean", F32, 8, False, False, False)
    assert dx.numel() == dw.numel() == db.numel() == 0
    assert [c["made"] for c in chunk_calls] == [(False,) * 3] * 2
    assert chunk_calls[0]["flops"] == 2 * 20 * 8 * 300, "only the logits' matmul"
    torch.testing.assert_close(loss, unfused(x, w, b, target), atol=1e-5, rtol=1e-5)


def test_linear_frozen_weight_fp32_with_half_input():
    """A frozen fp32 head with a bf16 input (autocast-style): only x gets a gradient, in bf16."""
    x, w, _, target = linear_inputs(16, 8, 100, torch.float32, False)
    x = x.detach().bfloat16().requires_grad_()
    w = w.detach()
    loss = linear_cross_entropy(x, w, target)
    loss.backward()
    ref = unfused(x.detach().float(), w, None, target)
    assert loss.dtype == x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.float(), ref, atol=2e-2, rtol=2e-2)


class MatmulDtypes(TorchDispatchMode):
    """The operand dtypes and shapes of every matmul run under it."""

    MATMULS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.MATMULS:
            a, b = args[:2] if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm) else args[1:3]
            self.calls.append((a.dtype, b.dtype, tuple(a.shape), tuple(b.shape)))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def head_matmuls(monkeypatch):
    """The matmuls inside the op (a dispatch mode around the caller cannot see into a custom op)."""
    seen = MatmulDtypes()
    real = flce._chunks

    def spy(*args):
        with seen:
            return real(*args)

    monkeypatch.setattr(flce, "_chunks", spy)
    return seen.calls


@pytest.mark.parametrize("compiled", [False, True])
def test_linear_under_autocast_runs_in_the_autocast_dtype(compiled, head_matmuls):
    """fp32 x and an fp32 master head under bf16 autocast (the GPU fine-tune's configuration): every matmul of
    the head runs in bf16 as F.linear's would, the loss is fp32, and each gradient comes back in its input's dtype
    (dW from an fp32 accumulator)."""
    x, w, _, target = linear_inputs(16, 8, 100, torch.float32, False)
    fn = lambda x, w: linear_cross_entropy(x, w, target, chunk_size=5)
    fn = torch.compile(fn, fullgraph=True) if compiled else fn
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = fn(x, w)
    loss.backward()
    assert head_matmuls and all(a == b == torch.bfloat16 for a, b, *_ in head_matmuls), head_matmuls
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(x, w).float(), target)  # eager autocast: a bf16 matmul, an fp32 loss
    ref_grads = torch.autograd.grad(ref, (x, w))
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=2e-2)
    for ours, theirs in zip((x.grad, w.grad), ref_grads):
        torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=5e-2)


class NewBuffers(TorchDispatchMode):
    """Shapes of the tensors that ops create (outputs that share no storage with an input)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = lambda ts: [t for t in ts if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors([*args, *(kwargs or {}).values()])}
        outs = tensors(out if isinstance(out, (tuple, list)) else [out])
        self.shapes += [tuple(t.shape) for t in outs if t.untyped_storage().data_ptr() not in inputs]
        return out


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_makes_no_head_sized_buffer(dtype, reduction):
    """The forward's gradients are scaled in place: backward creates no (N, C), (V, C) or (N, V) tensor (no zero
    gradients for the forward's extra outputs, no `grad * dW` copy), and the gradients equal the unfused ones."""
    N, C, V = 24, 8, 60
    x, w, b, target = linear_inputs(N, C, V, dtype, True)
    loss = linear_cross_entropy(x, w, target, b, reduction=reduction, chunk_size=7)
    upstream = torch.tensor(3.0, device=DEVICE, dtype=loss.dtype)
    with NewBuffers() as made:
        loss.backward(upstream)
    big = [s for s in made.shapes if s in {(N, C), (V, C), (N, V), (V,)}]
    assert not big, f"backward allocated {big}"
    ref = torch.autograd.grad(unfused(x, w, b, target, reduction=reduction), (x, w, b), upstream)
    for name, ours, theirs in zip(["dx", "dw", "db"], (x.grad, w.grad, b.grad), ref):
        torch.testing.assert_close(ours.float(), theirs.float(), atol=1e-2 if dtype == torch.float16 else 1e-5,
                                   rtol=1e-2 if dtype == torch.float16 else 1e-5, msg=lambda m: f"{name}: {m}")
    with pytest.raises(RuntimeError, match="backward through this call ran already"):
        loss2 = linear_cross_entropy(x, w, target, b, reduction=reduction)
        loss2.backward(retain_graph=True)
        loss2.backward()


@pytest.mark.parametrize("path,N,V", [("pytorch", 4096, 8192), ("triton", 512, 2048)])
def test_fp16_with_a_loss_scale_keeps_small_gradients(path, N, V, monkeypatch):
    """fp16 with a 2^15 loss scale (as GradScaler does): the forward's gradients are those of the summed loss, so
    the mean's 1/N and the scale meet them in fp32; dx and dW stay within 2x eager fp16's error against fp64
    (before, the 1/N-scaled fp16 gradients underflowed: dx 12% off, dW 8% at N x V = 4096 x 8192). The full size
    runs the chunks' PyTorch path (the interpreter takes 45 s there; the underflow shows at that size), the Triton
    kernels the same arithmetic at a smaller one."""
    if path == "pytorch":
        monkeypatch.setattr("kernels._utils.interpreting", lambda: False)
    C = 32
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(N, C, generator=g)
    w32 = torch.randn(V, C, generator=g) / C**0.5
    target = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    scale = torch.tensor(2.0**15, device=DEVICE)

    def grads(fn, dtype):
        x = x32.to(DEVICE, dtype).requires_grad_()
        w = w32.to(DEVICE, dtype).requires_grad_()
        return torch.autograd.grad(fn(x, w) * scale.to(dtype), (x, w))

    ours = grads(lambda x, w: linear_cross_entropy(x, w, target, chunk_size=N // 4), torch.float16)
    eager = grads(lambda x, w: F.cross_entropy(F.linear(x, w), target), torch.float16)
    ref = grads(lambda x, w: F.cross_entropy(F.linear(x, w), target), torch.float64)
    for name, o, e, r in zip(["dx", "dW"], ours, eager, ref):
        err = ((o.double() - r).norm() / r.norm()).item()
        eager_err = ((e.double() - r).norm() / r.norm()).item()
        assert err <= 2 * eager_err + 1e-4, f"{name}: relative error {err:.3g} against eager fp16's {eager_err:.3g}"


def test_linear_transposed_weight_under_compile():
    """A weight that is a transposed view: the op's fake gradients must have the real ones' (contiguous) strides."""
    x, w, _, target = linear_inputs(12, 8, 40, torch.float32, False)
    w_t = w.detach().t().contiguous().requires_grad_()
    fn = lambda x, w_t: linear_cross_entropy(x, w_t.t(), target)
    torch.library.opcheck(_linear_ce_fwd, (x.detach(), w_t.detach().t(), None, target, -100, 0.0, 0.0, "mean", F32, 5, True, True, False))
    eager = torch.autograd.grad(fn(x, w_t), (x, w_t))
    compiled = torch.autograd.grad(torch.compile(fn, fullgraph=True)(x, w_t), (x, w_t))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("frozen_weight", [False, True])
def test_linear_torch_compile_fullgraph_matches_eager(frozen_weight):
    """One opaque op in the graph, called with the gradient flags of the inputs (a frozen head: no dW)."""
    x, w, b, target = linear_inputs(37, 16, 1000, torch.float32, True)
    w.requires_grad_(not frozen_weight)
    upstream = torch.tensor(1.0, device=DEVICE)
    fwd_calls = []

    def backend(gm, example_inputs):
        op = torch.ops.fastlm.linear_cross_entropy_fwd.default
        graphs = [m.graph for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]  # the autograd.Function's too
        fwd_calls.extend(n.args[-3:] for g in graphs for n in g.nodes if n.target in (op, op.overloadpacket))
        return torch._dynamo.lookup_backend("inductor")(gm, example_inputs)

    eager = linear_loss_and_grads(fused, x, w, b, target, upstream)
    compiled = linear_loss_and_grads(torch.compile(fused, fullgraph=True, backend=backend), x, w, b, target, upstream)
    assert fwd_calls == [(True, not frozen_weight, True)]
    assert len(compiled) == 4 - frozen_weight
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, atol=0, rtol=0)


def test_linear_opcheck():
    """The two ops (autograd is the wrapper's autograd.Function, tested by the gradient and compile tests)."""
    x, w, b, target = (t.detach() for t in linear_inputs(9, 8, 100, torch.float32, True))
    for reduction, *flags in [("mean", True, True, True), ("none", True, True, True), ("sum", True, False, True),
                              ("mean", False, True, False), ("sum", False, False, False)]:
        torch.library.opcheck(_linear_ce_fwd, (x, w, b, target, -100, 0.1, 0.0, reduction, F32, 4, *flags))
    row_grad = torch.randn(9, device=DEVICE)
    torch.library.opcheck(_linear_ce_bwd, (row_grad, x, w, b, target, -100, 0.1, 0.0, F32, 4, True, False, True))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_fake_matches_real_for_every_flag_combination(bias):
    """register_fake gives the real outputs' shapes, dtypes and strides for every reduction and gradient flag."""
    x, w, b, target = linear_inputs(5, 4, 30, torch.float16, bias)
    w = w.detach().float().t().contiguous().t()  # an fp32 head, non-contiguous: gradients stay contiguous
    b = None if b is None else b.detach()
    check = dict(test_utils="test_faketensor")
    for flags in itertools.product([False, True], repeat=3):
        for reduction in ("mean", "sum", "none"):
            args = (x.detach(), w, b, target, -100, 0.0, 0.0, reduction, torch.float16, 2, *flags)
            torch.library.opcheck(_linear_ce_fwd, args, **check)
        args = (torch.rand(5, device=DEVICE), x.detach(), w, b, target, -100, 0.0, 0.0, torch.float16, 2, *flags)
        torch.library.opcheck(_linear_ce_bwd, args, **check)


def peak_cpu_bytes(fn) -> int:
    """Peak of live CPU memory allocated while fn runs, from the profiler's allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_linear_peak_memory_is_bounded_by_the_chunk(monkeypatch):
    """N=16384 tokens, V=50257 (GPT-2): forward+backward peak against the unfused path's logits.

    Runs the chunked PyTorch path (the same chunking as the Triton path, CPU without the interpreter) at full
    size with 256-row chunks. The unfused path's fp32 logits alone are 3141 MiB (its peak was 9423 MiB).
    """
    monkeypatch.setattr("kernels._utils.interpreting", lambda: False)
    N, C, V = 16384, 64, 50257
    x = torch.randn(N, C, requires_grad=True)
    w = (torch.randn(V, C) / 8).requires_grad_()
    target = torch.randint(0, V, (N,))
    rows = 256
    peak = peak_cpu_bytes(lambda: linear_cross_entropy(x, w, target, chunk_size=rows).backward())
    logits_bytes = N * V * 4
    chunk_bytes = rows * V * 4
    grads_bytes = (N * C + V * C) * 4  # dx, and dW (its own fp32 accumulator)
    print(f"fused peak {peak / 2**20:.1f} MiB; unfused logits alone {logits_bytes / 2**20:.0f} MiB ({peak / logits_bytes:.3f}x)")
    assert peak < grads_bytes + 4 * chunk_bytes, "peak must be bounded by the gradients plus a few chunk buffers"
    assert peak < 0.05 * logits_bytes


def test_strided_targets():
    x, w, _, t = linear_inputs(6, 8, 50, torch.float32, False)
    strided = t.repeat_interleave(2)[::2]
    torch.testing.assert_close(linear_cross_entropy(x, w, strided), unfused(x, w, None, t), atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise_clear_errors():
    x, w, t = torch.randn(4, 8, device=DEVICE), torch.randn(10, 8, device=DEVICE), torch.zeros(4, dtype=torch.long, device=DEVICE)
    cases = [((x, torch.randn(10, 9, device=DEVICE), t), {}, r"weight \(V, C\)"),
             ((x, w, t[:3]), {}, r"target must be \(4,\) to match x \(4, 8\)"),
             ((x, w, t.float()), {}, "int64 or int32"),
             ((x, w, t), dict(bias=torch.randn(9, device=DEVICE)), r"bias must be \(10,\)"),
             ((x, w, t), dict(reduction="avg"), "reduction must be"),
             ((x, w, t), dict(chunk_size=0), "chunk_size must be a positive"),
             ((x.long(), w, t), {}, "x must be a floating-point")]
    for args, kw, message in cases:
        with pytest.raises(ValueError, match=message):
            linear_cross_entropy(*args, **kw)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_pytorch_path_matches_unfused(reduction, monkeypatch):
    """Off Triton (a CPU without the interpreter) the same chunks run in plain PyTorch: smoothing, z-loss, ignored
    rows and an out-of-range target (nan, as the kernel gives) against the fp64 unfused loss."""
    monkeypatch.setattr("kernels._utils.interpreting", lambda: False)
    x, w, b, target = linear_inputs(11, 8, 300, torch.float32, True)
    upstream = torch.randn(11 if reduction == "none" else (), device=DEVICE)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    ours = linear_loss_and_grads(fused, x, w, b, target, upstream, chunk_size=4, **kw)
    up = lambda t: t.detach().double().requires_grad_()
    reference = lambda x, w, b, t, **kw: kernels.linear_cross_entropy_ref(x, w, t, b, **kw)
    ref = linear_loss_and_grads(reference, up(x), up(w), up(b), target, upstream.double(), **kw)
    for name, o, r in zip(["loss", "dx", "dweight", "dbias"], ours, ref):
        torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    target[3] = 300
    losses = linear_cross_entropy(x, w, target, b, reduction="none")
    assert torch.isnan(losses[3]) and not torch.isnan(losses[:3]).any()
