"""fastlm.hf.patch in transformers models: a training step of the patched model against the unpatched one.

One step = forward with `labels` (the model's own loss), backward and a fused AdamW step, fp32 master weights
under bf16 autocast (what Trainer(bf16=True) runs), the same batch for every provider, no attention_mask (an
unpadded batch: under torch.compile transformers builds a mask from any attention_mask tensor, see fastlm/hf.py).
Providers: `hf` = transformers with SDPA, `hf+compile` = torch.compile of it, `fastlm` = the patched model,
`fastlm+compile` = torch.compile of the patched model. Models, random weights:
  - gpt2-124M: GPT2LMHeadModel (12 x 768, vocab 50257), batch 8 x seq 1024;
  - llama-1B: LlamaForCausalLM shaped like Llama 3.2 1B (16 x 2048, 32 heads / 8 KV heads, MLP 8192, vocab
    128256, tied embeddings), batch 4 x seq 2048.
extra_info: tokens/s, model TFLOP/s (6 x parameters x tokens + 12 x layers x width x seq x tokens for attention, as
bench_model.py counts), and which path attention took (fastlm.hf.attention_path).
"""
import pytest
import torch

from bench.conftest import optional_import

transformers = optional_import("transformers")

MODELS = {
    "gpt2-124M": dict(batch=8, seq=1024),
    "llama-1B": dict(batch=4, seq=2048),
}
PROVIDERS = ["hf", "hf+compile", "fastlm", "fastlm+compile"]


def make_model(name: str, device="cuda"):
    if transformers is None:
        pytest.skip("transformers is not installed")
    if name == "gpt2-124M":
        config = transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0)
    else:
        config = transformers.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                          num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                          vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                                          tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(config).to(device).train()


def train_step(name: str, provider: str, device="cuda", batch=None, seq=None):
    """(step, info): step() runs one training step of `name` for `provider`; info has tokens and FLOPs per step."""
    import fastlm.hf

    model = make_model(name, device)
    if provider.startswith("fastlm"):
        fastlm.hf.patch(model)
    forward = torch.compile(model) if provider.endswith("+compile") else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    batch, seq = batch or MODELS[name]["batch"], seq or MODELS[name]["seq"]
    x = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = forward(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with fastlm.hf.attention_path() as path:
        step()  # the first step compiles; its attention path is what every step takes
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    tokens = batch * seq
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq * tokens  # as in bench_model.py
    info = dict(tokens=tokens, flops=6 * n_params * tokens + attention,
                attention=",".join(sorted(set(path))) or "sdpa (unpatched)")
    return step, info


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", list(MODELS))
def bench_hf_train_step(gpu_bench, benchmark, name, provider):
    shape = MODELS[name]
    benchmark.group = f"hf train_step {name} batch {shape['batch']} x seq {shape['seq']} bf16 autocast"
    step, info = train_step(name, provider)
    gpu_bench(step, rounds=10, warmup=2, tokens_per_s=lambda t: info["tokens"] / t,
              tflop_per_s=lambda t: info["flops"] / t / 1e12, attention=info["attention"])
