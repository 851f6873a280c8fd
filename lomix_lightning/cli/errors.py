"""The ``lomix`` command's error policy: a user's mistake is one line (exit 2), anything else is internal (exit 1).

One-line messages name the key, the bad value and what is allowed (no usage dump, no traceback unless
``LOMIX_TRACEBACK=1``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from pickle import UnpicklingError
from typing import NoReturn

from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lomix_lightning.callbacks.interrupt import EXIT_CODES
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


TRACEBACK_ENV = "LOMIX_TRACEBACK"
"""Set this environment variable to 1 to see the traceback of any error (``LOMIX_TRACEBACK=1 lomix fit ...``)."""

_USER_ERRORS: tuple[type[BaseException], ...] = (
    LomixUserError,  # our own checks of arguments, files and data
    ArgumentError,  # jsonargparse: a bad flag, value or config file
    MisconfigurationException,  # Lightning: options that do not go together
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    UnpicklingError,  # torch.load(weights_only=True) of a file that needs unpickling
    FloatingPointError,  # the training diverged (non-finite loss); the message says what to do
)
"""Exceptions that are the user's to fix: printed as one line, exit status 2. Anything else is an internal error."""

_LIBRARY_USER_MESSAGES = (("but got num_samples=0", "a shuffled DataLoader got an empty dataset"),)
"""ValueErrors of dependencies that are the user's to fix: (text in the message, what it means in plain words)."""


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


def _error(message: str, code: int = 2, label: str = "error") -> int:
    rank = _rank()
    where = f"lomix (rank {rank})" if rank else "lomix"
    print(f"{where}: {label}: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def _worker_message(message: str) -> str:
    """The original message of an exception that a DataLoader worker re-raised with its traceback as the text."""
    if "Original Traceback" not in message:
        return message
    last = [line for line in message.splitlines() if line.strip()][-1]
    return re.sub(r"^[\w.]+(Error|Exception): ", "", last.strip())


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of a user's mistake, or ``None`` when ``error`` is an internal error.

    Example:
        >>> user_error_message(LomixUserError("`batch_size` must be an integer >= 1, got 0"))
        '`batch_size` must be an integer >= 1, got 0'
        >>> user_error_message(TypeError("len() of unsized object")) is None
        True
        >>> try:  # jsonargparse re-raises what a class's __init__ raised as a ValueError "from" it
        ...     try:
        ...         raise LomixUserError("`encoder_name` 'x' is not a timm model")
        ...     except LomixUserError as error:
        ...         raise ValueError("Does not validate against any of the Union subtypes") from error
        ... except ValueError as wrapped:
        ...     user_error_message(wrapped)
        "`encoder_name` 'x' is not a timm model"
    """
    cause = None if isinstance(error, _USER_ERRORS) else error.__cause__
    while cause is not None:  # jsonargparse wraps an exception of a class's __init__ in a ValueError "from" it
        if isinstance(cause, _USER_ERRORS):
            return user_error_message(cause)
        cause = cause.__cause__
    message = _worker_message(str(error))
    if isinstance(error, FloatingPointError):
        return f"FloatingPointError: {message}"
    if isinstance(error, _USER_ERRORS):
        return summarize_error(message)
    if isinstance(error, ValueError):
        hint = next((hint for needle, hint in _LIBRARY_USER_MESSAGES if needle in message), None)
        if hint is not None:
            return f"{hint} ({summarize_error(message)})"
    return None


def report_error(error: BaseException) -> int:
    """Print one line for ``error``: a user error (exit 2) or an internal error (exit 1); the traceback on request."""
    if os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0"):
        traceback.print_exception(error, file=sys.stderr)
    message = user_error_message(error)
    if message is not None:
        return _error(message)
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return _error(
        f"{type(error).__name__}{': ' + first if first else ''} (no known input mistake: a bug in lomix-lightning, "
        f"a library, or your own network or data code; rerun with {TRACEBACK_ENV}=1 to see the traceback)",
        code=1,
        label="internal error",
    )


def report_interrupt(error: SIGTERMException) -> int:
    """The line of a run stopped by SIGTERM or a first Ctrl-C (the checkpoint it saved); its exit status."""
    record = getattr(error, "lomix_interrupt", None)
    if record is None:
        return _error("interrupted (SIGTERM)", EXIT_CODES["SIGTERM"], "stopped")
    if not record.is_global_zero:
        return record.exit_code
    print(f"lomix: {record.message()}", file=sys.stderr)
    return record.exit_code


def report_abort() -> int:
    """The line of an abort by Ctrl-C (exit status 130)."""
    return _error(
        "aborted by Ctrl-C; the last epoch checkpoint (if any) is in the run directory", EXIT_CODES["SIGINT"], "stopped"
    )
