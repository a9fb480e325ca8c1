"""Command lines generated from dataclasses: each field is a flag, its `help` metadata the help text, and the
dataclass docstring the description. Booleans get --name/--no-name. A dataclass may list flags it no longer has
in a `RENAMED_FLAGS` class attribute ({"--old": "--new"}): the old spelling is then an error naming the new one.
Errors in user input end the program with one line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing


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
    argv = sys.argv[1:] if argv is None else list(argv)
    for old, new in getattr(cls, "RENAMED_FLAGS", {}).items():
        if any(arg == old or arg.startswith(old + "=") for arg in argv):
            fail(f"{old} is now {new} ({prog or cls.__name__} --help lists every flag)")
    args = build_parser(cls, prog or cls.__name__).parse_args(argv)
    return cls(**vars(args))


def fail(message: str) -> typing.NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
