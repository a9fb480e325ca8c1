"""fastlm's kernels inside Hugging Face transformers models: `patch(model)` swaps them in, in place, for training.

    model = transformers.AutoModelForCausalLM.from_pretrained("gpt2")
    fastlm.hf.patch(model)                 # returns model; train it with transformers.Trainer, PEFT, torch.compile

What each architecture gets (embeddings, RoPE, the MLP, caches and generation stay transformers' own):

    architecture          norms                                attention                      LM head + loss (training)
    GPT2LMHeadModel       nn.LayerNorm -> kernels.layer_norm   kernels.attention              kernels.linear_cross_entropy
    Llama-, Mistral-,     <Arch>RMSNorm -> kernels.rms_norm    kernels.attention after RoPE,  kernels.linear_cross_entropy
    Qwen2-, Qwen3ForCausalLM  (Qwen3's q_norm/k_norm too)      GQA heads read in place

Norms are bound onto the existing modules (same parameters, state_dict keys and optimizer references) and keep
their numerics: nn.LayerNorm runs in fp32 under CUDA autocast, as F.layer_norm does there; Llama's RMSNorm
normalises in fp32, rounds to the input's dtype and then multiplies by the weight (the weight's dtype promoting the
result), by `kernels.rms_norm(..., cast_before_weight=True)`, or, with a kernels that lacks it, by the kernel's
weight-free normalisation followed by the same PyTorch multiply (the same expression, exactly).

Attention is the function "fastlm" in transformers' AttentionInterface, so transformers' own attention modules,
caches and generate() call it, with q (B, H, T, D), k, v (B, Hkv, S, D) after RoPE and the cache. Its mask builder
(AttentionMaskInterface) is SDPA's, except that a plain causal mask with no padding mask, T == S and an empty
cache is None even under torch.compile (SDPA's builder materialises every mask while compiling in 5.17). Per call:
  - no mask: kernels.attention, causal for T > 1 (a mask-free prefill into an empty static cache attends to its
    first T keys, as SDPA slices them), over the whole cache for one new token. This is an unpadded batch with no
    attention_mask, or in eager mode with an all-ones one (transformers reads it on the host), and generate()'s
    prefill and one-token steps over a dynamic cache. Under 16-bit autocast q, k, v are cast to the autocast dtype
    first, as SDPA is (RoPE's fp32 cos/sin leave Llama's q and k in fp32).
  - a mask (padding; packed sequences, which transformers finds from restarting position_ids when there is no
    cache; a sliding window shorter than the sequence; a static cache's decoding steps; and under torch.compile
    any attention_mask tensor or use_cache=False, since transformers cannot read them while compiling):
    transformers' SDPA with that mask, exact. Nothing masked is computed as if unpadded.
  - attention dropout in training (GPT-2 checkpoints carry attn_pdrop=0.1): the kernel's own dropout where
    kernels.attention takes dropout_p, else SDPA (patch() warns). A softcap or a head dim over 256: SDPA.
`attention_path()` (a context manager) lists the path each call took.

Loss: in training with `labels` (or `shift_labels`), the forward runs the base model and computes the causal-LM
loss with kernels.linear_cross_entropy on the hidden states against the labels shifted by one (the last position
of each row gets ignore_index), so the (B, T, vocab) logits are never built; `ignore_index` and the Trainer's
`num_items_in_batch` (the summed loss over num_items_in_batch, for gradient accumulation) are honoured as
transformers' ForCausalLMLoss does. In that mode the output's `logits` is None (as in Liger-Kernel), and absent
from the tuple with return_dict=False. In eval mode, without labels, with logits_to_keep != 0, or with a LoRA on
lm_head, the model's own forward runs (logits and transformers' loss). The loss is fp32 under autocast, otherwise
in the hidden states' dtype; a batch whose labels are all ignored gives 0 (transformers gives nan).

Versions: transformers 5.17 to 5.24 are tested (the GPU machines carry 5.17). patch() raises for an older one or
6.x and warns that a newer 5.x is untested. `import fastlm` never imports transformers; this module does.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import kernels

try:
    import transformers
    from packaging.version import Version
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.utils import ModelOutput
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("fastlm.hf patches transformers models and needs transformers: "
                      "pip install 'transformers>=5.17,<5.25'") from e

__all__ = ["SUPPORTED", "TESTED_VERSIONS", "attention_path", "patch"]

# class name -> prefix of its norm class in transformers (GPT-2's are plain nn.LayerNorm)
SUPPORTED = {
    "GPT2LMHeadModel": None,
    "LlamaForCausalLM": "LlamaRMSNorm",
    "MistralForCausalLM": "MistralRMSNorm",
    "Qwen2ForCausalLM": "Qwen2RMSNorm",
    "Qwen3ForCausalLM": "Qwen3RMSNorm",
}
TESTED_VERSIONS = ("5.17", "5.24")  # inclusive, by minor version
ATTN_NAME = "fastlm"
# what this checkout's kernels offer (both are newer than the first kernels)
_HAS_CAST_BEFORE_WEIGHT = "cast_before_weight" in inspect.signature(kernels.rms_norm).parameters
_HAS_DROPOUT = "dropout_p" in inspect.signature(kernels.attention).parameters


def _check_version(version: str) -> None:
    v, lo, hi = Version(version), Version(TESTED_VERSIONS[0]), Version(TESTED_VERSIONS[1])
    if v.release[:2] < lo.release[:2] or v.major != lo.major:
        raise RuntimeError(f"fastlm.hf supports transformers {TESTED_VERSIONS[0]} to {TESTED_VERSIONS[1]}, found {version}: "
                           f"pip install 'transformers>={TESTED_VERSIONS[0]},<{hi.major}.{hi.minor + 1}'")
    if v.release[:2] > hi.release[:2]:
        warnings.warn(f"fastlm.hf is tested with transformers {TESTED_VERSIONS[0]} to {TESTED_VERSIONS[1]}; "
                      f"{version} is newer and untested", stacklevel=3)


# -----------------------------------------------------------------------------
# norms: bound onto the existing modules, so parameters, state_dict keys and optimizer references stay the same

def _layer_norm_forward(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cuda" and x.dtype != torch.float32 and torch.is_autocast_enabled("cuda"):
        x = x.float()  # CUDA's autocast runs F.layer_norm in fp32 (the CPU's does not)
    return kernels.layer_norm(x, self.weight, self.bias, self.eps)


def _rms_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Llama's RMSNorm: weight * (x.float() * rstd).to(x.dtype)
    if _HAS_CAST_BEFORE_WEIGHT:
        return kernels.rms_norm(x, self.weight, self.variance_epsilon, cast_before_weight=True)
    return self.weight * kernels.rms_norm(x, None, self.variance_epsilon)


def _patch_norms(model: nn.Module, rms_class: str | None) -> int:
    count = 0
    for module in model.modules():
        if rms_class is None and type(module) is nn.LayerNorm and len(module.normalized_shape) == 1:
            module.forward = types.MethodType(_layer_norm_forward, module)
        elif rms_class is not None and type(module).__name__ == rms_class:
            module.forward = types.MethodType(_rms_norm_forward, module)
        else:
            continue
        count += 1
    return count


# -----------------------------------------------------------------------------
# attention: one function in transformers' registry

_path_log: list[str] | None = None


@contextlib.contextmanager
def attention_path():
    """Record the path of each fastlm attention call inside the block: a list of "kernel" / "sdpa: <why>"."""
    global _path_log
    previous, _path_log = _path_log, []
    try:
        yield _path_log
    finally:
        _path_log = previous


def _fallback_reason(query, key, value, attention_mask, dropout, kwargs) -> str | None:
    if attention_mask is not None:
        return "mask"
    if dropout > 0 and not _HAS_DROPOUT:
        return "dropout"
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None:
        return "score modifier"
    if query.shape[-1] > 256 or key.shape[-1] != value.shape[-1] or not query.dtype == key.dtype == value.dtype:
        return "shape or dtype"
    return None


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature. query (B, H, T, D), key/value (B, Hkv, S, D) after RoPE and the
    cache; returns ((B, T, H, D), None), as sdpa_attention_forward does."""
    if torch.is_autocast_enabled(query.device.type):  # SDPA runs in the autocast dtype; RoPE's fp32 cos/sin promote q, k
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    reason = _fallback_reason(query, key, value, attention_mask, dropout, kwargs)
    if _path_log is not None:
        _path_log.append("kernel" if reason is None else f"sdpa: {reason}")
    if reason is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    T, S = query.shape[2], key.shape[2]
    if causal and 1 < T < S:  # mask-free prefill into an empty static cache: the first T keys, as SDPA slices
        key, value = key[:, :, :T], value[:, :, :T]
    drop = {"dropout_p": dropout} if dropout > 0 else {}
    out = kernels.attention(query, key, value, causal=causal and T > 1, scale=scaling, **drop)  # (B, H, T, D)
    return out.transpose(1, 2), None  # (B, T, H, D), contiguous: the kernel lays its output out that way


def build_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
               mask_function=causal_mask_function, attention_mask=None, local_size=None,
               allow_is_causal_skip: bool = True, **kwargs) -> torch.Tensor | None:
    """SDPA's mask builder, but None for a plain causal mask with no padding, T == S and an empty cache, decided
    from Python values alone: transformers' sdpa_mask builds the mask whenever it runs under torch.compile
    (5.17) or reads the padding mask on the host (eager), so compiled models would never reach the kernel."""
    if (allow_is_causal_skip and attention_mask is None and mask_function is causal_mask_function and local_size is None
            and type(q_offset) is int and q_offset == 0 and kv_offset == 0 and q_length == kv_length):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, **kwargs)


def _register_attention() -> None:
    AttentionInterface.register(ATTN_NAME, attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, build_mask)  # without a mask builder transformers passes no mask


# -----------------------------------------------------------------------------
# LM head: the causal-LM loss from the hidden states, no logits

def causal_lm_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor | None = None,
                   num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = -100,
                   shift_labels: torch.Tensor | None = None, **_) -> torch.Tensor:
    """transformers' ForCausalLMLoss(head(hidden), labels, ...) by kernels.linear_cross_entropy. hidden (B, T, C);
    labels (B, T), shifted here (or shift_labels (B, T), already shifted)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    x = hidden.reshape(-1, hidden.shape[-1])  # (B*T, C), a view
    target = shift_labels.reshape(-1).to(x.device)
    if num_items_in_batch is None:
        return kernels.linear_cross_entropy(x, head.weight, target, head.bias, ignore_index=ignore_index)
    loss = kernels.linear_cross_entropy(x, head.weight, target, head.bias, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _fused_loss_forward(original):
    """Wrap the class's forward (unbound): the fused loss in training with labels, `original` otherwise."""
    params = inspect.signature(original).parameters
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]  # no self
    output_cls = inspect.signature(original).return_annotation
    if not (isinstance(output_cls, type) and issubclass(output_cls, ModelOutput)):
        output_cls = CausalLMOutputWithPast

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        call = {**dict(zip(names, args)), **kwargs}
        labels, shift_labels = call.pop("labels", None), call.get("shift_labels")
        logits_to_keep = call.pop("logits_to_keep", 0)
        head = self.get_output_embeddings()
        if (not self.training or (labels is None and shift_labels is None) or not isinstance(logits_to_keep, int)
                or logits_to_keep != 0 or type(head) is not nn.Linear):
            return original(self, *args, **kwargs)
        return_dict = call.pop("return_dict", None)
        outputs = getattr(self, self.base_model_prefix)(**call, return_dict=True)
        loss = causal_lm_loss(outputs.last_hidden_state, head, labels, **call)
        result = output_cls(loss=loss, logits=None, **{k: v for k, v in outputs.items() if k != "last_hidden_state"})
        if return_dict is False or (return_dict is None and not getattr(self.config, "return_dict", True)):
            return result.to_tuple()
        return result

    return forward


# -----------------------------------------------------------------------------

def patch(model, *, attention: bool = True, norms: bool = True, loss: bool = True):
    """Patch a transformers causal LM in place to run fastlm's kernels; returns `model`.

    Args:
        model: a GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM
            (or a PEFT model wrapping one). Patch before or after PEFT; the parameters are the model's own.
        attention, norms, loss: which parts to patch (all by default).

    Raises TypeError for another architecture and RuntimeError for an unsupported transformers version.
    """
    _check_version(transformers.__version__)
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(target).__name__
    if name not in SUPPORTED or not type(target).__module__.startswith("transformers.models."):
        raise TypeError(f"fastlm.hf.patch: {type(target).__module__}.{name} is not supported; "
                        f"supported: {', '.join(SUPPORTED)}")
    if getattr(target, "_fastlm_patched", False):
        return model
    if norms:
        _patch_norms(target, SUPPORTED[name])
    if attention:
        _register_attention()
        config = target.config
        if not _HAS_DROPOUT and (getattr(config, "attn_pdrop", 0.0) or getattr(config, "attention_dropout", 0.0)):
            warnings.warn(f"fastlm.hf.patch: {name} has attention dropout, which this kernels.attention lacks; its "
                          "training steps run SDPA (set attn_pdrop / attention_dropout to 0 to use the kernel)",
                          stacklevel=2)
        target.set_attn_implementation(ATTN_NAME)
    if loss:
        target.forward = types.MethodType(_fused_loss_forward(type(target).forward), target)
    target._fastlm_patched = True
    return model
