"""The ``lomix`` command."""

from lomix_lightning.cli.lightning import TRACEBACK_ENV, LoMixCLI, main, user_error_message

__all__ = ["TRACEBACK_ENV", "LoMixCLI", "main", "user_error_message"]
