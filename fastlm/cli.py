"""Command lines generated from dataclasses: each field is a flag, its `help` metadata the help text, and the
dataclass docstring the description. Booleans get --name/--no-name. Errors in user input end the program with
one line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

import torch


def _base_type(hint):
    """int for `int`, `int | None` and `Optional[int]`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


def build_parser(cls, prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        options = dict(default=default, help=f.metadata.get("help", ""))
        if "choices" in f.metadata:
            options["choices"] = f.metadata["choices"]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        else:
            parser.add_argument(flag, type=kind, metavar=f.name.upper(), **options)
    return parser


def parse_args(cls, argv=None, prog: str | None = None):
    args = build_parser(cls, prog or cls.__name__).parse_args(argv)
    return cls(**vars(args))


def fail(message: str) -> typing.NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device (try cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


AUTOCAST_DTYPES = ("auto", "float32", "bfloat16")  # --dtype of the training and evaluation CLIs


def autocast_dtype_for(dtype: str, device: torch.device) -> torch.dtype | None:
    """--dtype: "auto" is bfloat16 autocast on CUDA and plain fp32 elsewhere; None means no autocast."""
    return torch.bfloat16 if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda") else None


def check_backend(backend: str, device: torch.device) -> None:
    from kernels._utils import use_triton

    if backend == "triton" and not use_triton(torch.empty(0, device=device)):
        raise ValueError(f"--backend triton needs a CUDA device (or TRITON_INTERPRET=1 on the CPU); this run is on {device}")


def sequence_length(model, tokenizer, seq_len: int | None) -> int:
    """--seq-len for this model (default: its context, at most 1024), after checking it reads GPT-2's tokens."""
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the model's vocabulary of {model.config.vocab_size} is smaller than the GPT-2 tokenizer's "
                         f"{tokenizer.vocab_size}: not a GPT-2 vocabulary")
    seq_len = seq_len or min(model.config.block_size, 1024)
    if seq_len > model.config.block_size:
        raise ValueError(f"--seq-len {seq_len} is longer than the model's context of {model.config.block_size} tokens")
    return seq_len
