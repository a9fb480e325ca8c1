"""A fine-tuning run's directory and its checkpoint: what `--out` may hold, who may write it, checkpoint.pt in and out.

One run per --out: the run holds an advisory lock (flock) on `--out/.fastlm-run.lock` for its whole life, with
its pid, host and start time in the file; a second run on the same --out (fresh, --resume or --overwrite) is
refused with one line naming the holder. The kernel drops the lock when its process dies, however it dies, so
a killed run's lock file is stale, not held, and the next run takes it over. That next run, once its set-up has
succeeded, removes the temporary files a killed run left (`.<name>.<random>.tmp`, see fastlm.files); a run
whose set-up fails leaves --out as it found it (a directory it created is removed again).

checkpoint.pt holds whole tensors keyed by parameter name, whatever the run's layout (one process, DDP, FSDP),
so any of them resumes any other: `model` (the state dict, the tied head stored once), `optimizer` (AdamW's
state keyed by name), `step`, `rng` (the data generator's state, and each rank's torch CPU and CUDA generator
states, which draw its dropout masks: `ranks`, one entry per process), `model_config`,
`finetune_config` (the run's settings), `data_key` (the corpus hash), `windows_per_step`, `base_weights`, and
`checksum` (fastlm.weights.state_digest of everything else, which resume verifies: torch.load does not check
the zip's CRCs). A state with a non-finite weight or optimizer moment is never written. Gathering FSDP's shards
is a collective, so every rank calls save_checkpoint; rank 0 writes, to a temporary name that is then renamed.

The final save, in the order it happens: checkpoint.pt at the last step, then (LoRA) adapter/, config.json and,
last, model.safetensors, whose metadata records the step (`fastlm_step`). A model.safetensors of the
checkpoint's step is what marks the run complete; a checkpoint at --max-steps without it is a run killed during
its final save, and --resume finishes that save.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from fastlm.distributed import World, gather_objects
from fastlm.files import atomic_write, remove_temporaries
from fastlm.weights import saved_metadata, state_digest

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not locked
    fcntl = None

# Everything a run writes into --out; a fresh run refuses a directory holding any of them (unless --overwrite).
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "model.safetensors", "config.json", "loss.png",
             "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
             "prompt/adapter_model.safetensors", "prompt/adapter_config.json")
LOCK_FILE = ".fastlm-run.lock"
# Settings that change the data stream or what trains. The batch may be split differently (batch size,
# accumulation, processes) as long as each step takes the same number of windows.
RESUME_MUST_MATCH = ("seq_len", "seed", "val_fraction", "train_layers", "trainable", "lora_rank", "lora_alpha",
                     "lora_targets", "lora_dropout", "pack", "prompt_tokens", "prompt_init_text")
CHECKPOINT_KEYS = ("model", "optimizer", "step", "rng", "model_config", "finetune_config", "data_key",
                   "windows_per_step", "base_weights")
WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)


class NotFinite(ValueError):
    """A loss or a weight became nan or infinite; nothing non-finite is saved."""


# -----------------------------------------------------------------------------
@dataclass
class RunDir:
    """--out, locked by this process (rank 0) for the run's life."""

    path: Path
    lock_fd: int | None
    created: list[Path] = field(default_factory=list)  # directories this run made, deepest first
    stale_holder: str | None = None                     # the killed run whose lock this one took over

    def begin(self, overwrite: bool) -> list[Path]:
        """Once set-up has succeeded: remove what killed runs left half-written (and, with --overwrite, the
        earlier run's files). Returns the temporary files removed."""
        removed = remove_temporaries(self.path, [Path(n).name for n in RUN_FILES if "/" not in n])
        for folder in ("adapter", "prompt"):
            removed += remove_temporaries(self.path / folder, [Path(n).name for n in RUN_FILES if n.startswith(f"{folder}/")])
        if overwrite:
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
        return removed

    def release(self) -> None:
        """The run is over (finished or failed): drop the lock and its file."""
        if self.lock_fd is None:
            return
        (self.path / LOCK_FILE).unlink(missing_ok=True)  # before unlocking: no one else holds it in between
        os.close(self.lock_fd)
        self.lock_fd = None

    def abandon(self) -> None:
        """Set-up failed: leave --out as it was found (the lock released, directories made for it removed)."""
        self.release()
        for directory in self.created:
            try:
                directory.rmdir()  # only while empty
            except OSError:
                break


def open_out(path: str, resume: bool = False, overwrite: bool = False) -> RunDir:
    """--out as a writable directory locked for this run; one that holds an earlier run needs --resume or
    --overwrite, and one that another run holds is refused."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror})") from None
    stale = _lock(fd, out)  # refused: the directory and the lock file are the other run's, left untouched
    run_dir = RunDir(out, fd, created, stale)
    earlier = [name for name in RUN_FILES if (out / name).exists()]
    if earlier and not resume and not overwrite:
        run_dir.abandon()
        raise ValueError(f"--out {out} already holds {earlier[0]}: continue it with --resume, replace it with "
                         f"--overwrite, or choose another --out")
    return run_dir


def _lock(fd: int, out: Path) -> str | None:
    """Take the run lock on fd and write this process into it; returns the stale holder it replaced, if any."""
    previous = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f"--out {out} is in use by another fine-tuning run ({_describe(previous)}): wait for it to "
                             f"finish, or choose another --out") from None
        except OSError:
            pass  # a filesystem without locks: run unlocked rather than not at all
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    os.ftruncate(fd, 0)
    os.pwrite(fd, me.encode() + b"\n", 0)
    return previous


def _describe(holder: str | None) -> str:
    try:
        info = json.loads(holder or "")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that did not say which"


# -----------------------------------------------------------------------------
def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World, extra: dict) -> None:
    """checkpoint.pt with whole tensors keyed by name, written by rank 0 (under FSDP every rank must call this).
    Raises NotFinite, writing nothing, if a weight or an optimizer moment is nan or infinite."""
    model_state = get_model_state_dict(model, options=WHOLE)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=WHOLE)
    if not world.is_main:
        return
    if "lm_head.weight" in model_state:  # tied: one tensor, not two copies, in the file
        model_state["lm_head.weight"] = model_state["transformer.wte.weight"]
    bad = _first_nonfinite(model_state) or _first_nonfinite(optimizer_state.get("state", {}), "optimizer state of ")
    if bad:
        raise NotFinite(f"step {extra['step']}: {bad} is not finite")
    state = {"model": model_state, "optimizer": optimizer_state, **extra}
    state["checksum"] = state_digest(state)
    atomic_write(path, lambda tmp: _save(state, tmp))


def _save(state: dict, tmp: str) -> None:
    with open(tmp, "wb") as f:  # through a Python file: a full disk is an OSError (ENOSPC), not torch's "unexpected pos"
        torch.save(state, f)


def _first_nonfinite(state: dict, prefix: str = "") -> str | None:
    for name, value in state.items():
        if isinstance(value, dict):
            found = _first_nonfinite(value, f"{prefix}{name}.")
            if found:
                return found
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() and not _finite(value):
            return f"{prefix}{name}"
    return None


def _finite(tensor: torch.Tensor) -> bool:
    # min and max propagate nan: a fifth of the time of isfinite(tensor).all(), and no tensor of bools
    return all(bool(torch.isfinite(v)) for v in torch.aminmax(tensor))


def load_checkpoint(path: Path, world: World) -> dict:
    """checkpoint.pt, memory-mapped and checksum-verified; a missing, damaged or foreign file is a one-line
    ValueError naming it."""
    if not path.is_file():
        raise ValueError(f"--resume: no checkpoint.pt in {path.parent}" + ("" if world.is_main else
                         " (every process reads it: put --out on a filesystem all machines share)"))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise ValueError(f"{path}: unreadable: truncated, damaged or not a checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: not a fastlm fine-tuning checkpoint (a {type(checkpoint).__name__})")
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"{path}: not a fastlm fine-tuning checkpoint (no {missing[0]!r})")
    if "checksum" in checkpoint:  # older checkpoints have none
        saved = checkpoint.pop("checksum")
        if state_digest(checkpoint) != saved:
            raise ValueError(f"{path}: damaged: its contents do not match the checksum saved with them; resume from "
                             f"a copy, or start again with --overwrite")
    return checkpoint


def final_save_done(out: Path, step: int) -> bool:
    """Whether --out holds the finished model of this step (model.safetensors is written last, see above)."""
    return saved_metadata(out / "model.safetensors").get("fastlm_step") == str(step)


def killed_before_first_save(out: Path) -> bool:
    """--out holds the beginnings of a run (metrics.jsonl, loss.png) but no checkpoint.pt and no model: all that a
    run killed before its first checkpoint leaves, and nothing that starting it again would lose."""
    present = {name for name in RUN_FILES if (out / name).exists()}
    return bool(present) and present <= {"metrics.jsonl", "loss.png"}


def check_resumable(checkpoint: dict, cfg, windows_per_step: int, processes: int, complete: bool) -> None:
    """The run `cfg` continues the checkpoint's: same data stream and trainable set, same windows per step, and
    steps left to train (or the final save left to finish: complete=False at --max-steps)."""
    saved = checkpoint["finetune_config"]
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}  # what an older checkpoint's run had
    for name in RESUME_MUST_MATCH:
        theirs = saved.get(name, defaults[name])
        if theirs != getattr(cfg, name):
            raise ValueError(f"--resume: --{name.replace('_', '-')} is {getattr(cfg, name)} but the checkpoint was "
                             f"trained with {theirs}; resume with the same value")
    step = checkpoint["step"]
    if step > cfg.max_steps:
        raise ValueError(f"--max-steps {cfg.max_steps}: the checkpoint is already at step {step}")
    if step == cfg.max_steps and complete:
        raise ValueError(f"--max-steps {cfg.max_steps}: the run is complete (the checkpoint and model.safetensors are "
                         f"at step {step}); raise --max-steps to train further")
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


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of torch's generators on one rank (its dropout masks): a hash of the run's seed, the rank and the
    step it starts from, so ranks draw different masks and none replays the numbers that initialised the model."""
    digest = hashlib.sha256(f"fastlm-rank-generator:{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little")  # torch.manual_seed takes any 64-bit value


def rng_states(data_rng: torch.Generator, device: torch.device, world: World) -> dict:
    """The generators a resumed run needs: the data generator (the same on every rank) and every rank's torch
    CPU and CUDA generators. A collective under torchrun: every rank calls it."""
    own = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    ranks = gather_objects(world, own)
    return {"data": data_rng.get_state(), **ranks[0], "ranks": ranks}  # torch/cuda: rank 0's, as older files had


def restore_rng_states(states: dict, data_rng: torch.Generator, device: torch.device, world: World, seed: int,
                       step: int) -> bool:
    """Put the checkpoint's generators back on this rank; False when its torch generators cannot be the saved ones
    (the checkpoint was written by another number of processes, or by an older fastlm with one state for every
    rank): they are then seeded afresh for this rank (rank_seed), so the dropout masks differ from the run's."""
    data_rng.set_state(states["data"])
    ranks = states.get("ranks")
    if ranks is not None and len(ranks) == world.size:
        own = ranks[world.rank]
    elif ranks is None and not world.distributed:
        own = states
    else:
        torch.manual_seed(rank_seed(seed, world.rank, step))
        return False
    torch.set_rng_state(own["torch"])
    if device.type == "cuda" and isinstance(own["cuda"], torch.Tensor):
        torch.cuda.set_rng_state(own["cuda"], device)
    return True
