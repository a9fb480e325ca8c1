"""GPT-2's dropout: the three probabilities read from config.json and written back (against transformers'
GPT2Config), none in eval mode and nothing drawn at p = 0, attention dropout inside the attention op, masks that
differ from step to step and from rank to rank (2 gloo processes), the generators a checkpoint keeps per rank, and
the --dropout flag. A resumed run drawing the uninterrupted run's masks is test_finetune's resume test."""
import dataclasses
import hashlib
import json

import pytest
import torch

import fastlm.checkpoint as ckpt
import fastlm.finetune as finetune
import kernels
from fastlm import GPT, GPTConfig
from fastlm.distributed import World
from fastlm.weights import WeightsError
from tests.conftest import DEVICE
from tests.fastlm.helpers import config, spawn

transformers = pytest.importorskip("transformers", reason="transformers' GPT2Config is the reference (pip install -e '.[test]')")

BACKENDS = ["torch", "triton"]  # triton runs under the interpreter on CPU
CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=101, block_size=32)
ALL = dict(embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)


def tiny(backend: str, **pdrops) -> GPT:
    torch.manual_seed(0)  # the same weights whatever the dropout: it draws nothing at init
    return GPT(CONFIG.replace(**pdrops), backend=backend).to(DEVICE)


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, 101, (2, 19), generator=torch.Generator().manual_seed(3)).to(DEVICE)


# -----------------------------------------------------------------------------
def test_config_json_round_trip_with_transformers(tmp_path):
    hf = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=101, n_positions=16, embd_pdrop=0.05,
                                 attn_pdrop=0.15, resid_pdrop=0.25)
    transformers.GPT2LMHeadModel(hf).save_pretrained(tmp_path / "hf")
    model = GPT.from_pretrained(tmp_path / "hf")
    assert model.config.dropouts == {"embd_pdrop": 0.05, "attn_pdrop": 0.15, "resid_pdrop": 0.25}
    assert not model.training, "loaded in eval mode, as transformers' from_pretrained"
    assert model.transformer.drop.p == 0.05
    assert all((b.attn.attn_pdrop, b.attn.resid_dropout.p, b.mlp.dropout.p) == (0.15, 0.25, 0.25) for b in model.transformer.h)

    model.set_dropout(0.3, 0.2, 0.1)
    model.save_pretrained(tmp_path / "ours")
    back = transformers.GPT2Config.from_pretrained(tmp_path / "ours")
    assert (back.embd_pdrop, back.attn_pdrop, back.resid_pdrop) == (0.3, 0.2, 0.1)
    assert GPT.from_pretrained(tmp_path / "ours").config.dropouts == {"embd_pdrop": 0.3, "attn_pdrop": 0.2, "resid_pdrop": 0.1}

    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
        written.pop(key)  # absent: GPT-2's value, transformers' default
    assert GPTConfig.from_hf(written).dropouts == {k: getattr(transformers.GPT2Config(), k) for k in ALL} == ALL
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**written, "attn_pdrop": 1.5}))
    with pytest.raises(WeightsError, match=r"config.json: attn_pdrop must be in \[0, 1\), got 1.5"):
        GPT.from_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**written, "resid_pdrop": "0.1"}))
    with pytest.raises(WeightsError, match="config.json: resid_pdrop must be a number, got '0.1'"):
        GPT.from_pretrained(tmp_path / "hf")


def test_an_older_checkpoints_single_dropout_is_read():
    old = dataclasses.asdict(CONFIG)
    for key in ALL:
        old.pop(key)
    old["dropout"] = 0.2  # GPTConfig had one, for embeddings and residuals
    assert GPTConfig.from_dict(old).dropouts == {"embd_pdrop": 0.2, "attn_pdrop": 0.0, "resid_pdrop": 0.2}


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_dropout_in_eval_mode(backend, idx):
    plain, dropped = tiny(backend), tiny(backend, **ALL)
    with torch.no_grad():
        want = plain.eval()(idx)
        assert torch.equal(dropped.eval()(idx), want), "eval mode: exactly the dropout-free model"
        assert not torch.allclose(dropped.train()(idx), want, atol=1e-3), "training mode drops"


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_zero_draws_nothing(backend, idx):
    """p = 0 in training mode: the generators do not move and the loss is the eval loss, bit for bit."""
    model = tiny(backend).train()
    states = (torch.get_rng_state(), torch.cuda.get_rng_state() if DEVICE.type == "cuda" else None)
    loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert torch.equal(torch.get_rng_state(), states[0])
    if DEVICE.type == "cuda":
        assert torch.equal(torch.cuda.get_rng_state(), states[1])
    with torch.no_grad():
        assert torch.equal(model.eval()(idx[:, :-1], idx[:, 1:]), loss.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_dropout_runs_inside_the_attention_op(backend, idx, monkeypatch):
    """attn_pdrop goes to kernels.attention (triton: the kernel's Philox dropout) or SDPA's dropout_p (torch), in
    training mode only; with attention the only dropout, training-mode outputs differ from call to call and repeat
    under the same seed."""
    name = "attention" if backend == "triton" else "attention_ref"
    real, seen = getattr(kernels, name), []

    def spy(*args, **kwargs):
        seen.append(kwargs["dropout_p"])
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, name, spy)
    model = tiny(backend, attn_pdrop=0.25)
    with torch.no_grad():
        want = model.eval()(idx)
        model.train()
        torch.manual_seed(1)
        first, second = model(idx), model(idx)
        torch.manual_seed(1)
        again = model(idx)
    assert seen == [0.0] * CONFIG.n_layer + [0.25] * 3 * CONFIG.n_layer
    assert not torch.allclose(first, want, atol=1e-3) and not torch.allclose(first, second, atol=1e-3)
    assert torch.equal(first, again), "the same seed, the same masks"


def test_torch_backend_drops_where_transformers_does(tmp_path):
    """Training mode at 0.1: with the same seed, the torch backend draws the very masks GPT2LMHeadModel (SDPA
    attention) draws, in the same places and order, so the loss and every gradient agree (CPU generator)."""
    hf_config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=101, n_positions=32,
                                        attn_implementation="sdpa", **ALL)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_config)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path, backend="torch").train()
    hf.train()
    idx = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(9)
    ref = torch.nn.functional.cross_entropy(hf(idx[:, :-1]).logits.flatten(0, 1), idx[:, 1:].flatten())
    ref.backward()
    torch.manual_seed(9)
    loss = ours(idx[:, :-1], idx[:, 1:])
    loss.backward()
    with torch.no_grad():
        assert abs(ours.eval()(idx[:, :-1], idx[:, 1:]) - loss) > 1e-3, "the masks make a difference"
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    hf_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        ref_grad = hf_grads[name].grad
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            ref_grad = ref_grad.t()  # Conv1D stores (in, out)
        torch.testing.assert_close(p.grad, ref_grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


# -----------------------------------------------------------------------------
def _record_masks(rank: int, cfg, out) -> None:
    """Fine-tune, recording a fingerprint of every dropout mask drawn in training mode (nn.Dropout's)."""
    import torch.nn.functional as F

    real, fingerprints = F.dropout, []

    def dropout(input, p=0.5, training=True, inplace=False):
        result = real(input, p, training, inplace)
        if training and p > 0:
            fingerprints.append(hashlib.sha256((result == 0).numpy().tobytes()).hexdigest())
        return result

    F.dropout = dropout
    finetune.run(cfg)
    (out / f"masks{rank}.json").write_text(json.dumps(fingerprints))


def test_every_rank_and_every_step_draws_its_own_masks(checkpoint, corpus, tmp_path):
    cfg = config(checkpoint, corpus, tmp_path, batch_size=2, dropout=0.1, max_steps=2, eval_every=2, save_every=2,
                 log_every=1, sample_tokens=0)
    spawn(_record_masks, cfg, tmp_path)
    ranks = [json.loads((tmp_path / f"masks{r}.json").read_text()) for r in (0, 1)]
    per_step = 1 + 2 * 2  # the embeddings' and each block's two residual branches (2 blocks)
    assert [len(r) for r in ranks] == [2 * per_step] * 2, "training steps only; validation draws none"
    assert all(a != b for a, b in zip(*ranks)), "each mask differs between the two ranks"
    assert all(r[i] != r[i + per_step] for r in ranks for i in range(per_step)), "and from one step to the next"
    saved = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)["rng"]["ranks"]
    assert len(saved) == 2 and not torch.equal(saved[0]["torch"], saved[1]["torch"]), "each rank's generator is kept"


def test_each_rank_resumes_its_own_generator():
    states = [torch.manual_seed(seed).get_state() for seed in (10, 11)]
    saved = {"data": torch.Generator().get_state(), "torch": states[0], "cuda": None,
             "ranks": [{"torch": s, "cuda": None} for s in states]}
    device = torch.device("cpu")
    assert ckpt.restore_rng_states(saved, torch.Generator(), device, World(1, 1, 2), seed=5, step=3)
    assert torch.equal(torch.get_rng_state(), states[1])
    assert not ckpt.restore_rng_states(saved, torch.Generator(), device, World(2, 2, 4), seed=5, step=3)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(ckpt.rank_seed(5, 2, 3)).get_state()), \
        "another number of processes: seeded afresh for the rank and step"
    assert len({ckpt.rank_seed(5, r, s) for r in range(3) for s in range(3)} | {5}) == 10


# -----------------------------------------------------------------------------
def test_the_start_line_says_which_dropout(checkpoint, corpus, tmp_path, capsys):
    short = dict(max_steps=1, eval_every=1, save_every=1, sample_tokens=0)
    finetune.run(config(checkpoint, corpus, tmp_path / "a", dropout=None, **short))
    assert ("dropout: 0.1 on the embeddings, attention probabilities and residuals (the checkpoint's config.json; "
            "--dropout P to change)") in capsys.readouterr().out
    assert json.loads((tmp_path / "a" / "out" / "config.json").read_text())["attn_pdrop"] == 0.1
    finetune.run(config(checkpoint, corpus, tmp_path / "b", dropout=0.0, **short))
    assert "dropout: none (--dropout)" in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "out" / "config.json").read_text())["attn_pdrop"] == 0.0, "what it trained with"
    with pytest.raises(ValueError, match=r"--resume: --dropout is 0.2 but the checkpoint was trained with none; "
                                         r"resume with the same value, or leave --dropout out"):
        finetune.run(config(checkpoint, corpus, tmp_path / "b", dropout=0.2, resume=True, **{**short, "max_steps": 2}))


@pytest.mark.parametrize("value,message", [
    ("1.5", "--dropout must be in [0, 1), got 1.5"),
    ("-0.1", "--dropout must be in [0, 1), got -0.1"),
    ("nan", "--dropout must be in [0, 1), got nan"),
    ("lots", "--dropout: invalid float value: 'lots'"),
])
def test_bad_dropout_is_one_line(checkpoint, corpus, tmp_path, capsys, value, message):
    with pytest.raises(SystemExit) as info:
        finetune.main(["--weights", str(checkpoint), "--data", str(corpus), "--out", str(tmp_path / "out"),
                       "--device", "cpu", "--dropout", value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()
