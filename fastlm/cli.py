"""Command lines generated from dataclasses: each field is a flag, its `help` metadata the help text, and the
dataclass docstring the description. Booleans get --name/--no-name; `choices` metadata lists the accepted values
(shown in --help); `required` metadata makes a flag required. Each flag's help shows its default once: the
field's default, unless the help text already says what the default is. A dataclass may list flags it no longer
has in a `RENAMED_FLAGS` class attribute ({"--old": "--new"}): the old spelling is then an error naming the new one.
Errors in user input end the program with one line on stderr and exit status 2, never a traceback.

Nothing here imports torch: the commands parse their arguments (and answer --help) before they import it.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

# Accepted values shared by the commands (fastlm.model.BACKENDS and fastlm.runtime are the users; both torch-side).
BACKEND_CHOICES = ("auto", "triton", "torch")
AUTOCAST_CHOICES = ("auto", "bfloat16", "off")  # --autocast of the training and evaluation commands


def _base_type(hint):
    """int for `int`, `int | None` and `Optional[int]`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage text) that name the flag."""

    def error(self, message: str) -> typing.NoReturn:
        missing = "the following arguments are required: "
        if message.startswith(missing):
            flag = message.removeprefix(missing).split(",")[0].strip()
            action = next((a for a in self._actions if flag in a.option_strings), None)
            message = f"{flag} is required" + (f": {action.help}" if action is not None and action.help else "")
        elif message.startswith("argument "):
            message = message.removeprefix("argument ")
        fail(f"{message} ({self.prog} --help lists every flag)")


def _help(text: str, default) -> str:
    """The help text with the default said once: the field's, unless the text already describes it."""
    if default is None or "default" in text:
        return text
    shown = ("on" if default else "off") if isinstance(default, bool) else default
    return f"{text} (default: {shown})"


def build_parser(cls, prog: str) -> argparse.ArgumentParser:
    # Unset flags stay out of the namespace (SUPPRESS), so the dataclass's own defaults fill them in.
    parser = _Parser(prog=prog, description=(cls.__doc__ or "").strip(), argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        options = dict(help=_help(f.metadata.get("help", ""), default), required=f.metadata.get("required", False))
        if "choices" in f.metadata:
            options["choices"] = f.metadata["choices"]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        else:
            metavar = None if "choices" in options else f.name.upper()  # argparse shows {a,b,c} for choices
            parser.add_argument(flag, type=kind, metavar=metavar, **options)
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
