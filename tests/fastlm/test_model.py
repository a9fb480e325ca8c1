"""fastlm.GPT against transformers' GPT2LMHeadModel: logits, loss, gradients, greedy generation, compile."""
import pytest
import torch
import torch.nn.functional as F

from fastlm import GPT, GPTConfig
from fastlm.model import sample
from tests.conftest import DEVICE, requires_cuda
from tests.fastlm.helpers import make_hf_model

BACKENDS = ["torch", "triton"]  # triton runs under the interpreter on CPU


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 101, (2, 33), generator=g)


def load(hf_dir, backend):
    return GPT.from_pretrained(hf_dir, backend=backend, device=DEVICE).eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_transformers(hf_model, hf_dir, tokens, backend):
    with torch.no_grad():
        ours = load(hf_dir, backend)(tokens.to(DEVICE)).cpu()
        ref = hf_model(tokens).logits
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_and_gradients_match_transformers(hf_model, hf_dir, tokens, backend):
    model = load(hf_dir, backend)
    targets = tokens[:, 1:].clone()
    targets[0, :5] = -100  # ignored positions, e.g. a prompt
    loss = model(tokens[:, :-1].to(DEVICE), targets.to(DEVICE))
    loss.backward()
    hf_model.zero_grad()
    ref = F.cross_entropy(hf_model(tokens[:, :-1]).logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss.cpu(), ref, atol=1e-5, rtol=1e-5)
    hf_grads = dict(hf_model.named_parameters())
    for name, p in model.named_parameters():
        ref_grad = hf_grads[name].grad
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            ref_grad = ref_grad.t()  # Conv1D stores (in, out)
        torch.testing.assert_close(p.grad.cpu(), ref_grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generation_matches_transformers(hf_model, hf_dir, tokens, backend):
    prompt = tokens[:, :7]
    ours = load(hf_dir, backend).generate(prompt.to(DEVICE), max_new_tokens=20, temperature=0).cpu()
    ref = hf_model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=100, eos_token_id=None)
    assert ours.shape == (2, 27)
    assert torch.equal(ours, ref)


def test_generation_stops_at_eos(hf_dir, tokens):
    model = load(hf_dir, "torch")
    prompt = tokens[:1, :5].to(DEVICE)
    free = model.generate(prompt, 10, temperature=0)
    eos = int(free[0, 7])  # the third generated token
    stopped = model.generate(prompt, 10, temperature=0, eos_token_id=eos)
    first = (free[0, 5:] == eos).nonzero()[0, 0].item() + 5
    assert torch.equal(stopped[0], free[0, : first + 1])


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(500, 1)
    torch.manual_seed(0)
    assert torch.all(sample(logits, temperature=0) == 1)
    assert torch.all(sample(logits, top_k=1) == 1)
    assert set(sample(logits, top_k=2).flatten().tolist()) == {1, 3}
    p = logits[0].softmax(-1)
    assert set(sample(logits, top_p=float(p[1]) + 0.01).flatten().tolist()) == {1, 3}  # needs the top two
    counts = torch.bincount(sample(logits, temperature=1.0).flatten(), minlength=4).float() / 500
    torch.testing.assert_close(counts, p, atol=0.06, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(hf_dir, tokens, backend):
    model = load(hf_dir, backend)
    idx, targets = tokens[:, :-1].to(DEVICE), tokens[:, 1:].to(DEVICE)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx), model(idx), atol=1e-5, rtol=1e-5)
    loss = compiled(idx, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(idx, targets).backward()
    torch.testing.assert_close(loss, model(idx, targets), atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4)


def test_compiled_decode_step_is_reused_across_positions(hf_dir, tokens):
    """The KV cache keeps decode shapes static (its filled length is a device tensor): one compiled graph serves
    every position, and matches eager."""
    model = load(hf_dir, "torch")
    prompt = tokens[:1, :4].to(DEVICE)
    step = torch.compile(model.forward_cached, fullgraph=True, dynamic=False)
    runs = []
    for decode in (model.forward_cached, step):
        model.setup_kv_cache(1, 16)
        model.forward_cached(prompt)
        token, out = prompt[:, -1:], []
        for pos in range(4, 8):
            with torch._dynamo.config.patch(error_on_recompile=decode is step and pos > 4):
                out.append(decode(token))
        assert int(model.kv_cache.length) == 8
        model.clear_kv_cache()
        runs.append(out)
    for e, c in zip(*runs):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_filled_in_pieces_equals_one_pass(hf_model, hf_dir, tokens, backend):
    """The cache knows how much it holds: a prompt given in two pieces, then single tokens, gives the logits of
    one causal pass over the whole sequence (no assumption that a multi-token call starts an empty cache)."""
    model = load(hf_dir, backend)
    seq = tokens[:, :12].to(DEVICE)
    with torch.no_grad():
        ref = hf_model(seq.cpu()).logits
        model.setup_kv_cache(2, 12)
        pieces = [model.forward_cached(seq[:, :5]), model.forward_cached(seq[:, 5:9])]
        pieces += [model.forward_cached(seq[:, i:i + 1]) for i in range(9, 12)]
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(pieces, dim=1).cpu(), ref, atol=2e-5, rtol=1e-5)


def test_triton_backend_off_triton_says_why(hf_dir, monkeypatch):
    monkeypatch.setattr("kernels._utils.interpreting", lambda: False)
    model = GPT.from_pretrained(hf_dir, backend="triton")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        model(torch.zeros(1, 4, dtype=torch.long))
    assert GPT.from_pretrained(hf_dir, backend="auto")(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 101)


def test_presets_have_the_published_sizes():
    sizes = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}
    for name, size in sizes.items():
        with torch.device("meta"):
            assert GPT(GPTConfig.preset(name)).num_parameters() == size, name


def test_bad_config_and_input_errors():
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="unknown GPT-2 preset"):
        GPTConfig.preset("gpt3")
    with pytest.raises(ValueError, match="backend"):
        GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, vocab_size=10, block_size=8), backend="cuda")
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, vocab_size=10, block_size=8), backend="torch")
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="exceed the context"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), 5)


@requires_cuda("the 124M bf16 check runs on a GPU")
def test_124m_bf16_logits_within_transformers_own_bf16_error(tmp_path):
    hf = make_hf_model(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
    hf.save_pretrained(tmp_path)
    idx = torch.randint(0, 50257, (4, 1024))
    with torch.no_grad():
        ref = hf.cuda()(idx.cuda()).logits.double()
        hf_bf16 = hf.to(torch.bfloat16)(idx.cuda()).logits.double()
        ours = GPT.from_pretrained(tmp_path, backend="triton", device="cuda", dtype=torch.bfloat16)(idx.cuda()).double()
    assert (ours - ref).abs().max() <= 2 * (hf_bf16 - ref).abs().max()
