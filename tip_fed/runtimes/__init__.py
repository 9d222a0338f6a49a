"""Market-agnostic drivers: value a buyer against a set of sellers over each runtime.

One protocol, four carriers, the same valuations (within CKKS tolerance):

- :func:`value_inprocess`: :class:`~tip_fed.protocol.Seller` objects in this process;
- :func:`value_grpc`: ``tip-fed seller serve`` endpoints anywhere, and :func:`local_seller_fleet`
  to start such services on 127.0.0.1 from seller data files;
- :func:`value_flower_simulation`: one virtual Flower SuperNode per seller data file, under Ray;
- :func:`value_flower_deployment`: a local Flower deployment (SuperLink and one SuperNode per
  seller data file, TLS, node authentication, signed apps) running a :class:`FlowerApp`;
  :func:`value_flower_superlink`: the same on a :class:`RemoteSuperLink` already running;
  :func:`prepared_app`: the library's app valuing a query saved by ``tip-fed buyer prepare``.

Plus what they stand on: :class:`PrivateRun` and :class:`ProcessGroup` (nothing a run starts
outlives it) and :class:`LocalDeployment`. Names resolve on first use, so that
``python -m tip_fed.runtimes.reaper`` and ``import tip_fed.runtimes.processes`` load neither
Flower nor gRPC.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tip_fed.lazy import lazy_exports

# public name -> module that defines it
_LAZY = {
    "value_inprocess": "tip_fed.runtimes.inprocess",
    "value_grpc": "tip_fed.runtimes.grpc_sellers",
    "local_seller_fleet": "tip_fed.runtimes.grpc_sellers",
    "SellerFleet": "tip_fed.runtimes.grpc_sellers",
    "value_flower_simulation": "tip_fed.runtimes.flower_simulation",
    "value_flower_deployment": "tip_fed.runtimes.flower_deployment",
    "FlowerApp": "tip_fed.runtimes.flower_deployment",
    "RemoteSuperLink": "tip_fed.runtimes.flower_deployment",
    "prepared_app": "tip_fed.runtimes.flower_deployment",
    "value_flower_superlink": "tip_fed.runtimes.flower_deployment",
    "LocalDeployment": "tip_fed.runtimes.deployment",
    "PrivateRun": "tip_fed.runtimes.processes",
    "ProcessGroup": "tip_fed.runtimes.processes",
}

__all__ = [
    "FlowerApp", "LocalDeployment", "PrivateRun", "ProcessGroup", "RemoteSuperLink", "SellerFleet",
    "local_seller_fleet", "prepared_app", "value_flower_deployment", "value_flower_simulation",
    "value_flower_superlink", "value_grpc", "value_inprocess",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from tip_fed.runtimes.deployment import LocalDeployment as LocalDeployment
    from tip_fed.runtimes.flower_deployment import FlowerApp as FlowerApp
    from tip_fed.runtimes.flower_deployment import RemoteSuperLink as RemoteSuperLink
    from tip_fed.runtimes.flower_deployment import prepared_app as prepared_app
    from tip_fed.runtimes.flower_deployment import (
        value_flower_deployment as value_flower_deployment,
    )
    from tip_fed.runtimes.flower_deployment import (
        value_flower_superlink as value_flower_superlink,
    )
    from tip_fed.runtimes.flower_simulation import (
        value_flower_simulation as value_flower_simulation,
    )
    from tip_fed.runtimes.grpc_sellers import SellerFleet as SellerFleet
    from tip_fed.runtimes.grpc_sellers import local_seller_fleet as local_seller_fleet
    from tip_fed.runtimes.grpc_sellers import value_grpc as value_grpc
    from tip_fed.runtimes.inprocess import value_inprocess as value_inprocess
    from tip_fed.runtimes.processes import PrivateRun as PrivateRun
    from tip_fed.runtimes.processes import ProcessGroup as ProcessGroup


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
