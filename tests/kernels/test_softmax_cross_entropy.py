"""kernels.cross_entropy against F.cross_entropy: losses, gradients, ignored rows, strides, compile, opcheck."""
import pytest
import torch
import torch.nn.functional as F

import kernels.softmax_cross_entropy as ce
from kernels import cross_entropy, cross_entropy_ref
from kernels._utils import INT32_MAX, needs_int64_columns
from kernels.softmax_cross_entropy import BLOCK_V, _cross_entropy_bwd, _cross_entropy_fwd, logits_grad_, row_losses
from tests.conftest import DEVICE, assert_close_to_ref, requires_cuda

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


def padded(logits, width):
    """logits in the first columns of a (N, width) buffer whose other columns hold a large sentinel: rows 16-byte
    aligned for width % 16 == 0, as in the fused head's chunk buffer."""
    buffer = torch.full((logits.shape[0], width), 1e4, dtype=logits.dtype, device=logits.device)
    buffer[:, : logits.shape[1]] = logits.detach()
    return buffer


# V: below a block, a block and a bit, exactly two blocks (no partial block), two and a bit.
BLOCK_VOCABS = [17, BLOCK_V + 3, 2 * BLOCK_V, 2 * BLOCK_V + 3]


@pytest.mark.parametrize("V", BLOCK_VOCABS)
@pytest.mark.parametrize("aligned", [True, False])
def test_blocks_padding_and_targets_at_the_block_edges(V, aligned):
    """Targets on each side of every block edge, in full blocks and the partial one, an ignored row; rows
    16-byte aligned (vector loads) and not, in place (the fused head's row_losses + logits_grad_) and through
    cross_entropy; with label smoothing and a z-loss. The padding columns past V are never read (their 1e4 would
    swamp the log-sum-exp) nor written."""
    full = (V // BLOCK_V) * BLOCK_V
    targets = sorted({0, V - 1, min(BLOCK_V - 1, V - 1), min(BLOCK_V, V - 1), max(full - 1, 0), min(full, V - 1)})
    N = len(targets) + 1
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(N, V, generator=g) * 3).to(DEVICE, torch.float16)
    target = torch.tensor(targets + [-100], device=DEVICE)
    row_grad = torch.randn(N, generator=g).to(DEVICE)
    kw = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3)
    x64 = logits.double().requires_grad_()
    ref_losses = cross_entropy_ref(x64, target, reduction="none", **kw)
    ref_grad = torch.autograd.grad(ref_losses, x64, row_grad.double())[0]
    eager_losses = cross_entropy_ref(logits.float(), target, reduction="none", **kw)
    width = V + 64 - V % 64 if aligned else V + 5
    buffer = padded(logits, width)
    view = buffer[:, :V]
    assert ce.rows_aligned(view) == aligned
    losses, lse = row_losses(view, target, **kw)
    assert_close_to_ref(losses, ref_losses, eager_losses, "loss")
    logits_grad_(view, target, lse, row_grad, **kw)
    torch.testing.assert_close(view.double(), ref_grad, atol=1e-3, rtol=1e-2)  # fp16 gradients of magnitude <= 1
    assert torch.all(buffer[:, V:] == 1e4), "a padding column was written"
    standalone = padded(logits, width)[:, :V].requires_grad_()
    ours = cross_entropy(standalone, target, reduction="none", **kw)
    torch.testing.assert_close(ours.float(), losses.to(ours.dtype).float(), atol=0, rtol=0)
    torch.testing.assert_close(torch.autograd.grad(ours, standalone, row_grad.half())[0].double(), ref_grad, atol=1e-3, rtol=1e-2)


def test_masked_vocabulary_minus_inf_logits():
    """-inf logits (a masked vocabulary): whole blocks of them, a partial block of them, a row where only the
    target is finite; the loss and gradient are finite and equal torch's."""
    N, V = 3, 2 * BLOCK_V + 40
    logits = torch.randn(N, V, device=DEVICE) * 3
    logits[0, :BLOCK_V] = float("-inf")
    logits[1, 2 * BLOCK_V:] = float("-inf")
    logits[2, :] = float("-inf")
    target = torch.tensor([BLOCK_V + 1, 7, 2 * BLOCK_V + 9], device=DEVICE)
    logits[2, target[2]] = 0.5
    logits.requires_grad_()
    ours = loss_and_grad(cross_entropy, logits, target, reduction="none")
    ref = loss_and_grad(F.cross_entropy, logits, target, reduction="none")
    for o, r in zip(ours, ref):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


def test_int64_column_offsets_where_a_column_stride_could_overflow(monkeypatch):
    """The launchers compile the int64 column-offset variant exactly when (V - 1) * column stride passes 2^31
    (decided on meta tensors, which hold no memory), and that variant computes the same values as the 32-bit one."""
    V = 50257
    assert not needs_int64_columns(V, INT32_MAX // (V - 1)) and needs_int64_columns(V, INT32_MAX // (V - 1) + 1)
    launched = []

    class Recorder:  # stands in for a kernel: keeps each launch's COL_INT64
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(kwargs["COL_INT64"])

    with monkeypatch.context() as m:
        m.setattr(ce, "_cross_entropy_fwd_kernel", Recorder())
        m.setattr(ce, "_cross_entropy_bwd_kernel", Recorder())
        for stride in (1, INT32_MAX // (V - 1), INT32_MAX // (V - 1) + 1):
            logits = torch.empty_strided((4, V), (1, stride), dtype=torch.bfloat16, device="meta")
            target = torch.zeros(4, dtype=torch.long, device="meta")
            _, lse = ce._launch_fwd(logits, target, -100, 0.0, 0.0)
            ce._launch_bwd(torch.ones(4, device="meta"), logits, target, lse, torch.empty(4, V, device="meta"), -100, 0.0, 0.0)
    assert launched == [False, False, False, False, True, True]
    # The int64 variant on real data (forced by a small limit): transposed logits, column stride N.
    logits, target = make_logits(5, BLOCK_V + 3, torch.float32)
    transposed = logits.detach().t().contiguous().t().requires_grad_()
    results = []
    for limit in (INT32_MAX, 8):
        with monkeypatch.context() as m:
            m.setattr("kernels._utils.INT32_MAX", limit)
            results.append(loss_and_grad(cross_entropy, transposed, target, label_smoothing=0.1))
    for a, c in zip(*results):
        assert torch.equal(a, c)


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


@requires_cuda("real-size bf16/fp16 checks run on a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("V", [50257, 128256])
def test_real_sizes_on_gpu(dtype, V):
    test_matches_torch(16384, V, dtype, "mean")
