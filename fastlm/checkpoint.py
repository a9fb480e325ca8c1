"""A fine-tuning run's directory and its checkpoint: what `--out` may hold, and checkpoint.pt in and out.

checkpoint.pt holds whole tensors keyed by parameter name, whatever the run's layout (one process, DDP, FSDP),
so any of them resumes any other: `model` (the state dict, the tied head stored once), `optimizer` (AdamW's
state keyed by name), `step`, `rng` (the data generator's, torch's and CUDA's states), `model_config`,
`finetune_config` (the run's settings), `data_key` (the corpus hash), `windows_per_step` and `base_weights`.
Gathering FSDP's shards is a collective, so every rank calls save_checkpoint; rank 0 writes. Every file is
written to a temporary name and renamed (fastlm.files.atomic_write).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from fastlm.distributed import World
from fastlm.files import atomic_write

# Everything a run writes into --out; a fresh run refuses a directory holding any of them (unless --overwrite).
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "model.safetensors", "config.json", "loss.png",
             "adapter/adapter_model.safetensors", "adapter/adapter_config.json")
# Settings that change the data stream or what trains. The batch may be split differently (batch size,
# accumulation, processes) as long as each step takes the same number of windows.
RESUME_MUST_MATCH = ("seq_len", "seed", "val_fraction", "train_layers", "trainable", "lora_rank", "lora_alpha",
                     "lora_targets", "lora_dropout")
WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)


# -----------------------------------------------------------------------------
def prepare_out(path: str, resume: bool = False, overwrite: bool = False) -> Path:
    """--out as a writable directory; one that holds an earlier run needs --resume or --overwrite."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    earlier = [name for name in RUN_FILES if (out / name).exists()]
    if earlier and not resume and not overwrite:
        raise ValueError(f"--out {out} already holds {earlier[0]}: continue it with --resume, replace it with --overwrite, "
                         f"or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror})") from None
    return out


def clear_earlier_run(out: Path) -> None:
    """--overwrite, once the new run's set-up has succeeded: no file of the earlier run lingers beside the new one's."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


# -----------------------------------------------------------------------------
def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World, extra: dict) -> None:
    """checkpoint.pt with whole tensors keyed by name, written by rank 0 (under FSDP every rank must call this)."""
    model_state = get_model_state_dict(model, options=WHOLE)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=WHOLE)
    if world.is_main:
        if "lm_head.weight" in model_state:  # tied: one tensor, not two copies, in the file
            model_state["lm_head.weight"] = model_state["transformer.wte.weight"]
        atomic_write(path, lambda tmp: torch.save({"model": model_state, "optimizer": optimizer_state, **extra}, tmp))


def load_checkpoint(path: Path, world: World) -> dict:
    """checkpoint.pt, memory-mapped; a missing or foreign file is a one-line ValueError naming it."""
    if not path.is_file():
        raise ValueError(f"--resume: no checkpoint.pt in {path.parent}" + ("" if world.is_main else
                         " (every process reads it: put --out on a filesystem all machines share)"))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        missing = [k for k in ("model", "optimizer", "step", "rng", "model_config", "finetune_config", "data_key",
                               "windows_per_step", "base_weights") if k not in checkpoint]
    except Exception as e:
        raise ValueError(f"{path}: not a fastlm fine-tuning checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if missing:
        raise ValueError(f"{path}: not a fastlm fine-tuning checkpoint (no {missing[0]!r})")
    return checkpoint


def check_resumable(checkpoint: dict, cfg, windows_per_step: int, processes: int) -> None:
    """The run `cfg` continues the checkpoint's: same data stream and trainable set, same windows per step."""
    saved = checkpoint["finetune_config"]
    for name in RESUME_MUST_MATCH:
        if saved[name] != getattr(cfg, name):
            raise ValueError(f"--resume: --{name.replace('_', '-')} is {getattr(cfg, name)} but the checkpoint was "
                             f"trained with {saved[name]}; resume with the same value")
    if checkpoint["step"] >= cfg.max_steps:
        raise ValueError(f"--max-steps {cfg.max_steps}: the checkpoint is already at step {checkpoint['step']}")
    if checkpoint["windows_per_step"] != windows_per_step:
        raise ValueError(f"--resume: the checkpoint took {checkpoint['windows_per_step']} windows per step, this run "
                         f"would take {windows_per_step} (--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} "
                         f"x {processes} processes); keep the product to resume")


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a name-keyed whole state into this run's optimizer (plain, DDP or sharded), with this run's kernel
    choice (fused or not): the saving run's flags would decide where AdamW keeps its step counters."""
    flags = [{k: group[k] for k in ("fused", "foreach", "capturable") if k in group} for group in optimizer.param_groups]
    groups = [{**saved, **ours} for saved, ours in zip(state["param_groups"], flags)]
    set_optimizer_state_dict(model, optimizer, {**state, "param_groups": groups}, options=StateDictOptions(full_state_dict=True))


def rng_states(data_rng: torch.Generator, device: torch.device) -> dict:
    return {"data": data_rng.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng_states(states: dict, data_rng: torch.Generator, device: torch.device) -> None:
    data_rng.set_state(states["data"])
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and isinstance(states["cuda"], torch.Tensor):
        torch.cuda.set_rng_state(states["cuda"], device)
