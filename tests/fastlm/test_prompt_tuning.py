"""Prompt tuning against Hugging Face PEFT: PEFT applies fastlm's saved prompt with the same logits and greedy
continuation, fastlm loads a prompt PEFT trained, text initialisation is PEFT's TEXT init, a few training steps move
the prompt exactly as PEFT's model would (same loss and gradient) and nothing else; both backends, torch.compile,
the context check, and every bad file."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastlm.prompt_tuning as prompt_tuning
from fastlm import GPT
from fastlm.files import temporaries
from fastlm.prompt_tuning import (add_soft_prompt, check_window, detached, initial_embeddings, load_prompt,
                                  save_prompt, setup, text_room)
from tests.conftest import DEVICE

transformers = pytest.importorskip("transformers", reason="transformers is the GPT-2 reference (pip install -e '.[test]')")
peft = pytest.importorskip("peft", reason="peft is the prompt-tuning reference (pip install -e '.[test]')")

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:Position ids are not supported:UserWarning")]  # PEFT

N = 5
FILES = ["adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(1))


def load(path, backend="torch", **kwargs):
    return GPT.from_pretrained(path, backend=backend, device=DEVICE, **kwargs).eval()


def prompted(path, backend="torch", n=N, seed=0):
    model = load(path, backend)
    torch.manual_seed(seed)  # the same random prompt for every model built with this seed
    add_soft_prompt(model, n)
    return model


def peft_model(path, prompt_dir, **kwargs):
    return peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(path, **kwargs), prompt_dir).eval()


def token_logits(model, idx, n=N):
    """Logits of idx's tokens: fastlm returns only those; PEFT's model also returns the n virtual positions'."""
    with torch.no_grad():
        if isinstance(model, GPT):
            return model(idx.to(DEVICE)).cpu()
        return model(input_ids=idx).logits[:, n:]


def gpt2_tokenizer_dir(path):
    """transformers' GPT-2 tokenizer built from fastlm's bundled vocabulary (nothing downloaded), saved in path."""
    import gzip

    from fastlm.tokenizer import ASSETS

    with gzip.open(ASSETS / "encoder.json.gz", "rt", encoding="utf-8") as f:
        vocab = json.load(f)
    with gzip.open(ASSETS / "vocab.bpe.gz", "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().splitlines() if line and not line.startswith("#")]
    transformers.GPT2Tokenizer(vocab=vocab, merges=merges).save_pretrained(path)
    return path


# ---- PEFT's files, both ways ------------------------------------------------------------------------------------
def test_peft_applies_our_prompt_with_the_same_logits(hf_dir, tokens, tmp_path):
    model = prompted(hf_dir)
    save_prompt(model, tmp_path, base_model_name_or_path=str(hf_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == FILES
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
                                   "prompt_tuning_init", "base_model_name_or_path")} == \
        dict(peft_type="PROMPT_TUNING", task_type="CAUSAL_LM", num_virtual_tokens=N, token_dim=64,
             num_transformer_submodules=1, prompt_tuning_init="RANDOM", base_model_name_or_path=str(hf_dir))
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved.keys() == {"prompt_embeddings"} and saved["prompt_embeddings"].dtype == torch.float32
    theirs = peft_model(hf_dir, tmp_path)
    assert torch.equal(theirs.get_prompt(1)[0].detach(), model.soft_prompt.weight.detach().cpu())
    ours, ref = token_logits(model, tokens), token_logits(theirs, tokens)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    plain = token_logits(load(hf_dir), tokens)
    assert (ours - plain).abs().max() > 1e-2, "the prompt changes the logits, so the comparison means something"


def test_a_prompt_peft_trained_loads_and_saves_again_unchanged(hf_dir, tokens, tmp_path):
    base = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    theirs = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=0.1)
    before = theirs.get_prompt(1).detach().clone()
    theirs(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    assert not torch.equal(theirs.get_prompt(1).detach(), before), "PEFT's step trained the prompt"
    theirs.eval().save_pretrained(tmp_path / "peft")
    model = load(hf_dir)
    load_prompt(model, tmp_path / "peft")
    assert model.soft_prompt.num_tokens == 4 and not model.soft_prompt.weight.requires_grad
    torch.testing.assert_close(token_logits(model, tokens, 4), token_logits(theirs, tokens, 4), atol=1e-5, rtol=1e-5)
    save_prompt(model, tmp_path / "ours")
    original, resaved = (load_file(tmp_path / d / "adapter_model.safetensors")["prompt_embeddings"] for d in ("peft", "ours"))
    assert torch.equal(original, resaved)
    peft_keys, our_keys = (set(json.loads((tmp_path / d / "adapter_config.json").read_text())) for d in ("peft", "ours"))
    assert our_keys == peft_keys - {"peft_version"}, "every field PEFT writes (its version aside)"


def test_greedy_generation_with_the_prompt_is_peft_models(hf_dir, tmp_path):
    """The reference is PEFT's forward, one whole sequence per new token: PEFT 0.21's generate() looks for the cache
    under `past_key_values`, which transformers 5 renamed (`cache`), and so puts the prompt in again at every step."""
    model = prompted(hf_dir, seed=3)
    save_prompt(model, tmp_path)
    theirs = peft_model(hf_dir, tmp_path)
    idx = torch.randint(0, 101, (2, 6), generator=torch.Generator().manual_seed(2))
    ref = idx
    with torch.no_grad():
        for _ in range(12):
            ref = torch.cat([ref, theirs(input_ids=ref).logits[:, -1:].argmax(-1)], dim=1)
    ours = model.generate(idx.to(DEVICE), 12, temperature=0).cpu()
    assert torch.equal(ours, ref)  # through the KV cache: the new tokens' positions continue after N + T
    assert not torch.equal(ours, load(hf_dir).generate(idx.to(DEVICE), 12, temperature=0).cpu()), "the prompt matters"


@pytest.mark.parametrize("n", [3, 13])  # fewer virtual tokens than the text has (cut), and more (repeated)
def test_text_initialisation_is_peft_text_init(checkpoint, tmp_path, n):
    text = "Classify the review as great or terrible:"
    tokenizer_dir = gpt2_tokenizer_dir(tmp_path / "tokenizer")
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init="TEXT",
                                     prompt_tuning_init_text=text, tokenizer_name_or_path=str(tokenizer_dir))
    theirs = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(checkpoint), config)
    model = load(checkpoint)
    prompt = add_soft_prompt(model, n, text)
    assert torch.equal(prompt.weight.detach().cpu(), theirs.get_prompt(1)[0].detach())
    save_prompt(model, tmp_path / "prompt")
    saved = json.loads((tmp_path / "prompt" / "adapter_config.json").read_text())
    assert (saved["prompt_tuning_init"], saved["prompt_tuning_init_text"]) == ("TEXT", text)
    reloaded = peft_model(checkpoint, tmp_path / "prompt")  # inference mode: PEFT reads the tensor, not the tokenizer
    assert torch.equal(reloaded.get_prompt(1)[0].detach(), prompt.weight.detach().cpu())


def test_random_initialisation_is_at_the_scale_of_the_token_embeddings(hf_dir):
    model = load(hf_dir)
    torch.manual_seed(0)
    start = initial_embeddings(model, 400)
    scale = model.transformer.wte.weight.std().item()
    assert start.shape == (400, 64) and abs(start.std().item() / scale - 1) < 0.05


# ---- training ---------------------------------------------------------------------------------------------------
def test_training_moves_only_the_prompt_as_peft_would(hf_dir, tokens):
    """setup() freezes the model; three AdamW steps on the prompt alone. Each step's loss and prompt gradient equal
    PEFT's model's with the same prompt, its loss counting real tokens only (labels -100 on the first token, so
    both predict tokens 1.. from the tokens before them and the prompt)."""
    model = load(hf_dir)  # eval mode: no dropout (the checkpoint has some), so the two models compute the same
    torch.manual_seed(0)
    what = setup(model, N)
    assert what == "a soft prompt of 5 virtual tokens x 64 (initialised at random; every model weight frozen)"
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert [name for name, _ in trainable] == ["soft_prompt.weight"]
    assert model.num_parameters(trainable_only=True) == N * 64
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    theirs = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(hf_dir), config).eval()
    their_prompt = [p for p in theirs.parameters() if p.requires_grad]
    assert len(their_prompt) == 1 and their_prompt[0].shape == (N, 64)
    with torch.no_grad():
        their_prompt[0].copy_(model.soft_prompt.weight)
    ours_opt = torch.optim.AdamW([model.soft_prompt.weight], lr=1e-2, weight_decay=0.0)
    their_opt = torch.optim.AdamW(their_prompt, lr=1e-2, weight_decay=0.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    idx = tokens.to(DEVICE)
    labels = tokens.clone()
    labels[:, 0] = -100
    losses = []
    for _ in range(3):
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        ref = theirs(input_ids=tokens, labels=labels).loss
        ref.backward()
        torch.testing.assert_close(loss.detach().cpu(), ref.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.soft_prompt.weight.grad.cpu(), their_prompt[0].grad, atol=1e-5, rtol=1e-4)
        for optimizer in (ours_opt, their_opt):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    torch.testing.assert_close(model.soft_prompt.weight.detach().cpu(), their_prompt[0].detach(), atol=1e-5, rtol=1e-4)
    for name, p in model.named_parameters():
        if name == "soft_prompt.weight":
            assert not torch.equal(p, before[name]), "the prompt trained"
        else:
            assert torch.equal(p, before[name]) and p.grad is None, f"{name} is frozen but changed"


def test_windows_leave_room_for_the_prompt(hf_dir):
    model = load(hf_dir)  # a context of 64
    setup(model, 10)
    assert text_room(model) == 54
    check_window(model, 54)
    check_window(load(hf_dir), 64)  # no soft prompt: nothing of the context is taken
    with pytest.raises(ValueError) as info:
        check_window(model, 55)
    assert str(info.value) == ("--seq-len 55 + 10 virtual tokens (the soft prompt) exceed the model's context of 64 "
                               "tokens: use --seq-len 54 or less")
    with pytest.raises(ValueError, match=r"sequence length 55 \+ 10 virtual tokens is longer than the context of 64"):
        model(torch.zeros(1, 55, dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize("n,text,message", [
    (0, None, "--prompt-tokens must be a positive integer, got 0"),
    (64, None, "--prompt-tokens 64 leaves no room for text in the model's context of 64 tokens"),
    (4, "", "--prompt-init-text is empty"),
])
def test_bad_settings_say_which_flag(hf_dir, n, text, message):
    with pytest.raises(ValueError) as info:
        setup(load(hf_dir), n, text)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_triton_backend_applies_the_prompt_as_torch_does(hf_dir, tokens):
    idx, targets = tokens[:, :-1].to(DEVICE), tokens[:, 1:].to(DEVICE)
    results = []
    for backend in ("torch", "triton"):  # triton runs under the interpreter on a CPU
        model = prompted(hf_dir, backend)
        with torch.no_grad():
            logits = model(idx)
        loss = model(idx, targets)
        loss.backward()
        generated = model.generate(idx[:1, :6], 4, temperature=0)  # the prompt through the KV cache's prefill
        results.append((logits, loss.detach(), model.soft_prompt.weight.grad, generated))
    (logits, loss, grad, generated), (t_logits, t_loss, t_grad, t_generated) = results
    torch.testing.assert_close(t_logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t_loss, loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t_grad, grad, atol=1e-5, rtol=1e-4)
    assert torch.equal(t_generated, generated)


def test_torch_compile_fullgraph_forward_and_backward_with_the_prompt(hf_dir, tokens):
    model = prompted(hf_dir)  # eval mode: the checkpoint's dropout would draw differently compiled
    idx, targets = tokens[:, :-1].to(DEVICE), tokens[:, 1:].to(DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    loss = compiled(idx, targets)
    loss.backward()
    grad = model.soft_prompt.weight.grad.clone()
    model.zero_grad()
    ref = model(idx, targets)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, model.soft_prompt.weight.grad, atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for name, p in model.named_parameters() if name != "soft_prompt.weight")


def test_detached_gives_the_base_models_state(hf_dir, tmp_path):
    model = prompted(hf_dir)
    base_keys = set(load(hf_dir).state_dict())
    assert set(model.state_dict()) == base_keys | {"soft_prompt.weight"}, "a checkpoint holds the prompt"
    with detached(model):
        assert set(model.state_dict()) == base_keys
        model.save_pretrained(tmp_path)  # what a prompt-tuning run publishes as model.safetensors: the base
    assert model.soft_prompt is not None
    saved, original = load_file(tmp_path / "model.safetensors"), load_file(hf_dir / "model.safetensors")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)


# ---- files ------------------------------------------------------------------------------------------------------
def test_saving_over_an_earlier_prompt_and_never_over_other_files(hf_dir, tmp_path, monkeypatch):
    save_prompt(prompted(hf_dir, n=3), tmp_path / "p")
    model = prompted(hf_dir, n=N, seed=1)
    save_prompt(model, tmp_path / "p")  # replaces the earlier prompt
    fresh = load(hf_dir)
    assert torch.equal(load_prompt(fresh, tmp_path / "p").weight, model.soft_prompt.weight.detach())

    before = {p.name: p.read_bytes() for p in (tmp_path / "p").iterdir()}
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prompt_tuning, "save_file", full_disk)
    with pytest.raises(OSError, match="adapter_model.safetensors: cannot be written"):
        save_prompt(prompted(hf_dir, n=7), tmp_path / "p")
    assert {p.name: p.read_bytes() for p in (tmp_path / "p").iterdir()} == before, "a failed save leaves the files as they were"
    assert not temporaries(tmp_path / "p", FILES)
    monkeypatch.undo()

    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    (lora_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (lora_dir / "adapter_model.safetensors").write_bytes(b"someone's adapter")
    with pytest.raises(ValueError) as info:
        save_prompt(model, lora_dir)
    assert str(info.value) == (f"{lora_dir / 'adapter_config.json'}: a LORA adapter's config, not a soft prompt's: save "
                               f"the prompt in another directory")
    assert (lora_dir / "adapter_model.safetensors").read_bytes() == b"someone's adapter"


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("damage,file,message", [
    (lambda d: _edit_config(d, peft_type="LORA"), "adapter_config.json",
     "peft_type is 'LORA', not 'PROMPT_TUNING': not a soft prompt (LoRA adapters load with fastlm.lora.load_adapters)"),
    (lambda d: _edit_config(d, peft_type="PREFIX_TUNING"), "adapter_config.json", "peft_type is 'PREFIX_TUNING'"),
    (lambda d: _edit_config(d, token_dim=768), "adapter_config.json",
     "token_dim is 768 but the model is 64 wide: a prompt for another model"),
    (lambda d: _edit_config(d, task_type="SEQ_2_SEQ_LM"), "adapter_config.json", "task_type is 'SEQ_2_SEQ_LM'"),
    (lambda d: _edit_config(d, num_transformer_submodules=2), "adapter_config.json", "an encoder-decoder's prompt"),
    (lambda d: _edit_config(d, num_virtual_tokens=64), "adapter_config.json",
     "num_virtual_tokens 64 leaves no room for text in the model's context of 64 tokens"),
    (lambda d: _edit_config(d, num_virtual_tokens=6), "adapter_model.safetensors",
     "'prompt_embeddings' is (5, 64) torch.float32, expected (6, 64) floats"),
    (lambda d: (d / "adapter_config.json").write_text("{not json"), "adapter_config.json", "unreadable JSON"),
    (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json", "no such file"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors", "no such file"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x08" + bytes(20)), "adapter_model.safetensors",
     "not a readable safetensors file"),
    (lambda d: save_file({"prompt_embeddings": torch.zeros(5, 64), "extra": torch.zeros(1)}, d / "adapter_model.safetensors"),
     "adapter_model.safetensors", "unexpected key 'extra'"),
])
def test_bad_prompt_files_are_one_line_naming_the_file(hf_dir, tmp_path, damage, file, message):
    save_prompt(prompted(hf_dir), tmp_path)
    damage(tmp_path)
    with pytest.raises(ValueError) as info:
        load_prompt(load(hf_dir), tmp_path)
    text = str(info.value)
    assert text.startswith(str(tmp_path / file)) and message in text and "\n" not in text, text


def test_a_second_prompt_is_refused(hf_dir, tmp_path):
    model = prompted(hf_dir)
    save_prompt(model, tmp_path)
    with pytest.raises(ValueError, match=r"load_prompt: the model already has a soft prompt \(5 virtual tokens\)"):
        load_prompt(model, tmp_path)
    with pytest.raises(ValueError, match="add_soft_prompt: the model already has a soft prompt"):
        add_soft_prompt(model, 3)


# ---- python -m fastlm.evaluate --prompt-dir ----------------------------------------------------------------------
def test_evaluate_perplexity_with_a_soft_prompt_is_pefts(checkpoint, tmp_path, capsys):
    """Each window gets the prompt before it, as PEFT's model would: the summed loss of non-overlapping windows."""
    from fastlm.evaluate import EvaluateConfig, main

    if "prompt_dir" not in EvaluateConfig.__dataclass_fields__:
        pytest.skip("evaluate has no --prompt-dir yet (issue #26: its wiring into fastlm/evaluate.py)")
    from fastlm import get_tokenizer

    model = load(checkpoint)
    torch.manual_seed(0)
    add_soft_prompt(model, 8)
    save_prompt(model, tmp_path / "prompt")
    text = "The red cat sat on the blue mat and looked at the red dog. " * 12
    (tmp_path / "text.txt").write_text(text)
    main(["--weights", str(checkpoint), "--data", str(tmp_path / "text.txt"), "--prompt-dir", str(tmp_path / "prompt"),
          "--seq-len", "40", "--stride", "40", "--device", "cpu", "--backend", "torch", "--json"])
    result = json.loads(capsys.readouterr().out)
    ids = torch.tensor(get_tokenizer().encode(text))
    theirs = peft_model(checkpoint, tmp_path / "prompt", dtype=torch.float64)
    nll = 0.0
    with torch.no_grad():
        for begin in range(0, len(ids) - 1, 40):
            x, y = ids[begin:begin + 40], ids[begin + 1:begin + 41]
            logits = theirs(input_ids=x[:len(y)][None]).logits[0, 8:]
            nll += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
    assert result["tokens"] == len(ids) - 1 and result["nll"] == pytest.approx(nll, rel=1e-5)
    with pytest.raises(SystemExit):
        main(["--weights", str(checkpoint), "--data", str(tmp_path / "text.txt"), "--prompt-dir", str(tmp_path / "prompt"),
              "--seq-len", "60", "--device", "cpu"])
    assert "--seq-len 60 + 8 virtual tokens (the soft prompt) exceed the model's context of 64" in capsys.readouterr().err
