"""Parsing a command's options: dataclasses of fields, read by transformers' `HfArgumentParser`,
with `--config FILE` (YAML or JSON) supplying values that the command line overrides."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

import yaml
from transformers import HfArgumentParser

from .command import EXIT_USAGE

__all__ = ["parse_arguments", "read_config_file"]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The options in a `--config` file (YAML for .yaml/.yml, else JSON); ValueError if unreadable."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--config {path}: no such file.")
    text = file.read_text(encoding="utf-8")
    is_yaml = file.suffix in (".yaml", ".yml")
    try:
        values = yaml.safe_load(text) if is_yaml else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise ValueError(f"--config {path} is not valid {'YAML' if is_yaml else 'JSON'}: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a mapping of option names to values.")
    return values


def _as_option_string(value: Any) -> Any:
    """A config file's value for an option the parser reads as a string: YAML may give a mapping
    for a JSON option such as backbone_kwargs."""
    return json.dumps(value) if isinstance(value, dict) else value


def _is_string_field(annotation: Any) -> bool:
    return annotation is str or str(annotation).replace(" ", "") in ("str", "str|None", "Optional[str]")


class _CommandParser(HfArgumentParser):
    """HfArgumentParser whose usage errors are two lines, a short usage and the error, instead of
    argparse's usage of every option (dozens of lines that bury the one that matters); `--help`
    still lists them all."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"usage: {self.prog} [-h] ... (--help lists every option)\n{self.prog}: error: {message}\n")


def parse_arguments(
    dataclass_types: tuple[type, ...], argv: list[str] | None = None, description: str | None = None
) -> tuple[Any, ...]:
    """Parse `argv` (default: the command line) into one instance per dataclass.

    A bad value, or a ValueError from a dataclass's `__post_init__`, exits with argparse's usage
    error (status 2) and one line, never a traceback. `--config FILE` values come first; options
    given on the command line win."""
    parser = _CommandParser(dataclass_types, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML or JSON file of options; command-line options win.")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        known, _ = parser.parse_known_args(argv)  # only to find --config before the real parse
        if known.config:
            values = read_config_file(known.config)
            string_fields = {f.name for cls in dataclass_types for f in fields(cls) if _is_string_field(f.type)}
            names = {f.name for cls in dataclass_types for f in fields(cls)}
            unknown = sorted(set(values) - names)
            if unknown:
                raise ValueError(f"--config {known.config}: unknown options {', '.join(unknown)}.")
            parser.set_defaults(**{k: _as_option_string(v) if k in string_fields else v for k, v in values.items()})
        kwargs = vars(parser.parse_args(argv))
        kwargs.pop("config")
        outputs = []
        for cls in dataclass_types:
            names = {f.name for f in fields(cls) if f.init}
            outputs.append(cls(**{k: v for k, v in kwargs.items() if k in names}))
        return tuple(outputs)
    except (ValueError, yaml.YAMLError, json.JSONDecodeError) as error:
        _usage_error(parser, str(error))


def _usage_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.error(message)
