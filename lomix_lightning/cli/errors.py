"""One-line error messages for the ``lomix`` command: the key, the bad value and what is allowed, no usage dump."""

from __future__ import annotations

import argparse
import re
from typing import NoReturn

from lomix_lightning.errors import LomixUserError

_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)$')
_CLASS = re.compile(r"^Problem with given class_path '([^']+)':\s*(.*)$")
_EXPECTED = re.compile(r"^Expected a (.+?)(?:\. Got value: (.*))?$")
_GIVEN = re.compile(r"^Given value: (.*)$")
_LITERAL = re.compile(r"^typing\.Literal\[(.*)\]$")
_CLASS_REPR = re.compile(r"^<class '(?:builtins\.)?([^']+)'>$")
_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:")


def _expected_text(types: list[str]) -> str:
    literals, others = [], []
    for text in types:
        literal, plain = _LITERAL.match(text), _CLASS_REPR.match(text)
        if literal:
            literals.extend(v.strip() for v in literal.group(1).split(", "))
        else:
            others.append(plain.group(1) if plain else text)
    parts = [f"one of {', '.join(dict.fromkeys(literals))}"] if literals else []
    return "expected " + " or ".join(parts + list(dict.fromkeys(others)))


def summarize_error(message: str) -> str:
    """Condense a jsonargparse (or any multi-line) error into one line naming the key, the value and the choices.

    Example:
        >>> text = '''Parser key "model":
        ...   Does not validate against any of the Union subtypes
        ...   Errors:
        ...     - Problem with given class_path 'lomix_lightning.LoMixSegmentationModule':
        ...         Parser key "supervision":
        ...           Expected a typing.Literal['last_layer', 'lomix']. Got value: lomx
        ...     - Expected a <class 'NoneType'>
        ...   Given value: NestedArg(key='supervision', val='lomx')'''
        >>> summarize_error(text)
        "model.init_args.supervision: invalid value 'lomx'; expected one of 'last_layer', 'lomix'"
        >>> summarize_error("unrecognized arguments: --trainer.max_epochz=3")
        'unrecognized arguments: --trainer.max_epochz=3'
    """
    keys: list[str] = []
    class_path: str | None = None
    in_class = False
    expected: list[str] = []
    got: str | None = None
    given, given_depth = None, -1
    details: list[str] = []
    for raw in message.splitlines():
        line = raw.strip()
        depth = len(raw) - len(raw.lstrip())
        if line.startswith("- "):
            line, depth = line[2:].strip(), depth + 2
        if not line or line.startswith(_NOISE):
            continue
        if match := _KEY.match(line):
            keys.extend(["init_args", match.group(1)] if in_class else [match.group(1)])
            in_class = False
            if match.group(2):
                details.append(match.group(2))
        elif match := _CLASS.match(line):
            class_path, in_class = match.group(1), True
            if match.group(2):
                details.append(match.group(2))
        elif match := _EXPECTED.match(line):
            if "NoneType" not in match.group(1):
                expected.append(match.group(1))
                got = match.group(2) if match.group(2) is not None else got
        elif match := _GIVEN.match(line):
            if depth > given_depth:
                given, given_depth = match.group(1), depth
        else:
            details.append(line)
    prefix = f"{'.'.join(keys)}: " if keys else ""
    if details:
        where = f"class_path {class_path!r}: " if class_path and not expected else ""
        return prefix + where + "; ".join(dict.fromkeys(details))
    if expected:
        value = got if got is not None else given
        return f"{prefix}invalid value {value!r}; {_expected_text(expected)}"
    return " ".join(message.split())


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors raise :class:`LomixUserError` (one line from ``lomix``), not a usage dump.

    Example:
        >>> parser = OneLineArgumentParser(prog="lomix export")
        >>> _ = parser.add_argument("--input_size", type=int)
        >>> parser.parse_args(["--input_size", "x"])
        Traceback (most recent call last):
        ...
        lomix_lightning.errors.LomixUserError: lomix export: argument --input_size: invalid int value: 'x'
    """

    def error(self, message: str) -> NoReturn:
        """Raise instead of printing the usage and exiting."""
        raise LomixUserError(f"{self.prog}: {message}")
