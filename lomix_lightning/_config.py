"""Plain-data configs of networks, so checkpoints rebuild them without unpickling code (``weights_only=True``)."""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import sys
from collections.abc import Mapping
from typing import Any

from torch import nn

from lomix_lightning.errors import LomixUserError


def record_init_args(cls: type) -> type:
    """Class decorator: instances remember ``{"class_path", "init_args"}`` of the outermost ``__init__`` call.

    Example:
        >>> @record_init_args
        ... class Net(nn.Module):
        ...     def __init__(self, width: int = 3) -> None:
        ...         super().__init__()
        >>> network_config(Net(width=5))["init_args"]
        {'width': 5}
    """
    init = cls.__init__
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapped(self, *args: Any, **kwargs: Any) -> None:
        outermost = "_init_config" not in self.__dict__
        if outermost:
            self.__dict__["_init_config"] = None  # placeholder: inner __init__ calls do not record
        init(self, *args, **kwargs)
        if outermost and type(self) is cls:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            init_args = {k: v for k, v in bound.arguments.items() if k != "self"}
            for name, param in signature.parameters.items():
                if param.kind is inspect.Parameter.VAR_KEYWORD:
                    init_args.update(init_args.pop(name, {}))
            self.__dict__["_init_config"] = {
                "class_path": f"{cls.__module__}.{cls.__qualname__}",
                "init_args": init_args,
            }

    cls.__init__ = wrapped
    return cls


def _is_plain(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def network_config(network: nn.Module) -> dict[str, Any] | None:
    """The network's ``{"class_path", "init_args"}`` if it recorded them and they are plain data, else ``None``."""
    config = network.__dict__.get("_init_config")
    if not config:
        return None
    init_args = {k: list(v) if isinstance(v, tuple) else v for k, v in config["init_args"].items()}
    config = {"class_path": config["class_path"], "init_args": init_args}
    return config if _is_plain(config) else None


def instantiate_network(config: Mapping[str, Any]) -> nn.Module:
    """Build a network from ``{"class_path", "init_args"}``.

    Only classes of modules that are already imported are accepted, so a checkpoint cannot make us import code.

    Raises:
        ValueError: If the config is malformed, the module is not imported, or the class is not an ``nn.Module``.
    """
    class_path = config.get("class_path")
    if not isinstance(class_path, str) or "." not in class_path:
        raise LomixUserError(
            f"a network config needs a 'class_path' such as 'lomix_lightning.models.UNet', got {config!r}"
        )
    module_name, _, name = class_path.rpartition(".")
    if module_name not in sys.modules:
        raise LomixUserError(
            f"network class {class_path!r}: module {module_name!r} is not imported; import it before loading "
            "(checkpoints never import code by themselves)"
        )
    cls = getattr(importlib.import_module(module_name), name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise LomixUserError(f"network class {class_path!r} is not an nn.Module subclass")
    return cls(**dict(config.get("init_args") or {}))
