"""Options declared once: a command's settings are one dataclass, and everything else is derived.

Each setting is a dataclass field made with ``option(default, help=..., ...)``; its metadata says
how the command line parses it (``parse``, ``choices``, ``nargs``), how a YAML recipe value is
type-checked (``accepts`` and ``what``), and how a value is validated (``check``, a function
``(name, value)`` that raises a ValueError naming the setting). From that one declaration:

- ``add_options(parser, cls)`` adds one ``--flag-name`` per field (a positional argument where
  ``positional=True``; a required flag where the field has no default; ``store_true`` for a bool
  defaulting to False), with the field's default, which ``--help`` shows;
- ``from_args(cls, args)`` builds the dataclass from parsed arguments (``given`` lists the flags
  that were given);
- ``check_mapping(cls, mapping, label)`` checks a YAML/JSON mapping before ``cls(**mapping)``,
  refusing unknown keys and values of the wrong type with a message that names the key;
- ``validate(self)``, called from ``__post_init__``, runs every field's choices and check.

Used by every command: ``TrainConfig`` (``training.config``), ``MixOptions`` (``upcycle``) and the
option dataclasses of ``bam_model.cli.*``.

Cross-field rules (``warmup <= steps``) stay in the dataclass's own ``__post_init__``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def short_repr(value) -> str:
    """``repr(value)`` bounded in depth and length, for a message about a value a user gave (a YAML
    alias bomb or a huge list must not build its whole repr)."""
    text = _SHORT.repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


_SHORT = reprlib.Repr()   # attributes, not keywords: Python 3.11's Repr takes none
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxlong, _SHORT.maxother = 2, 80, 40, 80
_SHORT.maxtuple = _SHORT.maxlist = _SHORT.maxarray = _SHORT.maxdict = _SHORT.maxset = 6
_SHORT.maxfrozenset = _SHORT.maxdeque = 6


def finite_float(text: str) -> float:
    """An argparse type: a float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


# --- checks: (name, value) -> None, a ValueError naming the setting when the value is bad ------------

Check = Callable[[str, Any], None]


def positive_int(name: str, value) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {short_repr(value)}")


def positive_float(name: str, value) -> None:
    if not is_number(value) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite positive number, got {short_repr(value)}")


def int_at_least(low: int) -> Check:
    def check(name: str, value) -> None:
        if not is_int(value) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {short_repr(value)}")
    return check


def int_in(low: int, high: int) -> Check:
    """An int in ``[low, high]``."""
    def check(name: str, value) -> None:
        if not is_int(value) or not low <= value <= high:
            raise ValueError(f"{name} must be an int in [{low}, {high}], got {short_repr(value)}")
    return check


# Random seeds: torch takes a signed 64-bit one, and a rank's seed adds to it (``training.loop``).
SEED_MAX = 2**62
seed_check = int_in(0, SEED_MAX)


def number_in(low: float, high: float, *, above_low: bool = False) -> Check:
    """A number in ``[low, high]`` (``above_low``: and strictly above ``low``)."""
    def check(name: str, value) -> None:
        if not is_number(value) or not low <= value <= high or (above_low and value == low):
            raise ValueError(f"{name} must be a number in [{low}, {high}]"
                             f"{f' and > {low}' if above_low else ''}, got {short_repr(value)}")
    return check


def one_of(choices) -> Check:
    choices = tuple(choices)

    def check(name: str, value) -> None:
        if not isinstance(value, (str, int)) or value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {short_repr(value)}")
    return check


# --- declaring an option --------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """How one dataclass field appears on the command line and in a recipe (see the module doc)."""
    help: str
    parse: Callable[[str], Any] | None = None   # argparse ``type``
    what: str = ""                              # the type a recipe value must have, in words
    accepts: Callable[[Any], bool] | None = None
    choices: tuple | None = None
    check: Check | None = None
    nargs: str | None = None
    positional: bool = False
    cli: bool = True                            # False: a recipe/API setting without a flag
    required: bool = False                      # a required flag (the field may still have a default)


# Kinds of value, ``option(kind=...)``: how a flag parses it and what a recipe value must be.
INT = {"parse": int, "what": "an int", "accepts": is_int}
NUMBER = {"parse": finite_float, "what": "a number", "accepts": is_number}
TEXT = {"parse": str, "what": "a string", "accepts": lambda v: isinstance(v, str)}


def option(default=dataclasses.MISSING, *, help: str, kind: dict | None = None,
           default_factory=dataclasses.MISSING, **how):
    """A dataclass field that is also a command-line flag and a recipe key (see ``Option``); ``kind``
    (``INT``, ``NUMBER``, ``TEXT``) gives ``parse``, ``what`` and ``accepts``, which ``how`` may override."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"option": Option(help=help, **{**(kind or {}), **how})})


def options(cls) -> list[tuple[dataclasses.Field, Option]]:
    """The fields of the dataclass ``cls`` (a class or an instance) declared with ``option``."""
    return [(f, f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata]


def default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


# --- deriving -------------------------------------------------------------------------------------

def validate(obj) -> None:
    """Run every field's ``choices`` and ``check`` (a None that is the field's default is allowed)."""
    for f, opt in options(obj):
        value = getattr(obj, f.name)
        if value is None and default_of(f) is None:
            continue
        if opt.choices is not None:
            one_of(opt.choices)(f.name, value)
        if opt.check is not None:
            opt.check(f.name, value)


def add_options(parser: argparse.ArgumentParser, cls, *, defaults: bool = True, only=None, skip=()) -> None:
    """Add a flag per command-line field of ``cls`` (those named in ``only``, if given, but not in
    ``skip``: to order the flags of two dataclasses in ``--help``). ``defaults=False`` leaves every
    flag's value None when it is not given (to tell given flags apart, as ``bam mix`` does) and says
    the field's default in the help text instead."""
    for f, opt in options(cls):
        if not opt.cli or f.name in skip or (only is not None and f.name not in only):
            continue
        if opt.positional:
            parser.add_argument(f.name, help=opt.help, **({"nargs": opt.nargs} if opt.nargs else {}))
            continue
        default = default_of(f)
        kwargs: dict[str, Any] = {"help": opt.help}
        if default is False:
            # Under defaults=False an absent switch stays None, so that given() tells it apart.
            kwargs.update(action="store_const", const=True, default=False if defaults else None)
        else:
            kwargs.update(type=opt.parse, choices=opt.choices, nargs=opt.nargs)
            if default is dataclasses.MISSING or opt.required:
                kwargs["required"] = True
            elif defaults:
                kwargs["default"] = default
            elif default not in (None, []) and "default" not in opt.help:
                kwargs["help"] = f"{opt.help} (default: {default})"
        parser.add_argument(flag_name(f.name), **{k: v for k, v in kwargs.items() if v is not None})


def from_args(cls, args: argparse.Namespace, **extra):
    """``cls`` built from the command-line fields in ``args`` (plus ``extra``)."""
    values = {f.name: getattr(args, f.name) for f, opt in options(cls) if opt.cli and hasattr(args, f.name)}
    return cls(**values, **extra)


def given(cls, args: argparse.Namespace) -> dict:
    """The fields of ``cls`` whose flags ``args`` holds a value for (under ``defaults=False``)."""
    return {f.name: getattr(args, f.name) for f, opt in options(cls)
            if opt.cli and getattr(args, f.name, None) is not None}


def check_mapping(cls, mapping, label: str) -> dict:
    """``mapping`` (a recipe read from YAML) checked against the fields of ``cls``: a ValueError for
    an unknown key or a value of the wrong type, naming it as ``{label} 'key'``."""
    known = {f.name: opt for f, opt in options(cls)}
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        raise ValueError(f"unknown {label} {unknown[0]!r}; known keys: {', '.join(known)}")
    for key, value in mapping.items():
        opt = known[key]
        if opt.accepts is not None and not (value is None and default_of(_field(cls, key)) is None) \
                and not opt.accepts(value):
            raise ValueError(f"{label} {key!r} must be {opt.what}, got {short_repr(value)}")
    return dict(mapping)


def _field(cls, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Says each option's default in ``--help``, where it has one worth saying (not None or False, and
    not where the help already speaks of its default): the one way ``bam`` and ``bam-bench`` print
    defaults."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or "default" in text.lower() or action.default is None
                or action.default is False or action.default is argparse.SUPPRESS
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
