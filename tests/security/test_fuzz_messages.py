"""Fuzz the protocol boundary: Offer/Reply decoding, Seller.respond and Buyer settlement.

Random bytes and field-level mutations of real messages (wrong sizes, huge counts, negative/NaN
floats, truncated or foreign ciphertexts, tampered models with a recomputed fingerprint).
Every input must end in a TipError or a valid result; see fuzzing.py.
"""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tip_fed.protocol import Seller, SellerPolicy
from tip_fed.protocol.buyer import SellerValuation
from tip_fed.protocol.model import fingerprint
from tip_fed.protocol.offer import decode_offer
from tip_fed.protocol.reply import decode_reply
from tip_fed.testing import buyer_session
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

from ..conftest import make_data
from .fuzzing import HOSTILE_FLOATS, HOSTILE_INTS, HOSTILE_TEXT, HOSTILE_U64, fuzz, mutated_bytes, tip_or_result

N_BYTES, N_OFFER_DECODE, N_RESPOND, N_REPLY, N_SETTLE = 2400, 1200, 150, 1500, 15


class _Ctx(dict):
    """Shared session objects; a short repr keeps megabytes of keys out of hypothesis reports."""

    def __repr__(self):
        return "<fuzz session>"


W = _Ctx()


@pytest.fixture(scope="module", autouse=True)
def world(make_buyer):
    """One valid session: offer, a valid reply, the buyer's open session, and a foreign reply."""
    buyer = make_buyer(disclosure="per-sample", budget=10**9)  # so the budget never masks a bug
    other = make_buyer(disclosure="per-sample")
    foreign_offer = other.offer(max_samples=50)
    offer = buyer.offer(max_samples=50)
    seller = Seller("s1", make_data(12, 5), policy=SellerPolicy(max_queries_per_session=10**9, exact_per_sample=True))
    reply = seller.respond(offer)
    W.update(
        {
            "buyer": buyer,
            "session": buyer_session(buyer),
            "offer": pb.Offer.FromString(offer),
            "offer_bytes": offer,
            "foreign_offer": pb.Offer.FromString(foreign_offer),
            "reply": pb.Reply.FromString(reply),
            "reply_bytes": reply,
            "foreign_reply": pb.Reply.FromString(
                Seller("s9", make_data(3, 6), policy=SellerPolicy(exact_per_sample=True)).respond(foreign_offer)
            ),
            "seller": seller,
        }
    )
    yield W
    W.clear()


# ---- field-level mutations ---------------------------------------------------------------------
def _set(field, values):
    return st.tuples(st.just(field), values)


SCALARS = {
    "offer": st.one_of(
        _set("protocol_version", HOSTILE_INTS),
        _set("session_id", HOSTILE_TEXT),
        _set("task", HOSTILE_TEXT),
        _set("query_norm", HOSTILE_FLOATS),
        _set("disclosure", st.integers(0, 2**31 - 1)),
        _set("grad_norm_bound", HOSTILE_FLOATS),
        _set("query_budget", HOSTILE_INTS),
        _set("max_samples", HOSTILE_INTS),
        _set("dp_epsilon", HOSTILE_FLOATS),
        _set("dp_delta", HOSTILE_FLOATS),
    ),
    "reply": st.one_of(
        _set("protocol_version", HOSTILE_INTS),
        _set("session_id", HOSTILE_TEXT),
        _set("seller_id", HOSTILE_TEXT),
        _set("n_samples", HOSTILE_INTS),
        _set("n_rows", HOSTILE_INTS),
        _set("clipped", HOSTILE_INTS),
        _set("dp_epsilon", HOSTILE_FLOATS),
        _set("dp_delta", HOSTILE_FLOATS),
        _set("noise_std", HOSTILE_FLOATS),
        _set("commitment", st.binary(max_size=64)),
    ),
}


def mutate_blobs(draw, blobs, *, drop, first, whole=None):
    """One hostile change to a list of ciphertexts (an Offer's query, a Reply's scores): one entry's bytes mutated,
    the ``drop`` slice deleted, the first entry repeated, the list replaced by one of ``whole`` or the first entry
    by one of ``first`` (name: what makes it); an empty list gets random bytes instead."""
    whole = whole or {}
    which = draw(st.sampled_from(["mutate", "drop", "extra", *whole, *first]))
    if not blobs:
        blobs.append(draw(st.binary(max_size=64)))
    elif which == "mutate":
        i = draw(st.integers(0, len(blobs) - 1))
        blobs[i] = draw(mutated_bytes(bytes(blobs[i])))
    elif which == "drop":
        del blobs[drop]
    elif which == "extra":
        blobs.append(bytes(blobs[0]))
    elif which in whole:
        del blobs[:]
        blobs.extend(whole[which])
    else:
        blobs[0] = first[which]()


@st.composite
def mutate_offer(draw, w):
    offer = pb.Offer()
    offer.CopyFrom(w["offer"])
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["scalar", "packing", "he", "projection", "model", "context", "query"]))
        if kind == "scalar":
            name, value = draw(SCALARS["offer"])
            setattr(offer, name, value)
        elif kind == "packing":
            name = draw(
                st.sampled_from(
                    ["dim", "padded_dim", "chunks", "replication", "baby", "giant", "rows_per_block", "kind"]
                )
            )
            setattr(offer.packing, name, draw(HOSTILE_TEXT if name == "kind" else HOSTILE_INTS))
        elif kind == "he":
            which = draw(st.sampled_from(["n", "primes", "scale"]))
            if which == "n":
                offer.he.poly_modulus_degree = draw(HOSTILE_INTS)
            elif which == "scale":
                offer.he.global_scale_bits = draw(HOSTILE_INTS)
            else:
                del offer.he.coeff_mod_bit_sizes[:]
                offer.he.coeff_mod_bit_sizes.extend(draw(st.lists(HOSTILE_INTS, max_size=12)))
        elif kind == "projection":
            which = draw(st.sampled_from(["seed", "kind", "generator", "version", "layer", "drop", "dup"]))
            if which == "seed":
                offer.projection.seed = draw(HOSTILE_U64)
            elif which in ("kind", "generator"):
                setattr(offer.projection, which, draw(HOSTILE_TEXT))
            elif which == "version":
                offer.projection.version = draw(HOSTILE_INTS)
            elif not offer.projection.layers:
                offer.projection.layers.add(name=draw(HOSTILE_TEXT))
            elif which == "drop":
                del offer.projection.layers[draw(st.integers(0, len(offer.projection.layers) - 1))]
            elif which == "dup":
                offer.projection.layers.append(offer.projection.layers[0])
            else:
                layer = offer.projection.layers[draw(st.integers(0, len(offer.projection.layers) - 1))]
                name = draw(st.sampled_from(["name", "in_features", "out_features", "rank_in", "rank_out"]))
                setattr(layer, name, draw(HOSTILE_TEXT if name == "name" else HOSTILE_INTS))
        elif kind == "model":
            which = draw(st.sampled_from(["arch", "config", "sizes", "weights", "fingerprint"]))
            m = offer.model
            if which == "arch":
                m.architecture = draw(HOSTILE_TEXT)
            elif which == "config":
                m.config_json = draw(
                    st.one_of(
                        HOSTILE_TEXT,
                        st.just('{"sizes": [10, 100000, 100000, 2]}'),
                        st.just('{"sizes": "x"}'),
                        st.just('{"sizes": [10, -1]}'),
                        st.just(
                            '{"model_class": "GPT2LMHeadModel", "config": {"model_type": "gpt2", "n_layer": 100000}}'
                        ),
                    )
                )
            elif which == "sizes":
                m.config_json = json.dumps(
                    {"sizes": draw(st.lists(st.one_of(HOSTILE_INTS, HOSTILE_FLOATS, HOSTILE_TEXT), max_size=5))}
                )
            elif which == "weights":
                m.weights = draw(mutated_bytes(bytes(m.weights)))
            else:
                m.fingerprint = draw(HOSTILE_TEXT)
            if which != "fingerprint" and draw(st.booleans()):  # an attacker recomputes the fingerprint
                m.fingerprint = fingerprint(m.architecture, m.config_json, m.weights)
        elif kind == "context":
            src = draw(st.sampled_from(["self", "foreign"]))
            base = bytes((w["offer"] if src == "self" else w["foreign_offer"]).public_context)
            offer.public_context = base if src == "foreign" else draw(mutated_bytes(base))
        else:
            mutate_blobs(draw, offer.query, drop=slice(None), whole={"foreign": w["foreign_offer"].query},
                         first={"swap-reply": lambda: bytes(w["reply"].scores[0])})
    return offer.SerializeToString()


@st.composite
def mutate_reply(draw, w):
    reply = pb.Reply()
    reply.CopyFrom(w["reply"])
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["scalar", "scalar", "scores", "timings"]))
        if kind == "scalar":
            name, value = draw(SCALARS["reply"])
            setattr(reply, name, value)
        elif kind == "timings":
            setattr(reply.timings, draw(st.sampled_from(["gradients_s", "total_s"])), draw(HOSTILE_FLOATS))
        else:
            mutate_blobs(draw, reply.scores, drop=slice(-1, None), first={
                "foreign": lambda: bytes(w["foreign_reply"].scores[0]),
                "query": lambda: bytes(w["offer"].query[0]),
                "random": lambda: draw(st.binary(max_size=512)),
            })
    return reply.SerializeToString()


# ---- tests -------------------------------------------------------------------------------------
@fuzz(N_BYTES // 2)
@given(st.one_of(st.binary(max_size=2048), st.binary(max_size=16).map(lambda b: b"\x08\x01\x12\x20" + b)))
def test_decoders_on_random_bytes(data):
    for decode in (decode_offer, decode_reply):
        tip_or_result(decode, data)


@fuzz(N_BYTES // 2)
@given(st.data())
def test_decoders_on_mutated_serialisations(data):
    """Byte-level damage to real messages (truncation inside a field, bit flips in lengths)."""
    tip_or_result(decode_reply, data.draw(mutated_bytes(W["reply_bytes"])))
    head = W["offer_bytes"][:4096]  # the offer's leading fields, without its megabytes of keys
    tip_or_result(decode_offer, data.draw(mutated_bytes(head)))


@fuzz(N_OFFER_DECODE)
@given(st.data())
def test_decode_offer_on_field_mutations(data):
    tip_or_result(decode_offer, data.draw(mutate_offer(W)))


@fuzz(N_RESPOND, deadline_s=20)
@given(st.data())
def test_seller_respond_on_mutated_offers(data):
    out = tip_or_result(W["seller"].respond, data.draw(mutate_offer(W)))
    if out is not None:
        decode_reply(out)  # whatever the seller sends is a valid reply


@fuzz(N_REPLY)
@given(st.data())
def test_buyer_reply_handler_on_mutated_replies(data):
    """The per-reply handler settle() runs: a TipError (-> rejected) or a sane valuation."""
    out = tip_or_result(W["buyer"]._decode, W["session"], data.draw(mutate_reply(W)), set())
    if out is not None:
        assert isinstance(out, SellerValuation) and out.n_samples >= 1


@fuzz(N_SETTLE, deadline_s=20)
@given(st.data())
def test_settle_rejects_every_bad_reply_and_keeps_the_good_one(make_buyer, data):
    buyer = make_buyer(disclosure="aggregate")
    offer = buyer.offer(max_samples=50)
    good = Seller("good", make_data(7, 8), policy=SellerPolicy(exact_per_sample=True)).respond(offer)
    w = _Ctx(
        reply=pb.Reply.FromString(
            Seller("bad", make_data(4, 9), policy=SellerPolicy(exact_per_sample=True)).respond(offer)
        ),
        offer=pb.Offer.FromString(offer),
        foreign_reply=pb.Reply.FromString(good),
    )
    bad = [data.draw(mutate_reply(w)) for _ in range(4)] + [data.draw(st.binary(max_size=64))]
    valuation = buyer.settle([*bad, good], expected=["good", "bad"])
    assert "good" in valuation.by_id()
    assert len(valuation.sellers) + len(valuation.rejected) >= 2
    assert buyer_session(buyer).keys.destroyed
