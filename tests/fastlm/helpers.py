"""Shared by the fastlm tests: small random GPT-2s from transformers (the reference), a repetitive corpus, and
the fine-tuning helpers (a short run's config, a signal in the middle of it, the metrics it wrote)."""
import contextlib
import json
import os
import signal
import socket

import torch
import torch.multiprocessing as mp
import transformers

from fastlm.finetune import FinetuneConfig

transformers.logging.set_verbosity_error()


def make_hf_model(n_layer=2, n_head=2, n_embd=64, vocab_size=101, n_positions=64, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size,
                                     n_positions=n_positions, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random biases and norm parameters too, so a transposed or dropped tensor shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    return model


TEXT = " ".join(f"The {c} cat sat on the {m} mat and looked at the {c} dog." for c, m in
                [("red", "blue"), ("green", "yellow"), ("black", "white"), ("small", "big")] * 60)


def config(checkpoint, corpus, tmp_path, **overrides):
    """A short CPU fine-tuning run of the tiny checkpoint on corpus, its --out under tmp_path. Without dropout
    (its config.json says GPT-2's 0.1): runs that split a step differently (accumulation, processes) are compared
    for equality, and their masks could not be the same; the dropout tests ask for it."""
    base = dict(weights=str(checkpoint), data=str(corpus), out=str(tmp_path / "out"), max_steps=12, batch_size=4,
                seq_len=32, lr=3e-3, warmup_steps=2, eval_every=6, save_every=6, log_every=3, device="cpu",
                backend="torch", sample_tokens=8, cache_dir=str(tmp_path / "cache"), dropout=0.0)
    return FinetuneConfig(**{**base, **overrides})


@contextlib.contextmanager
def signalled_after(steps, monkeypatch, signum=signal.SIGINT):
    """Within the block, a run gets `signum` (as from Ctrl-C or `kill`) while it draws step steps + 1's batch: the
    loop finishes that step, saves a checkpoint and raises fastlm.training.Stopped."""
    import fastlm.training as training

    calls, real_windows = {"n": 0}, training.random_windows

    def windows(*args):
        calls["n"] += 1
        if calls["n"] == steps + 1:
            signal.raise_signal(signum)
        return real_windows(*args)

    monkeypatch.setattr(training, "random_windows", windows)
    try:
        yield
    finally:
        monkeypatch.setattr(training, "random_windows", real_windows)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def spawn(worker, cfg, out, world_size: int = 2) -> None:
    """Run worker(rank, cfg, out) in world_size processes joined in a gloo group (torch.multiprocessing)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_join_and_run, args=(world_size, port, worker, cfg, out), nprocs=world_size, join=True)


def _join_and_run(rank: int, world_size: int, port: int, worker, cfg, out) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    worker(rank, cfg, out)
