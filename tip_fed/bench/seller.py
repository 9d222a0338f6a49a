"""Share of a seller's wall time that is encryption work, on the GPT-2-style model.

One real :meth:`Seller.respond` (per-sample disclosure, so every sample is scored, not just the
total) on the benchmark model with sequences of 128 tokens. The Reply's own timings split the
call into gradients (+ offer and model decoding), commitment and encryption work (loading the
public context and query, encoding, encrypted scoring, masking, serialising): ``he_share =
encrypted_s / total_s``. ``he_share`` is the cold figure: a fresh seller process answering its
first query, every diagonal encoded and the CKKS context built. ``he_share_steady`` is the same
seller (``SellerPolicy.encoding_cache_mb``) answering a second session of the same buyer: new
keys, same model, so its encodings are reused.
"""

from __future__ import annotations

from typing import Any

import torch

from tip_fed.config import ProjectionConfig, ProtocolConfig
from tip_fed.core.tasks import get_task
from tip_fed.crypto.keys import clear_context_cache
from tip_fed.protocol import Buyer, BuyerSettings, Seller, SellerPolicy
from tip_fed.protocol.ledger import LedgerPolicy
from tip_fed.protocol.reply import decode_reply

from .common import GPT2_INCLUDE, GPT2_RANK, gpt2_model, timed, token_batch


def run(quick: bool) -> dict[str, Any]:
    """The ``seller`` section."""
    n, batch = (16, 8) if quick else (100, 8)
    model = gpt2_model()
    settings = BuyerSettings(
        projection=ProjectionConfig(rank=GPT2_RANK, include=GPT2_INCLUDE),
        protocol=ProtocolConfig(disclosure="per-sample"),
        batch_size=batch,
    )
    buyer = Buyer(model, get_task("causal-lm"), objective=token_batch(8, seed=1),
                  train=token_batch(16, seed=2), settings=settings)
    offer = buyer.offer(max_samples=n)
    policy = SellerPolicy(batch_size=batch, encoding_cache_mb=256, exact_per_sample=True,  # synthetic records
                          lifetime=LedgerPolicy(max_exact=None, total_max_exact=None))
    seller = Seller("bench-seller", token_batch(n, seed=3), policy=policy, seed=0)
    clear_context_cache()  # cold: as if this were the seller process's first Offer
    reply_bytes, wall = timed(lambda: seller.respond(offer))
    reply = decode_reply(reply_bytes)
    t = reply.timings
    valuation = buyer.settle([reply_bytes], expected=["bench-seller"])
    again = decode_reply(seller.respond(buyer.offer(max_samples=n))).timings  # new session, same model
    return {
        "model": "GPT2LMHeadModel n_layer=4 n_embd=256 vocab=1000, seq 128",
        "samples": n,
        "disclosure": "per-sample",
        "dim": buyer.spec.dim,
        "gradient_batch": batch,
        "torch_threads": torch.get_num_threads(),
        "he_share": t.encrypted_s / t.total_s,
        "total_s": t.total_s,
        "respond_wall_s": wall,
        "gradients_s": t.gradients_s,
        "commit_s": t.commit_s,
        "encrypted_s": t.encrypted_s,
        "he_share_steady": again.encrypted_s / again.total_s,
        "encrypted_s_steady": again.encrypted_s,
        "reply_bytes": len(reply_bytes),
        "settled_sellers": len(valuation.sellers),
    }
