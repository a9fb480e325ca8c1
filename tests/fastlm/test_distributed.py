"""Data-parallel fine-tuning with torchrun on the CPU (gloo): 2 ranks x batch 2 is 1 process x batch 4 with DDP and
with FSDP2, a checkpoint resumes on another number of processes and layout, and a rank that fails during set-up
stops the whole job with one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import fastlm.distributed
import fastlm.finetune as finetune
import fastlm.training as training
from fastlm import GPT
from fastlm.distributed import World, world_from_env
from tests.fastlm.helpers import TEXT, config, read_metrics, signalled_after, spawn

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no torch.distributed with gloo")
STEPS = dict(max_steps=8, grad_accum=2, eval_every=4, save_every=4, log_every=2, sample_tokens=0)
SIGTERM_TO_RANK_1 = """
import os, signal, sys
import fastlm.finetune as finetune
import fastlm.training as training

real_windows, calls = training.random_windows, [0]

def windows(*args):
    calls[0] += 1
    if calls[0] == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_windows(*args)

if os.environ["RANK"] == "1":
    training.random_windows = windows
finetune.main(sys.argv[1:])
"""


def torchrun(args: list[str], nproc: int = 2, cwd=REPO, module: str | None = "fastlm.finetune", timeout: int = 300):
    """`torchrun --standalone --nproc_per_node nproc [-m module] args` on the CPU; returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)  # the torch backend: nothing here needs the interpreter
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += (["-m", module] if module else []) + args
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def cli_args(cfg) -> list[str]:
    """The command line that gives FinetuneConfig cfg."""
    args = []
    for name, value in vars(cfg).items():
        default = finetune.FinetuneConfig.__dataclass_fields__[name].default
        if value != default:
            flag = "--" + name.replace("_", "-")
            args += [flag if value is True else f"--no-{flag[2:]}"] if isinstance(value, bool) else [flag, str(value)]
    return args


def assert_same_run(a: Path, b: Path) -> None:
    ma, mb = read_metrics(a), read_metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), (x, y)
        assert ("val_loss" in x) == ("val_loss" in y)
        if "val_loss" in x:
            assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-5)
    wa, wb = GPT.from_pretrained(a).state_dict(), GPT.from_pretrained(b).state_dict()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4, msg=key)




def test_two_ranks_equal_one_process_and_resume_on_another_layout(checkpoint, corpus, tmp_path, monkeypatch):
    one = config(checkpoint, corpus, tmp_path / "one", batch_size=4, **STEPS)
    finetune.run(one)

    two = config(checkpoint, corpus, tmp_path / "two", batch_size=2, **STEPS)
    done = torchrun(cli_args(two))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: 8 steps") == 1 and done.stdout.count("fine-tuning ") == 1, "only rank 0 prints"
    assert "DDP: the model replicated on every process" in done.stdout
    assert_same_run(tmp_path / "one" / "out", tmp_path / "two" / "out")

    # SIGTERM reaches rank 1 alone, in step 3: both ranks stop after that step with one whole checkpoint, rank 0 says
    # so, and one process resumes it to the same run.
    launcher = tmp_path / "sigterm_to_rank_1.py"
    launcher.write_text(SIGTERM_TO_RANK_1)
    stopped = config(checkpoint, corpus, tmp_path / "stopped", batch_size=2, **STEPS)
    done = torchrun([str(launcher)] + cli_args(stopped), module=None)
    assert done.returncode != 0 and "exitcode  : 143" in done.stderr, done.stderr[-3000:]
    ours = [line for line in done.stderr.splitlines() if line.startswith("stopped")]
    assert ours == [f"stopped by SIGTERM after step 3: saved {tmp_path / 'stopped' / 'out' / 'checkpoint.pt'}; continue "
                    f"with: the same torchrun command with --resume"], done.stderr[-3000:]
    assert torch.load(tmp_path / "stopped" / "out" / "checkpoint.pt", weights_only=False)["step"] == 3
    finetune.run(config(checkpoint, corpus, tmp_path / "stopped", batch_size=4, resume=True, **STEPS))
    assert_same_run(tmp_path / "one" / "out", tmp_path / "stopped" / "out")

    sharded = config(checkpoint, corpus, tmp_path / "fsdp", batch_size=2, fsdp=True, **STEPS)  # FSDP2 in place of DDP
    done = torchrun(cli_args(sharded))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FSDP: weights, gradients and optimizer state sharded" in done.stdout
    assert_same_run(tmp_path / "one" / "out", tmp_path / "fsdp" / "out")

    # One process gets SIGINT in step 5 (checkpoint at 5); two FSDP processes of batch 2 resume it to step 8.
    with signalled_after(4, monkeypatch), pytest.raises(training.Stopped):
        finetune.run(config(checkpoint, corpus, tmp_path / "resumed", batch_size=4, **STEPS))
    resumed = config(checkpoint, corpus, tmp_path / "resumed", batch_size=2, resume=True, fsdp=True, **STEPS)
    done = torchrun(cli_args(resumed))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout
    assert_same_run(tmp_path / "one" / "out", tmp_path / "resumed" / "out")

    # A different number of windows per step would change the data stream: refused with the product named.
    changed = config(checkpoint, corpus, tmp_path / "resumed", batch_size=4, resume=True, **{**STEPS, "max_steps": 10})
    done = torchrun(cli_args(changed))
    assert done.returncode != 0
    assert "error: --resume: the checkpoint took 8 windows per step, this run would take 16" in done.stderr


def test_a_rank_that_fails_stops_every_rank_with_one_line(checkpoint, tmp_path):
    """Each rank runs in its own directory (as on separate machines); rank 1's has no corpus.txt."""
    for rank in (0, 1):
        (tmp_path / f"rank{rank}").mkdir()
    (tmp_path / "rank0" / "corpus.txt").write_text(TEXT)
    launcher = tmp_path / "launch.py"
    launcher.write_text("import os\nos.chdir(f\"rank{os.environ['RANK']}\")\nfrom fastlm.finetune import main\nmain()\n")
    cfg = config(checkpoint, Path("corpus.txt"), Path("."), **STEPS)
    done = torchrun([str(launcher)] + cli_args(cfg), cwd=tmp_path, module=None, timeout=180)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert ours == ["error: rank 1: corpus.txt: no such file or directory"], done.stderr[-3000:]
    assert not (tmp_path / "rank0" / "out" / "checkpoint.pt").exists()


def test_world_from_torchrun_environment():
    assert world_from_env({}) == World(0, 0, 1)
    world = world_from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (world.rank, world.local_rank, world.size, world.is_main, world.distributed) == (3, 1, 4, False, True)
    with pytest.raises(ValueError, match="must be integers"):
        world_from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="do not describe a process"):
        world_from_env({"RANK": "2", "WORLD_SIZE": "2"})



def _count_all_reduces(rank: int, cfg, out: Path) -> None:
    """Fine-tune with DDP's all-reduces counted (a communication hook)."""
    reductions = []

    class CountingDDP(DistributedDataParallel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

            def hook(state, bucket):
                reductions.append(bucket.index())
                return default_hooks.allreduce_hook(state, bucket)

            self.register_comm_hook(None, hook)

    fastlm.distributed.DistributedDataParallel = CountingDDP
    finetune.run(cfg)
    (out / f"rank{rank}").write_text(str(len(reductions)))


def _measure_shards(rank: int, cfg, out: Path) -> None:
    """Fine-tune with --fsdp, recording what each rank holds of the parameters and of AdamW's state."""
    from torch.distributed.tensor import DTensor

    real_parallelize, real_optimizer, seen = fastlm.distributed.parallelize, training.make_optimizer, {}

    def parallelize(*args, **kwargs):
        parallel = real_parallelize(*args, **kwargs)
        params = list(parallel.model.parameters())
        seen.update(dtensors=all(isinstance(p, DTensor) for p in params), whole=sum(p.numel() for p in params),
                    local=sum(p.to_local().numel() for p in params))
        return parallel

    def make_optimizer(*args, **kwargs):
        optimizer = real_optimizer(*args, **kwargs)
        seen["optimizer"] = optimizer
        return optimizer

    fastlm.distributed.parallelize, training.make_optimizer = parallelize, make_optimizer
    finetune.run(cfg)
    moments = [state["exp_avg"] for state in seen.pop("optimizer").state.values()]
    seen["moments_local"] = sum(m.to_local().numel() for m in moments)
    seen["moments_whole"] = sum(m.numel() for m in moments)
    (out / f"rank{rank}.json").write_text(json.dumps(seen))


def test_lora_under_ddp_reduces_once_per_step(checkpoint, corpus, tmp_path):
    """LoRA (a frozen base: DDP syncs only the adapters) on 2 ranks x batch 2 is 1 process x batch 4, and with
    --grad-accum 2 the gradients are all-reduced once per step (no_sync on the first micro-batch), not twice."""
    lora = dict(lora_rank=2, lora_targets="c_attn", lr=1e-2, **STEPS)
    finetune.run(config(checkpoint, corpus, tmp_path / "one", batch_size=4, **lora))
    spawn(_count_all_reduces, config(checkpoint, corpus, tmp_path / "two", batch_size=2, **lora), tmp_path)
    buckets = 1  # the adapters are far smaller than one DDP bucket
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == [str(STEPS["max_steps"] * buckets)] * 2
    assert_same_run(tmp_path / "one" / "out", tmp_path / "two" / "out")


def test_fsdp_shards_weights_and_optimizer_state_with_frozen_blocks(checkpoint, corpus, tmp_path):
    """--fsdp really shards (each rank holds half of every parameter and of AdamW's moments), with frozen blocks
    mixed in, and trains exactly as one process does."""
    frozen = dict(train_layers=1, **STEPS)
    finetune.run(config(checkpoint, corpus, tmp_path / "one", batch_size=4, **frozen))
    spawn(_measure_shards, config(checkpoint, corpus, tmp_path / "two", batch_size=2, fsdp=True, **frozen), tmp_path)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["dtensors"], "every parameter is a DTensor shard"
        assert seen["local"] <= seen["whole"] / 2 + 1024 and seen["moments_local"] <= seen["moments_whole"] / 2 + 1024, seen
    assert_same_run(tmp_path / "one" / "out", tmp_path / "two" / "out")


def _fine_tune(rank: int, cfg, out: Path) -> None:
    finetune.run(cfg)


def test_two_ranks_equal_one_process_with_pack(checkpoint, documents, tmp_path):
    """--pack on many short documents: 2 DDP ranks x batch 2 (accumulating 2) are 1 process x batch 4."""
    packed = dict(pack=True, **STEPS)
    finetune.run(config(checkpoint, documents, tmp_path / "one", batch_size=4, **packed))
    spawn(_fine_tune, config(checkpoint, documents, tmp_path / "two", batch_size=2, **packed), tmp_path)
    assert_same_run(tmp_path / "one" / "out", tmp_path / "two" / "out")
