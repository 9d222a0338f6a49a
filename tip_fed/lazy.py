"""Packages whose public names load on first use (PEP 562), so that importing the package stays light.

``import tip_fed`` must not load torch or TenSEAL (the CLI checks its arguments first), and
``python -m tip_fed.runtimes.reaper`` must not load Flower or grpcio; yet ``from tip_fed import
Buyer`` and ``from tip_fed.runtimes import value_grpc`` work.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from importlib import import_module
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str], public: Iterable[str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: each name of ``exports`` (name -> defining
    module) is imported on first use and then kept in the package; ``public`` is what ``dir`` lists."""
    names = sorted(public)

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return names

    return __getattr__, __dir__
