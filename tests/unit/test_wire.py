"""The tip.v1 wire contract a third-party client relies on, checked without our generated code.

Field numbers and types are frozen; a real Offer and Reply are read with a protobuf wire reader
written here from the encoding spec, an Offer re-encoded in another field order (as any other
encoder may) is answered, and malformed or oversize messages are refused by our decoder.
"""

import importlib.util
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from tip_fed.errors import ProtocolError
from tip_fed.protocol import Seller, SellerPolicy
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools (dev extra) not installed")
def test_generated_code_matches_protos(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    committed = ROOT / "tip_fed" / "wire"
    for fresh in tmp_path.rglob("*_pb2*.py*"):
        rel = fresh.relative_to(tmp_path)
        assert (committed / rel).read_text() == fresh.read_text(), f"{rel} is stale: run python protos/generate.py"


# ---- the frozen v1 contract --------------------------------------------------------------------
#: name=number:type of every field; [] marks a repeated field. A client built from v1 relies on each.
V1 = {
    "HEParameters": "poly_modulus_degree=1:uint32 coeff_mod_bit_sizes=2:uint32[] global_scale_bits=3:uint32",
    "Packing": "kind=1:string dim=2:uint32 padded_dim=3:uint32 chunks=4:uint32 replication=5:uint32 baby=6:uint32 "
               "giant=7:uint32 rows_per_block=8:uint32",
    "LayerProjection": "name=1:string in_features=2:uint32 out_features=3:uint32 rank_in=4:uint32 rank_out=5:uint32 "
                       "bias=6:bool",
    "ProjectionSpec": "seed=1:uint64 kind=2:string layers=3:message[] generator=4:string version=5:uint32",
    "ModelPayload": "architecture=1:string config_json=2:string weights=3:bytes fingerprint=4:string",
    "TableInput": "features=1:string[] label=2:string classes=3:string[] offset=4:double[] scale=5:double[] "
                  "features_key=6:string label_key=7:string dtype=8:string",
    "TextInput": "tokenizer_json=1:bytes max_length=2:uint32 text_field=3:string label_field=4:string "
                 "classes=5:string[] pad_id=6:uint32 add_special_tokens=7:bool",
    "InputFormat": "table=1:message text=2:message",
    "Offer": "protocol_version=1:uint32 session_id=2:string model=3:message projection=4:message task=5:string "
             "he=6:message packing=7:message public_context=8:bytes query=9:bytes[] query_norm=10:double "
             "disclosure=11:enum grad_norm_bound=12:double query_budget=13:uint32 max_samples=14:uint32 "
             "dp_epsilon=15:double dp_delta=16:double input=17:message",
    "Timings": "gradients_s=1:double commit_s=2:double encrypted_s=3:double total_s=4:double",
    "Reply": "protocol_version=1:uint32 session_id=2:string seller_id=3:string n_samples=4:uint32 commitment=5:bytes "
             "n_rows=6:uint32 scores=7:bytes[] timings=8:message clipped=9:uint32 dp_epsilon=10:double "
             "dp_delta=11:double noise_std=12:double noise_commitment=13:bytes",
    "ValueRequest": "offer=1:message",
    "ValueResponse": "reply=1:message",
    "HealthRequest": "",
    "HealthResponse": "protocol_version=1:uint32 seller_id=2:string n_samples=3:uint32",
}
_TYPE_NAMES = {v: k[5:].lower() for k, v in vars(FieldDescriptor).items() if k.startswith("TYPE_")}


def _shape(message) -> str:
    return " ".join(f"{f.name}={f.number}:{_TYPE_NAMES[f.type]}{'[]' if f.is_repeated else ''}"
                    for f in message.fields)


def test_field_numbers_and_types_of_v1_are_frozen():
    """Renumbering, retyping or dropping a field breaks every client built from the published .proto:
    a new field takes a new number (and a line here); anything else is protocol version 2."""
    assert {name: _shape(m) for name, m in pb.DESCRIPTOR.message_types_by_name.items()} == V1
    assert {v.name: v.number for v in pb.Disclosure.DESCRIPTOR.values} == {
        "DISCLOSURE_UNSPECIFIED": 0, "DISCLOSURE_AGGREGATE": 1, "DISCLOSURE_PER_SAMPLE": 2}
    service = pb.DESCRIPTOR.services_by_name["Seller"]
    assert [(m.full_name, m.input_type.full_name, m.output_type.full_name) for m in service.methods] == [
        ("tip.v1.Seller.Value", "tip.v1.ValueRequest", "tip.v1.ValueResponse"),
        ("tip.v1.Seller.Health", "tip.v1.HealthRequest", "tip.v1.HealthResponse")]


# ---- an independent wire reader and writer (protobuf encoding spec: varint, I64, LEN, I32) --------
def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return value, i


def read_fields(data: bytes) -> list[tuple[int, int, bytes | int]]:
    """(field number, wire type, raw value) in the order they were written."""
    out, i = [], 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(data, i)
            value, i = data[i:i + n], i + n
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise AssertionError(f"wire type {wire} is not used by tip.v1")
        out.append((number, wire, value))
    assert i == len(data), "a field ran past the end of the message"
    return out


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b, value = value & 0x7F, value >> 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def write_fields(fields) -> bytes:
    out = bytearray()
    for number, wire, value in fields:
        out += _put_varint(number << 3 | wire)
        if wire == 0:
            out += _put_varint(value)
        elif wire == 2:
            out += _put_varint(len(value)) + value
        else:
            out += value
    return bytes(out)


@pytest.fixture(scope="module")
def exchange(seller_data, make_buyer):
    """A real Offer and the Reply a real seller sends to it."""
    buyer = make_buyer(disclosure="aggregate")
    offer = buyer.offer(max_samples=100)
    return buyer, offer, Seller("s1", seller_data["s1"]).respond(offer)


def _fields(data):
    by_number: dict[int, list] = {}
    for number, wire, value in read_fields(data):
        by_number.setdefault(number, []).append((wire, value))
    return by_number


def test_a_real_offer_and_reply_carry_the_contract_field_numbers(exchange, seller_data):
    _, offer, reply = exchange
    o = _fields(offer)
    assert o[1] == [(0, 1)]  # protocol_version, varint
    session_id = o[2][0][1]
    assert o[2][0][0] == 2 and len(session_id) == 32 and bytes.fromhex(session_id.decode())
    assert o[11] == [(0, 1)]  # disclosure = DISCLOSURE_AGGREGATE
    assert o[10][0][0] == 1 and o[12][0][0] == 1  # query_norm and grad_norm_bound: 64-bit doubles
    assert o[14] == [(0, 100)]  # max_samples
    assert len(o[9]) >= 1 and all(w == 2 and len(v) > 1000 for w, v in o[9])  # the query ciphertexts
    model = _fields(o[3][0][1])
    assert model[1][0][1] == b"mlp" and len(model[4][0][1]) == 64  # architecture; sha256 hex fingerprint
    r = _fields(reply)
    assert r[1] == [(0, 1)] and r[2] == [(2, session_id)]
    assert r[3] == [(2, b"s1")] and r[4] == [(0, len(seller_data["s1"]["y"]))]  # seller id, n_samples
    assert len(r[5][0][1]) == 32  # the Merkle root
    assert r[6] == [(0, 1)] and len(r[7]) == 1  # aggregate: one row in one result ciphertext


def test_an_offer_in_another_field_order_is_answered_alike(make_buyer, seller_data):
    """Encoders may write fields in any order (parsers must accept it): a client whose encoder writes
    the Offer's fields last to first (a repeated field's elements keep their order) gets the answer
    the canonical bytes get."""
    buyer = make_buyer(disclosure="aggregate")
    offer = buyer.offer(max_samples=100)
    backwards = write_fields(sorted(read_fields(offer), key=lambda field: -field[0]))
    assert backwards != offer
    valuation = buyer.settle([Seller("s2", seller_data["s2"]).respond(offer),
                              Seller("s2-again", seller_data["s2"]).respond(backwards)])
    assert valuation.rejected == {}
    totals = {v.seller_id: v.total for v in valuation.sellers}
    assert totals["s2-again"] == pytest.approx(totals["s2"], rel=1e-5)


def test_an_unknown_field_from_a_newer_v1_client_is_ignored(make_buyer, seller_data):
    """Within v1, a field the seller does not know (a newer client's addition) changes nothing;
    what must not be ignored changes the protocol version, which is refused."""
    buyer = make_buyer(disclosure="aggregate")
    offer = buyer.offer(max_samples=100)
    extended = offer + write_fields([(99, 2, b"a field from the future"), (100, 0, 7)])
    valuation = buyer.settle([Seller("s2", seller_data["s2"]).respond(extended)])
    assert valuation.rejected == {} and [v.seller_id for v in valuation.sellers] == ["s2"]


def _offer_with(offer: bytes, number: int, replace) -> bytes:
    fields = read_fields(offer)
    return write_fields([(n, w, v) for n, w, v in fields if n != number] + list(replace))


@pytest.mark.parametrize("case, match", [
    ("empty", "empty"),
    ("truncated", "not a valid tip.v1"),
    ("wrong wire type", "protocol version 0"),
    ("one query ciphertext too many", "query ciphertexts but its packing needs"),
    ("oversize model config", "above the 65536"),
    ("no session id", "malformed session id"),
])
def test_malformed_or_oversize_offers_are_refused_by_the_decoder(exchange, seller_data, case, match):
    _, offer, _ = exchange
    fields = read_fields(offer)
    if case == "empty":
        bad = b""
    elif case == "truncated":  # cut inside the public context or the query ciphertexts
        bad = offer[: len(offer) // 2]
    elif case == "wrong wire type":  # protocol_version as a length-delimited field: not read as the version
        bad = _offer_with(offer, 1, [(1, 2, b"\x01")])
    elif case == "one query ciphertext too many":
        bad = offer + write_fields([(9, 2, next(v for n, _, v in fields if n == 9))])
    elif case == "oversize model config":
        model = [(n, w, v) for n, w, v in read_fields(next(v for n, _, v in fields if n == 3)) if n != 2]
        bad = _offer_with(offer, 3, [(3, 2, write_fields([*model, (2, 2, b" " * (64 << 10) + b"{}")]))])
    else:
        bad = _offer_with(offer, 2, [])
    seller = Seller("s0", seller_data["s0"], policy=SellerPolicy(max_queries_per_session=10))
    with pytest.raises(ProtocolError, match=match):
        seller.respond(bad)
    seller.respond(offer)  # the refusals spent nothing: the genuine Offer is still answered
