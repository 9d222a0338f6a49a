"""tip_fed: secure federated data valuation with influence functions under CKKS encryption.

The front door: everything a buyer or a seller needs is importable from here, e.g.
``from tip_fed import Buyer, Seller, TipError``. Names are resolved on first use, so that
``import tip_fed`` (and the CLI's early checks) stay light: torch and TenSEAL load only when a
role is actually used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from tip_fed.errors import (
    BudgetExceededError,
    CodecError,
    ConfigError,
    CryptoError,
    DataError,
    FingerprintMismatchError,
    InsecureParametersError,
    ModelError,
    ProtocolError,
    SellerUnavailableError,
    SessionError,
    TipError,
    VersionMismatchError,
)

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "Buyer": "tip_fed.protocol",
    "BuyerSettings": "tip_fed.protocol",
    "Seller": "tip_fed.protocol",
    "SellerPolicy": "tip_fed.protocol",
    "SellerValuation": "tip_fed.protocol",
    "Valuation": "tip_fed.protocol",
    "PROTOCOL_VERSION": "tip_fed.protocol",
    "TipConfig": "tip_fed.config",
    "load_config": "tip_fed.config",
    "ProjectionSpec": "tip_fed.core.projection",
    "get_task": "tip_fed.core.tasks",
    "load_dataset": "tip_fed.protocol.data",
    "TableFormat": "tip_fed.protocol.formats",
    "TextFormat": "tip_fed.protocol.formats",
    "RawRecords": "tip_fed.protocol.records",
    "load_seller_data": "tip_fed.protocol.records",
}

__all__ = [
    "BudgetExceededError",
    "CodecError",
    "ConfigError",
    "CryptoError",
    "DataError",
    "FingerprintMismatchError",
    "InsecureParametersError",
    "ModelError",
    "ProtocolError",
    "SellerUnavailableError",
    "SessionError",
    "TipError",
    "VersionMismatchError",
    "__version__",
    *sorted(_LAZY),
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from tip_fed.config import TipConfig as TipConfig
    from tip_fed.config import load_config as load_config
    from tip_fed.core.projection import ProjectionSpec as ProjectionSpec
    from tip_fed.core.tasks import get_task as get_task
    from tip_fed.protocol import PROTOCOL_VERSION as PROTOCOL_VERSION
    from tip_fed.protocol import Buyer as Buyer
    from tip_fed.protocol import BuyerSettings as BuyerSettings
    from tip_fed.protocol import Seller as Seller
    from tip_fed.protocol import SellerPolicy as SellerPolicy
    from tip_fed.protocol import SellerValuation as SellerValuation
    from tip_fed.protocol import Valuation as Valuation
    from tip_fed.protocol.data import load_dataset as load_dataset
    from tip_fed.protocol.formats import TableFormat as TableFormat
    from tip_fed.protocol.formats import TextFormat as TextFormat
    from tip_fed.protocol.records import RawRecords as RawRecords
    from tip_fed.protocol.records import load_seller_data as load_seller_data


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tip_fed' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
