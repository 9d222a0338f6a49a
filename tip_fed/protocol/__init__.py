"""Buyer and Seller roles exchanging tip.v1 protobuf bytes; no transport.

Typical use::

    buyer = Buyer(model, task, objective, train)
    offer = buyer.offer()
    replies = [seller.respond(offer) for seller in sellers]
    valuation = buyer.settle(replies)

The costly fit can be done once and saved: ``Buyer.prepare(...).save(dir)``, then
``Buyer.from_prepared(PreparedQuery.load(dir))``.
"""

from tip_fed.protocol.buyer import Buyer, BuyerSettings, SellerValuation, Valuation
from tip_fed.protocol.messages import PROTOCOL_VERSION
from tip_fed.protocol.prepared import PreparedQuery
from tip_fed.protocol.seller import Seller, SellerPolicy

__all__ = [
    "PROTOCOL_VERSION",
    "Buyer",
    "BuyerSettings",
    "PreparedQuery",
    "Seller",
    "SellerPolicy",
    "SellerValuation",
    "Valuation",
]
