"""python -m fastlm.finetune on CPU with a tiny transformers-format GPT-2: learning, outputs, resume, accumulation,
data formats, and every kind of bad input."""
import pytest
import torch

from fastlm import GPT
from fastlm.data import DataError, read_documents, tokenize
from fastlm.finetune import FinetuneConfig, Stopped, learning_rate, main, run
from fastlm.tokenizer import get_tokenizer
from tests.fastlm.helpers import config, make_hf_model, read_metrics, signalled_after

transformers = pytest.importorskip("transformers")


def test_loss_falls_and_transformers_loads_the_output(checkpoint, corpus, tmp_path, capsys):
    cfg = config(checkpoint, corpus, tmp_path, max_steps=30, eval_every=10)
    summary = run(cfg)
    out = tmp_path / "out"
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 31)), "one record per step"
    assert all(m.keys() >= {"step", "loss", "lr", "tokens_per_s"} for m in metrics)
    assert [m["step"] for m in metrics if "val_loss" in m] == [10, 20, 30]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0, "the loss must fall on a repetitive corpus"
    assert metrics[-1]["val_loss"] < metrics[9]["val_loss"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ours = GPT.from_pretrained(out).eval()
    idx = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx), atol=1e-4, rtol=1e-4)
    printed = capsys.readouterr().out
    assert "done: 30 steps" in printed and "sample:" in printed
    assert summary["val_loss"] == metrics[-1]["val_loss"]


def test_resume_equals_uninterrupted(checkpoint, corpus, tmp_path, monkeypatch):
    run(config(checkpoint, corpus, tmp_path / "a"))
    uninterrupted = read_metrics(tmp_path / "a" / "out")

    with signalled_after(6, monkeypatch), pytest.raises(Stopped):
        run(config(checkpoint, corpus, tmp_path / "b"))
    run(config(checkpoint, corpus, tmp_path / "b", resume=True))
    resumed = read_metrics(tmp_path / "b" / "out")
    assert [m["step"] for m in resumed] == list(range(1, 13)), "each step logged once"
    assert [m["loss"] for m in resumed] == [m["loss"] for m in uninterrupted]
    a = GPT.from_pretrained(tmp_path / "a" / "out").state_dict()
    b = GPT.from_pretrained(tmp_path / "b" / "out").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_equals_the_larger_batch(checkpoint, corpus, tmp_path):
    run(config(checkpoint, corpus, tmp_path / "big", batch_size=4, grad_accum=1, max_steps=3))
    run(config(checkpoint, corpus, tmp_path / "acc", batch_size=2, grad_accum=2, max_steps=3))
    big, acc = read_metrics(tmp_path / "big" / "out"), read_metrics(tmp_path / "acc" / "out")
    for m_big, m_acc in zip(big, acc):
        assert m_big["loss"] == pytest.approx(m_acc["loss"], rel=1e-5)
    a = GPT.from_pretrained(tmp_path / "big" / "out").state_dict()
    b = GPT.from_pretrained(tmp_path / "acc" / "out").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_learning_rate_schedule():
    cfg = FinetuneConfig(lr=1.0, min_lr=0.1, warmup_steps=100, max_steps=50)  # warmup scales down to 5 steps
    lrs = [learning_rate(s, cfg) for s in range(50)]
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] == pytest.approx(0.1, abs=2e-3)


def test_default_run_trains_a_small_model_from_scratch_on_pythons_docs(tmp_path, capsys):
    run(FinetuneConfig(out=str(tmp_path / "out"), max_steps=2, eval_every=1, device="cpu", sample_tokens=4,
                       cache_dir=str(tmp_path / "cache")))
    printed = capsys.readouterr().out
    assert "training a small GPT-2 from scratch" in printed and "pydoc_data" in printed


def test_data_formats_and_token_cache(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("second")
    (tmp_path / "docs" / "a.txt").write_text("first")
    assert read_documents(tmp_path / "docs") == ["first", "second"]
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert read_documents(tmp_path / "c.jsonl") == ["one", "two"]
    tok = get_tokenizer()
    ids, key = tokenize(["Hello world", "Hello world"], tok, tmp_path / "cache")
    assert ids.tolist() == [15496, 995, 50256, 15496, 995, 50256]
    monkeypatch.setattr(tok, "encode_batch", lambda texts: pytest.fail("the cached tokens must be reused"))
    again, key_again = tokenize(["Hello world", "Hello world"], tok, tmp_path / "cache")
    assert key_again == key and again.tolist() == ids.tolist()


def test_bad_data_files(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object"):
        read_documents(tmp_path / "bad.jsonl")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_documents(tmp_path / "latin1.txt")


@pytest.mark.parametrize("args,message", [
    (["--weights", "{tmp}/missing.safetensors"], "no such file"),
    (["--weights", "{tmp}/corrupt.safetensors"], "not a readable safetensors file"),
    (["--data", "{tmp}/missing.txt"], "missing.txt: no such file"),
    (["--data", "{tmp}/empty.txt"], "too little data"),
    (["--seq-len", "65"], "longer than the model's context of 64"),
    (["--lr", "0"], "--lr must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--max-steps", "-1"], "--max-steps must be positive"),
    (["--out", "{tmp}/a_file"], "exists and is not a directory"),
    (["--resume"], "no checkpoint.pt"),
    (["--device", "foo"], "is not a device"),
    (["--weights", "{tmp}/small_vocab"], "smaller than the GPT-2 tokenizer's 50257"),
    (["--out", "{tmp}/earlier_run"], "already holds checkpoint.pt"),
    (["--out", "{tmp}/foreign", "--resume"], "not a fastlm fine-tuning checkpoint"),
    (["--train-layers", "3"], "--train-layers 3: the model has only 2 blocks"),
    (["--train-layers", "0"], "--train-layers must be at least 1"),
    (["--trainable", "h.0.,nope"], "--trainable 'nope' matches no parameter"),
    (["--lora-rank", "4", "--train-layers", "1"], "cannot be combined with --train-layers"),
    (["--lora-rank", "4", "--lora-targets", "c_attn,c_foo"], "'c_foo' matches no layer"),
    (["--lora-rank", "-1"], "--lora-rank must not be negative"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha must be positive"),
    (["--dtype", "bfloat16"], "--dtype is now --autocast"),
    (["--dtype=float32"], "--dtype is now --autocast"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA is not available")]))
def test_bad_input_exits_2_with_one_line(checkpoint, corpus, tmp_path, capsys, args, message):
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 100)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "a_file").write_text("keep")
    make_hf_model(n_embd=16, n_head=1, n_layer=1, vocab_size=101).save_pretrained(tmp_path / "small_vocab")
    (tmp_path / "earlier_run").mkdir()
    (tmp_path / "earlier_run" / "checkpoint.pt").write_text("an earlier run")
    (tmp_path / "foreign").mkdir()
    torch.save({"something": "else"}, tmp_path / "foreign" / "checkpoint.pt")
    capsys.readouterr()  # drop what the set-up printed
    base = ["--weights", str(checkpoint), "--data", str(corpus), "--out", str(tmp_path / "out"), "--device", "cpu",
            "--max-steps", "1", "--seq-len", "16", "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit) as info:
        main(base + [a.format(tmp=tmp_path) for a in args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert (tmp_path / "a_file").read_text() == "keep"
    assert (tmp_path / "earlier_run" / "checkpoint.pt").read_text() == "an earlier run"


def test_resume_refuses_changed_data_settings_and_overwrite_replaces(checkpoint, corpus, tmp_path, capsys):
    run(config(checkpoint, corpus, tmp_path, max_steps=2))
    with pytest.raises(ValueError, match="the checkpoint took 4 windows per step, this run would take 2"):
        run(config(checkpoint, corpus, tmp_path, max_steps=4, batch_size=2, resume=True))
    with pytest.raises(ValueError, match="--train-layers is 1 but the checkpoint was trained with None"):
        run(config(checkpoint, corpus, tmp_path, max_steps=4, train_layers=1, resume=True))
    run(config(checkpoint, corpus, tmp_path, max_steps=4, batch_size=2, grad_accum=2, resume=True))  # same windows per step
    with pytest.raises(ValueError, match="--max-steps 4: the run is complete .* raise --max-steps to train further"):
        run(config(checkpoint, corpus, tmp_path, max_steps=4, batch_size=2, grad_accum=2, resume=True))
    run(config(checkpoint, corpus, tmp_path, max_steps=3, overwrite=True))
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1, 2, 3]


def test_half_precision_weights_train_in_fp32(checkpoint, corpus, tmp_path):
    """A bf16 checkpoint is fine-tuned with fp32 master weights (autocast gives the low precision)."""
    GPT.from_pretrained(checkpoint, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    run(config(tmp_path / "bf16", corpus, tmp_path, max_steps=2))
    assert GPT.from_pretrained(tmp_path / "out").lm_head.weight.dtype == torch.float32
