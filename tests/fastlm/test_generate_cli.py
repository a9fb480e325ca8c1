"""python -m fastlm.generate: prints the continuation the model produces; with its defaults it works on any model
fastlm writes; bad input is one line naming the flag and exit 2, before anything is printed."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastlm import GPT, GPTConfig, get_tokenizer
from fastlm.generate import main

ROOT = Path(__file__).resolve().parents[2]


def run(*args):
    return subprocess.run([sys.executable, "-m", "fastlm.generate", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A model with the context of the default fine-tuning run's (64 tokens), as fastlm saves it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64), backend="torch").eval()
    path = tmp_path_factory.mktemp("small")
    model.save_pretrained(path)
    return model, path


def test_greedy_continuation_is_printed(small):
    model, path = small
    tok = get_tokenizer()
    prompt = "Hello, my name is"
    expected = tok.decode(model.generate(torch.tensor([tok.encode(prompt)]), 12, temperature=0)[0].tolist())
    proc = run("--weights", str(path), "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"


def test_the_defaults_fit_the_models_context(small, capsys):
    """100 new tokens by default, but the context is 64: capped at what the prompt leaves, said once."""
    model, path = small
    main(["--weights", str(path), "--device", "cpu", "--temperature", "0"])
    captured = capsys.readouterr()
    assert captured.err == ("note: --max-new-tokens 100 capped at 63: the model's context is 64 tokens, 1 of them the "
                            "prompt's\n")
    tok = get_tokenizer()
    full = model.generate(torch.tensor([tok.encode("\n")]), 63, temperature=0, eos_token_id=tok.eot_token)
    assert captured.out == tok.decode(full[0].tolist()) + "\n"


@pytest.mark.parametrize("args,message", [
    ((), "--weights is required"),
    (("--weights", "{tmp}/none"), "none: no such file"),
    (("--dtype", "int8"), "--dtype: invalid choice: 'int8'"),
    (("--device", "foo"), "is not a device"),
    (("--top-k", "-1"), "--top-k must be 0 (off) or positive, got -1"),
    (("--top-p", "1.5"), "--top-p must be in (0, 1], got 1.5"),
    (("--temperature", "-1"), "--temperature must not be negative (0: greedy), got -1.0"),
    (("--max-new-tokens", "-3"), "--max-new-tokens must not be negative, got -3"),
    (("--num-samples", "0"), "--num-samples must be at least 1, got 0"),
    (("--prompt", ""), "--prompt is empty"),
    (("--prompt", " word" * 64), "--prompt is 64 tokens: the model's context of 64 leaves no room to generate"),
])
def test_bad_input_is_one_line_naming_the_flag_and_nothing_else_is_printed(small, tmp_path, capsys, args, message):
    _, path = small
    weights = [] if not args or args[0] == "--weights" else ["--weights", str(path)]
    with pytest.raises(SystemExit) as info:
        main(weights + ["--device", "cpu"] + [a.format(tmp=tmp_path) for a in args])  # the last --device counts
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "", "nothing printed before the input is known to be good"
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and message in captured.err, captured.err
