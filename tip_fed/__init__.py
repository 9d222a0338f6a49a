"""tip_fed: secure federated data valuation with influence functions under CKKS encryption.

The front door: everything a buyer or a seller needs is importable from here, e.g.
``from tip_fed import Buyer, Seller, TipError``, or the buyer's workflow in two calls:
``query = tip_fed.prepare(model, "classification", objective)`` (``query.save(dir)`` keeps it) and
``tip_fed.value(query, "sellers.toml")``. Names are resolved on first use, so that
``import tip_fed`` (and the CLI's early checks) stay light: torch and TenSEAL load only when a
role is actually used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
from tip_fed.lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "Buyer": "tip_fed.protocol",
    "PreparedQuery": "tip_fed.protocol",
    "prepare": "tip_fed.workflow",
    "value": "tip_fed.workflow",
    "write_results": "tip_fed.workflow",
    "load_buyer_config": "tip_fed.buyer_config",
    "load_sellers_config": "tip_fed.buyer_config",
    "prepare_from_config": "tip_fed.buyer_config",
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
    "save_dataset": "tip_fed.protocol.data",
    "value_files": "tip_fed.workflow",
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
    from tip_fed.buyer_config import load_buyer_config as load_buyer_config
    from tip_fed.buyer_config import load_sellers_config as load_sellers_config
    from tip_fed.buyer_config import prepare_from_config as prepare_from_config
    from tip_fed.config import TipConfig as TipConfig
    from tip_fed.config import load_config as load_config
    from tip_fed.core.projection import ProjectionSpec as ProjectionSpec
    from tip_fed.core.tasks import get_task as get_task
    from tip_fed.protocol import PROTOCOL_VERSION as PROTOCOL_VERSION
    from tip_fed.protocol import Buyer as Buyer
    from tip_fed.protocol import BuyerSettings as BuyerSettings
    from tip_fed.protocol import PreparedQuery as PreparedQuery
    from tip_fed.protocol import Seller as Seller
    from tip_fed.protocol import SellerPolicy as SellerPolicy
    from tip_fed.protocol import SellerValuation as SellerValuation
    from tip_fed.protocol import Valuation as Valuation
    from tip_fed.protocol.data import load_dataset as load_dataset
    from tip_fed.protocol.data import save_dataset as save_dataset
    from tip_fed.protocol.formats import TableFormat as TableFormat
    from tip_fed.protocol.formats import TextFormat as TextFormat
    from tip_fed.protocol.records import RawRecords as RawRecords
    from tip_fed.protocol.records import load_seller_data as load_seller_data
    from tip_fed.workflow import prepare as prepare
    from tip_fed.workflow import value as value
    from tip_fed.workflow import value_files as value_files
    from tip_fed.workflow import write_results as write_results


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
