"""Writing files so that a reader never sees half of one: every file fastlm saves goes through atomic_write.

A write goes to a temporary file beside its target (`.<name>.<random>.tmp`), is flushed to disk, and is renamed
over the target; the directory is then flushed too, so the rename survives a power cut. Any failure while
writing (a full disk, an error in the writer, Ctrl-C) removes the temporary file and leaves the target as it
was, and comes out as one WriteError (an OSError) naming the target and the cause. Only a process killed
outright (SIGKILL, a crash) leaves its temporary file behind: `remove_temporaries` is how the next run on the
same directory clears them.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

FULL_DISK_MARGIN = 1 << 20  # bytes: a failed write with less than this left on its filesystem ran out of space


class WriteError(OSError):
    """A file that could not be written; the message names it and says why (a full disk says so)."""


def atomic_write(target: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call write(tmp_path) on a temporary file beside target, flush it to disk, then rename it over target.

    An interruption (Ctrl-C, a full disk, a crash in `write`) leaves target as it was and removes the temporary
    file; exceptions other than KeyboardInterrupt/SystemExit-like BaseExceptions come out as WriteError. The file
    gets the usual permissions (0666 less the umask; mkstemp alone would make it 0600).
    """
    target = Path(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise WriteError(f"{target}: cannot be written ({_cause(e, target.parent)})") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except Exception as e:
        cause = _cause(e, target.parent)  # before the temporary file goes: its bytes are what filled the disk
        Path(tmp).unlink(missing_ok=True)
        raise WriteError(f"{target}: cannot be written ({cause})") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)
    return target


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    return atomic_write(target, lambda tmp: Path(tmp).write_text(text))


def temporaries(directory: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """The temporary files atomic_write would leave for these target names in directory (a killed writer's)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for name in names:
        found += [p for p in directory.glob(f".{name}.*.tmp") if p.is_file()]
    return sorted(found)


def remove_temporaries(directory: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Remove what temporaries() finds; returns the paths removed. Only for a directory no writer is using."""
    removed = temporaries(directory, names)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def _cause(error: BaseException, directory: Path) -> str:
    """Why a write failed, in words: 'the disk is full' when it is, whatever error type the writer raised
    (torch.save and safetensors report a full disk in their own ways)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    full = getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)
    if not full:
        try:
            stats = os.statvfs(directory)
            full = stats.f_bavail * stats.f_frsize < FULL_DISK_MARGIN
        except OSError:
            pass
    if full:
        return "the disk is full: no space left on device"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return f"{type(error).__name__}: {text}"


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not every platform opens directories
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json_object(path: Path, holds: str) -> dict:
    """A JSON object read from path, or a one-line ValueError naming the file (`holds`: what its directory should
    hold, said when the file is missing)."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file ({holds})")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    return config
