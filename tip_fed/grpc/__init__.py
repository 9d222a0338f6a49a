"""Native gRPC runtime: a seller as a ``tip.v1.Seller`` service and the buyer's client for it.

The only place in ``tip_fed`` (besides the CLI) that imports grpcio. Both sides carry the same
Offer/Reply bytes as every other runtime; see ``server.py`` and ``client.py``.
"""

from tip_fed.grpc.client import ClientTLS, OfferSent, SellerEndpoint, value_sellers, wait_until_healthy
from tip_fed.grpc.server import DEFAULT_MAX_MESSAGE_BYTES, RunningServer, ServerTLS, serve, start_server

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "ClientTLS",
    "OfferSent",
    "RunningServer",
    "SellerEndpoint",
    "ServerTLS",
    "serve",
    "start_server",
    "value_sellers",
    "wait_until_healthy",
]
