"""LoRA: low-rank adapters for fastlm.GPT, in the files Hugging Face PEFT writes and reads.

A targeted nn.Linear (W: (out, in), bias b) keeps W and b frozen and learns a rank-r update beside them:

    y  = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A: (r, in), B: (out, r)
    W' = W + (alpha / r) * B @ A                             (merge_lora; computed in fp32)

A is initialised as PEFT does (kaiming_uniform_(a=sqrt(5)), nn.Linear's own default) and B to zeros, so training
starts exactly at the base model. Targets match layer names as PEFT's target_modules do: a layer is adapted when its
name equals a target or ends with "." + target, so "c_proj" adapts both attn.c_proj and mlp.c_proj, and "attn.c_proj"
only the first.

Files (save_adapters / load_adapters): adapter_config.json and adapter_model.safetensors with the keys
`base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight` (r, in) and `...lora_B.weight` (out, r), as PEFT saves
them for transformers' GPT2LMHeadModel. GPT-2's Conv1D stores W as (in, out); PEFT handles it with fan_in_fan_out=True,
but its lora_A/lora_B are still nn.Linear(in, r)/(r, out) and only the merged delta is transposed, so the factors are
the same tensors in both libraries and are stored untransposed.

Limits: nn.Linear layers inside the transformer blocks only (not the embeddings or the tied head); one adapter per
model; plain LoRA: no DoRA, rsLoRA, per-layer rank/alpha patterns, trained biases or modules_to_save (load_adapters
refuses adapters that use them). A LoRA model's state_dict holds lora_A/lora_B keys: merge_lora before
GPT.save_pretrained, or save the adapters alone with save_adapters.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from fastlm.model import GPT
from fastlm.files import atomic_write, read_json_object

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
FACTORS = ("lora_A", "lora_B")
# adapter_config.json fields that change what an adapter computes beyond plain LoRA; each must be off (absent, null,
# false, empty, or bias "none") for load_adapters to reproduce PEFT's model.
_UNSUPPORTED = ("use_dora", "use_rslora", "lora_bias", "bias", "rank_pattern", "alpha_pattern", "modules_to_save",
                "layer_replication", "trainable_token_indices", "target_parameters", "use_qalora", "use_bdlora",
                "alora_invocation_tokens", "arrow_config", "velora_config", "kasa_config", "monteclora_config")
_OFF = (None, False, "none", [], {})


class LoRALinear(nn.Linear):
    """nn.Linear plus a trainable low-rank branch: F.linear(x, W, b) + (alpha / r) * lora_B(lora_A(dropout(x))).

    Wraps `base` without copying: `weight` and `bias` are base's own Parameters under the same names, so the base
    state_dict keys are unchanged and lora_A.weight (r, in), lora_B.weight (out, r) are added beside them. The factors
    are created on the base weight's device in its dtype, and the module takes base's train/eval mode.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.train(base.training)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def merged_weight(self) -> Tensor:
        """W + (alpha / r) * B @ A (out, in), computed in fp32 and returned in W's dtype."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
        return (self.weight.float() + self.scaling * delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


# -----------------------------------------------------------------------------
def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The transformer blocks' nn.Linear layers by full name (transformer.h.0.attn.c_attn, ...); a LoRALinear counts
    as its layer, its factors do not."""
    return {name: m for name, m in model.transformer.h.named_modules(prefix="transformer.h")
            if isinstance(m, nn.Linear) and not name.endswith((".lora_A", ".lora_B"))}


def _matches(names, target: str) -> list[str]:
    """PEFT's target_modules rule for one list entry: the name itself or a dotted suffix of it."""
    return [name for name in names if name == target or name.endswith("." + target)]


def _short_names(names) -> list[str]:
    return list(dict.fromkeys(name.rpartition(".")[2] for name in names))


def _inject(model: nn.Module, names: Sequence[str], rank: int, alpha: float, dropout: float) -> None:
    """Wrap the named layers in LoRALinear and leave only the LoRA factors trainable."""
    model.requires_grad_(False)
    for name in names:  # the factors are created after the freeze, so they alone require grad
        model.set_submodule(name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))


def _refuse_second_adapter(model: nn.Module, caller: str) -> None:
    if layers := _lora_layers(model):
        raise ValueError(f"{caller}: the model already has LoRA layers ({next(iter(layers))}, ...); "
                         f"merge_lora them first or start from the base model")


def apply_lora(model: GPT, rank: int, alpha: float, targets: Sequence[str], dropout: float = 0.0) -> list[str]:
    """Add LoRA to every transformer-block nn.Linear matched by `targets` (c_attn, c_proj, c_fc, or a dotted suffix
    such as attn.c_proj) and freeze every other parameter. Returns the adapted layers' names, in model order.

    Errors are one-line ValueErrors naming the command-line flag (--lora-rank, --lora-alpha, --lora-dropout,
    --lora-targets). A string `targets` is one target.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"--lora-rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"--lora-alpha must be positive, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {dropout!r}")
    _refuse_second_adapter(model, "apply_lora")
    targets = [targets] if isinstance(targets, str) else list(targets)
    layers = _linear_layers(model)
    choices = ", ".join(_short_names(layers))
    if not targets:
        raise ValueError(f"--lora-targets: no layer names given; choose from {choices}")
    chosen = set()
    for target in targets:
        if not (found := _matches(layers, target)):
            raise ValueError(f"--lora-targets: {target!r} matches no layer; choose from {choices}")
        chosen.update(found)
    names = [name for name in layers if name in chosen]
    _inject(model, names, rank, alpha, dropout)
    return names


@torch.no_grad()
def merge_lora(model: GPT) -> GPT:
    """Fold every LoRALinear into a plain nn.Linear holding W' (the same bias Parameter), in place; returns model.

    Afterwards the model is an ordinary GPT: its state_dict has exactly the base keys, GPT.save_pretrained writes a
    GPT-2 that transformers loads, and every parameter requires grad again, as after GPT.from_pretrained (the freeze
    belonged to the LoRA run, not to the merged model).
    """
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("merge_lora: the model has no LoRA layers (apply_lora or load_adapters adds them)")
    for name, layer in layers.items():
        merged = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        merged.weight, merged.bias = nn.Parameter(layer.merged_weight()), layer.bias
        merged.train(layer.training)
        model.set_submodule(name, merged)
    model.requires_grad_(True)
    return model


# -----------------------------------------------------------------------------
def lora_state_dict(model: GPT) -> dict[str, Tensor]:
    """The adapter tensors under PEFT's names: base_model.model.{layer}.lora_A.weight (r, in), ...lora_B.weight (out, r)."""
    return {f"{PEFT_PREFIX}{name}.{factor}.weight": getattr(layer, factor).weight.detach()
            for name, layer in _lora_layers(model).items() for factor in FACTORS}


def _adapter_settings(model: nn.Module, caller: str) -> tuple[dict[str, LoRALinear], int, float, float]:
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(f"{caller}: the model has no LoRA layers (apply_lora or load_adapters adds them)")
    settings = {(layer.rank, layer.alpha, getattr(layer.lora_dropout, "p", 0.0)) for layer in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"{caller}: the LoRA layers differ in rank, alpha or dropout ({sorted(settings)}); "
                         f"adapter_config.json holds one of each")
    return (layers, *settings.pop())


def save_adapters(model: GPT, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter_model.safetensors + adapter_config.json into directory (each atomically), as PEFT's
    save_pretrained does, so peft.PeftModel.from_pretrained(GPT2LMHeadModel, directory) loads them. Returns directory.

    target_modules holds the layers' short names (c_attn, ...) when those select exactly the adapted layers, and
    their full names otherwise (say, after load_adapters of an adapter on some layers only). Keep adapters out of a
    merged model's directory: with peft installed, transformers' from_pretrained applies an adapter_config.json it
    finds beside model.safetensors, and the update would count twice.
    """
    layers, rank, alpha, dropout = _adapter_settings(model, "save_adapters")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory}: exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    short = _short_names(layers)
    exact = {name for target in short for name in _matches(_linear_layers(model), target)} == layers.keys()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": short if exact else list(layers),
        "fan_in_fan_out": True,  # GPT-2's Conv1D layers in transformers: PEFT sets it for them anyway
        "bias": "none", "inference_mode": True,
    }
    tensors = {k: v.to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    atomic_write(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def _read_config(path: Path) -> tuple[int, float, float]:
    config = read_json_object(path, f"a LoRA adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}, not 'LORA': not a LoRA adapter")
    for key in _UNSUPPORTED:
        if config.get(key) not in _OFF:
            raise ValueError(f"{path}: {key}={config[key]!r} is not supported (fastlm loads plain LoRA adapters)")
    rank, alpha, dropout = config.get("r"), config.get("lora_alpha"), config.get("lora_dropout", 0.0)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{path}: r must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"{path}: lora_alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"{path}: lora_dropout must be in [0, 1), got {dropout!r}")
    return rank, alpha, float(dropout)


def _read_tensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        other = " (adapter_model.bin is not read: re-save it with safe_serialization=True)" \
            if (path.parent / "adapter_model.bin").is_file() else ""
        raise ValueError(f"{path}: no such file{other}")
    try:
        with safe_open(path, framework="pt") as reader:
            return {key: reader.get_tensor(key) for key in reader.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def load_adapters(model: GPT, directory: str | os.PathLike) -> list[str]:
    """Add the LoRA adapters in directory (written by save_adapters or by PEFT's save_pretrained for GPT-2) to model,
    freezing the rest as apply_lora does. Returns the adapted layers' names.

    The adapted layers are the ones the tensor file holds factors for, so target_modules in any of PEFT's forms
    (suffixes, full names, a regular expression, layers_to_transform) loads. Every problem is a one-line ValueError
    naming the file and, where there is one, the key.
    """
    directory = Path(directory)
    rank, alpha, dropout = _read_config(directory / ADAPTER_CONFIG)
    weights_file = directory / ADAPTER_WEIGHTS
    tensors = _read_tensors(weights_file)
    _refuse_second_adapter(model, "load_adapters")
    layers = _linear_layers(model)
    names = set()
    for key in tensors:
        name, _, factor = key.removeprefix(PEFT_PREFIX).removesuffix(".weight").rpartition(".")
        if not key.startswith(PEFT_PREFIX) or not key.endswith(".weight") or factor not in FACTORS or name not in layers:
            raise ValueError(f"{weights_file}: unexpected key {key!r} (expected {PEFT_PREFIX}transformer.h.<i>.<layer>."
                             f"lora_A.weight / lora_B.weight for this model's {', '.join(_short_names(layers))} layers)")
        names.add(name)
    if not names:
        raise ValueError(f"{weights_file}: holds no LoRA tensors")
    ordered = [name for name in layers if name in names]
    expected = {}
    for name in ordered:
        layer = layers[name]
        for factor, shape in zip(FACTORS, ((rank, layer.in_features), (layer.out_features, rank))):
            key = f"{PEFT_PREFIX}{name}.{factor}.weight"
            if key not in tensors:
                raise ValueError(f"{weights_file}: missing {key!r}")
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"{weights_file}: {key!r} has shape {tuple(tensors[key].shape)}, expected {shape} "
                                 f"(r={rank} from {ADAPTER_CONFIG})")
            expected[key] = (name, factor)
    _inject(model, ordered, rank, alpha, dropout)
    with torch.no_grad():
        for key, (name, factor) in expected.items():
            param = getattr(model.get_submodule(name), factor).weight
            param.copy_(tensors[key].to(device=param.device, dtype=param.dtype))
    return ordered
