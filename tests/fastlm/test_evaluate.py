"""python -m fastlm.evaluate: strided perplexity against transformers' GPT-2 (an independent loop in float64),
each token scored once, bits per byte as defined, the JSON output, the Triton path, and every kind of bad input."""
import copy
import gzip
import json
import math

import pytest
import torch

from fastlm import GPT, GPTConfig, get_tokenizer
import fastlm.evaluate
from fastlm.evaluate import main
from fastlm.perplexity import evaluate, gpt2_token_bytes, text_ids, windows
from fastlm.tokenizer import ASSETS
from kernels._utils import use_triton
from tests.conftest import DEVICE
from tests.fastlm.helpers import make_hf_model

transformers = pytest.importorskip("transformers", reason="transformers' GPT-2 is the reference (pip install -e '.[test]')")
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402
TEXT = ("In 1889 the Eiffel Tower opened in Paris; visitors climbed 1,665 steps, paid 2 francs, and wrote about the "
        "view for weeks. Gustave Eiffel kept an office near the top for experiments.")
CONFIGS = [(16, 8), (16, 16), (8, 1), (32, 5), (10, 7)]  # (seq_len, stride)


@pytest.fixture(scope="module")
def hf_model():
    model = make_hf_model(n_layer=2, n_head=2, n_embd=32, vocab_size=50257, n_positions=64)
    with torch.no_grad():  # GPT-2's 0.02 init gives near-uniform predictions: sharpen them so context matters
        model.transformer.wte.weight.mul_(20)
        model.transformer.wpe.weight.mul_(10)
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(30)
    return model


@pytest.fixture(scope="module")
def checkpoint(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_gpt2")
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ids():
    return text_ids([TEXT], get_tokenizer())


@pytest.fixture(scope="module")
def references(hf_model, ids):
    return {cfg: reference_nll(hf_model, ids, *cfg) for cfg in CONFIGS}


def reference_nll(hf_model, ids, seq_len, stride):
    """Hugging Face's "Perplexity of fixed-length models" loop, with windows of seq_len + 1 tokens (seq_len
    predictions, the last with seq_len tokens of context), in float64: summed NLL and the tokens it scored."""
    model = copy.deepcopy(hf_model).double()
    ids = ids[None]
    n, max_length = ids.shape[1], seq_len + 1
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=labels).loss
        scored = int((labels[:, 1:] != -100).sum())  # the model shifts the labels: the first is never predicted
        nll += loss.item() * scored
        count += scored
        prev_end = end
        if end == n:
            break
    return nll, count


# -----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 17, 100])
def test_windows_score_every_token_once_with_bounded_context(n):
    for seq_len in (1, 2, 5, 16, 200):
        for stride in sorted({s for s in (1, 2, 3, seq_len // 2, seq_len) if 1 <= s <= seq_len}):
            spans = windows(n, seq_len, stride)
            scored = [t for begin, end, k in spans for t in range(end - k + 1, end + 1)]
            assert scored == list(range(1, n)), (n, seq_len, stride)
            for begin, end, k in spans:
                assert 0 < end - begin <= seq_len and 0 < k <= end - begin
                assert begin == 0 or end - k + 1 - begin >= seq_len - stride + 1, "context after the first window"


@pytest.mark.parametrize("seq_len,stride", CONFIGS)
def test_perplexity_matches_transformers(references, checkpoint, ids, seq_len, stride):
    ref_nll, ref_count = references[seq_len, stride]
    n = len(ids)
    assert ref_count == n - 1
    model = GPT.from_pretrained(checkpoint, backend="torch")
    one = evaluate(model, ids, seq_len, stride, batch_size=1)
    several = evaluate(model, ids, seq_len, stride, batch_size=3)
    assert one["tokens"] == several["tokens"] == n - 1
    assert one["nll"] == pytest.approx(ref_nll, rel=1e-5)
    assert one["perplexity"] == pytest.approx(math.exp(ref_nll / (n - 1)), rel=1e-5)
    assert several["nll"] == pytest.approx(one["nll"], rel=1e-6), "batching must not change the result"
    assert (one["seq_len"], one["stride"]) == (seq_len, stride)


def test_the_comparison_can_tell_windowings_apart(references, ids):
    """The text ends in a part-window, and the model is sharp enough that the context each token sees changes
    the NLL far beyond the tolerance, so a windowing mistake would show."""
    n = len(ids)
    assert n - 1 > max(seq_len for seq_len, _ in CONFIGS)
    assert all((n - 1 - seq_len) % stride for seq_len, stride in CONFIGS if stride > 1), "lengths not a multiple of the stride"
    nlls = [nll for nll, _ in references.values()]
    assert min(abs(a - b) / a for i, a in enumerate(nlls) for b in nlls[i + 1:]) > 1e-3


def test_token_byte_table_matches_transformers(tmp_path):
    for name in ("encoder.json", "vocab.bpe"):
        with gzip.open(ASSETS / f"{name}.gz", "rb") as src:
            (tmp_path / name).write_bytes(src.read())
    ref = transformers.GPT2Tokenizer(str(tmp_path / "encoder.json"), str(tmp_path / "vocab.bpe"))
    byte_of = {c: b for b, c in bytes_to_unicode().items()}  # GPT-2 spells each byte as one character
    table = gpt2_token_bytes()
    assert len(table) == 50257
    expected = [len(bytes(byte_of[c] for c in spelling)) for spelling in ref.convert_ids_to_tokens(list(range(50256)))]
    assert table[:50256].tolist() == expected
    assert table[50256] == len(b"<|endoftext|>")


def test_bits_per_byte_follows_its_definition(checkpoint, tmp_path):
    tok = get_tokenizer()
    model = GPT.from_pretrained(checkpoint, backend="torch")
    docs = ["\U0001f600 grinning, then plain text.", "A second document.", "", "Third."]
    ids = text_ids(docs, tok)
    assert ids.tolist() == tok.encode(docs[0]) + [50256] + tok.encode(docs[1]) + [50256] + tok.encode(docs[3]), \
        "documents joined by <|endoftext|>, none after the last, empty ones skipped"
    text = "<|endoftext|>".join(d for d in docs if d)
    first = tok.encode(docs[0])[0]  # 3 of the emoji's 4 bytes: its decoded text is a replacement character
    assert tok.decode([first]) == "\ufffd"
    result = evaluate(model, ids, seq_len=16, stride=8)
    assert result["bytes"] == len(text.encode("utf-8")) - 3
    assert result["bits_per_byte"] == pytest.approx(result["nll"] / math.log(2) / result["bytes"], rel=1e-12)
    ascii_ids = text_ids([TEXT], tok)
    ascii_result = evaluate(model, ascii_ids, seq_len=16, stride=8)
    assert ascii_result["bytes"] == len(tok.decode(ascii_ids[1:].tolist()).encode("utf-8"))


def test_cli_prints_json_or_one_line(checkpoint, tmp_path, capsys, ids):
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    main(["--weights", str(checkpoint), "--data", str(tmp_path / "text.jsonl"), "--device", "cpu", "--json"])
    out = capsys.readouterr().out
    result = json.loads(out)
    assert result.keys() >= {"perplexity", "bits_per_byte", "nll", "loss", "tokens", "bytes", "seq_len", "stride", "windows"}
    assert (result["seq_len"], result["stride"], result["tokens"]) == (64, 32, len(ids) - 1), "defaults: the context, half of it"
    expected = evaluate(GPT.from_pretrained(checkpoint), ids, 64, 32)
    assert result["nll"] == pytest.approx(expected["nll"], rel=1e-6)

    (tmp_path / "text.txt").write_text(TEXT)
    main(["--weights", str(checkpoint), "--data", str(tmp_path / "text.txt"), "--device", "cpu", "--seq-len", "16",
          "--stride", "16", "--batch-size", "2"])
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and line.startswith("perplexity ") and "bits per byte" in line
    assert f"{len(ids) - 1:,} tokens" in line and "seq-len 16, stride 16" in line


@pytest.mark.skipif(not use_triton(torch.empty(0, device=DEVICE)), reason="needs CUDA or the Triton interpreter (TRITON_INTERPRET=1)")
def test_triton_backend_matches_torch():
    torch.manual_seed(0)
    torch_model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=101), backend="torch")
    triton_model = GPT(torch_model.config, backend="triton")
    triton_model.load_state_dict(torch_model.state_dict())
    ids = torch.randint(0, 101, (29,))
    bytes_per_token = torch.ones(101, dtype=torch.long)
    want = evaluate(torch_model.to(DEVICE), ids, 8, 3, batch_size=2, token_bytes=bytes_per_token)
    got = evaluate(triton_model.to(DEVICE), ids, 8, 3, batch_size=2, token_bytes=bytes_per_token)
    assert got["tokens"] == want["tokens"] == 28 and got["bytes"] == 28
    assert got["nll"] == pytest.approx(want["nll"], rel=1e-5)
    ids[[5, 6, 17]] = 100  # <|endoftext|>'s stand-in: documents of 5, 1, 11 and 11 tokens
    want = evaluate(torch_model, ids, 8, 3, batch_size=2, token_bytes=bytes_per_token, per_document=True, eot=100)
    got = evaluate(triton_model, ids, 8, 3, batch_size=2, token_bytes=bytes_per_token, per_document=True, eot=100)
    assert (got["mode"], got["documents"]) == ("per-document", 4)
    assert got["nll"] == pytest.approx(want["nll"], rel=1e-5)


DOCUMENTS = ["The tower opened in 1889.", "Visitors climbed 1,665 steps and paid 2 francs for the view.",
             "Gustave Eiffel kept an office near the top.", "Short."]


def per_document_reference(hf_model, ids: torch.Tensor, eot: int = 50256) -> float:
    """transformers in float64 on each document alone: its inputs are the <|endoftext|> before it (none for the
    first document) and its tokens; its targets the tokens after that first input and the <|endoftext|> after it
    (none after the last). The summed NLL."""
    model = copy.deepcopy(hf_model).double()
    starts = [0] + (ids == eot).nonzero().flatten().tolist() + [len(ids) - 1]
    nll = 0.0
    for a, b in zip(starts[:-1], starts[1:]):
        with torch.no_grad():
            logits = model(ids[a:b][None]).logits[0]
        nll += torch.nn.functional.cross_entropy(logits, ids[a + 1:b + 1], reduction="sum").item()
    return nll


def test_per_document_mode_scores_each_document_alone(hf_model, checkpoint):
    """The same tokens scored as the stream mode, each from its own document only: windows of 32 with stride 16 give
    every scored token at least 17 tokens of context, more than any document here has, so each token sees exactly
    its document's earlier tokens, as the reference does."""
    ids = text_ids(DOCUMENTS, get_tokenizer())
    assert 32 < len(ids) and max(len(get_tokenizer().encode(d)) for d in DOCUMENTS) < 17
    model = GPT.from_pretrained(checkpoint, backend="torch")
    alone = evaluate(model, ids, 32, 16, batch_size=2, per_document=True)
    stream = evaluate(model, ids, 32, 16, batch_size=2)
    assert alone["nll"] == pytest.approx(per_document_reference(hf_model, ids), rel=1e-5)
    assert (alone["mode"], stream["mode"], alone["documents"]) == ("per-document", "stream", 4)
    assert (alone["tokens"], alone["bytes"]) == (stream["tokens"], stream["bytes"]), "the same tokens scored"
    assert abs(alone["nll"] - stream["nll"]) / stream["nll"] > 1e-3, "context from the previous document would show"


def test_cli_says_which_mode(checkpoint, tmp_path, capsys):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    common = ["--weights", str(checkpoint), "--data", str(tmp_path / "docs.jsonl"), "--device", "cpu", "--seq-len", "32"]
    main(common + ["--per-document"])
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and line.rstrip().endswith("per document: each of the 4 documents without context "
                                                            "from the one before"), line
    main(common)
    assert capsys.readouterr().out.rstrip().endswith("one stream: context runs across the 4 documents "
                                                     "(--per-document: each alone)")
    main(common + ["--per-document", "--json"])
    assert json.loads(capsys.readouterr().out)["mode"] == "per-document"


@pytest.mark.parametrize("args,message", [
    (["--weights", None], "--weights is required"),
    (["--data", None], "--data is required"),
    (["--weights", "{tmp}/missing.safetensors"], "missing.safetensors: no such file"),
    (["--data", "{tmp}/missing.txt"], "missing.txt: no such file"),
    (["--data", "{tmp}/empty.txt"], "empty.txt: no text in it (the file is empty)"),
    (["--data", "{tmp}/one_token.txt"], "the text is 1 token(s)"),
    (["--stride", "0"], "--stride must be positive"),
    (["--stride", "17"], "--stride 17 is larger than --seq-len 16"),
    (["--seq-len", "65"], "--seq-len 65 is longer than the model's context of 64"),
    (["--seq-len", "0"], "--seq-len must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--weights", "{tmp}/small_vocab"], "smaller than the GPT-2 tokenizer's 50257"),
    (["--device", "foo"], "is not a device"),
    (["--autocast", "float16"], "--autocast: invalid choice: 'float16' (choose from "),
    (["--batch-size", "two"], "--batch-size: invalid int value: 'two'"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA is not available")]))
def test_bad_input_exits_2_with_one_line(checkpoint, tmp_path, capsys, args, message):
    (tmp_path / "text.txt").write_text(TEXT)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "one_token.txt").write_text("Hello")
    if "small_vocab" in " ".join(str(a) for a in args):
        make_hf_model(n_embd=16, n_head=1, n_layer=1, vocab_size=101).save_pretrained(tmp_path / "small_vocab")
    capsys.readouterr()
    options = {"--weights": str(checkpoint), "--data": str(tmp_path / "text.txt"), "--device": "cpu", "--seq-len": "16"}
    options.update(zip(args[::2], args[1::2]))  # None drops a flag
    argv = [item for flag, value in options.items() if value is not None for item in (flag, value.format(tmp=tmp_path))]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and message in captured.err, captured.err
    assert captured.out == ""


def test_python_api_checks_its_arguments(checkpoint, ids):
    model = GPT.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate(model, ids[:1], 8, 4)
    with pytest.raises(ValueError, match="1 <= stride <= seq_len"):
        evaluate(model, ids, 8, 9)
    with pytest.raises(ValueError, match="longer than the model's context of 64"):
        evaluate(model, ids, 65, 8)


def test_old_dtype_flag_names_its_new_spelling(checkpoint, tmp_path, capsys):
    """--dtype meant the autocast dtype here and the weights' dtype in generate: it is --autocast now."""
    with pytest.raises(SystemExit) as info:
        main(["--weights", str(checkpoint), "--data", str(tmp_path / "text.txt"), "--dtype", "bfloat16"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "--dtype is now --autocast" in err, err


def test_a_long_evaluation_shows_its_progress(checkpoint, tmp_path, capsys, monkeypatch):
    """A line per batch here (every 0 s): windows done of all, on stderr; the result alone on stdout."""
    monkeypatch.setattr(fastlm.evaluate, "PROGRESS_EVERY", 0.0)
    (tmp_path / "text.txt").write_text(TEXT)
    main(["--weights", str(checkpoint), "--data", str(tmp_path / "text.txt"), "--device", "cpu", "--seq-len", "16",
          "--stride", "8", "--batch-size", "2", "--json"])
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    lines = captured.err.splitlines()
    done = [int(line.split()[1].split("/")[0]) for line in lines]
    assert done == list(range(2, result["windows"], 2)) and all(f"/{result['windows']} windows, elapsed" in l for l in lines)
