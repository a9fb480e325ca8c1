"""Fine-tuning part of a model: --train-layers, --trainable and LoRA (checked against PEFT), and the loss curves."""
import sys

import pytest
import torch
from safetensors.torch import load_file

import fastlm.finetune as finetune
import fastlm.training as training
import fastlm.progress
from fastlm import GPT, GPTConfig
from fastlm.trainable import choose_trainable
from tests.fastlm.helpers import config, read_metrics, signalled_after

transformers = pytest.importorskip("transformers", reason="transformers is the GPT-2 reference (pip install -e '.[test]')")
SHORT = dict(max_steps=4, eval_every=2, save_every=2, log_every=2, sample_tokens=0)




def trained_and_frozen(checkpoint, out, prefixes):
    """Which parameters changed in training; asserts every one outside `prefixes` is bit-identical to the start."""
    before = GPT.from_pretrained(checkpoint).state_dict()
    after = GPT.from_pretrained(out).state_dict()
    changed = set()
    for key, value in before.items():
        if key.startswith(prefixes):
            changed |= {key} if not torch.equal(value, after[key]) else set()
        else:
            assert torch.equal(value, after[key]), f"{key} is frozen but changed"
    return changed


def optimizer_state_sizes(out) -> list[int]:
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["optimizer"]["state"]
    return sorted(s["exp_avg"].numel() for s in state.values())


@pytest.mark.parametrize("options,prefixes", [
    (dict(train_layers=1), ("transformer.h.1.", "transformer.ln_f.")),
    (dict(trainable="h.0.attn.,ln_f"), ("transformer.h.0.attn.", "transformer.ln_f.")),
    (dict(train_layers=1, trainable="wpe"), ("transformer.h.1.", "transformer.ln_f.", "transformer.wpe.")),
])
def test_only_the_chosen_parameters_train(checkpoint, corpus, tmp_path, capsys, options, prefixes):
    summary = finetune.run(config(checkpoint, corpus, tmp_path, **SHORT, **options))
    out = tmp_path / "out"
    model = GPT.from_pretrained(checkpoint)
    chosen = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    assert trained_and_frozen(checkpoint, out, prefixes) == set(chosen), "every chosen parameter trains"
    assert summary["trainable_parameters"] == sum(v.numel() for v in chosen.values())
    assert optimizer_state_sizes(out) == sorted(v.numel() for v in chosen.values()), "no optimizer state for frozen ones"
    assert f"{summary['trainable_parameters']:,} of {model.num_parameters():,} parameters" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["lm_head", "transformer.wte"])
def test_the_tied_head_can_be_chosen_by_either_name(checkpoint, corpus, tmp_path, name):
    finetune.run(config(checkpoint, corpus, tmp_path, trainable=name, **SHORT))
    changed = trained_and_frozen(checkpoint, tmp_path / "out", ("transformer.wte.", "lm_head."))
    assert changed == {"transformer.wte.weight", "lm_head.weight"}  # one tensor under two names


def test_lora_merged_model_and_peft_adapters(checkpoint, corpus, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is the adapter-format reference (pip install -e '.[test]')")
    rank, alpha = 4, 8.0
    summary = finetune.run(config(checkpoint, corpus, tmp_path, lora_rank=rank, lora_alpha=alpha,
                                  lora_targets="c_attn,c_fc", lr=1e-2, **SHORT))
    out = tmp_path / "out"
    assert not (out / "adapter_config.json").exists(), "transformers would apply the adapters to the merged model again"
    adapters = load_file(out / "adapter" / "adapter_model.safetensors")
    base, merged = GPT.from_pretrained(checkpoint).state_dict(), GPT.from_pretrained(out).state_dict()
    targets = [k for k in base if k.endswith(("attn.c_attn.weight", "mlp.c_fc.weight"))]
    assert summary["trainable_parameters"] == sum(v.numel() for v in adapters.values())
    for key in base:
        if key not in targets:
            assert torch.equal(base[key], merged[key]), f"{key} is not a LoRA target but changed"
            continue
        prefix = "base_model.model." + key.removesuffix(".weight")
        A, B = adapters[prefix + ".lora_A.weight"], adapters[prefix + ".lora_B.weight"]
        assert A.shape == (rank, base[key].shape[1]) and B.shape == (base[key].shape[0], rank)
        assert B.abs().max() > 0, f"{prefix}: the adapter did not train"
        torch.testing.assert_close(merged[key], base[key] + alpha / rank * B @ A, atol=1e-6, rtol=1e-5)

    idx = torch.randint(0, 50257, (2, 24))
    assert (out / "adapter" / "adapter_config.json").is_file()
    reference = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(checkpoint), out / "adapter").eval()
    ours = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(idx).logits, reference(idx).logits, atol=1e-4, rtol=1e-4)


def test_lora_resume_equals_uninterrupted(checkpoint, corpus, tmp_path, monkeypatch):
    lora = dict(lora_rank=2, lora_targets="c_attn", lr=1e-2, **SHORT)
    finetune.run(config(checkpoint, corpus, tmp_path / "a", **lora))
    with signalled_after(2, monkeypatch), pytest.raises(training.Stopped):
        finetune.run(config(checkpoint, corpus, tmp_path / "b", **lora))
    with pytest.raises(ValueError, match="--lora-rank is 3 but the checkpoint was trained with 2"):
        finetune.run(config(checkpoint, corpus, tmp_path / "b", resume=True, **{**lora, "lora_rank": 3}))
    finetune.run(config(checkpoint, corpus, tmp_path / "b", resume=True, **lora))
    assert [m["loss"] for m in read_metrics(tmp_path / "b" / "out")] == [m["loss"] for m in read_metrics(tmp_path / "a" / "out")]
    a, b = (load_file(tmp_path / run / "out" / "adapter" / "adapter_model.safetensors") for run in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loss_png_is_written_at_each_evaluation(checkpoint, corpus, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="loss.png needs the optional extra fastlm[plot] (matplotlib)")
    written = []
    real = fastlm.progress.write_loss_plot
    monkeypatch.setattr(fastlm.progress, "write_loss_plot", lambda metrics, path: written.append(len(metrics)) or real(metrics, path))
    finetune.run(config(checkpoint, corpus, tmp_path, **SHORT))
    assert written == [2, 4], "rewritten at each evaluation"
    assert (tmp_path / "out" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_run_says_how_to_get_the_plot(checkpoint, corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    finetune.run(config(checkpoint, corpus, tmp_path, **SHORT))
    assert not (tmp_path / "out" / "loss.png").exists()
    assert capsys.readouterr().out.count("pip install 'fastlm[plot]'") == 1


def test_overwrite_removes_the_earlier_runs_adapters(checkpoint, corpus, tmp_path):
    finetune.run(config(checkpoint, corpus, tmp_path, lora_rank=2, **SHORT))
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match="already holds checkpoint.pt"):
        finetune.run(config(checkpoint, corpus, tmp_path, **SHORT))
    finetune.run(config(checkpoint, corpus, tmp_path, overwrite=True, **SHORT))
    assert not any((tmp_path / "out" / "adapter").iterdir()), "adapters of the earlier run would not match this model"


def test_frozen_blocks_before_the_trained_ones_keep_no_activations():
    """What makes peak memory fall: autograd saves nothing for the frozen blocks before the first trained one."""
    idx = torch.randint(0, 101, (2, 64))

    def saved_bytes(cfg) -> int:
        # a small vocabulary, so the blocks' activations dominate the head's
        model = GPT(GPTConfig(n_layer=4, n_head=2, n_embd=64, vocab_size=101, block_size=64), backend="torch")
        choose_trainable(model, cfg)
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(idx, idx)
        return total

    every, last_block = saved_bytes(finetune.FinetuneConfig()), saved_bytes(finetune.FinetuneConfig(train_layers=1))
    first_block = saved_bytes(finetune.FinetuneConfig(trainable="h.0."))
    assert first_block > 0.6 * every, "a trained first block needs every later block's activations"
    assert last_block < 0.4 * every, "a quarter of the blocks (plus the head) keep activations"


# ---- prompt tuning: the model frozen, only the soft prompt trains --------------------------------------------------
def prompt_choice(**flags):
    """The fine-tuning flags with prompt tuning's (FinetuneConfig may not have those fields yet: a namespace)."""
    import types

    return types.SimpleNamespace(**{**vars(finetune.FinetuneConfig()), "prompt_tokens": 0, "prompt_init_text": None, **flags})


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=50257, block_size=64), backend="torch")


def test_prompt_tuning_trains_the_prompt_alone_and_the_optimizer_holds_only_it():
    model = tiny_gpt()
    what = choose_trainable(model, prompt_choice(prompt_tokens=6, prompt_init_text="Review:"))
    assert what == "a soft prompt of 6 virtual tokens x 32 (initialised from the embeddings of 'Review:'; every model weight frozen)"
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["soft_prompt.weight"]
    assert model.num_parameters(trainable_only=True) == 6 * 32
    assert model.soft_prompt.init_text == "Review:"
    optimizer = training.make_optimizer(model, finetune.FinetuneConfig(), torch.device("cpu"))
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(held) == 1 and held[0] is model.soft_prompt.weight
    decay = [group["weight_decay"] for group in optimizer.param_groups if group["params"]]
    assert finetune.FinetuneConfig().weight_decay > 0 and decay == [0.0], "the prompt is not weight-decayed"


@pytest.mark.parametrize("flags,message", [
    (dict(prompt_tokens=4, lora_rank=2), "--prompt-tokens trains a soft prompt on a frozen model: it cannot be combined with --lora-rank"),
    (dict(prompt_tokens=4, train_layers=1), "it cannot be combined with --train-layers"),
    (dict(prompt_tokens=4, trainable="ln_f"), "it cannot be combined with --trainable"),
    (dict(prompt_init_text="Review:"), "--prompt-init-text starts a soft prompt: it needs --prompt-tokens N"),
    (dict(prompt_tokens=-2), "--prompt-tokens must be a positive integer, got -2"),
])
def test_prompt_tuning_flags_that_do_not_go_together(flags, message):
    with pytest.raises(ValueError) as info:
        choose_trainable(tiny_gpt(), prompt_choice(**flags))
    assert str(info.value) == message or (message in str(info.value) and "\n" not in str(info.value))


def test_a_resumed_run_gets_its_trained_prompt_back_from_the_state_dict():
    """What --resume does: a fresh model, choose_trainable (which makes the prompt anew), then the checkpoint's state."""
    trained = tiny_gpt()
    choose_trainable(trained, prompt_choice(prompt_tokens=4))
    with torch.no_grad():
        trained.soft_prompt.weight.add_(1.0)  # as training would move it
    state = trained.state_dict()
    resumed = tiny_gpt()
    torch.manual_seed(5)  # another random start: the state must replace it
    choose_trainable(resumed, prompt_choice(prompt_tokens=4))
    resumed.load_state_dict(state)
    assert torch.equal(resumed.soft_prompt.weight, trained.soft_prompt.weight)
    assert [name for name, p in resumed.named_parameters() if p.requires_grad] == ["soft_prompt.weight"]
    idx = torch.randint(0, 50257, (1, 9))
    torch.testing.assert_close(resumed(idx), trained(idx), atol=0, rtol=0)


def test_prompt_tuning_keeps_every_blocks_activations():
    """The gradient reaches the input, through every frozen block, so each block keeps what its input's gradient
    needs (as LoRA on every block does), only not the inputs of its frozen matmuls, which only weight gradients
    read: between the last block alone and full fine-tuning, near the latter."""
    idx = torch.randint(0, 101, (2, 60))

    def saved_bytes(choice) -> int:
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=4, n_head=2, n_embd=64, vocab_size=101, block_size=64), backend="torch")
        choose_trainable(model, choice)
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(idx, idx)
        return total

    every, prompt = saved_bytes(prompt_choice()), saved_bytes(prompt_choice(prompt_tokens=4))
    last_block = saved_bytes(prompt_choice(train_layers=1))
    assert last_block < 0.4 * every and 0.6 * every < prompt < every, (last_block, prompt, every)


# ---- prompt tuning through python -m fastlm.finetune ------------------------------------------------------------
def needs_prompt_flags():
    if "prompt_tokens" not in finetune.FinetuneConfig.__dataclass_fields__:
        pytest.skip("fine-tuning has no --prompt-tokens yet (issue #26: its wiring into finetune_config/training)")


PROMPT = dict(prompt_tokens=4, prompt_init_text="The cat", lr=3e-2, **SHORT)


def trained_prompt(out):
    return load_file(out / "prompt" / "adapter_model.safetensors")["prompt_embeddings"]


def test_a_prompt_tuning_run_saves_the_prompt_for_peft_and_leaves_the_base(checkpoint, corpus, tmp_path, capsys):
    needs_prompt_flags()
    peft = pytest.importorskip("peft", reason="peft is the prompt-tuning reference (pip install -e '.[test]')")
    from fastlm.prompt_tuning import initial_embeddings, load_prompt

    summary = finetune.run(config(checkpoint, corpus, tmp_path, seq_len=None, **PROMPT))
    out = tmp_path / "out"
    printed = capsys.readouterr().out
    base = GPT.from_pretrained(checkpoint)
    assert summary["trainable_parameters"] == 4 * 32
    assert (f"training a soft prompt of 4 virtual tokens x 32 (initialised from the embeddings of 'The cat'; every model "
            f"weight frozen): 128 of {base.num_parameters() + 128:,} parameters") in printed
    assert f"and the soft prompt of 4 virtual tokens in {out}/prompt (PEFT's layout)" in printed
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert saved["finetune_config"]["seq_len"] == 60, "the default window leaves the prompt its 4 positions of 64"
    assert "soft_prompt.weight" in saved["model"] and len(optimizer_state_sizes(out)) == 1
    after = GPT.from_pretrained(out).state_dict()
    assert all(torch.equal(value, after[key]) for key, value in base.state_dict().items()), "model.safetensors is the base"
    prompt = trained_prompt(out)
    assert not torch.equal(prompt, initial_embeddings(base, 4, "The cat")), "the prompt trained"
    theirs = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(checkpoint), out / "prompt").eval()
    load_prompt(base, out / "prompt")
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(base(idx), theirs(input_ids=idx).logits[:, 4:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"--seq-len 64 \+ 4 virtual tokens \(the soft prompt\) exceed the model's context "
                                         r"of 64 tokens: use --seq-len 60 or less"):
        finetune.run(config(checkpoint, corpus, tmp_path / "long", seq_len=64, **PROMPT))


def test_a_prompt_tuning_run_resumes_as_if_uninterrupted(checkpoint, corpus, tmp_path, monkeypatch):
    needs_prompt_flags()
    finetune.run(config(checkpoint, corpus, tmp_path / "a", **PROMPT))
    with signalled_after(2, monkeypatch), pytest.raises(training.Stopped):
        finetune.run(config(checkpoint, corpus, tmp_path / "b", **PROMPT))
    with pytest.raises(ValueError, match="--prompt-tokens is 5 but the checkpoint was trained with 4"):
        finetune.run(config(checkpoint, corpus, tmp_path / "b", resume=True, **{**PROMPT, "prompt_tokens": 5}))
    finetune.run(config(checkpoint, corpus, tmp_path / "b", resume=True, **PROMPT))
    assert [m["loss"] for m in read_metrics(tmp_path / "b" / "out")] == [m["loss"] for m in read_metrics(tmp_path / "a" / "out")]
    assert torch.equal(trained_prompt(tmp_path / "a" / "out"), trained_prompt(tmp_path / "b" / "out"))


def _finetune(rank, cfg, out):
    finetune.run(cfg)


def test_prompt_tuning_on_two_ranks_equals_one_process(checkpoint, corpus, tmp_path):
    """Under torchrun (DDP: only the prompt's gradient is all-reduced), 2 ranks x batch 2 are 1 process x batch 4."""
    needs_prompt_flags()
    from tests.fastlm.helpers import spawn

    steps = {**PROMPT, "max_steps": 2, "log_every": 1}
    finetune.run(config(checkpoint, corpus, tmp_path / "one", batch_size=4, **steps))
    spawn(_finetune, config(checkpoint, corpus, tmp_path / "two", batch_size=2, **steps), tmp_path)
    one, two = read_metrics(tmp_path / "one" / "out"), read_metrics(tmp_path / "two" / "out")
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in one], rel=1e-5)
    torch.testing.assert_close(trained_prompt(tmp_path / "two" / "out"), trained_prompt(tmp_path / "one" / "out"),
                               atol=1e-5, rtol=1e-4)


def test_a_prompt_that_fills_the_context_is_refused_before_the_start_line(checkpoint, corpus, tmp_path, capsys):
    """The tiny checkpoint's context is 64: 100 virtual tokens are refused with one line before any size is derived
    from what they leave (no negative --seq-len printed)."""
    from tests.fastlm.helpers import config

    with pytest.raises(ValueError, match="--prompt-tokens 100 leaves no room for text in the model's context of 64"):
        finetune.run(config(checkpoint, corpus, tmp_path, prompt_tokens=100, seq_len=None, batch_size=None))
    assert "-36" not in capsys.readouterr().out
