"""Packed documents: the boundaries fastlm.packing finds, a packed batch against each document run alone through
transformers' GPT2LMHeadModel (loss = the token-weighted mean of the documents' losses, every gradient equal) on
both backends, the varlen kernel's call, torch.compile without recompiling for new lengths, and what padding
would waste."""
import contextlib
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernels
from fastlm import GPT
from fastlm.packing import document_boundaries, document_lengths, padding_waste
from tests.conftest import DEVICE

EOT = 100  # the tiny models' last token stands in for <|endoftext|>
BACKENDS = ["torch", "triton"]  # triton runs under the interpreter on CPU


def packed_rows(seed: int = 0) -> torch.Tensor:
    """Two rows of 23 tokens: documents of 1, 4, 9 ... tokens, one cut by each row's edges, an <|endoftext|> first
    in a row and one last (a document of one token)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, EOT, (2, 23), generator=g)
    for row, cols in ((0, [3, 4, 8, 22]), (1, [0, 10, 19])):
        x[row, cols] = EOT
    return x


def test_boundaries_begin_at_each_row_and_at_every_endoftext():
    x = torch.tensor([[5, 6, EOT, 7, EOT, EOT, 8], [EOT, 1, 2, 3, 4, EOT, 9]])
    cu_seqlens, positions = document_boundaries(x, EOT)
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == [0, 2, 4, 5, 7, 12, 14]
    assert positions.tolist() == [[0, 1, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 0, 1]]
    with pytest.raises(ValueError, match=r"must be \(B, T\) token ids on the CPU"):
        document_boundaries(x[0], EOT)


def test_padding_waste_counts_rows_of_their_own():
    ids = np.array([1, 2, EOT] + [3] * 9 + [EOT] + [4, 5])  # documents of 3, 10 and 2 (unfinished) tokens
    assert document_lengths(ids, EOT).tolist() == [3, 10, 2]
    assert padding_waste(ids, EOT, 4) == pytest.approx(1 - 15 / (4 * (1 + 3 + 1)))
    assert padding_waste(np.array([1, 2, 3, EOT]), EOT, 4) == 0.0


def load(hf_dir, backend):
    return GPT.from_pretrained(hf_dir, backend=backend, device=DEVICE)  # eval mode: no dropout, like hf_model


def each_document_alone(hf_model, x: torch.Tensor, y: torch.Tensor):
    """transformers on each document of the packed rows by itself (its own positions from 0): the summed loss
    over all targets, divided by their count, and its backward; returns the loss and the per-document logits."""
    cu_seqlens, _ = document_boundaries(x, EOT)
    hf_model.zero_grad()
    flat_x, flat_y, total, logits = x.flatten(), y.flatten(), 0.0, []
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        out = hf_model(flat_x[a:b][None]).logits[0]
        total = total + F.cross_entropy(out, flat_y[a:b], reduction="sum")
        logits.append(out.detach())
    loss = total / flat_y.numel()
    loss.backward()
    return loss.detach(), torch.cat(logits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_batch_equals_each_document_alone(hf_model, hf_dir, backend):
    x = packed_rows()
    y = torch.randint(0, 101, x.shape, generator=torch.Generator().manual_seed(1))
    ref_loss, ref_logits = each_document_alone(hf_model, x, y)
    model = load(hf_dir, backend)
    cu_seqlens, positions = (t.to(DEVICE) for t in document_boundaries(x, EOT))
    x, y = x.to(DEVICE), y.to(DEVICE)
    with torch.no_grad():
        logits = model(x, cu_seqlens=cu_seqlens, position_ids=positions)
        assert torch.equal(model(x, cu_seqlens=cu_seqlens), logits), "position ids default to the documents' own"
        unpacked = model(x, y)
    torch.testing.assert_close(logits.flatten(0, 1).cpu(), ref_logits, atol=2e-5, rtol=1e-5)
    loss = model(x, y, cu_seqlens=cu_seqlens, position_ids=positions)
    loss.backward()
    torch.testing.assert_close(loss.cpu(), ref_loss, atol=1e-5, rtol=1e-5)
    assert abs(unpacked.item() - ref_loss.item()) > 1e-3, "attending across documents would show"
    hf_grads = dict(hf_model.named_parameters())
    for name, p in model.named_parameters():
        ref_grad = hf_grads[name].grad
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            ref_grad = ref_grad.t()  # Conv1D stores (in, out)
        torch.testing.assert_close(p.grad.cpu(), ref_grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def _varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, dropout_p=0.0):
    """Dense causal SDPA on each sequence of (total, H, D) q, k, v: the varlen op's meaning, in plain PyTorch."""
    out = []
    for a, b in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
        seq = [t[a:b].transpose(0, 1) for t in (q, k, v)]  # (H, L, D)
        out.append(F.scaled_dot_product_attention(*seq, is_causal=causal, dropout_p=dropout_p).transpose(0, 1))
    return torch.cat(out)


def test_triton_backend_calls_varlen_attention_on_views(hf_model, hf_dir, monkeypatch):
    """On triton the model calls kernels.varlen_attention(q, k, v, cu, cu, T, T, causal=True, dropout_p=p) with
    (B*T, nh, hs) views of the fused projection and builds no mask; here the op is a plain-PyTorch stand-in, so
    this holds before the kernel does (the kernel itself: the next test)."""
    calls = []

    def varlen(q, k, v, *args, **kwargs):
        calls.append(dict(shapes=[tuple(t.shape) for t in (q, k, v)], views=all(t._base is not None for t in (q, k, v)),
                          args=args[2:], kwargs=kwargs, cu=args[0] is args[1]))
        return _varlen_reference(q, k, v, *args, **kwargs)

    monkeypatch.setattr(kernels, "varlen_attention", varlen, raising=False)
    x = packed_rows(2)
    y = torch.randint(0, 101, x.shape, generator=torch.Generator().manual_seed(3))
    ref_loss, _ = each_document_alone(hf_model, x, y)
    model = load(hf_dir, "triton")
    cu_seqlens, positions = (t.to(DEVICE) for t in document_boundaries(x, EOT))
    loss = model(x.to(DEVICE), y.to(DEVICE), cu_seqlens=cu_seqlens, position_ids=positions)
    torch.testing.assert_close(loss.cpu(), ref_loss, atol=1e-5, rtol=1e-5)
    assert calls == [dict(shapes=[(46, 2, 32)] * 3, views=True, args=(23, 23), kwargs=dict(causal=True, dropout_p=0.0),
                          cu=True)] * 2
    model.train()
    model.set_dropout(0.0, 0.2, 0.0)
    model(x.to(DEVICE), y.to(DEVICE), cu_seqlens=cu_seqlens)
    assert [c["kwargs"]["dropout_p"] for c in calls[2:]] == [0.2, 0.2], "attention dropout in training mode"


@pytest.mark.skipif(not hasattr(kernels, "varlen_attention"), reason="kernels.varlen_attention has not landed yet "
                    "(the kernel engineer's, #19); until it does, the triton backend runs SDPA with the mask")
def test_the_varlen_kernel_gives_each_document_alone(hf_model, hf_dir):
    x = packed_rows(4)
    y = torch.randint(0, 101, x.shape, generator=torch.Generator().manual_seed(5))
    ref_loss, _ = each_document_alone(hf_model, x, y)
    model = load(hf_dir, "triton")
    cu_seqlens, positions = (t.to(DEVICE) for t in document_boundaries(x, EOT))
    loss = model(x.to(DEVICE), y.to(DEVICE), cu_seqlens=cu_seqlens, position_ids=positions)
    torch.testing.assert_close(loss.cpu(), ref_loss, atol=1e-5, rtol=1e-5)


def test_compiled_packed_model_does_not_recompile_for_new_documents(hf_dir):
    model = load(hf_dir, "torch")
    compiled = torch.compile(model, fullgraph=True)
    for extra in range(3):  # 7, 8 and 9 documents
        x = packed_rows(extra)
        x[1, 2:2 + extra] = EOT
        cu_seqlens, positions = document_boundaries(x, EOT)
        torch._dynamo.maybe_mark_dynamic(cu_seqlens, 0)  # as the training loop does
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=extra > 0):
            got = compiled(x, cu_seqlens=cu_seqlens, position_ids=positions)
        torch.testing.assert_close(got, model(x, cu_seqlens=cu_seqlens), atol=1e-5, rtol=1e-5)


def test_bad_packing_arguments_say_what_is_wrong(hf_dir):
    model = load(hf_dir, "torch")
    x = packed_rows()
    cu_seqlens, positions = document_boundaries(x, EOT)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-d int32 tensor"):
        model(x, cu_seqlens=cu_seqlens.long())
    with pytest.raises(ValueError, match=r"position_ids must be int32/int64 of idx's shape \(2, 23\)"):
        model(x, position_ids=positions[:, :5])
    with pytest.raises(ValueError, match=r"got torch.float32 of shape \(2, 23\)"):
        model(x, position_ids=positions.float())
    with pytest.raises(ValueError, match=r"on cpu, got torch.int64 of shape \(2, 23\) on meta"):
        model(x, position_ids=positions.to("meta"))
    with pytest.raises(ValueError, match="do not combine with the KV cache"):
        model.hidden_states(x, step=object(), cu_seqlens=cu_seqlens)


def test_finetune_pack_attends_within_documents_and_reports_the_padding_saved(checkpoint, documents, tmp_path, capsys):
    from fastlm.finetune import run
    from tests.fastlm.helpers import config, read_metrics

    short = dict(max_steps=2, eval_every=2, save_every=2, sample_tokens=0)
    run(config(checkpoint, documents, tmp_path / "packed", pack=True, **short))
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("--pack: "))
    waste = re.search(r"padding each of the (\d+) training documents to rows of its own would waste (\d+\.\d)% of the "
                      r"tokens$", line)
    assert waste and 40 <= int(waste[1]) < 60 and 10 < float(waste[2]) < 90, line
    assert "with --pack, each token within its own document" in printed
    run(config(checkpoint, documents, tmp_path / "plain", **short))
    packed, plain = read_metrics(tmp_path / "packed" / "out"), read_metrics(tmp_path / "plain" / "out")
    assert packed[0]["loss"] != plain[0]["loss"] and packed[-1]["val_loss"] != plain[-1]["val_loss"], \
        "the same windows, attended within documents"
    with pytest.raises(ValueError, match="--resume: --pack is False but the checkpoint was trained with True"):
        run(config(checkpoint, documents, tmp_path / "packed", resume=True, **{**short, "max_steps": 3}))


def test_validation_with_pack_scores_each_document_alone(hf_dir):
    """The loop's validation loss with --pack (eot given) is the mean of the packed batches' losses, each document
    alone, and differs from the plain windows' (eot None)."""
    from fastlm.distributed import Parallel, World
    from fastlm.training import validation_loss

    model = load(hf_dir, "torch")
    x = torch.cat([packed_rows(seed) for seed in range(2)])
    y = torch.roll(x, -1, dims=1)
    parallel = Parallel(model=model, forward=model, train=model, sharded=False)
    world = World(0, 0, 1)
    no_autocast = contextlib.nullcontext
    with torch.no_grad():  # in eval mode, as validation runs (it leaves the model in training mode)
        expected = sum(model(xb, yb, **dict(zip(("cu_seqlens", "position_ids"), document_boundaries(xb, EOT)))).item()
                       for xb, yb in zip(x.split(2), y.split(2))) / 2
    got = validation_loss(parallel, world, x, y, 2, no_autocast, eot=EOT)
    plain = validation_loss(parallel, world, x, y, 2, no_autocast, eot=None)
    assert got == pytest.approx(expected, rel=1e-6)
    assert abs(got - plain) > 100 * abs(got - expected), "the plain windows attend across documents"
