"""Label-word scoring against transformers: GPT2LMHeadModel in fp64 (and PEFT's prompt-tuning model over it, for a
soft prompt) scoring the same continuations, tokenised by transformers' own GPT-2 tokenizer; the JSONL file's errors."""
import gzip
import json

import pytest
import torch

from fastlm import GPT, get_tokenizer
from fastlm.choices import describe, read_choices, score_choices, split_tokens
from fastlm.data import DataError
from fastlm.prompt_tuning import add_soft_prompt, save_prompt
from fastlm.tokenizer import ASSETS
from tests.conftest import DEVICE

transformers = pytest.importorskip("transformers", reason="transformers is the GPT-2 reference (pip install -e '.[test]')")

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:Position ids are not supported:UserWarning")]  # PEFT

ROWS = [
    {"text": "The film was a delight from start to finish. It was", "choices": [" great", " terrible"], "label": 0},
    {"text": "I walked out after twenty minutes. It was", "choices": [" great", " terrible"], "label": 1},
    {"text": "Review: the plot made no sense at all.\nSentiment:", "choices": [" positive", " negative"], "label": 1},
    {"text": "Answer:\n", "choices": ["yes", "no", "maybe not"], "label": 2},       # the newline stays the text's
    {"text": "The capital of France is ", "choices": ["Paris", "a city in Europe"], "label": 0},  # the space moves
    {"text": "", "choices": ["Hello", " world"], "label": 1},                        # after <|endoftext|> alone
    {"text": "Café au lait,", "choices": [" s'il vous plaît", " merci", " non"], "label": 0},
    {"text": "2 + 2 =", "choices": [" 4", " 5", " four", " 22"], "label": 0},
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    """transformers' GPT-2 tokenizer from the same vocabulary and merges fastlm bundles (nothing downloaded)."""
    with gzip.open(ASSETS / "encoder.json.gz", "rt", encoding="utf-8") as f:
        vocab = json.load(f)
    with gzip.open(ASSETS / "vocab.bpe.gz", "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().splitlines() if line and not line.startswith("#")]
    return transformers.GPT2Tokenizer(vocab=vocab, merges=merges)


def reference_tokens(tok, text, choice):
    """The documented rule, written the way lm-evaluation-harness splits a request: trailing spaces of the text go
    to the continuation, whose tokens are those of the whole after the (stripped) text's."""
    stripped = text.rstrip(" ")
    choice = text[len(stripped):] + choice
    context = tok(stripped)["input_ids"] or [tok.eos_token_id]
    whole = tok(stripped + choice)["input_ids"]
    if stripped:
        assert whole[:len(context)] == context, "a row of this test whose text merges into its choice"
        return context, whole[len(context):]
    return context, whole


def reference_scores(model, tok, rows, n_virtual=0):
    """Summed log-probabilities of each choice, fp64, from a transformers model (logits of the virtual positions
    dropped)."""
    scores = []
    with torch.no_grad():
        for row in rows:
            scores.append([])
            for choice in row["choices"]:
                context, cont = reference_tokens(tok, row["text"], choice)
                logits = model(input_ids=torch.tensor([context + cont])).logits[0, n_virtual:].double()
                logp = logits.log_softmax(-1)[len(context) - 1:-1]
                scores[-1].append(logp[torch.arange(len(cont)), torch.tensor(cont)].sum().item())
    return scores


def assert_same_as_reference(result, ref, rows, tok):
    assert result["rows"] == len(rows)
    for i, (got, want, row) in enumerate(zip(result["per_row"], ref, rows)):
        counts = [len(reference_tokens(tok, row["text"], c)[1]) for c in row["choices"]]
        assert got["tokens"] == counts, f"row {i}: tokens per choice"
        torch.testing.assert_close(torch.tensor(got["logprobs"], dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                                   atol=2e-5, rtol=1e-6, msg=lambda m: f"row {i}: {m}")
        means = [s / n for s, n in zip(want, counts)]
        assert got["choice"] == want.index(max(want)) and got["choice_norm"] == means.index(max(means)), f"row {i}"
    correct = sum(r["choice"] == row["label"] for r, row in zip(result["per_row"], rows))
    correct_norm = sum(r["choice_norm"] == row["label"] for r, row in zip(result["per_row"], rows))
    assert (result["correct"], result["correct_norm"]) == (correct, correct_norm)
    assert result["accuracy"] == correct / len(rows) and result["accuracy_norm"] == correct_norm / len(rows)


# -----------------------------------------------------------------------------------------------------------------
def test_tokens_follow_the_text_as_the_tokenizer_reads_them():
    tok = get_tokenizer()
    great = tok.encode(" great")
    assert len(great) == 1
    assert split_tokens(tok, "It was", " great") == (tok.encode("It was"), great)
    assert split_tokens(tok, "It was ", "great") == (tok.encode("It was"), great), "the text's space moves to the word"
    assert split_tokens(tok, "", "Hello") == ([tok.eot_token], tok.encode("Hello"))
    assert split_tokens(tok, "Answer:\n", "yes") == (tok.encode("Answer:\n"), tok.encode("yes"))


def test_scores_equal_gpt2_in_fp64(checkpoint, hf_tokenizer):
    reference = transformers.GPT2LMHeadModel.from_pretrained(checkpoint, dtype=torch.float64).eval()
    model = GPT.from_pretrained(checkpoint, backend="torch", device=DEVICE)
    result = score_choices(model, get_tokenizer(), ROWS, batch_size=5)
    ref = reference_scores(reference, hf_tokenizer, ROWS)
    assert_same_as_reference(result, ref, ROWS, hf_tokenizer)
    assert len({r["choice"] for r in result["per_row"]}) > 1, "a model that always picks the first choice proves little"
    assert result["chance"] == pytest.approx(sum(1 / len(r["choices"]) for r in ROWS) / len(ROWS))
    single = score_choices(model, get_tokenizer(), ROWS, batch_size=1)  # batching and padding change nothing
    for a, b in zip(single["per_row"], result["per_row"]):
        torch.testing.assert_close(torch.tensor(a["logprobs"]), torch.tensor(b["logprobs"]), atol=1e-5, rtol=1e-6)


def test_scores_with_a_soft_prompt_equal_pefts_model_in_fp64(checkpoint, hf_tokenizer, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is the prompt-tuning reference (pip install -e '.[test]')")
    model = GPT.from_pretrained(checkpoint, backend="torch", device=DEVICE)
    torch.manual_seed(0)
    add_soft_prompt(model, 4)
    save_prompt(model, tmp_path)
    base = transformers.GPT2LMHeadModel.from_pretrained(checkpoint, dtype=torch.float64)
    reference = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    result = score_choices(model, get_tokenizer(), ROWS, batch_size=4)
    assert_same_as_reference(result, reference_scores(reference, hf_tokenizer, ROWS, n_virtual=4), ROWS, hf_tokenizer)
    without = score_choices(GPT.from_pretrained(checkpoint, backend="torch", device=DEVICE), get_tokenizer(), ROWS)
    assert max(abs(a - b) for r, s in zip(result["per_row"], without["per_row"])
               for a, b in zip(r["logprobs"], s["logprobs"])) > 1e-2, "the prompt changes the scores"


def test_triton_backend_scores_as_torch_does(checkpoint):
    rows = ROWS[:3]
    results = [score_choices(GPT.from_pretrained(checkpoint, backend=backend, device=DEVICE), get_tokenizer(), rows)
               for backend in ("torch", "triton")]  # triton under the interpreter on a CPU: the fused head, no logits
    for a, b in zip(*(r["per_row"] for r in results)):
        torch.testing.assert_close(torch.tensor(b["logprobs"]), torch.tensor(a["logprobs"]), atol=1e-4, rtol=1e-5)


def test_a_row_longer_than_the_context_is_an_error_naming_it(checkpoint):
    model = GPT.from_pretrained(checkpoint, backend="torch", device=DEVICE)  # a context of 64
    fits = [{"text": " word" * 64, "choices": [" a"], "label": 0}]  # 65 tokens: the last is never an input
    assert score_choices(model, get_tokenizer(), fits)["per_row"][0]["tokens"] == [1]
    rows = [ROWS[0], {"text": " word" * 65, "choices": [" a", " b"], "label": 0}]
    with pytest.raises(ValueError, match=r"^row 1: the text and choice 0 are 66 tokens: more than the model's context of 64"):
        score_choices(model, get_tokenizer(), rows)
    torch.manual_seed(0)
    add_soft_prompt(model, 4)
    rows = [{"text": " word" * 61, "choices": [" a"], "label": 0}]
    with pytest.raises(ValueError, match=r"^row 0: the text and choice 0 are 62 tokens, with 4 virtual tokens: more than"):
        score_choices(model, get_tokenizer(), rows)


# ---- the JSONL file ---------------------------------------------------------------------------------------------
def test_reading_a_jsonl_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({**row, "id": i}) for i, row in enumerate(ROWS[:3])) + "\n\n")
    assert read_choices(path) == ROWS[:3], "blank lines skipped, other keys ignored"


@pytest.mark.parametrize("line,message", [
    ('{"text": "a", "choices": [" b"]}', ":2: no 'label' (each row needs text, choices and label)"),
    ('{"choices": [" b"], "label": 0}', ":2: no 'text'"),
    ('{"text": "a", "choices": [" b", " c"], "label": 2}', ":2: label 2 is out of range for 2 choices (0..1)"),
    ('{"text": "a", "choices": [" b"], "label": -1}', ":2: label -1 is out of range for 1 choices (0..0)"),
    ('{"text": "a", "choices": [], "label": 0}', ":2: 'choices' is empty: give at least one continuation"),
    ('{"text": "a", "choices": [" b", ""], "label": 0}', ":2: choice 1 is an empty string"),
    ('{"text": "a", "choices": " b", "label": 0}', ":2: 'choices' must be a list of strings"),
    ('{"text": 3, "choices": [" b"], "label": 0}', ":2: 'text' must be a string, got int"),
    ('{"text": "a", "choices": [" b"], "label": true}', ":2: 'label' must be an integer"),
    ('{"text": "a", "choices": [" b"], "label": "0"}', ":2: 'label' must be an integer"),
    ('["a", [" b"], 0]', ":2: not a JSON object with text, choices, label"),
    ('{"text": "a", "choices": [" b"], "label": 0', ":2: not valid JSON"),
])
def test_bad_rows_are_one_line_naming_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
    with pytest.raises(DataError) as info:
        read_choices(path)
    assert str(info.value).startswith(f"{path}{message}") and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("content,message", [
    (None, "no such file"), (b"", "no rows"), (b"\n  \n", "no rows"), (b'{"text": "\xff"}', "not UTF-8 text"),
])
def test_bad_files_are_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "rows.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_choices(path)
    assert str(info.value).startswith(f"{path}: {message}"), str(info.value)


def test_rows_given_directly_are_checked_too(checkpoint):
    model = GPT.from_pretrained(checkpoint, backend="torch", device=DEVICE)
    with pytest.raises(DataError, match=r"^row 1: label 5 is out of range for 2 choices"):
        score_choices(model, get_tokenizer(), [ROWS[0], {**ROWS[1], "label": 5}])


def test_the_printed_line():
    result = dict(rows=16, correct=12, accuracy=0.75, correct_norm=11, accuracy_norm=0.6875, chance=0.5, per_row=[])
    assert describe(result) == "accuracy 0.7500 (12 of 16 rows), length-normalised 0.6875 (11 of 16); chance 0.5000"


# ---- python -m fastlm.evaluate --choices ------------------------------------------------------------------------
def needs_choices_flag():
    from fastlm.evaluate import EvaluateConfig

    if "choices" not in EvaluateConfig.__dataclass_fields__:
        pytest.skip("evaluate has no --choices/--prompt-dir yet (issue #26: its wiring into fastlm/evaluate.py)")


@pytest.mark.parametrize("with_prompt", [False, True])
def test_evaluate_choices_prints_the_accuracy_of_score_choices(checkpoint, tmp_path, capsys, with_prompt):
    needs_choices_flag()
    from fastlm.evaluate import main
    from fastlm.prompt_tuning import load_prompt

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    model = GPT.from_pretrained(checkpoint, backend="torch")
    prompt_args = []
    if with_prompt:
        torch.manual_seed(0)
        add_soft_prompt(model, 4)
        save_prompt(model, tmp_path / "prompt")
        prompt_args = ["--prompt-dir", str(tmp_path / "prompt")]
        model = GPT.from_pretrained(checkpoint, backend="torch")
        load_prompt(model, tmp_path / "prompt")
    expected = score_choices(model, get_tokenizer(), ROWS)
    args = ["--weights", str(checkpoint), "--choices", str(path), "--device", "cpu", "--backend", "torch", *prompt_args]
    main(args)
    printed = capsys.readouterr().out
    assert printed.startswith(describe(expected) + "; ") and printed.count("\n") == 1, printed
    main(args + ["--json"])
    result = json.loads(capsys.readouterr().out)
    assert (result["correct"], result["correct_norm"], result["rows"]) == (expected["correct"], expected["correct_norm"], 8)
    for got, want in zip(result["per_row"], expected["per_row"]):
        assert got["choice"] == want["choice"] and got["logprobs"] == pytest.approx(want["logprobs"], abs=1e-5)


@pytest.mark.parametrize("args,message", [
    ((), "--data is required: a .txt file, a directory of .txt files, or a .jsonl file with a 'text' field (or --choices"),
    (("--data", "x.txt", "--choices", "y.jsonl"), "--data and --choices: give one of them"),
    (("--choices", "{tmp}/none.jsonl"), "none.jsonl: no such file"),
    (("--choices", "{tmp}/rows.jsonl", "--seq-len", "8"), "--choices scores whole rows"),
])
def test_evaluate_choices_bad_input_is_one_line(checkpoint, tmp_path, capsys, args, message):
    needs_choices_flag()
    from fastlm.evaluate import main

    (tmp_path / "rows.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(SystemExit) as info:
        main(["--weights", str(checkpoint), "--device", "cpu", *(a.format(tmp=tmp_path) for a in args)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and message in err, err
