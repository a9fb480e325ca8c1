"""kernels.cross_entropy / linear_cross_entropy against F.cross_entropy: losses, gradients, memory, compile, opcheck."""
import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import cross_entropy, linear_cross_entropy
from kernels.cross_entropy import _cross_entropy_bwd, _cross_entropy_fwd, _linear_ce_bwd, _linear_ce_fwd, chunk_rows
from tests.conftest import DEVICE, assert_close_to_ref, requires_cuda

ce_module = importlib.import_module("kernels.cross_entropy")  # `kernels.cross_entropy` is the re-exported function

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (3, 17), (7, 1000), (4, 50257)]  # (N, V): one class, odd V, GPT-2's vocabulary


def make_logits(N, V, dtype, seed=0, ignored=(0,)):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
    target = torch.randint(0, V, (N,), generator=g)
    if N > 1:
        target[list(ignored)] = -100
    return logits, target.to(DEVICE)


def loss_and_grad(fn, logits, target, upstream=None, **kw):
    loss = fn(logits, target, **kw)
    upstream = torch.ones_like(loss) if upstream is None else upstream.to(loss.dtype)
    return loss, torch.autograd.grad(loss, logits, upstream)[0]


def reference(logits, target, upstream, **kw):
    """F.cross_entropy in float64: the independent reference."""
    x64 = logits.detach().double().requires_grad_()
    return loss_and_grad(F.cross_entropy, x64, target, upstream, **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V", SHAPES)
def test_matches_torch(N, V, dtype, reduction):
    logits, target = make_logits(N, V, dtype)
    upstream = torch.randn(N if reduction == "none" else (), device=DEVICE)
    ours = loss_and_grad(cross_entropy, logits, target, upstream, reduction=reduction)
    eager = loss_and_grad(F.cross_entropy, logits, target, upstream, reduction=reduction)
    ref = reference(logits, target, upstream, reduction=reduction)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    for name, o, r, e in zip(["loss", "dlogits"], ours, ref, eager):
        assert_close_to_ref(o, r, e, name)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("label_smoothing", [0.1, 1.0])
def test_label_smoothing(label_smoothing, reduction):
    logits, target = make_logits(6, 771, torch.float32, ignored=(1, 4))
    upstream = torch.randn(6 if reduction == "none" else (), device=DEVICE)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    ours = loss_and_grad(cross_entropy, logits, target, upstream, **kw)
    ref = reference(logits, target, upstream, **kw)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=1e-5)


def test_z_loss():
    """loss = CE + z * lse^2 on rows that are not ignored, and its gradient."""
    logits, target = make_logits(5, 300, torch.float32)
    ours = loss_and_grad(cross_entropy, logits, target, z_loss=1e-3)
    x64 = logits.detach().double().requires_grad_()
    valid = target != -100
    ref_loss = (F.cross_entropy(x64, target, reduction="none") + 1e-3 * torch.logsumexp(x64, -1).square() * valid).sum() / valid.sum()
    ref = (ref_loss, torch.autograd.grad(ref_loss, x64)[0])
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=1e-5)


def test_ignore_index_rows_and_all_ignored_batch():
    logits, target = make_logits(4, 50, torch.float32, ignored=(1, 2))
    none_loss, grad = loss_and_grad(cross_entropy, logits, target, reduction="none")
    assert torch.all(none_loss[1:3] == 0) and torch.all(grad[1:3] == 0)
    target = torch.full_like(target, 7)
    target[:] = -1
    for reduction in ("mean", "sum"):
        loss, grad = loss_and_grad(cross_entropy, logits, target, ignore_index=-1, reduction=reduction)
        assert loss.item() == 0 and torch.all(grad == 0), "every row ignored: loss 0 (torch's mean gives nan) and no gradient"


def test_out_of_range_target_gives_nan():
    logits, target = make_logits(3, 10, torch.float32)
    target[2] = 10
    loss = cross_entropy(logits, target, reduction="none")
    assert torch.isnan(loss[2]) and not torch.isnan(loss[:2]).any()


def test_non_contiguous_logits():
    """A transposed (V, N) buffer and a strided column slice give the same loss and gradient as torch."""
    N, V = 5, 257
    for logits in (torch.randn(V, N, device=DEVICE).t(), torch.randn(N, 2 * V, device=DEVICE)[:, ::2]):
        logits.requires_grad_()
        target = torch.randint(0, V, (N,), device=DEVICE)
        ours = loss_and_grad(cross_entropy, logits, target)
        ref = loss_and_grad(F.cross_entropy, logits, target)
        for o, r in zip(ours, ref):
            torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


def test_strided_targets():
    logits, _ = make_logits(6, 50, torch.float32)
    target = torch.randint(0, 50, (6, 3), device=DEVICE)[:, 0]  # stride 3
    ours, ref = loss_and_grad(cross_entropy, logits, target, reduction="none"), loss_and_grad(F.cross_entropy, logits, target, reduction="none")
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
    x, w, _, t = linear_inputs(6, 8, 50, torch.float32, False)
    strided = t.repeat_interleave(2)[::2]
    torch.testing.assert_close(linear_cross_entropy(x, w, strided), unfused(x, w, None, t), atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise_clear_errors():
    logits = torch.randn(4, 10, device=DEVICE)
    with pytest.raises(ValueError, match="target must be"):
        cross_entropy(logits, torch.zeros(3, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="int64 or int32"):
        cross_entropy(logits, torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="reduction must be"):
        cross_entropy(logits, torch.zeros(4, dtype=torch.long, device=DEVICE), reduction="avg")
    with pytest.raises(ValueError, match=r"logits must be \(N, V\)"):
        cross_entropy(logits[None], torch.zeros(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"weight \(V, C\)"):
        linear_cross_entropy(torch.randn(4, 8, device=DEVICE), torch.randn(10, 9, device=DEVICE), torch.zeros(4, dtype=torch.long, device=DEVICE))


def test_torch_compile_fullgraph_matches_eager():
    logits, target = make_logits(5, 1000, torch.float32)
    fn = lambda x, t: cross_entropy(x, t, label_smoothing=0.1)
    eager = loss_and_grad(fn, logits, target)
    compiled = loss_and_grad(torch.compile(fn, fullgraph=True), logits, target)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, atol=0, rtol=0)


def test_opcheck():
    logits, target = make_logits(5, 100, torch.float32)
    torch.library.opcheck(_cross_entropy_fwd, (logits, target, -100, 0.1, 1e-4))
    with torch.no_grad():
        _, lse = _cross_entropy_fwd(logits, target, -100, 0.1, 1e-4)
    torch.library.opcheck(_cross_entropy_bwd, (torch.randn(5, device=DEVICE), logits.detach(), target, lse, -100, 0.1, 1e-4))


# -----------------------------------------------------------------------------
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
    """Many chunks (chunk_rows < N) for the first two shapes; gradients for x, weight and bias."""
    x, w, b, target = linear_inputs(N, C, V, dtype, bias)
    upstream = torch.randn(N if reduction == "none" else (), device=DEVICE)
    kw = dict(reduction=reduction, label_smoothing=0.1)
    ours = linear_loss_and_grads(fused, x, w, b, target, upstream, **kw)
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
    real = ce_module._linear_ce_chunks

    def spy(*args):
        with MatmulCounter() as counter:
            out = real(*args)
        calls.append(dict(made=tuple(g.numel() > 0 for g in out[1:]), flops=counter.flops, shapes=counter.shapes))
        return out

    monkeypatch.setattr(ce_module, "_linear_ce_chunks", spy)
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
    loss = fused(*inputs.values(), target, **kw)
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
        _, dx, dw, db = _linear_ce_fwd(x, w, b, target, -100, 0.0, 0.0, "mean", False, False, False)
    assert dx.numel() == dw.numel() == db.numel() == 0
    assert [c["made"] for c in chunk_calls] == [(False,) * 3] * 2
    assert chunk_calls[0]["flops"] == 2 * 20 * 8 * 300, "only the logits' matmul"
    torch.testing.assert_close(loss, unfused(x, w, b, target), atol=1e-5, rtol=1e-5)


def test_linear_op_called_with_fewer_flags_recomputes_in_backward():
    """Called directly with a flag off for an input that requires grad, the op's backward recomputes that gradient."""
    x, w, b, target = linear_inputs(9, 8, 100, torch.float32, True)
    ours = torch.autograd.grad(_linear_ce_fwd(x, w, b, target, -100, 0.1, 0.0, "mean", True, False, False)[0], (x, w, b))
    ref = torch.autograd.grad(unfused(x, w, b, target, label_smoothing=0.1), (x, w, b))
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


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


def test_linear_under_autocast_in_eager_mode():
    """Called inside torch.autocast (as a training loop does) with an fp32 head: runs in x's dtype, no crash."""
    x, w, _, target = linear_inputs(16, 8, 100, torch.float32, False)
    x = x.detach().bfloat16().requires_grad_()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, target)
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    torch.testing.assert_close(loss.float(), unfused(x.detach().float(), w.detach(), None, target), atol=3e-2, rtol=3e-2)


def test_linear_transposed_weight_under_compile():
    """A weight that is a transposed view: the op's fake gradients must have the real ones' (contiguous) strides."""
    x, w, _, target = linear_inputs(12, 8, 40, torch.float32, False)
    w_t = w.detach().t().contiguous().requires_grad_()
    fn = lambda x, w_t: linear_cross_entropy(x, w_t.t(), target)
    torch.library.opcheck(_linear_ce_fwd, (x, w_t.t(), None, target, -100, 0.0, 0.0, "mean", True, True, False))
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
        fwd_calls.extend(n.args[-3:] for n in gm.graph.nodes if n.target in (op, op.overloadpacket))
        return torch._dynamo.lookup_backend("inductor")(gm, example_inputs)

    eager = linear_loss_and_grads(fused, x, w, b, target, upstream)
    compiled = linear_loss_and_grads(torch.compile(fused, fullgraph=True, backend=backend), x, w, b, target, upstream)
    assert fwd_calls == [(True, not frozen_weight, True)]
    assert len(compiled) == 4 - frozen_weight
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, atol=0, rtol=0)


def test_linear_opcheck():
    x, w, b, target = linear_inputs(9, 8, 100, torch.float32, True)
    # a flag off while its input requires grad (the last three) makes the op's backward recompute that gradient
    for reduction, *flags in [("mean", True, True, True), ("none", True, True, True), ("mean", True, False, True),
                              ("sum", False, True, False), ("sum", False, False, False)]:
        torch.library.opcheck(_linear_ce_fwd, (x, w, b, target, -100, 0.1, 0.0, reduction, *flags))
    row_grad = torch.randn(9, device=DEVICE)
    torch.library.opcheck(_linear_ce_bwd, (row_grad, x.detach(), w.detach(), b.detach(), target, -100, 0.1, 0.0, True, False, True))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_fake_matches_real_for_every_flag_combination(bias):
    """register_fake gives the real outputs' shapes, dtypes and strides for every reduction and gradient flag."""
    x, w, b, target = linear_inputs(5, 4, 30, torch.float16, bias)
    w = w.detach().float().t().contiguous().t()  # an fp32 head, non-contiguous: gradients stay contiguous
    check = dict(test_utils="test_faketensor")
    for flags in itertools.product([False, True], repeat=3):
        for reduction in ("mean", "sum", "none"):
            torch.library.opcheck(_linear_ce_fwd, (x.detach(), w, b, target, -100, 0.0, 0.0, reduction, *flags), **check)
        torch.library.opcheck(_linear_ce_bwd, (torch.rand(5, device=DEVICE), x.detach(), w, b, target, -100, 0.0, 0.0, *flags), **check)


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
    size. Measured here (2026-11-22, CPU): 49 MiB peak for the fused path (C=64; most of it the gradients, plus one chunk of
    fp32 logits), where the unfused path's fp32 logits alone are 3141 MiB and its peak was 9423 MiB.
    """
    monkeypatch.setattr("kernels._utils.interpreting", lambda: False)
    N, C, V = 16384, 64, 50257
    x = torch.randn(N, C, requires_grad=True)
    w = (torch.randn(V, C) / 8).requires_grad_()
    target = torch.randint(0, V, (N,))
    peak = peak_cpu_bytes(lambda: linear_cross_entropy(x, w, target).backward())
    logits_bytes = N * V * 4
    chunk_bytes = chunk_rows(N, C, V) * V * 4
    grads_bytes = (N * C + 2 * V * C) * 4  # dx, dW and its fp32 accumulator
    print(f"fused peak {peak / 2**20:.1f} MiB; unfused logits alone {logits_bytes / 2**20:.0f} MiB ({peak / logits_bytes:.3f}x)")
    assert peak < grads_bytes + 4 * chunk_bytes, "peak must be bounded by the gradients plus a few chunk buffers"
    assert peak < 0.05 * logits_bytes


@requires_cuda("real-size bf16/fp16 checks run on a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("V", [50257, 128256])
def test_real_sizes_on_gpu(dtype, V):
    test_matches_torch(16384, V, dtype, "mean")
