"""Data-parallel runs on torch.distributed: what `torchrun --nproc_per_node N -m fastlm.finetune ...` needs.

torchrun starts one process per GPU and gives each RANK, LOCAL_RANK, WORLD_SIZE and a rendezvous address; a
plain `python -m fastlm.finetune` has none of them and runs as a world of one, with nothing here talking to
anyone. In a world of N: NCCL on CUDA (each process on cuda:LOCAL_RANK), gloo on the CPU, and `parallelize`
either replicates the model (DistributedDataParallel) or shards it (FSDP2's fully_shard): PyTorch's own engines.

Failures. Set-up steps that can fail on one rank only (a data file missing on one machine, a checkpoint on a
disk the others cannot see) run inside `agree`: every rank all-gathers every rank's outcome, so a failure on
rank 3 stops all ranks with the same one-line message naming rank 3, instead of leaving the others waiting in
their first collective. A process that dies later (out of memory, killed) is torchrun's to handle: its agent
stops the other workers as soon as one exits with an error.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")
_flags_group = None  # a gloo group for the per-step flags (set by init): a CPU all-reduce never waits on the GPU


@dataclass(frozen=True)
class World:
    """This process's place among the processes of the job."""

    rank: int = 0        # 0 .. size - 1 across every machine
    local_rank: int = 0  # 0 .. processes on this machine - 1: picks the GPU
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, writes metrics and checkpoints, and saves the model."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def print(self, *args, **kwargs) -> None:
        """print(), on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs)


class RankFailed(ValueError):
    """Another rank failed during set-up; the message names it (rank 0 prints it, the others stay quiet)."""


def world_from_env(environ=os.environ) -> World:
    """The World torchrun describes in the environment, or a world of one."""
    if "WORLD_SIZE" not in environ:
        return World()
    try:
        world = World(int(environ.get("RANK", 0)), int(environ.get("LOCAL_RANK", 0)), int(environ["WORLD_SIZE"]))
    except ValueError:
        raise ValueError("RANK, LOCAL_RANK and WORLD_SIZE must be integers (they are set by torchrun)") from None
    if not 0 <= world.rank < world.size or world.local_rank < 0:
        raise ValueError(f"RANK={world.rank}, LOCAL_RANK={world.local_rank}, WORLD_SIZE={world.size} do not describe a process")
    return world


def place(world: World, device: torch.device) -> torch.device:
    """This rank's device: with several processes on CUDA, GPU LOCAL_RANK of this machine."""
    if not world.distributed or device.type != "cuda":
        return device
    if device.index not in (None, world.local_rank):
        raise ValueError(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda or auto")
    if world.local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {world.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                         f"lower --nproc_per_node")
    return torch.device("cuda", world.local_rank)


def init(world: World, device: torch.device) -> None:
    """Join the process group (NCCL on CUDA, gloo otherwise); nothing for a world of one."""
    if not world.distributed or dist.is_initialized():
        return
    global _flags_group
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        _flags_group = dist.new_group(backend="gloo")
    else:
        dist.init_process_group("gloo")
        _flags_group = dist.group.WORLD


@dataclass
class Parallel:
    """The model as one rank trains it: what to call for training and for evaluation, and how gradients sync."""

    model: nn.Module    # the model itself: the optimizer steps its parameters; checkpoints read it
    forward: nn.Module  # what evaluation calls: the model, compiled when asked
    train: nn.Module    # what training calls: forward, in DistributedDataParallel when replicated
    sharded: bool

    def micro_step(self, last: bool):
        """Context for one micro-batch's forward and backward. Replicated: gradients are all-reduced on the last
        micro-batch only (no_sync before). Sharded: reduce-scattered on every one, as torchtitan does, since holding
        them unsharded until the last would cost the whole model's gradients on every GPU."""
        if isinstance(self.train, DistributedDataParallel) and not last:
            return self.train.no_sync()
        return nullcontext()


def parallelize(model: nn.Module, world: World, device: torch.device, shard: bool, compile: bool) -> Parallel:
    """Place the model for this rank, before its optimizer is made.

    One process: the model (compiled when asked). Replicated: DDP broadcasts rank 0's weights and averages gradients
    in buckets during backward. Sharded (shard=True): each rank keeps 1/N of every weight, gradient and optimizer
    state; a block gathers its weights just before it runs (fully_shard on each block, then on the rest), and
    compilation is per block, before sharding, as torchtitan does.
    """
    model.to(device)
    sharded = shard and world.distributed
    if sharded:
        mesh = init_device_mesh(device.type, (world.size,))
        for block in model.transformer.h:
            if compile:
                block.compile()
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the embeddings, tied head and final norm
        return Parallel(model, model, model, sharded=True)
    forward = torch.compile(model) if compile else model
    train = forward
    if world.distributed:
        train = DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None,
                                        gradient_as_bucket_view=True)  # no second copy of the gradients
    return Parallel(model, forward, train, sharded=False)


def close(world: World) -> None:
    global _flags_group
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
        _flags_group = None


def agree(world: World, step: Callable[[], T]) -> T:
    """Run step() on every rank; if it raised on any rank, raise on every rank.

    The failing rank re-raises its own exception when it is rank 0 (or the only rank); every other rank raises
    RankFailed("rank r: <its one-line message>") for the lowest failing rank r.
    """
    error, result = None, None
    try:
        result = step()
    except Exception as e:  # noqa: BLE001 -- every failure must reach the other ranks, then is re-raised
        error = e
    if not world.distributed:
        if error is not None:
            raise error
        return result
    outcomes: list = [None] * world.size
    dist.all_gather_object(outcomes, None if error is None else _one_line(error))
    failed = [(rank, message) for rank, message in enumerate(outcomes) if message is not None]
    if not failed:
        return result
    if error is not None and world.is_main:
        raise error
    rank, message = failed[0]
    raise RankFailed(f"rank {rank}: {message}") from error


def same_everywhere(world: World, value, what: str) -> None:
    """Raise on every rank unless `value` is equal on all of them (what: the one-line complaint's subject)."""
    if not world.distributed:
        return
    values: list = [None] * world.size
    dist.all_gather_object(values, value)
    for rank, other in enumerate(values):
        if other != values[0]:
            raise RankFailed(f"rank {rank}'s {what} differs from rank 0's; every process must be given the same")


def gather_objects(world: World, value) -> list:
    """Every rank's `value` (picklable), in rank order, on every rank; over the CPU group, so no GPU sync."""
    if not world.distributed:
        return [value]
    values: list = [None] * world.size
    dist.all_gather_object(values, value, group=_flags_group)
    return values


def all_reduce_sum(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (in place); the tensor itself for a world of one."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def max_over_ranks(world: World, *values: int) -> tuple[int, ...]:
    """Each value's maximum over the ranks: what every rank decides together after a step (stop on a signal one
    of them got, save on a timer). A small all-reduce on the CPU (gloo), so no GPU sync; a world of one returns
    the values unchanged."""
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_flags_group)
    return tuple(tensor.tolist())


def barrier(world: World) -> None:
    """Wait for every rank (on the CPU group): so that no rank exits while rank 0 still writes."""
    if world.distributed:
        dist.barrier(group=_flags_group)


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
