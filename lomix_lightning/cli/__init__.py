"""The ``lomix`` command: :func:`main` dispatches to the sub-commands; each lives in its own module.

- ``fit``, ``validate``, ``test``, ``predict``: :class:`~lomix_lightning.cli.lightning.LoMixCLI` (``lightning.py``).
- ``compare``: ``compare.py``; ``export``: ``export.py``; ``prepare-synapse``: ``prepare_synapse.py``.
- ``errors.py``: the error policy (one line per user mistake, exit status 2; internal errors exit 1).

Imports go one way: this file imports the sub-command modules; none of them imports this file's names.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

from lightning.pytorch.utilities.exceptions import SIGTERMException

from lomix_lightning.cli.errors import (
    TRACEBACK_ENV,
    report_abort,
    report_error,
    report_interrupt,
    user_error_message,
)
from lomix_lightning.cli.lightning import LoMixCLI

__all__ = ["TRACEBACK_ENV", "LoMixCLI", "main", "user_error_message"]


def _run_cli(args: list[str]) -> None:
    with warnings.catch_warnings():  # main() hands over sys.argv itself: that is no mistake
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        LoMixCLI(args=args, parser_kwargs={"prog": "lomix", "exit_on_error": False})


def _subcommand(command: str | None, args: list[str]) -> int | None:
    """Run ``export``, ``prepare-synapse`` or ``compare`` (imported only when asked for); ``None`` for the others."""
    if command == "export":
        from lomix_lightning.cli.export import export_main

        return export_main(args)
    if command == "prepare-synapse":
        from lomix_lightning.cli.prepare_synapse import prepare_synapse_main

        return prepare_synapse_main(args)
    if command == "compare":
        from lomix_lightning.cli.compare import compare_main

        return compare_main(args)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lomix`` console script.

    A user's mistake (a bad flag or value, a missing or unreadable file, wrong data) is one line
    ``lomix: error: ...`` and exit status 2; any other failure is one line ``lomix: internal error: ...`` and exit
    status 1. ``LOMIX_TRACEBACK=1`` prints the traceback before that line.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _subcommand(args[0] if args else None, args[1:])
        if code is not None:
            return code
        if not args or args[0].startswith("-") and args[0] not in ("-h", "--help", "--version"):
            args = ["fit", *args]  # `lomix` alone trains the demo
        _run_cli(args)
    except SIGTERMException as error:  # SIGTERM, or a first Ctrl-C during fit (InterruptCheckpoint)
        return report_interrupt(error)
    except SystemExit as error:
        if isinstance(error.__context__, KeyboardInterrupt):  # Lightning exits 1 on a KeyboardInterrupt
            return report_abort()
        raise
    except KeyboardInterrupt:
        return report_abort()
    except Exception as error:  # noqa: BLE001 - every error ends in one line; user or internal is decided there
        return report_error(error)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
