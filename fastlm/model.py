"""GPT-2 on fastlm's Triton kernels, with a plain PyTorch path beside it.

Parameter names follow Hugging Face's GPT-2 (`transformer.h.0.attn.c_attn.weight`, ...), with nn.Linear
weights stored (out, in): weights.py transposes GPT-2's Conv1D (in, out) tensors on the way in and out.

backend="triton": kernels.layer_norm, kernels.attention and, for the loss, kernels.linear_cross_entropy (the
(B*T, vocab) logits are never built). backend="torch": F.layer_norm, F.scaled_dot_product_attention and
F.cross_entropy. backend="auto": triton for CUDA inputs, torch elsewhere (also under the interpreter). backend="triton" on
the CPU needs the interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from fastlm.config import GPTConfig
from kernels._utils import use_triton

BACKENDS = ("auto", "triton", "torch")


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same state_dict) that runs kernels.layer_norm when the model's backend is triton."""

    def forward(self, x: Tensor, triton: bool = False) -> Tensor:
        if triton:
            return kernels.layer_norm(x, self.weight, self.bias, self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class KVCache(nn.Module):
    """Preallocated keys and values (B, nh, max_len, hs) so a decode step has static shapes."""

    def __init__(self, batch_size: int, n_head: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.dtype = dtype

    def update(self, positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, nh, T, hs) at `positions` (T,); return the whole cache."""
        self.k.index_copy_(2, positions, k.to(self.dtype))
        self.v.index_copy_(2, positions, v.to(self.dtype))
        return self.k, self.v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, triton: bool, positions: Tensor | None = None, prefill: bool = False) -> Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, nh, T, hs) strided views, no copies
        if self.kv_cache is not None and positions is not None:
            cache_k, cache_v = self.kv_cache.update(positions, k, v)
        if self.kv_cache is None or positions is None or prefill:
            # Training, or a prompt filling an empty cache: causal attention over these T tokens.
            y = kernels.attention(q, k, v, causal=True) if triton else F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Decoding: the query at absolute position p sees cached keys 0..p. Masking the whole cache keeps the
            # shapes static, so one compiled decode step serves every position.
            mask = torch.arange(cache_k.shape[2], device=x.device)[None, :] <= positions[:, None]
            y = F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, triton: bool, positions: Tensor | None = None, prefill: bool = False) -> Tensor:
        x = x + self.attn(self.ln_1(x, triton), triton, positions, prefill)
        return x + self.mlp(self.ln_2(x, triton))


class GPT(nn.Module):
    """GPT-2. `model(idx)` -> logits (B, T, vocab); `model(idx, targets)` -> mean loss over targets != -100."""

    def __init__(self, config: GPTConfig, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"GPT: backend must be one of {BACKENDS}, got {backend!r}")
        self.config, self.backend = config, backend
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=LayerNorm(config.n_embd, eps=config.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, path, backend: str = "auto", device=None, dtype: torch.dtype | None = None) -> "GPT":
        """Load GPT-2 safetensors (a file, or a directory with model.safetensors / a sharded index and perhaps
        config.json) in either Hugging Face layout. Errors name the file and the key (fastlm.weights.WeightsError)."""
        from fastlm import weights

        config, state = weights.load_state(path)
        with torch.device("meta"):
            model = cls(config, backend)
        weights.load_into(model, state, device=device, dtype=dtype)
        return model

    def save_pretrained(self, directory) -> None:
        """Write model.safetensors + config.json that transformers' GPT2LMHeadModel.from_pretrained loads."""
        from fastlm import weights

        weights.save(self, directory)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _uses_triton(self, idx: Tensor) -> bool:
        """auto: the kernels on CUDA, plain PyTorch elsewhere; triton: the kernels or a clear error."""
        if self.backend == "torch":
            return False
        if self.backend == "auto":
            return idx.device.type == "cuda" and use_triton(idx)
        if not use_triton(idx):
            raise RuntimeError(f"GPT(backend='triton') needs a CUDA device or TRITON_INTERPRET=1 on the CPU; "
                               f"the input is on {idx.device}: use backend='auto' or 'torch'")
        return True

    def hidden_states(self, idx: Tensor, positions: Tensor | None = None, prefill: bool = False) -> tuple[Tensor, bool]:
        """Final-norm hidden states (B, T, C) and whether the Triton kernels ran.

        positions (T,): absolute positions of idx's tokens when a KV cache is set up (see forward_cached).
        """
        B, T = idx.shape
        if positions is None and T > self.config.block_size:
            raise ValueError(f"GPT: sequence length {T} is longer than the context of {self.config.block_size} tokens")
        triton = self._uses_triton(idx)
        pos = torch.arange(T, device=idx.device) if positions is None else positions
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, triton, positions, prefill)
        return self.transformer.ln_f(x, triton), triton

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Tensor:
        """idx (B, T) token ids. Returns logits (B, T, vocab), or with targets (B, T) the mean loss."""
        x, triton = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(x)
        if triton:
            return kernels.linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())
        return F.cross_entropy(self.lm_head(x).flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    # ---- generation -------------------------------------------------------------------------------------
    def setup_kv_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate every layer's KV cache for `batch_size` sequences of up to `max_len` tokens."""
        if max_len > self.config.block_size:
            raise ValueError(f"GPT: {max_len} tokens exceed the context of {self.config.block_size}")
        weight = self.lm_head.weight
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, self.config.n_head, max_len, self.config.head_dim,
                                          dtype or weight.dtype, weight.device)

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def forward_cached(self, idx: Tensor, positions: Tensor, prefill: bool = False) -> Tensor:
        """Logits (B, T, vocab) of tokens at absolute `positions` (T,), reading and filling the KV cache.

        prefill=True: idx is a prompt starting at position 0 of an empty cache; its attention runs as one causal
        pass over the prompt (the fused kernel on triton) while the cache is filled.
        """
        x, _ = self.hidden_states(idx, positions, prefill)
        return self.lm_head(x)

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | None = None) -> Tensor:
        """Append up to `max_new_tokens` sampled tokens to idx (B, T); returns (B, T + n).

        temperature=0 is greedy. With eos_token_id, a sequence that produced it continues with eos_token_id,
        and generation stops early once every sequence has.
        """
        pieces = [idx]
        for token in self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, eos_token_id):
            pieces.append(token)
        return torch.cat(pieces, dim=1)

    @torch.no_grad()
    def generate_stream(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                        top_p: float | None = None, eos_token_id: int | None = None):
        """Yield each new token (B, 1) as it is sampled (what `python -m fastlm.generate` prints from)."""
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"generate: idx must be (B, T) with T >= 1, got shape {tuple(idx.shape)}")
        if max_new_tokens < 0 or temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 1):
            raise ValueError("generate: need max_new_tokens >= 0, temperature >= 0, top_k >= 1, 0 < top_p <= 1")
        B, T = idx.shape
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"generate: {T} prompt + {max_new_tokens} new tokens exceed the context of {self.config.block_size}")
        if max_new_tokens == 0:
            return
        was_training = self.training
        self.eval()
        self.setup_kv_cache(B, T + max_new_tokens)
        try:
            x, _ = self.hidden_states(idx, torch.arange(T, device=idx.device), prefill=True)
            logits = self.lm_head(x[:, -1:])  # only the last position's logits are needed
            finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
            position = torch.tensor([T], device=idx.device)  # stays on the device: no host copy per step
            for step in range(max_new_tokens):
                token = sample(logits[:, -1], temperature, top_k, top_p)
                if eos_token_id is not None:
                    token = torch.where(finished[:, None], eos_token_id, token)
                    finished |= token[:, 0] == eos_token_id
                yield token
                if step + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
                    break
                logits = self.forward_cached(token, position)
                position += 1
        finally:
            self.clear_kv_cache()
            self.train(was_training)


def sample(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Next token (B, 1) from logits (B, vocab), with no host sync (exponential-race sampling, as gpt-fast)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1, keepdim=True)
