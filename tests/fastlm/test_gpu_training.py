"""The fine-tuning paths only a GPU runs: the compiled triton step with in-kernel attention dropout (its seed drawn
inside the compiled graph from the CUDA generator), packed documents through kernels.varlen_attention, the CUDA
generator states a checkpoint keeps, and a soft prompt on CUDA. On the CPU these paths run the torch backend or the
interpreter (tests/fastlm/test_finetune.py, test_packing.py, test_dropout.py); here they run as a user's GPU run
does. The reference is the uninterrupted run itself (resume must reproduce it bit for bit), and the losses must
fall (a soft prompt: it trains without non-finite steps and is saved apart from the base)."""
import math

import pytest
import torch

from fastlm import GPT
from fastlm.finetune import run
from fastlm.training import Stopped
from tests.conftest import requires_cuda
from tests.fastlm.helpers import config, read_metrics, signalled_after


@requires_cuda("the compiled triton step with dropout, --pack and CUDA generator states runs on a GPU")
def test_compiled_triton_run_with_dropout_and_pack_resumes_bit_for_bit(checkpoint, documents, tmp_path, monkeypatch):
    steps = 8
    options = dict(device="cuda", backend="triton", compile=True, dropout=0.1, pack=True, max_steps=steps,
                   save_every=steps // 2, eval_every=steps // 2, log_every=1, sample_tokens=0, lr=1e-2)
    run(config(checkpoint, documents, tmp_path / "a", **options))
    uninterrupted = read_metrics(tmp_path / "a" / "out")
    with signalled_after(steps // 2, monkeypatch), pytest.raises(Stopped):
        run(config(checkpoint, documents, tmp_path / "b", **options))
    run(config(checkpoint, documents, tmp_path / "b", resume=True, **options))
    resumed = read_metrics(tmp_path / "b" / "out")
    assert [m["loss"] for m in resumed] == [m["loss"] for m in uninterrupted], "the same masks after the resume"
    assert uninterrupted[-1]["loss"] < uninterrupted[0]["loss"]
    a = GPT.from_pretrained(tmp_path / "a" / "out").state_dict()
    b = GPT.from_pretrained(tmp_path / "b" / "out").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@requires_cuda("prompt tuning with the compiled triton step runs on a GPU")
def test_prompt_tuning_on_the_gpu_trains_the_prompt_alone(checkpoint, corpus, tmp_path):
    options = dict(device="cuda", backend="triton", compile=True, prompt_tokens=4, seq_len=24, max_steps=6,
                   save_every=6, eval_every=6, log_every=1, sample_tokens=4, lr=3e-2)
    run(config(checkpoint, corpus, tmp_path, **options))
    from fastlm.prompt_tuning import load_prompt

    metrics = read_metrics(tmp_path / "out")
    assert all(math.isfinite(m["loss"]) for m in metrics) and len(metrics) == 6
    base = GPT.from_pretrained(checkpoint)
    written = GPT.from_pretrained(tmp_path / "out").state_dict()
    assert all(torch.equal(v, written[k]) for k, v in base.state_dict().items()), "model.safetensors is the base"
    idx = torch.arange(10)[None]
    plain = base(idx)
    load_prompt(base, tmp_path / "out" / "prompt")
    assert not torch.allclose(base(idx), plain), "the saved prompt changes the logits"
