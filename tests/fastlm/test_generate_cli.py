"""python -m fastlm.generate: prints the continuation the model produces; bad input is one line and exit 2."""
import subprocess
import sys
from pathlib import Path

import torch

from fastlm import GPT, GPTConfig, get_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def run(*args):
    return subprocess.run([sys.executable, "-m", "fastlm.generate", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


def test_greedy_continuation_is_printed(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64), backend="torch").eval()
    model.save_pretrained(tmp_path)
    tok = get_tokenizer()
    prompt = "Hello, my name is"
    expected = tok.decode(model.generate(torch.tensor([tok.encode(prompt)]), 12, temperature=0)[0].tolist())
    proc = run("--weights", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    for args, message in [((), "--weights is required"), (("--weights", str(tmp_path / "none")), "no such file"),
                          (("--weights", str(tmp_path), "--dtype", "int8"), "--dtype must be one of"),
                          (("--weights", str(tmp_path), "--device", "foo"), "is not a device"),
                          (("--weights", str(tmp_path), "--top-k", "-1"), "--top-k must be")]:
        proc = run(*args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
