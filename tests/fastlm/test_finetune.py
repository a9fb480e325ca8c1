"""python -m fastlm.finetune on CPU with a tiny transformers-format GPT-2: learning, outputs, resume, accumulation,
data formats, the defaults for the run at hand, the README's own command, --help, and every kind of bad input."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastlm import GPT
from fastlm.data import DataError, read_documents, split, tokenize
from fastlm.finetune import FinetuneConfig, main, run
from fastlm.training import Stopped, learning_rate
from fastlm.tokenizer import get_tokenizer
from tests.fastlm.helpers import config, make_hf_model, read_metrics, signalled_after

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]


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


@pytest.mark.parametrize("pack", [False, True])
def test_resume_equals_uninterrupted(checkpoint, corpus, documents, tmp_path, monkeypatch, pack):
    """With dropout 0.1 (the masks come from the generators checkpoint.pt keeps), and with --pack on many documents."""
    options = dict(dropout=0.1, pack=pack, data=str(documents if pack else corpus))
    steps = 6 if pack else 12  # shorter with --pack: the loop is the same
    options.update(max_steps=steps, save_every=steps // 2, eval_every=steps // 2)
    run(config(checkpoint, corpus, tmp_path / "a", **options))
    uninterrupted = read_metrics(tmp_path / "a" / "out")

    with signalled_after(steps // 2, monkeypatch), pytest.raises(Stopped):
        run(config(checkpoint, corpus, tmp_path / "b", **options))
    run(config(checkpoint, corpus, tmp_path / "b", resume=True, **options))
    resumed = read_metrics(tmp_path / "b" / "out")
    assert [m["step"] for m in resumed] == list(range(1, steps + 1)), "each step logged once"
    assert [m["loss"] for m in resumed] == [m["loss"] for m in uninterrupted]
    a = GPT.from_pretrained(tmp_path / "a" / "out").state_dict()
    b = GPT.from_pretrained(tmp_path / "b" / "out").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "out" / "config.json").read_text())["attn_pdrop"] == 0.1


@pytest.mark.parametrize("pack", [False, True])
def test_gradient_accumulation_equals_the_larger_batch(checkpoint, corpus, documents, tmp_path, pack):
    if pack:
        corpus = documents
    run(config(checkpoint, corpus, tmp_path / "big", batch_size=4, grad_accum=1, max_steps=3, pack=pack))
    run(config(checkpoint, corpus, tmp_path / "acc", batch_size=2, grad_accum=2, max_steps=3, pack=pack))
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


def readme_set_up() -> list[str]:
    """The command lines of the README's first block (under Set-up)."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Set-up"):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def readme_main_job() -> list[str]:
    """The main-job part of the README's first command: what follows the install in its first line."""
    return shlex.split(readme_set_up()[0].split(" && ")[-1])


def test_the_readmes_download_command_is_installed_with_fastlm():
    """`hf` comes with huggingface_hub, which tokenizers (a dependency) installs; `huggingface-cli` no longer does."""
    download = next(shlex.split(line) for line in readme_set_up() if "download" in line)
    assert download[:3] == ["hf", "download", "openai-community/gpt2"]
    assert shutil.which(download[0], path=str(Path(sys.executable).parent)), "in the environment the install made"


def test_the_readmes_first_command_trains_with_falling_loss(tmp_path):
    """As CI runs it: `python -m fastlm.finetune` with its defaults (no file of ours: a small GPT-2 from scratch on
    Python's documentation), shortened only by documented flags, in a fresh directory."""
    command = readme_main_job()
    assert command == ["python", "-m", "fastlm.finetune"], "the README's main job is the default run"
    shorter = ["--max-steps", "20", "--eval-every", "10", "--sample-tokens", "0", "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run([sys.executable, *command[1:], *shorter], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == "", "everything the run says goes to stdout, with the progress lines"
    lines = done.stdout.splitlines()
    assert lines[0].startswith("no --weights given: training a small GPT-2 from scratch (4 layers, 128 wide")
    assert lines[1] == "dropout: none (from scratch; --dropout P to add it)"
    steps = [line for line in lines if line.startswith("step ")]
    assert steps[0].startswith("step 1/20 loss ") and " elapsed 0:00:" in steps[0], "a line at step 1, with the time"
    assert [int(line.split()[1].split("/")[0]) for line in steps] == [1, 10, 20]
    metrics = read_metrics(tmp_path / "out-finetune")
    assert sum(m["loss"] for m in metrics[-5:]) / 5 < metrics[0]["loss"] - 0.3, [m["loss"] for m in metrics]
    assert metrics[19]["val_loss"] < metrics[9]["val_loss"]
    saved = torch.load(tmp_path / "out-finetune" / "checkpoint.pt", weights_only=False, mmap=True)["finetune_config"]
    assert (saved["batch_size"], saved["seq_len"]) == (8, 64), "no --weights: the usual 8 windows of the whole context"
    assert any(line.startswith("losses: train = the mean over the last 10 steps") for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out-finetune"]


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
    (["--weights", "{tmp}/missing.safetensors"], "missing.safetensors: no such file or directory. GPT-2's weights: "
                                                 "`hf download openai-community/gpt2 model.safetensors config.json "
                                                 "--local-dir gpt2`, then --weights gpt2; or leave --weights out to "
                                                 "train a small GPT-2 from scratch"),
    (["--weights", "{tmp}/corrupt.safetensors"], "not a readable safetensors file"),
    (["--data", "{tmp}/missing.txt"], "missing.txt: no such file"),
    (["--data", "{tmp}/empty.txt"], "empty.txt: no text in it (the file is empty)"),
    (["--data", "{tmp}/one_word.txt"], "one_word.txt: 2 tokens is too little data for --seq-len 16"),
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
    (["--autocast", "float16"], "--autocast: invalid choice: 'float16' (choose from "),
    (["--max-steps", "ten"], "--max-steps: invalid int value: 'ten'"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA is not available")]))
def test_bad_input_exits_2_with_one_line(checkpoint, corpus, tmp_path, capsys, args, message):
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 100)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "one_word.txt").write_text("Hello")
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
    assert not (tmp_path / "out").exists(), "a run whose set-up fails leaves no --out behind"
    assert (tmp_path / "earlier_run" / "checkpoint.pt").read_text() == "an earlier run"


def test_resume_refuses_changed_data_settings_and_overwrite_replaces(checkpoint, corpus, tmp_path, capsys):
    run(config(checkpoint, corpus, tmp_path, max_steps=2))
    with pytest.raises(ValueError, match="the checkpoint took 4 windows per step, this run would take 2"):
        run(config(checkpoint, corpus, tmp_path, max_steps=4, batch_size=2, resume=True))
    with pytest.raises(ValueError, match="--train-layers is 1 but the checkpoint was trained with None"):
        run(config(checkpoint, corpus, tmp_path, max_steps=4, train_layers=1, resume=True))
    with pytest.raises(ValueError, match="--seq-len is 16 but the checkpoint was trained with 32; resume with the same"):
        run(config(checkpoint, corpus, tmp_path, max_steps=4, seq_len=16, resume=True))
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


def test_validation_is_whole_documents_drawn_from_across_the_corpus():
    eot, rng = 50256, np.random.default_rng(0)
    docs = [list(rng.integers(0, 50000, size=int(n))) + [eot] for n in rng.integers(20, 200, size=60)]
    tokens = np.array([t for doc in docs for t in doc], dtype=np.uint16)
    splits = split(tokens, "key", 16, 0.1, "corpus", eot=eot, seed=7)
    val, train = _documents(splits.val.tolist(), eot), _documents(splits.train.tolist(), eot)
    originals = [tuple(doc) for doc in docs]
    assert sorted(val + train) == sorted(originals), "every document in one split or the other, whole"
    assert 0.1 * len(tokens) <= len(splits.val) <= 0.15 * len(tokens)
    positions = sorted(originals.index(doc) for doc in val)
    assert positions[0] < 30 < positions[-1], "from across the corpus, not its end"
    assert splits.how == f"{len(val)} of 60 documents drawn at random (seed 7)"
    again, other = split(tokens, "key", 16, 0.1, "corpus", eot=eot, seed=7), split(tokens, "key", 16, 0.1, "corpus", eot=eot, seed=8)
    assert torch.equal(again.val, splits.val) and not torch.equal(other.val, splits.val), "seeded"
    one = split(tokens[:-1], "key", 16, 0.1, "corpus", eot=None)  # no document boundaries: the last tokens
    assert torch.equal(one.val, torch.from_numpy(tokens[-len(one.val) - 1:-1].astype(np.int64)))


def _documents(ids: list[int], eot: int) -> list[tuple[int, ...]]:
    out, current = [], []
    for t in ids:
        current.append(t)
        if t == eot:
            out.append(tuple(current))
            current = []
    return out


def test_a_cpu_run_with_weights_picks_sizes_that_give_a_step_in_seconds(checkpoint, corpus, tmp_path, capsys):
    run(config(checkpoint, corpus, tmp_path, max_steps=2, batch_size=None, seq_len=None, sample_tokens=0))
    printed = capsys.readouterr().out
    assert ("on a CPU: --batch-size 4 --seq-len 64 (a GPU run's default is 8 x 64), so that a step takes seconds rather "
            "than minutes; pass them to choose") in printed
    saved = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False, mmap=True)["finetune_config"]
    assert (saved["batch_size"], saved["seq_len"]) == (4, 64)
    run(config(checkpoint, corpus, tmp_path, max_steps=3, batch_size=None, seq_len=None, sample_tokens=0, resume=True))
    assert "on a CPU" not in capsys.readouterr().out, "a resumed run keeps its own sizes"
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1, 2, 3]


@pytest.mark.parametrize("command", ["finetune", "evaluate", "generate"])
def test_help_is_instant_with_one_default_per_flag_and_every_choice(command):
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", f"fastlm.{command}", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"torch", "triton", "numpy", "kernels"}, "--help imports nothing heavy"
    assert seconds < 2.0, f"--help took {seconds:.1f} s"
    text = " ".join(done.stdout.split())
    entries = text.split(" --")[1:]
    assert entries and all(entry.count("default") <= 1 for entry in entries), [e for e in entries if e.count("default") > 1]
    assert "--backend {auto,triton,torch}" in text
    assert ("--dtype {auto,float32,bfloat16,float16}" if command == "generate" else "--autocast {auto,bfloat16,off}") in text
    if command != "finetune":
        assert "[--weights WEIGHTS]" not in text and "--weights WEIGHTS" in text, "required: shown without brackets"
