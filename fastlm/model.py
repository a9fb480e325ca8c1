"""GPT-2 on fastlm's Triton kernels, with a plain PyTorch path beside it.

Parameter names follow Hugging Face's GPT-2 (`transformer.h.0.attn.c_attn.weight`, ...), with nn.Linear
weights stored (out, in): weights.py transposes GPT-2's Conv1D (in, out) tensors on the way in and out.

The backend picks one table of ops (`Ops`) that every block calls, resolved once for the device the model sits
on (again whenever it moves): "triton" runs kernels.layer_norm, kernels.attention and, for the loss,
kernels.linear_cross_entropy (the (B*T, vocab) logits are never built); "torch" runs F.layer_norm, SDPA and
F.cross_entropy; "auto" is triton on CUDA and torch elsewhere (also under the interpreter). "triton" on a
device that cannot run Triton is an error at the first forward.

The residual stream: a block hands its MLP output to the next block's first norm, which adds it to the
stream and normalises the sum in one step (`Ops.layer_norm(x, norm, residual)`), as flash-attention's
prenorm blocks do; the final norm adds the last block's output.

Dropout (GPTConfig's embd_pdrop, attn_pdrop, resid_pdrop; training mode only): nn.Dropout on the embeddings and
on each branch before the residual add, and on the attention probabilities inside the attention op (the
kernel's Philox dropout on triton, SDPA's dropout_p on torch), each drawing from torch's generator on the
model's device. In eval mode, or with p = 0, nothing is drawn and the ops are the dropout-free ones.

Packed documents: `model(idx, targets, cu_seqlens=..., position_ids=...)` runs a batch whose rows each hold
several documents end to end. cu_seqlens (n_docs + 1,) int32 are the documents' offsets into the flattened
B * T tokens (cu_seqlens[0] = 0, cu_seqlens[-1] = B * T, no document crossing from one row into the next):
a token attends only to the earlier tokens of its own document. position_ids (B, T) are the tokens' positions
for the position embedding (default: restarting at 0 at each document's first token, derived from cu_seqlens
on the device). Attention is kernels.varlen_attention on triton (q, k, v as (B * T, nh, hs) views, max_seqlen
T: a constant, so a compiled model does not recompile for new document lengths), SDPA with a block-diagonal
causal mask built on the device on torch; neither reads the boundaries on the host. fastlm.packing builds both
tensors from token ids.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from fastlm import weights
from fastlm.config import GPTConfig
from kernels._utils import device_runs_triton

BACKENDS = ("auto", "triton", "torch")


# -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Documents:
    """The document boundaries of a packed batch (B, T), as the attention ops read them."""

    cu_seqlens: Tensor   # (n_docs + 1,) int32 offsets into the B * T flattened tokens
    max_seqlen: int      # T: no document is longer than its row
    mask: Tensor | None  # (B, 1, T, T) bool, True where query i may see key j; built only where SDPA runs


@dataclass(frozen=True)
class Ops:
    """What the blocks and the loss call: one table per backend, chosen by `ops_for`."""

    name: str
    layer_norm: Callable  # (x, norm: nn.LayerNorm, residual=None) -> y, or with residual (y, x + residual)
    attention: Callable   # (q, k, v, dropout_p) (B, nh, T, hs), (B, nh, S, hs) -> causal, bottom-right when T < S
    packed_attention: Callable  # (q, k, v (B, T, nh, hs), docs: Documents, dropout_p) -> (B, T, nh, hs)
    head_loss: Callable   # (h (N, C), weight (V, C), targets (N,), reduction) -> cross-entropy of h @ weight.T


def _torch_layer_norm(x: Tensor, norm: nn.LayerNorm, residual: Tensor | None = None):
    if residual is None:
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    h = residual + x
    return F.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps), h


def _triton_layer_norm(x: Tensor, norm: nn.LayerNorm, residual: Tensor | None = None):
    # One kernel adds the branch to the stream and normalises the sum; under autocast y comes out in the autocast
    # dtype for the matmul that reads it, while the stream stays in its own (fp32) dtype.
    out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
    return kernels.layer_norm(x, norm.weight, norm.bias, norm.eps, residual=residual, out_dtype=out_dtype)


def _torch_head_loss(h: Tensor, weight: Tensor, targets: Tensor, reduction: str) -> Tensor:
    return F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=-100, reduction=reduction)


def _triton_head_loss(h: Tensor, weight: Tensor, targets: Tensor, reduction: str) -> Tensor:
    return kernels.linear_cross_entropy(h, weight, targets, reduction=reduction)


def _torch_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
    return kernels.attention_ref(q, k, v, causal=True, dropout_p=dropout_p)


def _triton_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
    return kernels.attention(q, k, v, causal=True, dropout_p=dropout_p)


def _varlen_kernel() -> Callable | None:
    """kernels.varlen_attention, or None while this kernels package has none (then SDPA with the mask runs)."""
    return getattr(kernels, "varlen_attention", None)


def _torch_packed_attention(q: Tensor, k: Tensor, v: Tensor, docs: Documents, dropout_p: float) -> Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs) views
    return F.scaled_dot_product_attention(q, k, v, attn_mask=docs.mask, dropout_p=dropout_p).transpose(1, 2)


def _triton_packed_attention(q: Tensor, k: Tensor, v: Tensor, docs: Documents, dropout_p: float) -> Tensor:
    varlen = _varlen_kernel()
    if varlen is None or docs.mask is not None:
        return _torch_packed_attention(q, k, v, docs, dropout_p)
    B, T, nh, hs = q.shape
    q, k, v = (t.flatten(0, 1) for t in (q, k, v))  # (B * T, nh, hs) views of the fused projection, no copies
    y = varlen(q, k, v, docs.cu_seqlens, docs.cu_seqlens, docs.max_seqlen, docs.max_seqlen, causal=True,
               dropout_p=dropout_p)
    return y.view(B, T, nh, hs)


TORCH_OPS = Ops("torch", _torch_layer_norm, _torch_attention, _torch_packed_attention, _torch_head_loss)
TRITON_OPS = Ops("triton", _triton_layer_norm, _triton_attention, _triton_packed_attention, _triton_head_loss)


def documents(cu_seqlens: Tensor, B: int, T: int, ops: Ops) -> tuple[Documents, Tensor]:
    """The Documents of a packed (B, T) batch and each token's position in its document (B, T), on cu_seqlens'
    device without a host sync; the mask only for the ops that need it (SDPA)."""
    tokens = torch.arange(B * T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    doc = torch.searchsorted(cu_seqlens, tokens, right=True) - 1  # (B * T,) the document of each token
    positions = (tokens - cu_seqlens[doc]).long().view(B, T)
    mask = None
    if ops is TORCH_OPS or _varlen_kernel() is None:
        doc = doc.view(B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=cu_seqlens.device).tril()
        mask = ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]  # (B, 1, T, T) block-diagonal, causal
    return Documents(cu_seqlens, T, mask), positions


def ops_for(backend: str, device: torch.device) -> Ops:
    """auto: the kernels on CUDA, plain PyTorch elsewhere; triton: the kernels (the forward checks the device)."""
    if backend == "torch" or (backend == "auto" and not (device.type == "cuda" and device_runs_triton(device))):
        return TORCH_OPS
    return TRITON_OPS


# -----------------------------------------------------------------------------
class KVCache(nn.Module):
    """Keys and values of every layer, each (B, nh, max_len, hs), and how many positions hold them (`length`,
    a 0-dim device tensor, so a compiled decode step reads it without a host sync or a recompile). Each layer has
    buffers of its own: autograd may keep one layer's cache for backward while the next layer writes to its own."""

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        for layer in range(n_layer):
            self.register_buffer(f"k_{layer}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v_{layer}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("length", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self.max_len = max_len

    def update(self, layer: int, positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, nh, T, hs) of one layer at `positions` (T,); return that layer's whole cache."""
        cache_k, cache_v = getattr(self, f"k_{layer}"), getattr(self, f"v_{layer}")
        cache_k.index_copy_(2, positions, k.to(cache_k.dtype))
        cache_v.index_copy_(2, positions, v.to(cache_v.dtype))
        return cache_k, cache_v


@dataclass
class CacheStep:
    """One forward through the KV cache: where the new tokens go and what they see."""

    cache: KVCache
    positions: Tensor          # (T,) absolute positions of the new tokens
    decode_mask: Tensor | None  # (T, max_len) for one new token: the whole cache, masked (static shapes)
    end: int | None             # for several new tokens: the filled length afterwards (causal over cache[:end])


# -----------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int, ops: Ops):
        super().__init__()
        self.layer, self.ops = layer, ops
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop  # on the attention probabilities, inside the attention op
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: Tensor, step: CacheStep | None = None, docs: Documents | None = None) -> Tensor:
        B, T, C = x.shape
        p = self.attn_pdrop if self.training else 0.0
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim)
        if docs is not None:
            y = self.ops.packed_attention(*qkv.unbind(2), docs, p)  # (B, T, nh, hs) in, (B, T, nh, hs) out
            return self.resid_dropout(self.c_proj(y.reshape(B, T, C)))
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, nh, T, hs) strided views, no copies
        if step is None:
            y = self.ops.attention(q, k, v, p)
        else:
            k, v = step.cache.update(self.layer, step.positions, k, v)
            if step.decode_mask is not None:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=step.decode_mask, dropout_p=p)
            else:  # several new tokens: causal over what the cache holds, aligned to its end
                y = self.ops.attention(q, k[:, :, :step.end], v[:, :, :step.end], p)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int, ops: Ops):
        super().__init__()
        self.ops = ops
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer, ops)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, pending: Tensor | None, step: CacheStep | None = None,
                docs: Documents | None = None) -> tuple[Tensor, Tensor]:
        """x: the residual stream (B, T, C); pending: the previous block's MLP output, not yet added to it (None
        in the first block). Returns the stream and this block's MLP output, for the next norm to add."""
        if pending is None:
            h = self.ops.layer_norm(x, self.ln_1)
        else:
            h, x = self.ops.layer_norm(pending, self.ln_1, x)
        h, x = self.ops.layer_norm(self.attn(h, step, docs), self.ln_2, x)
        return x, self.mlp(h)


class GPT(nn.Module):
    """GPT-2. `model(idx)` -> logits (B, T, vocab); `model(idx, targets)` -> mean loss over targets != -100;
    `model(idx, targets, cu_seqlens=...)`: a packed batch of documents (see the module docstring)."""

    def __init__(self, config: GPTConfig, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"GPT: backend must be one of {BACKENDS}, got {backend!r}")
        self.config, self.backend = config, backend
        self.ops = TORCH_OPS  # set for the parameters' device below
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.embd_pdrop),
            h=nn.ModuleList(Block(config, i, self.ops) for i in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.kv_cache: KVCache | None = None
        self.soft_prompt: nn.Module | None = None  # fastlm.prompt_tuning.SoftPrompt: virtual tokens forward/generate put first
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.resolve_ops()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # ---- the backend's ops, resolved for where the parameters are ------------------------------------------
    def resolve_ops(self) -> Ops:
        """Choose the ops table for the backend and the parameters' device, and hand it to every block."""
        self.ops = ops_for(self.backend, self.lm_head.weight.device)
        for module in self.modules():
            if isinstance(module, (Block, CausalSelfAttention)):
                module.ops = self.ops
        return self.ops

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self.resolve_ops()  # .to(), .cuda(), .half(): the device may have changed
        return module

    def _check_device(self, idx: Tensor) -> None:
        if self.backend == "triton" and not device_runs_triton(idx.device):
            raise RuntimeError(f"GPT(backend='triton') needs a CUDA device or TRITON_INTERPRET=1 on the CPU; "
                               f"the input is on {idx.device}: use backend='auto' or 'torch'")

    # ---- weights -----------------------------------------------------------------------------------------
    @classmethod
    def state_shapes(cls, config: GPTConfig) -> dict[str, torch.Size]:
        """The state_dict names and shapes of a GPT with this config (the tied lm_head.weight left out)."""
        with torch.device("meta"):
            return {k: v.shape for k, v in cls(config, backend="torch").state_dict().items() if k != "lm_head.weight"}

    @classmethod
    def from_pretrained(cls, path, backend: str = "auto", device=None, dtype: torch.dtype | None = None) -> "GPT":
        """Load GPT-2 safetensors (a file, or a directory with model.safetensors / a sharded index and perhaps
        config.json) in either Hugging Face layout, in eval mode (call .train() to train with the config's dropout).
        Errors name the file and the key (fastlm.weights.WeightsError)."""
        config, state = weights.load_state(path, cls.state_shapes)
        with torch.device("meta"):
            model = cls(config, backend)
        weights.load_into(model, state, device=device, dtype=dtype)
        model.resolve_ops()
        return model.eval()  # as transformers' from_pretrained: no dropout until .train()

    def save_pretrained(self, directory) -> None:
        """Write model.safetensors + config.json that transformers' GPT2LMHeadModel.from_pretrained loads."""
        weights.save(self, directory)

    def set_dropout(self, embd_pdrop: float, attn_pdrop: float, resid_pdrop: float) -> None:
        """Train with these dropout probabilities from now on (config and modules; they act in training mode)."""
        self.config = self.config.replace(embd_pdrop=embd_pdrop, attn_pdrop=attn_pdrop, resid_pdrop=resid_pdrop)
        self.transformer.drop.p = embd_pdrop
        for block in self.transformer.h:
            block.attn.attn_pdrop = attn_pdrop
            block.attn.resid_dropout.p = block.mlp.dropout.p = resid_pdrop

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ---- forward and loss --------------------------------------------------------------------------------
    def hidden_states(self, idx: Tensor, step: CacheStep | None = None, prompt: Tensor | None = None,
                      cu_seqlens: Tensor | None = None, position_ids: Tensor | None = None) -> Tensor:
        """Final-norm hidden states (B, T, C) of token ids idx (B, T); with `step`, through the KV cache.

        prompt: (N, C) soft-prompt embeddings put before idx's, as PEFT's prompt tuning does: they take positions
        0..N-1 (step.positions then covers N + T) and the tokens follow; only the tokens' states are returned.
        cu_seqlens: (n_docs + 1,) int32, a packed batch's document offsets into the B * T tokens (attention stays in
        each document); position_ids: (B, T) the tokens' positions (default: 0..T-1 in every row, or with
        cu_seqlens from 0 at each document's first token). See the module docstring.
        """
        B, T = idx.shape
        N = 0 if prompt is None else prompt.shape[0]
        if step is None and N + T > self.config.block_size:
            raise ValueError(f"GPT: sequence length {T}{f' + {N} virtual tokens' if N else ''} is longer than the "
                             f"context of {self.config.block_size} tokens")
        self._check_device(idx)
        docs = None
        if cu_seqlens is not None or position_ids is not None:
            self._check_packing(idx, step, prompt, cu_seqlens, position_ids)
        if cu_seqlens is not None:
            docs, doc_positions = documents(cu_seqlens, B, T, self.ops)
            position_ids = doc_positions if position_ids is None else position_ids
        if position_ids is not None:
            pos = position_ids  # (B, T)
        else:
            pos = torch.arange(N + T, device=idx.device) if step is None else step.positions
        tok = self.transformer.wte(idx)
        if prompt is not None:
            tok = torch.cat([prompt.to(tok.dtype).expand(B, -1, -1), tok], dim=1)  # (B, N + T, C)
        x = self.transformer.drop(tok + self.transformer.wpe(pos))
        pending = None
        for block in self.transformer.h:
            x, pending = block(x, pending, step, docs)
        h, _ = self.ops.layer_norm(pending, self.transformer.ln_f, x)
        return h if prompt is None else h[:, N:]

    @staticmethod
    def _check_packing(idx: Tensor, step, prompt, cu_seqlens: Tensor | None, position_ids: Tensor | None) -> None:
        """Shapes and dtypes only: the values stay on the device (reading them would cost a host sync)."""
        if step is not None or prompt is not None:
            raise ValueError("GPT: cu_seqlens/position_ids (packed documents) do not combine with the KV cache or a "
                             "soft prompt")
        if position_ids is not None and (position_ids.shape != idx.shape or position_ids.device != idx.device
                                         or position_ids.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"GPT: position_ids must be int32/int64 of idx's shape {tuple(idx.shape)} on {idx.device}, "
                             f"got {position_ids.dtype} of shape {tuple(position_ids.shape)} on {position_ids.device}")
        if cu_seqlens is not None and (cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32
                                       or cu_seqlens.device != idx.device):
            raise ValueError(f"GPT: cu_seqlens must be a 1-d int32 tensor of n_docs + 1 >= 2 offsets on idx's device "
                             f"{idx.device}, got {cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)} on {cu_seqlens.device}")

    def loss(self, h: Tensor, targets: Tensor, reduction: str = "mean", fp32_head: bool = False) -> Tensor:
        """Cross-entropy of the LM head on hidden states h (B, T, C) against targets (B, T); -100 is ignored.

        reduction: "mean" (over the counted targets), "sum" or "none". fp32_head: the head's matmul and the loss
        in fp32 whatever the autocast (evaluation sums thousands of losses; a 16-bit head would round them).
        """
        h, targets, weight = h.flatten(0, 1), targets.flatten(), self.lm_head.weight
        if fp32_head:
            with torch.autocast(h.device.type, enabled=False):
                return self.ops.head_loss(h.float(), weight.float(), targets, reduction)
        return self.ops.head_loss(h, weight, targets, reduction)

    def forward(self, idx: Tensor, targets: Tensor | None = None, cu_seqlens: Tensor | None = None,
                position_ids: Tensor | None = None) -> Tensor:
        """idx (B, T) token ids. Returns logits (B, T, vocab), or with targets (B, T) the mean loss; a model with a
        soft prompt puts it first (the logits and the loss are still the T tokens'). cu_seqlens (n_docs + 1,)
        int32 and position_ids (B, T): a packed batch (see hidden_states); its mean loss is the token-weighted mean
        of the documents' own losses."""
        prompt = None if self.soft_prompt is None else self.soft_prompt.weight
        h = self.hidden_states(idx, prompt=prompt, cu_seqlens=cu_seqlens, position_ids=position_ids)
        return self.lm_head(h) if targets is None else self.loss(h, targets)

    # ---- generation -------------------------------------------------------------------------------------
    def setup_kv_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate an empty KV cache for `batch_size` sequences of up to `max_len` tokens."""
        if max_len > self.config.block_size:
            raise ValueError(f"GPT: {max_len} tokens exceed the context of {self.config.block_size}")
        weight = self.lm_head.weight
        c = self.config
        self.kv_cache = KVCache(c.n_layer, batch_size, c.n_head, max_len, c.head_dim, dtype or weight.dtype, weight.device)

    def clear_kv_cache(self) -> None:
        self.kv_cache = None

    def forward_cached(self, idx: Tensor, last_only: bool = False, prompt: Tensor | None = None) -> Tensor:
        """Logits (B, T, vocab) of idx (B, T), the T tokens that follow what the KV cache holds; they join it.

        One new token (decoding) attends over the whole cache with a position mask built once per step, so the
        shapes never change and one compiled step serves every position. Several (a prompt) attend causally over
        the filled part of the cache, the fused kernel on triton; that reads the filled length on the host once.
        last_only: the logits of the last position only, (B, 1, vocab). prompt: (N, C) soft-prompt embeddings that
        go into the cache before idx (see hidden_states); the logits are still idx's.
        """
        cache = self.kv_cache
        if cache is None:
            raise RuntimeError("forward_cached: no KV cache; call setup_kv_cache(batch_size, max_len) first")
        T = idx.shape[1] + (0 if prompt is None else prompt.shape[0])
        positions = cache.length + torch.arange(T, device=idx.device)
        if T == 1:
            mask = torch.arange(cache.max_len, device=idx.device)[None, :] <= positions[:, None]
            step = CacheStep(cache, positions, decode_mask=mask, end=None)
        else:
            end = int(cache.length) + T
            if end > cache.max_len:
                raise ValueError(f"forward_cached: {T} tokens after {end - T} would overflow the cache of {cache.max_len}")
            step = CacheStep(cache, positions, decode_mask=None, end=end)
        h = self.hidden_states(idx, step, prompt)
        cache.length.add_(T)  # in place: `+=` on a module attribute is a setattr that torch.compile mistraces
        return self.lm_head(h[:, -1:] if last_only else h)

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
        """Yield each new token (B, 1) as it is sampled (what `python -m fastlm.generate` prints from). A model with
        a soft prompt puts it before idx, and its N virtual tokens count against the context."""
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"generate: idx must be (B, T) with T >= 1, got shape {tuple(idx.shape)}")
        if max_new_tokens < 0 or temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 1):
            raise ValueError("generate: need max_new_tokens >= 0, temperature >= 0, top_k >= 1, 0 < top_p <= 1")
        B, T = idx.shape
        prompt = None if self.soft_prompt is None else self.soft_prompt.weight
        N = 0 if prompt is None else prompt.shape[0]
        if N + T + max_new_tokens > self.config.block_size:
            raise ValueError(f"generate: {T} prompt{f' + {N} virtual' if N else ''} + {max_new_tokens} new tokens exceed "
                             f"the context of {self.config.block_size}")
        if max_new_tokens == 0:
            return
        was_training = self.training
        self.eval()
        self.setup_kv_cache(B, N + T + max_new_tokens)
        try:
            logits = self.forward_cached(idx, last_only=True, prompt=prompt)  # only the last position's logits are needed
            finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
            for step in range(max_new_tokens):
                token = sample(logits[:, -1], temperature, top_k, top_p)
                if eos_token_id is not None:
                    token = torch.where(finished[:, None], eos_token_id, token)
                    finished |= token[:, 0] == eos_token_id
                yield token
                if step + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
                    break
                logits = self.forward_cached(token)
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
