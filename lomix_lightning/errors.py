"""The exceptions that mean "the user's input is wrong", as opposed to a bug in lomix-lightning or a library.

The ``lomix`` command prints these as one line, ``lomix: error: ...``, with exit status 2; any other exception is
reported as an internal error (exit status 1) whose traceback ``LOMIX_TRACEBACK=1`` shows. Both classes derive from
the built-in exception Python code would catch (``ValueError``, ``TypeError``), so ``except ValueError`` still works.
"""

from __future__ import annotations

__all__ = ["LomixMissingDependencyError", "LomixUserError", "LomixUserTypeError"]


class LomixUserError(ValueError):
    """A bad argument, file or data set, described in a message that names the value and what is allowed.

    Example:
        >>> try:
        ...     raise LomixUserError("`batch_size` must be an integer >= 1, got 0")
        ... except ValueError as error:
        ...     print(error)
        `batch_size` must be an integer >= 1, got 0
    """


class LomixUserTypeError(LomixUserError, TypeError):
    """A user-supplied object of the wrong kind (e.g. a network that returns a dict instead of a list of maps).

    Example:
        >>> isinstance(LomixUserTypeError("x"), TypeError), isinstance(LomixUserTypeError("x"), LomixUserError)
        (True, True)
    """


class LomixMissingDependencyError(LomixUserError, ImportError):
    """An optional dependency is not installed; the message says what to ``pip install``.

    Example:
        >>> isinstance(LomixMissingDependencyError("pip install nibabel"), ImportError)
        True
    """
