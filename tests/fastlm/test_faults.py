"""Fine-tuning that never loses work: signals, kills at many moments (inside every save too), a diverging loss,
damaged files, full disks, and two runs on one --out. The reference is always the same run left alone: whatever
happened on the way, --resume must end at its final weights and losses, bit for bit."""
import errno
import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import fastlm.checkpoint as ckpt
import fastlm.finetune as finetune
import fastlm.training as training
from fastlm import GPT
from fastlm.files import temporaries
from fastlm.finetune import main, run
from fastlm.weights import WeightsError
from tests.fastlm.helpers import TEXT, config, read_metrics, signalled_after

REPO = Path(__file__).resolve().parents[2]
SHORT = dict(max_steps=6, save_every=2, eval_every=6, log_every=2, sample_tokens=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint, corpus, tmp_path_factory):
    """The uninterrupted run: its --out."""
    root = tmp_path_factory.mktemp("reference")
    run(config(checkpoint, corpus, root, **SHORT))
    return root / "out"


def args_of(cfg) -> list[str]:
    """The command line that gives FinetuneConfig cfg."""
    args = []
    for name, value in vars(cfg).items():
        if value != finetune.FinetuneConfig.__dataclass_fields__[name].default:
            flag = "--" + name.replace("_", "-")
            args += ([flag] if value else [f"--no-{flag[2:]}"]) if isinstance(value, bool) else [flag, str(value)]
    return args


def assert_same_as(reference: Path, out: Path) -> None:
    """Same losses at every step and the same final weights, bit for bit; nothing half-written left behind."""
    assert [(m["step"], m["loss"], m.get("val_loss")) for m in read_metrics(out)] == \
           [(m["step"], m["loss"], m.get("val_loss")) for m in read_metrics(reference)]
    ours, theirs = GPT.from_pretrained(out).state_dict(), GPT.from_pretrained(reference).state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert not list(out.glob(".*.tmp")) and not (out / ckpt.LOCK_FILE).exists()


def messages(capsys) -> list[str]:
    """What the run said on stderr, beside its progress lines."""
    return [line for line in capsys.readouterr().err.splitlines() if not line.startswith("step ")]


def stderr(capsys) -> str:
    return "".join(line + "\n" for line in messages(capsys))


def saved_step(out: Path) -> int:
    return torch.load(out / "checkpoint.pt", weights_only=False, mmap=True)["step"]


# -- signals -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_step_saves_and_says_how_to_resume(checkpoint, corpus, reference, tmp_path, monkeypatch,
                                                                 capsys, signum, status):
    cfg = config(checkpoint, corpus, tmp_path, **{**SHORT, "save_every": 100})  # only the signal saves before the end
    with signalled_after(2, monkeypatch, signum), pytest.raises(SystemExit) as exit_:
        main(args_of(cfg))
    assert exit_.value.code == status
    err = messages(capsys)
    assert len(err) == 1 and err[0].startswith(f"stopped by {signal.Signals(signum).name} after step 3: saved "), err
    assert saved_step(tmp_path / "out") == 3 and [m["step"] for m in read_metrics(tmp_path / "out")] == [1, 2, 3]
    command = shlex.split(err[0].split("continue with: ")[1])
    assert command[:3] == ["python", "-m", "fastlm.finetune"] and "--resume" in command
    main(command[3:])  # the command it printed, as it is
    assert_same_as(reference, tmp_path / "out")


def test_a_second_signal_during_the_save_stops_at_once_and_keeps_the_previous_checkpoint(
        checkpoint, corpus, reference, tmp_path, monkeypatch, capsys):
    cfg = config(checkpoint, corpus, tmp_path, **SHORT)  # checkpoints at 2, 4, 6; SIGINT in step 3
    real_save, before = ckpt._save, {}

    def save_then_signal_again(state, tmp):
        if state["step"] == 3:  # the save the first signal asked for: half-way through, Ctrl-C again
            before["bytes"] = (tmp_path / "out" / "checkpoint.pt").read_bytes()
            real_save(state, tmp)
            before["temporary"] = [p.name for p in temporaries(tmp_path / "out", ["checkpoint.pt"])]
            signal.raise_signal(signal.SIGINT)
        real_save(state, tmp)

    monkeypatch.setattr(ckpt, "_save", save_then_signal_again)
    with signalled_after(2, monkeypatch, signal.SIGINT), pytest.raises(SystemExit) as exit_:
        main(args_of(cfg))
    assert exit_.value.code == 130
    err = messages(capsys)
    assert len(err) == 1 and err[0].startswith("stopped at once by a second SIGINT: step 2's checkpoint is intact"), err
    assert before["temporary"], "the second signal came inside the save"
    assert (tmp_path / "out" / "checkpoint.pt").read_bytes() == before["bytes"]
    assert not temporaries(tmp_path / "out", ["checkpoint.pt"]) and not (tmp_path / "out" / ckpt.LOCK_FILE).exists()
    monkeypatch.setattr(ckpt, "_save", real_save)
    run(config(checkpoint, corpus, tmp_path, resume=True, **SHORT))
    assert_same_as(reference, tmp_path / "out")


def test_a_checkpoint_every_few_minutes_as_well_as_every_few_steps(checkpoint, corpus, tmp_path, monkeypatch):
    saved, real = [], ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint", lambda path, *args: saved.append(args[-1]["step"]) or real(path, *args))
    clock = iter(range(0, 10**6, 61))  # every reading of the clock a minute and a second after the last
    monkeypatch.setattr(training, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: next(clock))}))
    run(config(checkpoint, corpus, tmp_path, max_steps=4, save_every=100, eval_every=100, save_minutes=1, sample_tokens=0))
    assert saved == [1, 2, 3, 4], "a minute had passed since the last checkpoint after every step"


# -- kills ---------------------------------------------------------------------------------------------------
# One process imports fastlm once, then forks a child per moment (it runs no torch op itself, so the children
# start with no thread pool to inherit); each child is a fine-tuning run that SIGKILLs itself at its moment.
KILLER = """
import json, os, signal, sys
import fastlm.checkpoint, fastlm.files, fastlm.finetune, fastlm.training, fastlm.weights
try:
    import matplotlib.backends.backend_agg, matplotlib.figure  # loss.png: imported once, not in every child
except ImportError:
    pass

def killed_at(name, nth, how, args):
    real_write, real_windows, seen = fastlm.files.atomic_write, fastlm.training.random_windows, {"n": 0}

    def atomic_write(target, write):
        if os.path.basename(target) != name:
            return real_write(target, write)
        seen["n"] += 1
        if seen["n"] != nth:
            return real_write(target, write)
        def then_die(tmp):
            if how != "empty":
                write(tmp)
            if how == "half":
                os.truncate(tmp, os.path.getsize(tmp) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(target, then_die)

    def random_windows(*args):
        seen["n"] += 1
        if seen["n"] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_windows(*args)

    if name == "training":
        fastlm.training.random_windows = random_windows
    for module in (fastlm.files, fastlm.checkpoint, fastlm.weights):
        module.atomic_write = atomic_write
    fastlm.finetune.main(args)

statuses = []
for name, nth, how, args in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        try:
            killed_at(name, nth, how, args)
        except SystemExit as e:
            os._exit(e.code if isinstance(e.code, int) else 1)
        os._exit(0)
    statuses.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(statuses))
"""

MOMENTS = [  # (the file being written, which time it is written, how far it got when the process was killed)
    ("training", 4, None),                  # in step 4, between two checkpoints
    ("checkpoint.pt", 1, "full"),           # the first checkpoint, written but not yet renamed
    ("checkpoint.pt", 2, "half"),           # the second, half-written over the first
    ("checkpoint.pt", 3, "full"),           # the final checkpoint, not yet renamed: the model is not saved yet
    ("config.json", 1, "half"),             # the final save: after the last checkpoint
    ("model.safetensors", 1, "empty"),      # config.json written, the model not yet
    ("model.safetensors", 1, "full"),       # the whole model in its temporary file, never renamed
]


@pytest.fixture(scope="module")
def killed(checkpoint, corpus, tmp_path_factory):
    """{moment: (exit status, the tmp_path of its run)}: every moment's run, killed there."""
    roots = {moment: tmp_path_factory.mktemp("killed") for moment in MOMENTS}
    runs = [[*moment, args_of(config(checkpoint, corpus, roots[moment], **SHORT))] for moment in MOMENTS]
    # the same threads as this process: a different split of the reductions would change the last bits
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run([sys.executable, "-c", KILLER, json.dumps(runs)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    statuses = json.loads(done.stdout.splitlines()[-1])
    return {moment: (status, roots[moment]) for moment, status in zip(MOMENTS, statuses)}


@pytest.mark.parametrize("name,nth,how", MOMENTS)
def test_a_run_killed_at_any_moment_resumes_to_the_same_weights(checkpoint, corpus, reference, killed, capsys, name, nth,
                                                                how):
    status, root = killed[(name, nth, how)]
    assert status == -signal.SIGKILL
    out = root / "out"
    if name != "training":
        assert temporaries(out, [name]), "the kill came inside that save"
    assert (out / ckpt.LOCK_FILE).exists(), "a killed run cannot remove its lock file: the next run takes it over"
    assert not (out / "model.safetensors").exists(), "no model before the final save has finished"
    run(config(checkpoint, corpus, root, resume=True, **SHORT))
    if (name, nth) == ("checkpoint.pt", 1):  # killed before its first checkpoint: all it left is metrics.jsonl
        assert "starting that run again from step 0" in capsys.readouterr().out
    assert_same_as(reference, out)


# -- a diverging loss ----------------------------------------------------------------------------------------
def strict_json(line: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(line, parse_constant=refuse)


def test_a_nonfinite_loss_stops_the_run_without_saving_it(checkpoint, corpus, tmp_path, monkeypatch, capsys):
    """The logged loss is made nan from step 4 on; losses are read back every 3 steps (4, 5, 6 together)."""
    real_step = training.train_step
    steps = iter(range(1, 100))
    monkeypatch.setattr(training, "train_step", lambda *args: real_step(*args) * (1.0 if next(steps) < 4 else float("nan")))
    cfg = config(checkpoint, corpus, tmp_path, max_steps=12, save_every=3, log_every=3, eval_every=100, sample_tokens=0)
    with pytest.raises(SystemExit) as exit_:
        main(args_of(cfg))
    assert exit_.value.code == 2
    err = stderr(capsys)
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    records = [strict_json(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["loss"] is None, "up to the step it appears"
    last = records[2]["loss"]
    assert err == (f"error: step 4: the training loss is nan (the last finite loss was {last:.6g} at step 3); stopped "
                   f"without saving anything non-finite ({tmp_path / 'out' / 'checkpoint.pt'} is still step 3's); "
                   f"try a lower --lr than 0.003\n")
    assert saved_step(tmp_path / "out") == 3 and not (tmp_path / "out" / "model.safetensors").exists()


def test_weights_that_overflow_are_never_saved(checkpoint, corpus, tmp_path, capsys):
    """--lr 1e3: the loss explodes, then an update overflows the weights before any loss reads nan."""
    cfg = config(checkpoint, corpus, tmp_path, max_steps=12, lr=1e3, warmup_steps=0, save_every=1, log_every=1,
                 sample_tokens=0)
    with pytest.raises(SystemExit) as exit_:
        main(args_of(cfg))
    assert exit_.value.code == 2
    err = stderr(capsys)
    assert err.count("\n") == 1 and "stopped without saving anything non-finite" in err, err
    state = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines():
        strict_json(line)


def test_a_huge_but_finite_loss_has_an_infinite_perplexity_not_an_overflow():
    summary = training._summary([{"step": 1, "loss": 800.0, "val_loss": 710.0}], torch.device("cpu"), 1.0, 1)
    assert summary["train_ppl"] == summary["val_ppl"] == float("inf") and summary["val_loss"] == 710.0


# -- damaged files ---------------------------------------------------------------------------------------------
def largest_member_offset(path: Path) -> int:
    """Where the largest tensor's bytes start inside a torch.save zip file."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_refused_by_resume(checkpoint, corpus, reference, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    flip_bit(out / "checkpoint.pt", largest_member_offset(out / "checkpoint.pt"))
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 6, "torch.load itself does not notice"
    base = args_of(config(checkpoint, corpus, tmp_path, **{**SHORT, "max_steps": 8})) + ["--resume"]
    with pytest.raises(SystemExit) as exit_:
        main(base)
    err = stderr(capsys)
    assert exit_.value.code == 2 and err == (f"error: {out / 'checkpoint.pt'}: damaged: its contents do not match the "
                                             f"checksum saved with them; resume from a copy, or start again with --overwrite\n")
    (out / "checkpoint.pt").write_bytes((reference / "checkpoint.pt").read_bytes()[:5000])  # truncated
    with pytest.raises(SystemExit):
        main(base)
    err = stderr(capsys)
    assert err.startswith(f"error: {out / 'checkpoint.pt'}: unreadable: truncated, damaged") and err.count("\n") == 1


def test_a_damaged_model_file_is_refused_on_load(reference, tmp_path):
    path = tmp_path / "model.safetensors"
    shutil.copy(reference / "model.safetensors", path)
    shutil.copy(reference / "config.json", tmp_path / "config.json")
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["fastlm_checksum"].startswith("sha256-crc32:") and f.metadata()["fastlm_step"] == "6"
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    flip_bit(path, 8 + header + (path.stat().st_size - 8 - header) // 2)
    with pytest.raises(WeightsError, match=r"model.safetensors: corrupt: its tensors do not match the checksum"):
        GPT.from_pretrained(tmp_path)


# -- full disks ------------------------------------------------------------------------------------------------
def test_a_full_disk_is_one_line_that_says_so(checkpoint, corpus, reference, tmp_path, monkeypatch, capsys):
    """Each writer reports a full disk its own way (torch.save: OSError through a Python file; safetensors: its
    own error with the OS's message); each is one line naming the file, the previous file intact."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = (out / "checkpoint.pt").read_bytes()

    def full_disk(state, tmp):
        Path(tmp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "_save", full_disk)
    base = args_of(config(checkpoint, corpus, tmp_path, **{**SHORT, "max_steps": 8}))
    with pytest.raises(SystemExit) as exit_:
        main(base + ["--resume"])
    assert exit_.value.code == 2
    assert stderr(capsys) == (f"error: {out / 'checkpoint.pt'}: cannot be written (the disk is full: no space "
                                       f"left on device)\n")
    assert (out / "checkpoint.pt").read_bytes() == before and not list(out.glob(".*.tmp"))

    class SafetensorError(Exception):  # what safetensors raises
        pass

    def full_disk_safetensors(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("fastlm.weights.save_file", full_disk_safetensors)
    with pytest.raises(OSError, match=r"model.safetensors: cannot be written \(the disk is full: no space left on device\)"):
        GPT.from_pretrained(reference).save_pretrained(out)
    assert not list(out.glob(".*.tmp"))


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: a real full disk (needs the right to mount one: root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("a real full disk needs root to mount a small tmpfs; test_a_full_disk_is_one_line_that_says_so simulates it")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the simulated full disk covers the messages")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk(checkpoint, corpus, tmp_path, small_disk, capsys):
    cfg = config(checkpoint, corpus, tmp_path, max_steps=2, sample_tokens=0, out=str(small_disk / "out"))
    with pytest.raises(SystemExit) as exit_:
        main(args_of(cfg))  # metrics.jsonl fits in 3 MB; the 20 MB checkpoint does not
    assert exit_.value.code == 2
    assert stderr(capsys) == (f"error: {small_disk / 'out' / 'checkpoint.pt'}: cannot be written (the disk is "
                                       f"full: no space left on device)\n")
    assert {p.name for p in (small_disk / "out").iterdir()} <= {"metrics.jsonl", "loss.png"}, "no temporary file, no lock"
    with pytest.raises(OSError, match="model.safetensors: cannot be written .the disk is full"):
        GPT.from_pretrained(checkpoint).save_pretrained(small_disk / "model")
    assert not list((small_disk / "model").iterdir()) or sorted(p.name for p in (small_disk / "model").iterdir()) == ["config.json"]


# -- one run per --out -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [{}, {"resume": True}, {"overwrite": True}])
def test_a_second_run_on_the_same_out_is_refused(checkpoint, corpus, reference, tmp_path, capsys, mode):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    holder = ckpt.open_out(str(out), resume=True)  # as a run that is still training holds it
    try:
        with pytest.raises(SystemExit) as exit_:
            main(args_of(config(checkpoint, corpus, tmp_path, **{**SHORT, "max_steps": 8, **mode})))
        assert exit_.value.code == 2
        err = stderr(capsys)
        assert err.startswith(f"error: --out {out} is in use by another fine-tuning run (pid {os.getpid()} on ") and \
            err.endswith("wait for it to finish, or choose another --out\n"), err
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ckpt.LOCK_FILE} == files
    finally:
        holder.release()


def test_a_stale_lock_is_taken_over_and_a_failed_setup_leaves_out_as_it_was(checkpoint, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / ckpt.LOCK_FILE).write_text('{"pid": 999999999, "host": "gone", "started": "yesterday"}\n')  # not held
    (out / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half a checkpoint of a killed run")
    with pytest.raises(SystemExit):
        main(args_of(config(checkpoint, tmp_path / "missing.txt", tmp_path, **SHORT)))  # set-up fails: no data
    assert "missing.txt: no such file" in stderr(capsys)
    assert sorted(p.name for p in out.iterdir()) == [".checkpoint.pt.x1y2.tmp"], "as it was, less the stale lock"
    run(config(checkpoint, corpus, tmp_path, **{**SHORT, "max_steps": 2}))
    assert "removed 1 temporary file(s) an interrupted run left" in capsys.readouterr().out
    assert not list(out.glob(".*")), "no temporary file, no lock once the run is over"
    nested = tmp_path / "a" / "b" / "out"
    with pytest.raises(SystemExit):
        main(args_of(config(checkpoint, tmp_path / "missing.txt", tmp_path, **{**SHORT, "out": str(nested)})))
    assert not (tmp_path / "a").exists(), "the directories made for a run whose set-up failed are removed"
