"""Command-line settings: a Flag holds a setting's default, its help and the values it may take, so that
every flag is declared once and checked before anything loads."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Flag:
    """One setting: its default, its help text, and what values it may take (checked before anything loads)."""

    default: Any
    help: str
    choices: tuple | None = None
    min: float | None = None  # smallest allowed value
    above: float | None = None  # values must be greater than this
    max: float | None = None  # largest allowed value

    def problem(self, value) -> str | None:
        """What is wrong with `value`, or None."""
        if value is None or isinstance(value, (bool, str)):
            return None
        if self.min is not None and value < self.min:
            return f"must be at least {self.min:g}"
        if self.above is not None and value <= self.above:
            return f"must be greater than {self.above:g}"
        if self.max is not None and value > self.max:
            return f"must be at most {self.max:g}"
        return None


def flag(default, help: str, **allowed) -> Any:
    """A dataclass field that is also a command-line flag (config.RunConfig)."""
    return dataclasses.field(default=default, metadata={"flag": Flag(default, help, **allowed)})


def add_flags(parser, flags: dict[str, Flag], types: dict[str, type] | None = None) -> None:
    """One --flag-name per Flag, default None (so that what was given can be told from what was not)."""
    for name, f in flags.items():
        kind = (types or {}).get(name) or type(f.default)
        text = f.help.replace("%", "%%") + ("" if f.default is None else f" (default: {f.default})")
        if kind is bool:
            parser.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument("--" + name.replace("_", "-"), type=kind, choices=f.choices, help=text)


def dataclass_flags(cls) -> tuple[dict[str, Flag], dict[str, type]]:
    """The Flags of a dataclass's fields (engine.flag), and each field's type (for those whose default is None)."""
    kinds = {"int": int, "float": float, "str": str, "bool": bool}
    fields = [f for f in dataclasses.fields(cls) if "flag" in f.metadata]
    return {f.name: f.metadata["flag"] for f in fields}, {
        f.name: kinds[str(f.type).split("|")[0].strip()] for f in fields
    }


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (the usage of fifty flags would bury the message)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")
