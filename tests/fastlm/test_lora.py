"""LoRA adapters: the merge maths, PEFT's own loader and saver as the file-format reference, freezing, the Triton
backend, torch.compile and autocast, and every bad input."""
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from fastlm import GPT
from fastlm.lora import LoRALinear, apply_lora, load_adapters, lora_state_dict, merge_lora, save_adapters
from tests.conftest import DEVICE

transformers = pytest.importorskip("transformers", reason="transformers is the GPT-2 reference (pip install -e '.[test]')")

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # transformers, via peft

TARGETS = ["c_attn", "c_proj", "c_fc"]
RANK, ALPHA = 4, 8.0
LAYERS = [f"transformer.h.{i}.{layer}" for i in range(2) for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 101, (2, 33), generator=g)


def load(hf_dir, backend="torch", **kwargs):
    return GPT.from_pretrained(hf_dir, backend=backend, device=DEVICE, **kwargs).eval()


def randomize_b(model, seed=0):
    """Non-zero B, as training leaves it, so that the adapters change the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for factor in [m.lora_B.weight for m in model.modules() if isinstance(m, LoRALinear)]:
            factor.copy_(torch.randn(factor.shape, generator=g) * 0.1)


def lora_model(hf_dir, backend="torch", targets=TARGETS, seed=0):
    model = load(hf_dir, backend)
    torch.manual_seed(seed)  # the same A for every model built with this seed
    apply_lora(model, RANK, ALPHA, targets)
    randomize_b(model, seed)
    return model


def logits(model, idx):
    with torch.no_grad():
        out = model(idx.to(DEVICE) if isinstance(model, GPT) else idx)
    return (out.logits if hasattr(out, "logits") else out).cpu()


# -----------------------------------------------------------------------------
def test_lora_linear_matches_its_formula_with_and_without_dropout():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 7)  # odd sizes: in 7, out 5, rank 3
    for bias in (True, False):
        layer = LoRALinear(nn.Linear(7, 5, bias=bias), rank=3, alpha=5.0, dropout=0.5)
        nn.init.normal_(layer.lora_B.weight)
        W, b, A, B = layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight
        torch.manual_seed(1)
        out = layer(x)
        torch.manual_seed(1)  # the same dropout mask
        ref = F.linear(x, W, b) + F.dropout(x, 0.5, training=True) @ A.t() @ B.t() * (5.0 / 3)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        layer.eval()
        torch.testing.assert_close(layer(x), F.linear(x, W, b) + x @ A.t() @ B.t() * (5.0 / 3), atol=1e-6, rtol=1e-5)
        assert not torch.allclose(out, layer(x)), "dropout must act in training mode"
    # Wrapping a module in eval mode keeps it in eval mode: no dropout at inference.
    eval_layer = LoRALinear(nn.Linear(7, 5).eval(), rank=3, alpha=5.0, dropout=0.5)
    nn.init.normal_(eval_layer.lora_B.weight)
    assert torch.equal(eval_layer(x), eval_layer(x))


def test_init_starts_at_the_base_model_and_follows_the_base_dtype(hf_dir, tokens):
    model = load(hf_dir)
    base = logits(model, tokens)
    assert apply_lora(model, RANK, ALPHA, TARGETS) == LAYERS
    assert torch.equal(logits(model, tokens), base), "B = 0: training starts exactly at the base model"
    for layer in (m for m in model.modules() if isinstance(m, LoRALinear)):
        bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=sqrt(5)), as PEFT initialises A
        assert 0.5 * bound < layer.lora_A.weight.abs().max() <= bound
        assert not layer.lora_B.weight.any()
    bf16 = load(hf_dir, dtype=torch.bfloat16)
    apply_lora(bf16, RANK, ALPHA, ["c_attn"])
    assert {p.dtype for p in lora_state_dict(bf16).values()} == {torch.bfloat16}
    assert {p.dtype for p in lora_state_dict(model).values()} == {torch.float32}


def test_merge_is_base_plus_scaled_product_and_keeps_the_logits(hf_dir, tokens, tmp_path):
    base_state = {k: v.clone() for k, v in load(hf_dir).state_dict().items()}
    model = lora_model(hf_dir)
    unmerged = logits(model, tokens)
    assert not torch.allclose(unmerged, logits(load(hf_dir), tokens), atol=1e-2), "the adapters must change the logits"
    factors = {name: (m.lora_A.weight.clone(), m.lora_B.weight.clone(), m.bias) for name, m in model.named_modules()
               if isinstance(m, LoRALinear)}
    assert list(factors) == LAYERS
    assert merge_lora(model) is model
    for name, (A, B, bias) in factors.items():
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and layer.bias is bias, name
        ref = base_state[f"{name}.weight"].double() + (ALPHA / RANK) * (B.double() @ A.double())
        torch.testing.assert_close(layer.weight.double(), ref, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")
    assert model.state_dict().keys() == base_state.keys()
    assert all(p.requires_grad for p in model.parameters()), "a merged model is a plain GPT again"
    torch.testing.assert_close(logits(model, tokens), unmerged, atol=1e-5, rtol=1e-5)
    # What save_pretrained writes is an ordinary GPT-2 for transformers.
    model.save_pretrained(tmp_path)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, tokens), unmerged, atol=1e-5, rtol=1e-5)


# ---- PEFT as the reference for the file format and target matching ---------------------------------------
@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft", reason="peft is the adapter-format reference (pip install -e '.[test]')")


def peft_lora(peft, hf_dir, targets, **kwargs):
    base = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, fan_in_fan_out=True,
                             task_type="CAUSAL_LM", **kwargs)
    return peft.get_peft_model(base, config).eval()


def peft_layers(peft, peft_model):
    return [name.removeprefix("base_model.model.") for name, m in peft_model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)]


@pytest.mark.parametrize("targets", [["c_proj"], ["attn.c_proj", "c_fc"], ["c_attn", "c_proj", "c_fc"]])
def test_targets_select_the_layers_peft_selects(peft, hf_dir, targets):
    assert apply_lora(load(hf_dir), RANK, ALPHA, targets) == peft_layers(peft, peft_lora(peft, hf_dir, targets))


def test_peft_loads_our_adapters(peft, hf_dir, tokens, tmp_path):
    model = lora_model(hf_dir)
    save_adapters(model, tmp_path, base_model_name_or_path=str(hf_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (RANK, ALPHA, TARGETS)
    base = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    ref = logits(theirs, tokens)
    ours = logits(model, tokens)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    merge_lora(model)
    torch.testing.assert_close(logits(model, tokens), ref, atol=1e-5, rtol=1e-5)
    merged = theirs.merge_and_unload().state_dict()
    for name in LAYERS:  # transformers' Conv1D holds (in, out)
        torch.testing.assert_close(model.get_submodule(name).weight.t().cpu(), merged[f"{name}.weight"], atol=1e-6, rtol=1e-6)


def test_adapters_saved_by_peft_load_and_round_trip(peft, hf_dir, tokens, tmp_path):
    theirs = peft_lora(peft, hf_dir, ["c_attn", "mlp.c_proj"], lora_dropout=0.1)  # a dotted suffix: not every c_proj
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    theirs.save_pretrained(tmp_path / "peft")
    ref = logits(theirs, tokens)
    model = load(hf_dir)
    expected = [name for name in LAYERS if name.endswith(("c_attn", "mlp.c_proj"))]
    assert load_adapters(model, tmp_path / "peft") == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{f}.weight" for n in expected for f in "AB"}
    torch.testing.assert_close(logits(model, tokens), ref, atol=1e-5, rtol=1e-5)
    # Saved again: the same tensors, and target_modules that select exactly these layers in PEFT.
    save_adapters(model, tmp_path / "ours")
    original, resaved = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("peft", "ours"))
    assert original.keys() == resaved.keys() and all(torch.equal(original[k], resaved[k]) for k in original)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    reloaded = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval(), tmp_path / "ours")
    assert peft_layers(peft, reloaded) == expected, "PEFT would add zero adapters to the layers outside target_modules"
    torch.testing.assert_close(logits(reloaded.eval(), tokens), ref, atol=1e-5, rtol=1e-5)


# ---- training ---------------------------------------------------------------------------------------------
def test_only_the_adapters_train(hf_dir, tokens):
    model = load(hf_dir).train()
    apply_lora(model, RANK, ALPHA, TARGETS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{f}.weight" for n in LAYERS for f in "AB"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    idx, targets = tokens[:, :-1].to(DEVICE), tokens[:, 1:].to(DEVICE)
    losses = []
    for _ in range(3):
        loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]) and p.grad is None, f"{name} is frozen but changed"


def test_triton_backend_gives_the_same_loss_and_adapter_gradients(hf_dir, tokens):
    idx, targets = tokens[:, :-1].to(DEVICE), tokens[:, 1:].to(DEVICE)
    grads, losses = [], []
    for backend in ("torch", "triton"):  # triton runs under the interpreter on CPU
        model = lora_model(hf_dir, backend)
        loss = model(idx, targets)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * len(LAYERS)
    for name, ref in grads[0].items():
        torch.testing.assert_close(grads[1][name], ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_torch_compile_fullgraph_matches_eager(hf_dir, tokens):
    model = lora_model(hf_dir)
    idx, targets = tokens[:, :-1].to(DEVICE), tokens[:, 1:].to(DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    loss = compiled(idx, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ref = model(idx, targets)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_autocast_bf16_within_twice_eagers_own_error(hf_dir, tokens):
    model = lora_model(hf_dir)
    merged = merge_lora(lora_model(hf_dir))  # the same function as plain Linear layers: eager's own bf16 error
    idx = tokens.to(DEVICE)
    ref = logits(merged, tokens).double()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        ours, eager = logits(model, tokens), logits(merged, tokens)
        loss = model(idx[:, :-1], idx[:, 1:])
    assert ours.dtype == torch.bfloat16
    err, eager_err = (ours.double() - ref).abs().max(), (eager.double() - ref).abs().max()
    assert err <= 2 * eager_err + 1e-2 * ref.abs().max(), f"autocast error {err:.3g} vs eager's {eager_err:.3g}"
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.isfinite().all()
               for p in model.parameters() if p.requires_grad)


# ---- errors -----------------------------------------------------------------------------------------------
def one_line(excinfo):
    assert "\n" not in str(excinfo.value), f"multi-line error: {excinfo.value}"


def test_bad_arguments_say_which_flag(hf_dir):
    model = load(hf_dir)
    cases = [
        (dict(rank=0), "--lora-rank must be a positive integer, got 0"),
        (dict(rank=2.0), "--lora-rank must be a positive integer"),
        (dict(alpha=0.0), "--lora-alpha must be positive, got 0.0"),
        (dict(dropout=1.0), re.escape("--lora-dropout must be in [0, 1), got 1.0")),
        (dict(targets=["foo"]), re.escape("--lora-targets: 'foo' matches no layer; choose from c_attn, c_proj, c_fc")),
        (dict(targets=[]), "--lora-targets: no layer names given; choose from c_attn, c_proj, c_fc"),
    ]
    for overrides, message in cases:
        args = dict(rank=RANK, alpha=ALPHA, targets=TARGETS) | overrides
        with pytest.raises(ValueError, match=message) as e:
            apply_lora(model, **args)
        one_line(e)
    assert all(p.requires_grad for p in model.parameters()) and not lora_state_dict(model), "a refused call changes nothing"
    with pytest.raises(ValueError, match="merge_lora: the model has no LoRA layers") as e:
        merge_lora(model)
    one_line(e)
    with pytest.raises(ValueError, match="save_adapters: the model has no LoRA layers"):
        save_adapters(model, "unused")
    apply_lora(model, RANK, ALPHA, ["c_attn"])
    with pytest.raises(ValueError, match=r"apply_lora: the model already has LoRA layers \(transformer.h.0.attn.c_attn") as e:
        apply_lora(model, RANK, ALPHA, ["c_fc"])
    one_line(e)


def test_bad_adapter_files_name_the_file(hf_dir, tmp_path):
    good = tmp_path / "good"
    save_adapters(lora_model(hf_dir), good)
    tensors = load_file(good / "adapter_model.safetensors")
    config = json.loads((good / "adapter_config.json").read_text())
    key_b = "base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"

    def variant(name, config_changes=None, tensor_changes=None, drop=None, weights=True):
        path = tmp_path / name
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps(config | (config_changes or {})))
        if weights:
            changed = {k: v for k, v in (tensors | (tensor_changes or {})).items() if k != drop}
            save_file(changed, path / "adapter_model.safetensors")
        return path

    cases = [
        (tmp_path / "nowhere", r"nowhere/adapter_config.json: no such file"),
        (variant("no_weights", weights=False), r"no_weights/adapter_model.safetensors: no such file"),
        (variant("ia3", {"peft_type": "IA3"}), r"ia3/adapter_config.json: peft_type is 'IA3', not 'LORA'"),
        (variant("dora", {"use_dora": True}), r"dora/adapter_config.json: use_dora=True is not supported"),
        (variant("rank", {"r": 8}), r"rank/adapter_model.safetensors: 'base_model.model.transformer.h.0.attn.c_attn."
                                    r"lora_A.weight' has shape \(4, 64\), expected \(8, 64\)"),
        (variant("missing", drop=key_b), rf"missing/adapter_model.safetensors: missing '{re.escape(key_b)}'"),
        (variant("extra", tensor_changes={"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}),
         r"extra/adapter_model.safetensors: unexpected key 'base_model.model.lm_head.lora_A.weight'"),
    ]
    model = load(hf_dir)
    for path, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            load_adapters(model, path)
        one_line(e)
    assert not lora_state_dict(model), "a refused load changes nothing"
    assert load_adapters(model, good) == LAYERS
