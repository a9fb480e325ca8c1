"""python -m fastlm.finetune --weights gpt2.safetensors --data corpus.txt: fine-tune GPT-2 (or, with no --weights,
train a small one from scratch on Python's own documentation).

This module is the command: its flags (FinetuneConfig in fastlm.finetune_config, re-exported here), and main(), which parses the command line before it imports torch (so --help is instant) and then runs
fastlm.training, where the loop is. Errors in what was asked are one line and exit status 2; a run stopped by
SIGINT/SIGTERM exits with 128 + the signal's number after saving a checkpoint, with the command that continues it.
"""
from __future__ import annotations

import shlex
import sys
from fastlm.cli import fail, parse_args
from fastlm.finetune_config import FinetuneConfig, validate  # noqa: F401 (the command's settings, re-exported)

PROG = "python -m fastlm.finetune"


def run(cfg: FinetuneConfig) -> dict:
    """Train as configured; returns the summary (also printed). See fastlm.training.run."""
    from fastlm import training

    return training.run(cfg)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(FinetuneConfig, argv, prog=PROG)
    from fastlm import distributed  # torch, once the command line is known to be good
    from fastlm.runtime import Aborted
    from fastlm.training import Stopped

    try:
        world = distributed.world_from_env()
    except ValueError as e:
        fail(str(e))
    prefix = f"rank {world.rank}: " if world.distributed and not world.is_main else ""
    try:
        run(cfg)
    except Stopped as e:
        if world.is_main:
            print(f"{e}: saved {e.checkpoint}; continue with: {resume_command(argv, world)}", file=sys.stderr)
        # every rank stopped after the same step; none exits before rank 0 has written and said so (torchrun stops
        # the other workers as soon as one exits with an error)
        distributed.barrier(world)
        distributed.close(world)
        raise SystemExit(128 + e.signum)
    except Aborted as e:
        if world.is_main:
            kept = f"step {e.saved_step}'s checkpoint is intact" if e.saved_step is not None else "no checkpoint was saved"
            print(f"stopped at once by a second {e}: {kept} (continue with: {resume_command(argv, world)})", file=sys.stderr)
        raise SystemExit(128 + e.signum)
    except (ValueError, OSError) as e:  # WeightsError and DataError are ValueErrors too: bad input, said in one line
        if isinstance(e, distributed.RankFailed) and not world.is_main:
            raise SystemExit(2)  # rank 0 says it
        fail(prefix + (str(e).splitlines()[0] if str(e) else type(e).__name__))
    except KeyboardInterrupt:  # outside the training loop, which handles SIGINT itself: set-up, summary or sample
        if world.is_main:
            print(f"interrupted: {cfg.out} keeps what it held (a run interrupted in its set-up leaves it as it was)",
                  file=sys.stderr)
        raise SystemExit(130)


def resume_command(argv: list[str], world) -> str:
    """The command line that continues this run (world: a fastlm.distributed.World)."""
    if world.distributed:
        return "the same torchrun command with --resume"
    args = [a for a in argv if a != "--overwrite"] + ([] if "--resume" in argv else ["--resume"])
    return shlex.join([*PROG.split(), *args])


if __name__ == "__main__":
    main()
