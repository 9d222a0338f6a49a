"""In-process runtime: the buyer and its sellers as objects in this process, exchanging protobuf bytes.

The reference every other runtime is compared with: nothing but :meth:`Seller.respond` stands
between the Offer and the Replies.
"""

from __future__ import annotations

from collections.abc import Mapping

from tip_fed.console import ANSWERED, counted
from tip_fed.errors import ConfigError, TipError
from tip_fed.protocol import Buyer, Seller, Valuation


def value_inprocess(buyer: Buyer, sellers: Mapping[str, Seller], max_samples: int, *,
                    progress: bool = False, tolerate_refusals: bool = False) -> Valuation:
    """Offer to every seller of ``sellers`` (seller id -> :class:`Seller`), collect and settle.

    ``max_samples`` is the Offer's bound on records per seller (the largest seller's count); every
    seller of the mapping is expected, so one that fails to answer is listed as missing. A seller
    refusing the Offer (a TipError) aborts the session, unless ``tolerate_refusals``: then it is
    listed as missing with its reason in ``valuation.manifest["transport"]["failures"]``. Every
    seller gets the full Offer (weights included): ``manifest["transport"]["offers"]``.
    """
    wrong = [f"{key!r} holds seller {seller.seller_id!r}" for key, seller in sellers.items() if key != seller.seller_id]
    if wrong:
        raise ConfigError(f"sellers must be keyed by their own seller id: {', '.join(wrong)}")
    offer = buyer.offer(max_samples=max_samples)
    replies, failures = [], {}
    for sid, seller in counted(list(sellers.items()), ANSWERED, enabled=progress):
        try:
            replies.append(seller.respond(offer))
        except TipError as exc:
            if not tolerate_refusals:
                raise
            failures[sid] = f"{type(exc).__name__}: {exc}"
    valuation = buyer.settle(replies, expected=list(sellers))
    valuation.manifest["transport"] = {
        "runtime": "inprocess", "failures": failures,
        "offers": {sid: {"offer_bytes": len(offer), "weights_shipped": True} for sid in sellers},
    }
    return valuation
