"""fastlm.hf.patch on tiny random transformers models (no downloads): the patched model against the unpatched one.

Numerics follow ../STYLE.md: the patched fp32 model may be at most 2x as far from the unpatched model in fp64 as
the unpatched fp32 model is. On the CPU the kernels run in Triton's interpreter, so the models are tiny.
"""
import copy
import inspect
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers

import fastlm.hf as hf
import kernels
from tests.conftest import DEVICE, assert_close_to_ref

ARCHS = ["gpt2", "llama", "mistral", "qwen2", "qwen3"]
V = 97  # odd vocabulary


def make(arch: str, n_layer: int = 2, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny random model of `arch` with no dropout, random norm weights and biases (so a dropped one shows)."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = transformers.GPT2Config(**{**dict(n_layer=n_layer, n_head=2, n_embd=32, vocab_size=V, n_positions=64,
                                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                                   eos_token_id=0, pad_token_id=0), **overrides})
    else:
        Config = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[arch]
        config = Config(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, vocab_size=V, max_position_embeddings=64,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=arch == "qwen3",
                        **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config).to(DEVICE).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.2)
    return model


def pair(arch: str, **kwargs):
    """(unpatched, patched) copies of one tiny model."""
    ref = make(arch, **kwargs)
    return ref, hf.patch(copy.deepcopy(ref))


def batch(B=2, T=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, V, (B, T), generator=g)  # token 0 is bos, eos and pad
    labels = x.clone()
    labels[0, :3] = -100  # a prompt that is not trained on
    return x.to(DEVICE), labels.to(DEVICE)


# -----------------------------------------------------------------------------
# the call itself

def test_unsupported_architecture_names_it_and_the_supported_list():
    config = transformers.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=16, vocab_size=V)
    with pytest.raises(TypeError, match=r"GemmaForCausalLM is not supported; supported: GPT2LMHeadModel, LlamaForCausalLM"):
        hf.patch(transformers.GemmaForCausalLM(config))
    with pytest.raises(TypeError, match="GPT2Model is not supported"):
        hf.patch(make("gpt2", n_layer=1).transformer)


def test_version_range(monkeypatch):
    for ok in ("5.17.0", "5.20.1", "5.24.0", "5.24.3.dev0"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            hf._check_version(ok)
    for bad in ("4.57.1", "5.16.1", "6.0.0"):
        with pytest.raises(RuntimeError, match=r"supports transformers 5\.17 to 5\.24, found"):
            hf._check_version(bad)
    with pytest.warns(UserWarning, match="5.30.0 is newer and untested"):
        hf._check_version("5.30.0")
    monkeypatch.setattr(transformers, "__version__", "5.3.0")
    with pytest.raises(RuntimeError, match="found 5.3.0: pip install 'transformers>=5.17,<5.25'"):
        hf.patch(make("gpt2", n_layer=1))


def test_importing_fastlm_needs_no_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"  # any `import transformers` now raises ImportError
            "import fastlm, fastlm.model, fastlm.finetune, fastlm.generate, kernels\n"
            "try:\n    import fastlm.hf\nexcept ImportError as e:\n    print('hf:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr
    assert "hf: fastlm.hf patches transformers models and needs transformers: pip install" in out.stdout


def test_patch_in_place_returns_the_model_and_is_idempotent():
    model = make("llama", n_layer=1)
    params = list(model.parameters())
    assert hf.patch(model) is model and hf.patch(model) is model
    assert list(model.parameters()) == params  # same tensors: an optimizer made before patching still steps them
    assert model.config._attn_implementation == "fastlm"
    assert "labels" in str(inspect.signature(model.forward))  # Trainer reads the signature
    x, labels = batch(T=5)
    loss, *rest = model.train()(x, labels=labels, return_dict=False)  # the fused loss; no logits in the tuple
    assert loss.ndim == 0 and not any(torch.is_tensor(r) and r.shape[-1] == V for r in rest)


# -----------------------------------------------------------------------------
# numerics: logits (eval), loss and every gradient (train)

@pytest.mark.parametrize("arch", ARCHS)
def test_eval_logits(arch):
    ref, patched = pair(arch)
    x, _ = batch()
    with torch.no_grad():
        with hf.attention_path() as path:
            out = patched(x).logits
        expected, eager = copy.deepcopy(ref).double()(x).logits, ref(x).logits
    assert path == ["kernel"] * 2
    assert_close_to_ref(out, expected, eager, f"{arch} logits")


@pytest.mark.parametrize("arch", ARCHS)
def test_train_loss_and_every_gradient(arch):
    ref, patched = pair(arch)
    ref64 = copy.deepcopy(ref).double()
    x, labels = batch()
    results = []
    for model in (patched, ref, ref64):
        model.train()
        with hf.attention_path() as path:
            out = model(x, labels=labels)
        out.loss.backward()
        results.append((out, path, {n: p.grad for n, p in model.named_parameters()}))
    (out, path, grads), (eager, _, eager_grads), (expected, _, expected_grads) = results
    assert path == ["kernel"] * 2 and out.logits is None  # the fused loss builds no logits
    assert_close_to_ref(out.loss, expected.loss, eager.loss, f"{arch} loss")
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_close_to_ref(grad, expected_grads[name], eager_grads[name], f"{arch} grad {name}")


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_autocast_training(arch):
    """Under 16-bit autocast (fp16 on the CPU: the interpreter's bf16 matmuls are wrong; bf16 on a GPU): the kernel
    path (RoPE's fp32 cos/sin leave q, k in fp32 and v in 16 bits: cast to the autocast dtype, as SDPA does)."""
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16
    ref, patched = pair(arch, n_layer=1)
    ref64 = copy.deepcopy(ref).double()
    x, labels = batch(T=8)
    results = []
    for model, autocast in ((patched, True), (ref, True), (ref64, False)):
        model.train()
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=autocast), hf.attention_path() as path:
            out = model(x, labels=labels)
        out.loss.backward()
        results.append((out.loss, path, {n: p.grad for n, p in model.named_parameters()}))
    (loss, path, grads), (eager, _, eager_grads), (expected, _, expected_grads) = results
    assert path == ["kernel"] and loss.dtype == eager.dtype == torch.float32
    assert_close_to_ref(loss, expected, eager, f"{arch} loss")
    for name, grad in grads.items():
        assert_close_to_ref(grad, expected_grads[name], eager_grads[name], f"{arch} grad {name}")


def test_fused_loss_matches_transformers_loss_function():
    """ignore_index, num_items_in_batch (a tensor or an int) and shift_labels, as ForCausalLMLoss takes them."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(0)
    hidden, head = torch.randn(3, 7, 16, device=DEVICE), torch.nn.Linear(16, V, device=DEVICE)  # fp32: no fp64 kernels
    labels = torch.randint(0, V, (3, 7), device=DEVICE)
    labels[1, 2:5] = 7
    logits = head(hidden)
    for kwargs in ({}, {"ignore_index": 7}, {"num_items_in_batch": torch.tensor(11)}, {"num_items_in_batch": 5},
                   {"shift_labels": F.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()}):
        expected = ForCausalLMLoss(logits, labels, V, **kwargs)
        assert torch.allclose(hf.causal_lm_loss(hidden, head, labels, **kwargs), expected, atol=1e-6), kwargs


# -----------------------------------------------------------------------------
# masks: what each case runs

@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral"])
def test_padded_and_packed_batches_take_sdpa_with_the_mask(arch):
    # Mistral with a sliding window shorter than the sequence: a mask even without padding
    ref, patched = pair(arch, n_layer=1, **({"sliding_window": 4} if arch == "mistral" else {}))
    x, labels = batch(T=9)
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding
    mask[1, -2:] = 0  # right padding
    cases = {"all-ones mask": {"attention_mask": torch.ones_like(x)}, "padded": {"attention_mask": mask},
             # transformers looks for restarting position_ids only without a cache
             "packed": {"position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4], list(range(9))], device=DEVICE),
                        "use_cache": False}}
    for case, kwargs in cases.items():
        with torch.no_grad():
            with hf.attention_path() as path:
                out = patched(x, **kwargs).logits
            expected = ref(x, **kwargs).logits
        keep = kwargs.get("attention_mask", torch.ones_like(x)).bool()
        assert torch.allclose(out[keep], expected[keep], atol=1e-5), case
        windowed = arch == "mistral"
        assert path == (["sdpa: mask"] if case != "all-ones mask" or windowed else ["kernel"]), (case, path)
    # and not as if unpadded: the left-padded row equals that sequence alone
    with torch.no_grad():
        alone = patched(x[:1, 3:]).logits
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        padded = patched(x, attention_mask=mask, position_ids=positions).logits[:1, 3:]
    assert torch.allclose(alone, padded, atol=1e-5)
    # training on the padded batch: the same loss and gradients as transformers
    for model in (patched, ref):
        model.train()
        model(x, attention_mask=mask, labels=labels.masked_fill(mask == 0, -100)).loss.backward()
    for (name, p), q in zip(patched.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name


def test_attention_dropout_in_training():
    """GPT-2 checkpoints carry attn_pdrop=0.1: the kernel's own dropout where kernels.attention has it, else SDPA."""
    model = make("gpt2", n_layer=1, attn_pdrop=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf.patch(model)
    assert any("attention dropout" in str(w.message) for w in caught) == (not hf._HAS_DROPOUT)
    x, labels = batch(T=8)
    with torch.no_grad(), hf.attention_path() as path:
        evaluated = model(x, labels=labels).loss
        trained = [model.train()(x, labels=labels).loss for _ in range(2)]
    assert path == ["kernel", *(["kernel" if hf._HAS_DROPOUT else "sdpa: dropout"] * 2)]
    assert torch.isfinite(trained[0]) and trained[0] != evaluated and trained[0] != trained[1]  # fresh masks


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_generate_gives_the_same_greedy_tokens(arch):
    ref, patched = pair(arch, n_layer=1)
    x, _ = batch(B=2, T=5)
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # a left-padded prompt
    for kwargs in ({}, {"attention_mask": mask}) + (({"cache_implementation": "static"},) if arch == "qwen3" else ()):
        args = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, **kwargs)
        with hf.attention_path() as path:
            out = patched.generate(x, **args)
        assert torch.equal(out, ref.generate(x, **args)), kwargs
        if not kwargs:  # prefill and each one-token step over the cache: the kernel
            assert path == ["kernel"] * (out.shape[1] - x.shape[1])
        if "attention_mask" in kwargs:
            assert set(path) == {"sdpa: mask"}


# -----------------------------------------------------------------------------
# training set-ups

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_trainer_three_steps_give_the_unpatched_losses(arch, tmp_path, monkeypatch):
    x, labels = batch(B=8, T=8, seed=2)
    labels[4:, :2] = -100
    data = [{"input_ids": x[i].cpu(), "labels": labels[i].cpu()} for i in range(8)]
    seen = []
    real_loss = hf.causal_lm_loss
    spy = lambda *a, **kw: seen.append(kw.get("num_items_in_batch")) or real_loss(*a, **kw)  # noqa: E731
    monkeypatch.setattr(hf, "causal_lm_loss", spy)

    def run(model):
        args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2,
                                              gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1,
                                              save_strategy="no", report_to=[], use_cpu=DEVICE.type == "cpu", seed=0,
                                              disable_tqdm=True, lr_scheduler_type="constant")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        assert trainer.model_accepts_loss_kwargs
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    ref, patched = pair(arch, n_layer=1)
    expected = run(ref)
    assert seen == []
    losses = run(patched)
    assert len(losses) == 3 and losses == pytest.approx(expected, abs=2e-4)
    assert len(seen) == 6 and all(torch.is_tensor(n) for n in seen)  # 3 steps x 2 micro-batches, normalised per step


@pytest.mark.parametrize("arch, when", [("gpt2", "before"), ("llama", "after")])
def test_peft_lora_adapters_load_into_an_unpatched_model(arch, when, tmp_path):
    peft = pytest.importorskip("peft")
    targets = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    base = make(arch, n_layer=1)
    model = copy.deepcopy(base)
    if when == "before":
        hf.patch(model)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                        fan_in_fan_out=arch == "gpt2"))
    if when == "after":
        assert hf.patch(model) is model
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, labels = batch(T=8)
    for _ in range(2):
        with hf.attention_path() as path:
            out = model(input_ids=x, labels=labels)
        assert out.logits is None and path == ["kernel"]
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert loaded.get_base_model().config._attn_implementation != "fastlm"
    with torch.no_grad():
        trained, reloaded, untrained = model.eval()(input_ids=x).logits, loaded(input_ids=x).logits, base(x).logits
    assert (trained - untrained).abs().max() > 1e-3  # the adapters learned something
    assert torch.allclose(trained, reloaded, atol=1e-5)


def test_save_pretrained_loads_unpatched(tmp_path):
    ref, patched = pair("llama", n_layer=1)
    patched.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config._attn_implementation == "sdpa"
    x, _ = batch()
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, ref(x).logits, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_gradient_checkpointing(arch):
    plain, checkpointed = make(arch, n_layer=1), make(arch, n_layer=1)
    hf.patch(plain)
    hf.patch(checkpointed).gradient_checkpointing_enable()
    x, labels = batch()
    paths = []
    for model in (plain, checkpointed):
        with hf.attention_path() as path:
            model.train()(x, labels=labels).loss.backward()
        paths.append(path)
    assert paths == [["kernel"], ["kernel"] * 2]  # the block ran twice: forward and recompute
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


@pytest.mark.parametrize("arch", ["qwen3"])  # the superset of the patched parts; ~30 s on 2 CPU cores, cold
def test_torch_compile_runs_a_patched_forward_and_backward(arch):
    eager, compiled = make(arch, n_layer=1), make(arch, n_layer=1)
    hf.patch(eager).train()
    model = torch.compile(hf.patch(compiled).train())
    x, labels = batch(T=8)
    with hf.attention_path() as path:
        out = model(x, labels=labels)
    out.loss.backward()
    expected = eager(x, labels=labels)
    expected.loss.backward()
    assert path == ["kernel"] and out.logits is None
    assert torch.allclose(out.loss, expected.loss, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name


# -----------------------------------------------------------------------------
# norms: the replaced module's numerics in 16-bit and under autocast

@pytest.mark.parametrize("kernel_cast", [True, False], ids=["cast_before_weight", "fallback"])
def test_rms_norm_keeps_llamas_numerics(kernel_cast, monkeypatch):
    if kernel_cast and not hf._HAS_CAST_BEFORE_WEIGHT:
        pytest.skip("kernels.rms_norm has no cast_before_weight yet")
    monkeypatch.setattr(hf, "_HAS_CAST_BEFORE_WEIGHT", kernel_cast)
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    dtypes = ((torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16))
    for x_dtype, w_dtype in dtypes:
        norm = LlamaRMSNorm(48, eps=1e-5).to(DEVICE, w_dtype)
        with torch.no_grad():
            norm.weight.normal_(1.0, 0.5)
        patched, norm64 = copy.deepcopy(norm), copy.deepcopy(norm).double()
        assert hf._patch_norms(patched, "LlamaRMSNorm") == 1
        x = (torch.randn(3, 5, 48, device=DEVICE) * 4).to(x_dtype).requires_grad_()
        out, eager = patched(x), norm(x)
        assert out.dtype == eager.dtype  # promoted with the weight, as Llama's `weight * y.to(x.dtype)` is
        xd = x.detach().double().requires_grad_()
        expected = norm64.weight * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)  # fp64, no rounding
        assert_close_to_ref(out, expected, eager, f"rms_norm {x_dtype}/{w_dtype}")
        dy = torch.randn_like(out)
        (gx,), (gx_eager,) = torch.autograd.grad(out, x, dy), torch.autograd.grad(eager, x, dy)
        (gx_ref,) = torch.autograd.grad(expected, xd, dy.double())
        assert_close_to_ref(gx, gx_ref, gx_eager, f"rms_norm dx {x_dtype}/{w_dtype}")


def test_layer_norm_keeps_nn_layer_norms_numerics_under_autocast():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(48, device=DEVICE)
    patched = copy.deepcopy(norm)
    assert hf._patch_norms(patched, None) == 1
    x = torch.randn(3, 5, 48, dtype=torch.bfloat16, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out, eager = patched(x), norm(x)
    assert out.dtype == eager.dtype  # CUDA's autocast runs layer_norm in fp32, the CPU's in bf16
    assert_close_to_ref(out, norm.double()(x.double()), eager, "layer_norm under autocast")
    assert patched(x).dtype == torch.bfloat16


def test_kernels_really_run(monkeypatch):
    """The patched model calls the fused kernels (not transformers' modules) for norms, attention and loss."""
    calls = []
    for name in ("layer_norm", "rms_norm", "attention", "linear_cross_entropy"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    x, labels = batch(T=5)
    for arch, norm in (("gpt2", "layer_norm"), ("qwen3", "rms_norm")):
        calls.clear()
        hf.patch(make(arch, n_layer=1)).train()(x, labels=labels)
        per_layer = 2 + (2 if arch == "qwen3" else 0)  # Qwen3 also normalises q and k
        assert calls.count(norm) == per_layer + 1 and calls.count("attention") == 1
        assert calls.count("linear_cross_entropy") == 1
