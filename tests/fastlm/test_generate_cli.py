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


# ---- --prompt-dir: a soft prompt (prompt tuning) before --prompt -------------------------------------------------
@pytest.fixture(scope="module")
def soft_prompt(small, tmp_path_factory):
    """The small model with a 10-token soft prompt, and the prompt saved in PEFT's layout."""
    from fastlm.prompt_tuning import add_soft_prompt, save_prompt

    _, path = small
    model = GPT.from_pretrained(path, backend="torch").eval()
    torch.manual_seed(1)
    add_soft_prompt(model, 10, "Once upon a time")
    return model, save_prompt(model, tmp_path_factory.mktemp("prompt"))


def test_prompt_dir_puts_the_soft_prompt_before_the_prompt(small, soft_prompt, capsys):
    _, path = small
    model, prompt_dir = soft_prompt
    tok = get_tokenizer()
    idx = torch.tensor([tok.encode("Hello, my name is")])
    expected = tok.decode(model.generate(idx, 12, temperature=0)[0].tolist())
    main(["--weights", str(path), "--prompt", "Hello, my name is", "--max-new-tokens", "12", "--temperature", "0",
          "--device", "cpu", "--prompt-dir", str(prompt_dir)])
    captured = capsys.readouterr()
    assert captured.out == expected + "\n" and captured.err == ""
    plain = tok.decode(small[0].generate(idx, 12, temperature=0)[0].tolist())
    assert plain != expected, "the soft prompt changes the continuation"


def test_the_soft_prompts_virtual_tokens_count_against_the_context(small, soft_prompt, capsys):
    _, path = small
    main(["--weights", str(path), "--device", "cpu", "--temperature", "0", "--prompt-dir", str(soft_prompt[1])])
    assert capsys.readouterr().err == ("note: --max-new-tokens 100 capped at 53: the model's context is 64 tokens, 1 of "
                                       "them the prompt's and 10 the soft prompt's\n")
    with pytest.raises(SystemExit):
        main(["--weights", str(path), "--device", "cpu", "--prompt", " word" * 54, "--prompt-dir", str(soft_prompt[1])])
    assert capsys.readouterr().err == ("error: --prompt is 54 tokens, after 10 virtual tokens (--prompt-dir): the model's "
                                       "context of 64 leaves no room to generate\n")


@pytest.mark.parametrize("make,message", [
    (lambda d: None, "adapter_config.json: no such file"),
    (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LORA"}'), "adapter_config.json: peft_type is 'LORA'"),
    (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "token_dim": 768}'),
     "adapter_config.json: token_dim is 768 but the model is 64 wide"),
])
def test_a_bad_prompt_dir_is_one_line_naming_the_file(small, tmp_path, capsys, make, message):
    make(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["--weights", str(small[1]), "--device", "cpu", "--prompt-dir", str(tmp_path)])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and f"{tmp_path}/{message}" in captured.err, captured.err
