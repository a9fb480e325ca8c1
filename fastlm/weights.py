"""GPT-2 weights as safetensors: the layouts found in the wild in, Hugging Face's save_pretrained layout out.

In: a `.safetensors` file, or a directory with `model.safetensors` or a sharded `model.safetensors.index.json`,
and `config.json` when there is one (otherwise the config is inferred from the tensors: GPT-2's head dim is 64
in every published size). Both key layouts load: today's `transformer.h.0.attn.c_attn.weight` and the original
hub file's `h.0.attn.c_attn.weight` with its `h.N.attn.bias` / `h.N.attn.masked_bias` mask buffers (dropped).
GPT-2's Conv1D weights are stored (in, out) and transposed to nn.Linear's (out, in). The tensors are read
through safetensors' memory map and the model is built on the meta device, so nothing is initialised twice.

Out: `model.safetensors` (no `lm_head.weight`: it is tied) and `config.json`, each written to a temporary file
in the target directory and renamed over the old one, so an interrupted save never leaves a half-written file.
Every problem is a WeightsError naming the file and, where there is one, the key.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastlm.config import GPTConfig
from fastlm.files import atomic_write, atomic_write_text

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_MASK_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # not h.N.attn.c_attn.bias
_LAYER = re.compile(r"^h\.(\d+)\.")
GPT2_HEAD_DIM = 64


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded or saved; the message names the file and the key."""


def _resolve(path: str | os.PathLike) -> tuple[list[Path], Path | None]:
    """The safetensors files to read and the config.json to use, if any."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such file or directory")
    if path.is_dir():
        config = path / "config.json"
        config = config if config.is_file() else None
        if (path / "model.safetensors").is_file():
            return [path / "model.safetensors"], config
        if (path / "model.safetensors.index.json").is_file():
            return _shards(path / "model.safetensors.index.json"), config
        raise WeightsError(f"{path}: no model.safetensors or model.safetensors.index.json in this directory")
    if path.name.endswith(".index.json"):
        config = path.parent / "config.json"
        return _shards(path), config if config.is_file() else None
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: not a .safetensors file (PyTorch .bin/.pt checkpoints are not loaded: convert them with safetensors)")
    config = path.parent / "config.json"
    return [path], config if path.name == "model.safetensors" and config.is_file() else None


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{index}: not a safetensors index with a weight_map ({e})") from None
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    for f in files:
        if not f.is_file():
            raise WeightsError(f"{index}: shard {f.name} is missing")
    return files


def _read(files: list[Path]) -> dict[str, tuple[torch.Tensor, Path]]:
    tensors = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as reader:
                for key in reader.keys():
                    tensors[key] = (reader.get_tensor(key), f)
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise WeightsError(f"{f}: not a readable safetensors file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return tensors


def _infer_config(tensors: dict[str, torch.Tensor], source: Path) -> GPTConfig:
    wte, wpe = tensors["wte.weight"], tensors["wpe.weight"]
    layers = {int(m.group(1)) for key in tensors if (m := _LAYER.match(key))}
    n_embd = wte.shape[1]
    if n_embd % GPT2_HEAD_DIM:
        raise WeightsError(f"{source}: n_embd {n_embd} is not a multiple of GPT-2's head dim 64; add a config.json with n_head")
    return GPTConfig(block_size=wpe.shape[0], vocab_size=wte.shape[0], n_layer=max(layers, default=-1) + 1,
                     n_head=n_embd // GPT2_HEAD_DIM, n_embd=n_embd)


def load_state(path: str | os.PathLike, expected_shapes: Callable[[GPTConfig], dict[str, torch.Size]]
               ) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Read a GPT-2 checkpoint: its config and a state dict in this model's layout (transformer.* names, Linear
    weights), checked against expected_shapes(config) (the model's state_dict names and shapes, lm_head aside)."""
    files, config_file = _resolve(path)
    raw = _read(files)
    label = files[0] if len(files) == 1 else Path(path)
    tensors, origin, lm_head = {}, {}, None
    for key, (tensor, f) in raw.items():
        name = key.removeprefix("transformer.")
        if _MASK_BUFFER.match(name):
            continue
        if name == "lm_head.weight":
            lm_head = (tensor, f)
            continue
        tensors[name], origin[name] = tensor, f
    if "wte.weight" not in tensors or "wpe.weight" not in tensors:
        sample = ", ".join(list(raw)[:3])
        raise WeightsError(f"{label}: not a GPT-2 checkpoint (no wte.weight/wpe.weight; keys look like: {sample})")
    if config_file is not None:
        try:
            config = GPTConfig.from_hf(json.loads(config_file.read_text()), source=str(config_file))
        except (OSError, json.JSONDecodeError) as e:
            raise WeightsError(f"{config_file}: unreadable config.json ({e})") from None
        except ValueError as e:
            raise WeightsError(str(e)) from None
    else:
        config = _infer_config(tensors, label)

    expected = expected_shapes(config)
    state = {}
    for name, tensor in tensors.items():
        key = f"transformer.{name}"
        if key not in expected:
            raise WeightsError(f"{origin[name]}: unexpected key {name!r} for a GPT-2 with {config.n_layer} layers")
        if name.endswith(CONV1D_SUFFIXES) and tensor.dim() == 2:
            tensor = tensor.t()
        if tensor.shape != expected[key]:
            raise WeightsError(f"{origin[name]}: {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[key])} "
                               f"(Conv1D weights are stored (in, out))")
        state[key] = tensor
    missing = sorted(k.removeprefix("transformer.") for k in expected.keys() - state.keys())
    if missing:
        raise WeightsError(f"{label}: missing {len(missing)} weight(s), first {missing[0]!r}")
    if lm_head is not None and not torch.equal(lm_head[0], state["transformer.wte.weight"]):
        raise WeightsError(f"{lm_head[1]}: lm_head.weight differs from wte.weight; GPT-2's head is tied to the embedding")
    return config, state


def load_into(model, state: dict[str, torch.Tensor], device=None, dtype=None) -> None:
    """Assign a loaded state dict to a (meta-device) GPT, cast and placed, and re-tie the head."""
    state = {k: v.to(device=device, dtype=dtype).contiguous() for k, v in state.items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.lm_head.weight = model.transformer.wte.weight


def save(model, directory: str | os.PathLike) -> Path:
    """Write model.safetensors + config.json in Hugging Face's GPT-2 layout into directory."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise WeightsError(f"{directory}: exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        tensor = tensor.detach()
        if key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        tensors[key] = tensor.to("cpu").contiguous()
    config = model.config.to_hf()
    config["dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2) + "\n")
    return directory
