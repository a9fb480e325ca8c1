"""The GPT-2 124M training step and generation: fastlm against eager PyTorch, torch.compile and transformers.

train_step: forward, backward and a fused AdamW step at seq 1024, bf16 autocast, the same batch for every
provider: `triton` = fastlm on our kernels, compiled; `eager` = fastlm's plain PyTorch path; `compile` =
torch.compile of that path; `hf` = transformers' GPT2LMHeadModel with SDPA attention. extra_info has tokens/s and
model FLOPs utilisation (6 x parameters x tokens + attention, over the device's bf16 peak). The largest-batch
group runs the compiled providers at the largest batch that fits (96 down to 16), for tokens/s at full load.
generate: 124M, batch 1, a 32-token prompt and 256 new greedy tokens: `triton` = fastlm's KV-cache generate,
`eager` = a loop that reruns the whole forward per token, `hf` = transformers' generate.
"""
import gc

import pytest
import torch

from bench.conftest import optional_import
from bench.report import device_peaks
from fastlm import GPT, GPTConfig

transformers = optional_import("transformers")
BATCH, SEQ = 8, 1024
LARGE_BATCHES = (96, 64, 48, 32, 16)


def _model(provider):
    config = GPTConfig.preset("gpt2")
    if provider == "hf":
        if transformers is None:
            pytest.skip("transformers is not installed")
        hf_config = transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12, attn_implementation="sdpa",
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(hf_config).cuda(), config
    return GPT(config, backend="triton" if provider == "triton" else "torch").cuda(), config


def _train_step(provider: str, model, config, batch: int):
    """One forward + backward + fused AdamW step on a fixed random batch (batch x SEQ), and its FLOPs."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    idx = torch.randint(0, config.vocab_size, (batch, SEQ + 1), device="cuda")
    x, y = idx[:, :-1], idx[:, 1:]
    if provider == "hf":
        loss_fn = lambda: torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten())
    else:
        # dynamic=False: a step retried at a smaller batch compiles a static graph again, as every other group's
        forward = torch.compile(model, dynamic=False) if provider in ("triton", "compile") else model
        loss_fn = lambda: forward(x, y)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    n_params = sum(p.numel() for p in model.parameters())
    tokens = batch * SEQ
    flops = 6 * n_params * tokens + 12 * config.n_layer * config.n_embd * SEQ * tokens  # + attention (causal halved)
    return step, tokens, flops


def _throughput(tokens: int, flops: float) -> dict:
    peak = (device_peaks(torch.cuda.get_device_name()) or (None, None))[0]
    return dict(tokens_per_s=lambda t: tokens / t, mfu=lambda t: flops / t / (peak * 1e12) if peak else 0.0,
                tflop_per_s=lambda t: flops / t / 1e12)


@pytest.mark.parametrize("provider", ["triton", "eager", "compile", "hf"])
def bench_train_step(gpu_bench, benchmark, provider):
    benchmark.group = f"train_step gpt2-124M batch {BATCH} x seq {SEQ} bf16"
    model, config = _model(provider)
    step, tokens, flops = _train_step(provider, model, config, BATCH)
    gpu_bench(step, rounds=10, **_throughput(tokens, flops))


@pytest.mark.parametrize("provider", ["triton", "compile"])
def bench_train_step_largest_batch(gpu_bench, benchmark, provider):
    """The largest batch of LARGE_BATCHES whose step fits (an out-of-memory step tries the next smaller one):
    the tokens/s figure to hold against llm.c's ~463K tokens/s per H100."""
    benchmark.group = f"train_step gpt2-124M largest batch x seq {SEQ} bf16"
    model, config = _model(provider)
    for batch in LARGE_BATCHES:
        step, tokens, flops = _train_step(provider, model, config, batch)
        fits = True
        try:
            step()
            torch.cuda.synchronize()
        except torch.OutOfMemoryError:
            fits = False  # freed below, outside the handler: its traceback holds the failed step's tensors
        if fits:
            break
        del step
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    else:
        pytest.fail(f"no batch of {LARGE_BATCHES} fits")
    gpu_bench(step, rounds=5, warmup=1, batch=batch, **_throughput(tokens, flops))


@pytest.mark.parametrize("trains", ["everything", "last 2 blocks", "LoRA r=8"])
def bench_train_step_partial(gpu_bench, benchmark, trains):
    """What choosing what trains saves: the same fastlm step (our kernels, compiled) with frozen parts."""
    from fastlm.finetune import FinetuneConfig
    from fastlm.trainable import choose_trainable

    benchmark.group = f"train_step gpt2-124M batch {BATCH} x seq {SEQ} bf16, what trains"
    model, config = _model("triton")
    choice = {"everything": {}, "last 2 blocks": dict(train_layers=2), "LoRA r=8": dict(lora_rank=8)}[trains]
    choose_trainable(model, FinetuneConfig(**choice))
    model.cuda()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    idx = torch.randint(0, config.vocab_size, (BATCH, SEQ + 1), device="cuda")
    x, y = idx[:, :-1], idx[:, 1:]
    forward = torch.compile(model)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gpu_bench(step, rounds=10, tokens_per_s=lambda t: BATCH * SEQ / t, trainable_parameters=trainable)


@pytest.mark.parametrize("provider", ["triton", "eager", "hf"])
def bench_generate(gpu_bench, benchmark, provider):
    benchmark.group = "generate gpt2-124M batch 1, 32 + 256 tokens, greedy, bf16"
    model, config = _model(provider)
    model = model.to(torch.bfloat16).eval()
    prompt = torch.randint(0, config.vocab_size, (1, 32), device="cuda")
    new = 256
    if provider == "triton":
        run = lambda: model.generate(prompt, new, temperature=0)
    elif provider == "hf":
        run = lambda: model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    else:
        @torch.no_grad()
        def run():
            idx = prompt
            for _ in range(new):
                idx = torch.cat([idx, model(idx)[:, -1:].argmax(-1)], dim=1)
            return idx
    gpu_bench(run, rounds=5, tokens_per_s=lambda t: new / t)
