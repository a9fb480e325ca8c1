"""GPT-2 weights as safetensors: the layouts found in the wild in, Hugging Face's save_pretrained layout out.

In: a `.safetensors` file, or a directory with `model.safetensors` or a sharded `model.safetensors.index.json`,
and `config.json` when there is one (otherwise the config is inferred from the tensors: GPT-2's head dim is 64
in every published size, and its dropout 0.1). The config's three dropout probabilities (embd_pdrop, attn_pdrop,
resid_pdrop) are read from config.json and written back to it. Both key layouts load: today's `transformer.h.0.attn.c_attn.weight` and the original
hub file's `h.0.attn.c_attn.weight` with its `h.N.attn.bias` / `h.N.attn.masked_bias` mask buffers (dropped).
GPT-2's Conv1D weights are stored (in, out) and transposed to nn.Linear's (out, in). The tensors are read
through safetensors' memory map and the model is built on the meta device, so nothing is initialised twice.

Out: `config.json`, then `model.safetensors` (no `lm_head.weight`: it is tied), each written to a temporary file
in the target directory and renamed over the old one, so an interrupted save never leaves a half-written file,
and a model.safetensors is never there without the config.json it was saved with. Its safetensors metadata
carries, besides {"format": "pt"}, fastlm's own record of the model:

    fastlm_config    the config.json it was saved with (JSON), so the file alone says what model it is
    fastlm_checksum  "sha256-crc32:<hex>": sha256 over each tensor's name, dtype, shape and CRC-32 of its bytes
                     (in name order), as state_digest computes it

and fastlm checks both when it loads a file that has them (transformers ignores them): a checksum that does
not match (a flipped bit, a damaged copy) and a config.json that contradicts the saved config are refused; with
no config.json beside it, the file's own config is used. Every problem is a WeightsError naming the file and,
where there is one, the key.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastlm.config import GPT2_PDROP, GPTConfig
from fastlm.files import atomic_write, atomic_write_text

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_MASK_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # not h.N.attn.c_attn.bias
_LAYER = re.compile(r"^h\.(\d+)\.")
GPT2_HEAD_DIM = 64
CHECKSUM_KIND = "sha256-crc32"


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


def _read(files: list[Path]) -> tuple[dict[str, tuple[torch.Tensor, Path]], dict | None]:
    """Every file's tensors (with the file each came from), checksums verified; and fastlm's saved config, if any."""
    tensors, saved_config = {}, None
    for f in files:
        try:
            with safe_open(f, framework="pt") as reader:
                metadata = reader.metadata() or {}
                own = {key: reader.get_tensor(key) for key in reader.keys()}
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise WeightsError(f"{f}: not a readable safetensors file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        if "fastlm_checksum" in metadata and metadata["fastlm_checksum"] != state_digest(own, sort=True):
            raise WeightsError(f"{f}: corrupt: its tensors do not match the checksum saved with them (a damaged or "
                               f"altered file); use another copy")
        if "fastlm_config" in metadata:
            try:
                saved_config = json.loads(metadata["fastlm_config"])
            except json.JSONDecodeError:
                raise WeightsError(f"{f}: its fastlm_config metadata is not JSON") from None
        tensors.update({key: (tensor, f) for key, tensor in own.items()})
    return tensors, saved_config


def _infer_config(tensors: dict[str, torch.Tensor], source: Path) -> GPTConfig:
    wte, wpe = tensors["wte.weight"], tensors["wpe.weight"]
    layers = {int(m.group(1)) for key in tensors if (m := _LAYER.match(key))}
    n_embd = wte.shape[1]
    if n_embd % GPT2_HEAD_DIM:
        raise WeightsError(f"{source}: n_embd {n_embd} is not a multiple of GPT-2's head dim 64; add a config.json with n_head")
    return GPTConfig(block_size=wpe.shape[0], vocab_size=wte.shape[0], n_layer=max(layers, default=-1) + 1,
                     n_head=n_embd // GPT2_HEAD_DIM, n_embd=n_embd).with_dropout(GPT2_PDROP)  # GPT-2's, as from_hf


def load_state(path: str | os.PathLike, expected_shapes: Callable[[GPTConfig], dict[str, torch.Size]]
               ) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Read a GPT-2 checkpoint: its config and a state dict in this model's layout (transformer.* names, Linear
    weights), checked against expected_shapes(config) (the model's state_dict names and shapes, lm_head aside)."""
    files, config_file = _resolve(path)
    raw, saved_config = _read(files)
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
            hf = json.loads(config_file.read_text())
            config = GPTConfig.from_hf(hf, source=str(config_file))
        except (OSError, json.JSONDecodeError) as e:
            raise WeightsError(f"{config_file}: unreadable config.json ({e})") from None
        except ValueError as e:
            raise WeightsError(str(e)) from None
        if saved_config is not None:
            _check_agrees(config, _saved(saved_config, label), config_file, label)
    elif saved_config is not None:
        config = _saved(saved_config, label)
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


def _saved(hf: dict, label: Path) -> GPTConfig:
    try:
        return GPTConfig.from_hf(hf, source=f"{label} (its fastlm_config metadata)")
    except ValueError as e:
        raise WeightsError(str(e)) from None


def _check_agrees(config: GPTConfig, saved: GPTConfig, config_file: Path, label: Path) -> None:
    """config.json must describe the model the safetensors file was saved as (the shapes do not show n_head)."""
    for field in ("n_head", "layer_norm_eps", "n_layer", "n_embd", "block_size", "vocab_size"):
        ours, theirs = getattr(config, field), getattr(saved, field)
        if ours != theirs:
            raise WeightsError(f"{config_file}: says {field} {ours}, but {label.name} was saved as a model with "
                               f"{field} {theirs}: the two files are not one model")


def state_digest(state, sort: bool = False) -> str:
    """A checksum of a nested structure of dicts, lists and tensors: sha256 over its layout and every value (a
    tensor by dtype, shape and the CRC-32 of its bytes, anything else by repr), in order (sort: dict keys sorted).

    CRC-32 runs at a few GB/s and releases the GIL, so the tensors are checksummed on several threads: about
    0.3 s for GPT-2 124M's weights and AdamW state on 2 cores.
    """
    layout, tensors = hashlib.sha256(), []

    def walk(value) -> None:
        if isinstance(value, torch.Tensor):
            layout.update(f"T{value.dtype}{tuple(value.shape)};".encode())
            tensors.append(value)
        elif isinstance(value, dict):
            layout.update(b"{")
            for key in sorted(value) if sort else value:
                layout.update(repr(key).encode() + b":")
                walk(value[key])
            layout.update(b"}")
        elif isinstance(value, (list, tuple)):
            layout.update(b"[")
            for item in value:
                walk(item)
            layout.update(b"]")
        else:
            layout.update(repr(value).encode() + b";")

    walk(state)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        crcs = list(pool.map(_crc32, tensors))
    layout.update(b"".join(crc.to_bytes(4, "little") for crc in crcs))
    return f"{CHECKSUM_KIND}:{layout.hexdigest()}"


def _crc32(tensor: torch.Tensor) -> int:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return zlib.crc32(memoryview(flat.view(torch.uint8).numpy())) if flat.numel() else 0


def load_into(model, state: dict[str, torch.Tensor], device=None, dtype=None) -> None:
    """Assign a loaded state dict to a (meta-device) GPT, cast and placed, and re-tie the head."""
    state = {k: v.to(device=device, dtype=dtype).contiguous() for k, v in state.items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.lm_head.weight = model.transformer.wte.weight


def save(model, directory: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write config.json, then model.safetensors (with `metadata` among its own), in Hugging Face's GPT-2 layout."""
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
    own = {"format": "pt", "fastlm_config": json.dumps(config), "fastlm_checksum": state_digest(tensors, sort=True)}
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2) + "\n")
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={**(metadata or {}), **own}))
    return directory


def saved_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors metadata of a file (its header only); {} when it is missing or unreadable."""
    try:
        with safe_open(Path(path), framework="pt") as reader:
            return reader.metadata() or {}
    except Exception:  # noqa: BLE001 -- absent or damaged: either way, not what the caller is looking for
        return {}
