"""Prompt tuning: N learned virtual-token embeddings before every input of a frozen GPT, in the files Hugging Face
PEFT writes and reads for prompt tuning (PeftType.PROMPT_TUNING).

The soft prompt P (N, C) is the only trained tensor. For token ids idx (B, T), the model's input is

    x = dropout([P; wte(idx)] + wpe(0 .. N + T - 1))      (B, N + T, C)

exactly as PEFT's PeftModelForCausalLM builds it for GPT-2: it concatenates the prompt before `inputs_embeds`
and passes no position ids, so GPT-2's position embeddings number the virtual tokens 0 .. N - 1 and the text's
tokens from N on (in generation too: the cache continues from N + T). The virtual positions predict nothing: the
model returns the hidden states (and logits, loss) of idx's tokens only, so the loss counts real tokens only and
a sequence of T tokens needs N + T positions of context. (PEFT's model, given labels equal to its input, also scores
the first token from the last virtual position; a fastlm window of T + 1 tokens scores its last T, as without a
prompt. With that first label -100, PEFT's loss is fastlm's: tested.)

Initialisation (add_soft_prompt): from a text (PEFT's prompt_tuning_init="TEXT": the token embeddings of the
text's GPT-2 tokens, cut to N or repeated to reach it), or random: N(0, s^2) with s the standard deviation of the
model's token embeddings, so the virtual tokens start at the scale of real ones (PEFT's "RANDOM" keeps
nn.Embedding's N(0, 1), several times GPT-2's scale; either is a starting point, and the files are the same).

Files (save_prompt / load_prompt): adapter_config.json (peft_type PROMPT_TUNING, task_type CAUSAL_LM,
num_virtual_tokens, token_dim, num_transformer_submodules 1, ...) and adapter_model.safetensors holding one tensor,
`prompt_embeddings` (N, C), as PEFT's save_pretrained writes them, so
`peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), directory)` applies the same prompt, and a
prompt PEFT trained loads here.

Training (setup, called by fastlm.trainable for --prompt-tokens): the model is frozen and the prompt alone requires
grad, so the optimizer holds N x C parameters and the model has no gradients and no optimizer state. The gradient
still flows back through every block to the input, so every block keeps the activations its input's gradient needs
(not the inputs of its frozen matmuls, which only weight gradients read): about what LoRA on every block keeps. A
window of seq_len tokens takes N + seq_len positions: check_window says so when they exceed the context.

Limits: one soft prompt per model, decoder-only (num_transformer_submodules 1), no task ids (PEFT's multitask
prompt tuning) and no prefix tuning or P-tuning (other prompt-learning methods of PEFT, refused on load).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from fastlm.files import atomic_write, read_json_object
from fastlm.model import GPT

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROMPT_KEY = "prompt_embeddings"  # PEFT's name for the prompt encoder's embedding table
GPT2_TOKENIZER = "openai-community/gpt2"  # the tokenizer fastlm bundles, named for PEFT's text initialisation


class SoftPrompt(nn.Module):
    """The virtual tokens' embeddings, `weight` (N, C): what GPT puts before every input when it has one
    (`model.soft_prompt`). init_text: the text it was initialised from, if any (recorded in adapter_config.json)."""

    def __init__(self, weight: Tensor, init_text: str | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.init_text = init_text

    @property
    def num_tokens(self) -> int:
        return self.weight.shape[0]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]} virtual tokens x {self.weight.shape[1]}"


def prompt_of(model: GPT) -> Tensor | None:
    """The model's soft prompt (N, C), or None: what GPT.hidden_states takes as `prompt`."""
    return None if model.soft_prompt is None else model.soft_prompt.weight


def num_virtual_tokens(model: GPT) -> int:
    return 0 if model.soft_prompt is None else model.soft_prompt.num_tokens


def _check_room(model: GPT, num_tokens: int, flag: str) -> None:
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"{flag} must be a positive integer, got {num_tokens!r}")
    if num_tokens >= model.config.block_size:
        raise ValueError(f"{flag} {num_tokens} leaves no room for text in the model's context of "
                         f"{model.config.block_size} tokens")


def check_prompt_room(model: GPT, num_tokens: int) -> None:
    """--prompt-tokens N (0: no prompt) must leave room for text in the model's context."""
    if num_tokens:
        _check_room(model, num_tokens, "--prompt-tokens")


def _refuse_second_prompt(model: GPT, caller: str) -> None:
    if model.soft_prompt is not None:
        raise ValueError(f"{caller}: the model already has a soft prompt ({model.soft_prompt.num_tokens} virtual tokens)")


def initial_embeddings(model: GPT, num_tokens: int, init_text: str | None = None, tokenizer=None) -> Tensor:
    """(num_tokens, C) fp32 starting embeddings: the text's token embeddings cut or repeated to num_tokens (PEFT's
    TEXT initialisation), or, without a text, normal with the token embeddings' standard deviation."""
    wte = model.transformer.wte.weight
    if init_text is None:
        scale = wte.detach().float().std()
        return torch.randn(num_tokens, wte.shape[1], device=wte.device) * scale
    if tokenizer is None:
        from fastlm.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    ids = tokenizer.encode(init_text)
    if not ids:
        raise ValueError("--prompt-init-text is empty: give a text to start the virtual tokens from, or leave it out")
    if max(ids) >= model.config.vocab_size:
        raise ValueError(f"--prompt-init-text: the model's vocabulary of {model.config.vocab_size} does not cover its "
                         f"tokens")
    ids = (ids * math.ceil(num_tokens / len(ids)))[:num_tokens]
    return wte.detach()[torch.tensor(ids, device=wte.device)].float().clone()


def add_soft_prompt(model: GPT, num_tokens: int, init_text: str | None = None, tokenizer=None) -> SoftPrompt:
    """Give the model a trainable soft prompt of num_tokens virtual tokens and freeze every other parameter.

    Returns the SoftPrompt (also `model.soft_prompt`). Errors are one-line ValueErrors naming the flag
    (--prompt-tokens, --prompt-init-text).
    """
    _check_room(model, num_tokens, "--prompt-tokens")
    _refuse_second_prompt(model, "add_soft_prompt")
    weight = initial_embeddings(model, num_tokens, init_text, tokenizer)
    model.requires_grad_(False)
    model.soft_prompt = SoftPrompt(weight, init_text)  # created after the freeze: it alone requires grad
    return model.soft_prompt


def setup(model: GPT, num_tokens: int, init_text: str | None = None, tokenizer=None) -> str:
    """Prompt-tuning mode of fine-tuning: a trainable soft prompt of num_tokens virtual tokens (from init_text's
    embeddings, or random), every model weight frozen. Returns what trains, in words, for the run's start line."""
    prompt = add_soft_prompt(model, num_tokens, init_text, tokenizer)
    start = "at random" if init_text is None else f"from the embeddings of {init_text!r}"
    return (f"a soft prompt of {prompt.num_tokens} virtual tokens x {model.config.n_embd} (initialised {start}; every "
            f"model weight frozen)")


def text_room(model: GPT) -> int:
    """How many real tokens fit the context beside the model's virtual ones."""
    return model.config.block_size - num_virtual_tokens(model)


def check_window(model: GPT, seq_len: int, flag: str = "--seq-len") -> None:
    """A window of seq_len tokens, after the model's virtual tokens, must fit its context (one-line ValueError).
    Without a soft prompt there is nothing to check here: the commands check the context themselves."""
    n, context = num_virtual_tokens(model), model.config.block_size
    if n and seq_len + n > context:
        raise ValueError(f"{flag} {seq_len} + {n} virtual tokens (the soft prompt) exceed the model's context of "
                         f"{context} tokens: use {flag} {context - n} or less")


@contextlib.contextmanager
def detached(model: GPT):
    """Within the block the model has no soft prompt (its state_dict is the base model's), then it has it again."""
    prompt, model.soft_prompt = model.soft_prompt, None
    try:
        yield model
    finally:
        model.soft_prompt = prompt


# -----------------------------------------------------------------------------
def save_prompt(model: GPT, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter_model.safetensors + adapter_config.json into directory (each atomically), as PEFT's
    save_pretrained does for prompt tuning, so peft.PeftModel.from_pretrained(GPT2LMHeadModel, directory) loads
    them. Returns directory. The tensor is saved in fp32, as PEFT keeps it."""
    if model.soft_prompt is None:
        raise ValueError("save_prompt: the model has no soft prompt (add_soft_prompt or load_prompt gives it one)")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory}: exists and is not a directory")
    _refuse_other_adapter(directory / ADAPTER_CONFIG)
    directory.mkdir(parents=True, exist_ok=True)
    prompt, c = model.soft_prompt, model.config
    text = prompt.init_text
    config = {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "num_virtual_tokens": prompt.num_tokens, "token_dim": c.n_embd, "num_transformer_submodules": 1,
        "num_attention_heads": c.n_head, "num_layers": c.n_layer,
        "prompt_tuning_init": "RANDOM" if text is None else "TEXT", "prompt_tuning_init_text": text,
        # PEFT's config requires a tokenizer with TEXT (it reads it only to initialise a prompt for training)
        "tokenizer_name_or_path": None if text is None else GPT2_TOKENIZER, "tokenizer_kwargs": None,
        "inference_mode": True, "modules_to_save": None, "revision": None, "auto_mapping": None,
    }
    tensors = {PROMPT_KEY: prompt.weight.detach().to("cpu", torch.float32).contiguous()}
    # the tensor first, the config (which says what the tensor is) last: a save interrupted between the two leaves an
    # old config whose num_virtual_tokens no longer fits, which load_prompt refuses, or the same prompt's config
    atomic_write(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def _refuse_other_adapter(path: Path) -> None:
    """An adapter_config.json that is not a soft prompt's (a LoRA adapter, say) is someone's work: never replaced."""
    if not path.exists():
        return
    try:
        config = json.loads(path.read_text())
        kind = config.get("peft_type") if isinstance(config, dict) else None
    except (OSError, ValueError):
        kind = None
    if kind != "PROMPT_TUNING":
        what = f"a {kind} adapter's config" if isinstance(kind, str) else "an adapter config of no known kind"
        raise ValueError(f"{path}: {what}, not a soft prompt's: save the prompt in another directory")


def _read_config(path: Path, model: GPT) -> dict:
    config = read_json_object(path, f"a prompt-tuning directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    kind = config.get("peft_type")
    if kind != "PROMPT_TUNING":
        also = " (LoRA adapters load with fastlm.lora.load_adapters)" if kind == "LORA" else ""
        raise ValueError(f"{path}: peft_type is {kind!r}, not 'PROMPT_TUNING': not a soft prompt{also}")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{path}: task_type is {config['task_type']!r}; fastlm applies CAUSAL_LM prompts")
    if config.get("num_transformer_submodules") not in (None, 1):
        raise ValueError(f"{path}: num_transformer_submodules={config['num_transformer_submodules']!r}: an "
                         f"encoder-decoder's prompt, not a GPT's")
    if config.get("modules_to_save"):
        raise ValueError(f"{path}: modules_to_save={config['modules_to_save']!r} is not supported (fastlm loads the "
                         f"prompt alone)")
    n, dim = config.get("num_virtual_tokens"), config.get("token_dim")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{path}: num_virtual_tokens must be a positive integer, got {n!r}")
    if dim is not None and dim != model.config.n_embd:
        raise ValueError(f"{path}: token_dim is {dim} but the model is {model.config.n_embd} wide: a prompt for "
                         f"another model")
    return config


def _read_tensor(path: Path, shape: tuple[int, int]) -> Tensor:
    if not path.is_file():
        other = " (adapter_model.bin is not read: re-save it with safe_serialization=True)" \
            if (path.parent / "adapter_model.bin").is_file() else ""
        raise ValueError(f"{path}: no such file{other}")
    try:
        with safe_open(path, framework="pt") as reader:
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if set(tensors) != {PROMPT_KEY}:
        unexpected = sorted(set(tensors) - {PROMPT_KEY})
        raise ValueError(f"{path}: " + (f"unexpected key {unexpected[0]!r}" if unexpected else f"no {PROMPT_KEY!r}")
                         + f" (a prompt-tuning file holds {PROMPT_KEY!r} alone)")
    tensor = tensors[PROMPT_KEY]
    if tuple(tensor.shape) != shape or not tensor.is_floating_point():
        raise ValueError(f"{path}: {PROMPT_KEY!r} is {tuple(tensor.shape)} {tensor.dtype}, expected {shape} floats "
                         f"(num_virtual_tokens x token_dim from {ADAPTER_CONFIG})")
    return tensor


def load_prompt(model: GPT, directory: str | os.PathLike, trainable: bool = False) -> SoftPrompt:
    """Give the model the soft prompt in directory (written by save_prompt or by PEFT's save_pretrained for a
    prompt-tuning model of GPT-2), in the model's dtype and on its device. trainable: freeze the model and let
    the prompt train (else it is loaded frozen, for inference). Every problem is a one-line ValueError naming the
    file."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory}: not a directory (a prompt-tuning directory holds {ADAPTER_CONFIG} and "
                         f"{ADAPTER_WEIGHTS})")
    config = _read_config(directory / ADAPTER_CONFIG, model)
    n = config["num_virtual_tokens"]
    _check_room(model, n, f"{directory / ADAPTER_CONFIG}: num_virtual_tokens")
    _refuse_second_prompt(model, "load_prompt")
    tensor = _read_tensor(directory / ADAPTER_WEIGHTS, (n, model.config.n_embd))
    wte = model.transformer.wte.weight
    if trainable:
        model.requires_grad_(False)
    model.soft_prompt = SoftPrompt(tensor.to(device=wte.device, dtype=wte.dtype), config.get("prompt_tuning_init_text"))
    model.soft_prompt.requires_grad_(trainable)
    return model.soft_prompt
