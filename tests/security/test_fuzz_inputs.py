"""Fuzz every other untrusted input: ciphertext and context bytes, configs, data files, model
payloads, session records and deliveries. Each must end in a TipError or a valid result."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from simulations.settings import config_from_dict, load_config
from tip_fed.config import apply_overrides
from tip_fed.core.models import MLP
from tip_fed.crypto.codec import ciphertext_from_bytes
from tip_fed.crypto.keys import SessionKeys, load_public_context
from tip_fed.crypto.params import plan_packing
from tip_fed.protocol.audit import Delivery, SessionRecord, audit
from tip_fed.protocol.data import load_dataset
from tip_fed.protocol.model import decode_model, encode_model, fingerprint

from .fuzzing import HOSTILE_FLOATS, HOSTILE_INTS, HOSTILE_TEXT, fuzz, mutated_bytes, tip_or_result

N_CT, N_CTX, N_OVERRIDES, N_TOML, N_DATA, N_MODEL, N_RECORD = 1500, 100, 1500, 600, 700, 400, 400


class _Ctx(dict):
    def __repr__(self):
        return "<fuzz keys>"


K = _Ctx()


@pytest.fixture(scope="module", autouse=True)
def keys():
    plan = plan_packing(24, 40)
    session = SessionKeys.generate(plan)
    K.update(session=session, plan=plan, ctx=session.public_context(),
             ct=session.encrypt_slots([0.5] * plan.slots), context=session.public_context_bytes())
    yield K
    K.clear()


@fuzz(N_CT)
@given(st.data())
def test_ciphertext_decoder_on_damaged_bytes(data):
    blob = data.draw(st.one_of(mutated_bytes(K["ct"]), st.binary(max_size=128)))
    h = K["ctx"].handles
    tip_or_result(ciphertext_from_bytes, h.seal_context, K["plan"].params, blob, what="fuzzed ciphertext")
    tip_or_result(K["session"].decrypt_slots, blob, "fuzzed reply")


@fuzz(N_CTX, deadline_s=20)
@given(st.data())
def test_public_context_loader_on_damaged_bytes(data):
    blob = data.draw(mutated_bytes(K["context"]))
    tip_or_result(load_public_context, blob, K["plan"].params)


# ---- configs -----------------------------------------------------------------------------------
KEYS = ["seed", "runtime", "quick", "scenario", "projection.rank", "projection.kind", "projection.include",
        "preconditioner.kind", "preconditioner.damping", "crypto.poly-modulus-degree", "crypto.coeff-mod-bit-sizes",
        "protocol.disclosure", "protocol.grad-norm-bound", "protocol.query-budget", "protocol.dp-epsilon",
        "protocol.dp-delta", "protocol.release-digits", "ground-truth.lr", "causal.seller-classes",
        "causal.buyer-classes", "projection", "protocol", "nope", "a.b.c.d", ".", "seed.x"]
VALUES = st.one_of(
    HOSTILE_TEXT, st.integers().map(str), HOSTILE_FLOATS.map(repr), st.sampled_from(
        ["true", "[1, 2]", "[[1], [2, 3]]", "{a = 1}", "[", "nan", "inf", "-inf", "1e400", "'x'", '"', "[]", "[[]]",
         "9" * 400, "{}", "[1, 'a']", "2024-01-01"]))


@fuzz(N_OVERRIDES)
@given(st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), HOSTILE_TEXT), VALUES), max_size=4))
def test_config_overrides(pairs):
    tip_or_result(lambda: config_from_dict(apply_overrides({}, [f"{k}={v}" for k, v in pairs])))


@fuzz(N_TOML)
@given(st.one_of(st.text(max_size=300), st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=5).map(
    lambda kv: "\n".join(f"{k} = {v}" for k, v in kv)), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_config_files(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "fuzz.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    tip_or_result(load_config, path)


# ---- data files, deliveries --------------------------------------------------------------------
def _valid_dataset() -> bytes:
    return st_save({"x": torch.randn(6, 3), "y": torch.arange(6)})


@st.composite
def safetensors_files(draw):
    kind = draw(st.sampled_from(["mutate", "header", "random"]))
    if kind == "mutate":
        return draw(mutated_bytes(_valid_dataset()))
    if kind == "header":
        header = {draw(st.sampled_from(["x", "y", "__tip_fed_committed_gradients__", ""])): {
            "dtype": draw(st.sampled_from(["F32", "F64", "I64", "BOOL", "U8", "F8_E4M3", "XX"])),
            "shape": draw(st.lists(st.one_of(HOSTILE_INTS, st.integers(-5, 5)), max_size=4)),
            "data_offsets": draw(st.lists(st.one_of(HOSTILE_INTS, st.integers(-5, 50)), min_size=0, max_size=3)),
        } for _ in range(draw(st.integers(0, 3)))}
        raw = json.dumps(header).encode()
        n = draw(st.one_of(st.just(len(raw)), HOSTILE_INTS))
        return n.to_bytes(8, "little") + raw + draw(st.binary(max_size=128))
    return draw(st.binary(max_size=256))


@fuzz(N_DATA)
@given(safetensors_files())
def test_dataset_and_delivery_loaders(tmp_path_factory, blob):
    path = tmp_path_factory.getbasetemp() / "fuzz.safetensors"
    path.write_bytes(blob)
    tip_or_result(load_dataset, path)
    tip_or_result(Delivery.load, path)


# ---- model payloads ----------------------------------------------------------------------------
BASE = encode_model(MLP([4, 3, 2]))


@fuzz(N_MODEL, deadline_s=10)
@given(st.data())
def test_model_payload_decoder(data):
    from tip_fed.wire.tip.v1 import valuation_pb2 as pb

    p = pb.ModelPayload()
    p.CopyFrom(BASE)
    which = data.draw(st.sampled_from(["arch", "config", "weights", "sizes", "gpt2"]))
    if which == "arch":
        p.architecture = data.draw(HOSTILE_TEXT)
    elif which == "config":
        p.config_json = data.draw(st.one_of(HOSTILE_TEXT, st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=5),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3)).map(json.dumps)))
    elif which == "weights":
        p.weights = data.draw(mutated_bytes(bytes(BASE.weights)))
    elif which == "sizes":
        p.config_json = json.dumps({"sizes": data.draw(st.lists(st.one_of(st.integers(-3, 2**62), HOSTILE_TEXT,
                                                                            st.none()), max_size=5))})
    else:
        p.architecture = "transformers"
        p.config_json = json.dumps({"model_class": data.draw(st.sampled_from(["GPT2LMHeadModel", "x"])), "config": {
            "model_type": data.draw(st.sampled_from(["gpt2", "bert", "nope", ""])),
            data.draw(st.sampled_from(["n_layer", "n_embd", "vocab_size", "n_head", "bogus"])): data.draw(
                st.one_of(st.integers(-2, 10**9), HOSTILE_TEXT))}})
    p.fingerprint = fingerprint(p.architecture, p.config_json, p.weights)  # an attacker can do this
    tip_or_result(decode_model, p)


# ---- session records ---------------------------------------------------------------------------
@fuzz(N_RECORD)
@given(
    st.one_of(
        st.dictionaries(
            st.sampled_from([*list(SessionRecord.__dataclass_fields__), "x"]),
            st.one_of(
                st.none(),
                st.integers(),
                HOSTILE_FLOATS,
                HOSTILE_TEXT,
                st.lists(st.integers(), max_size=3),
                st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
            ),
            max_size=10,
        ),
        st.text(max_size=50),
        st.binary(max_size=50).map(lambda b: b.decode("latin-1")),
    )
)
def test_session_record_loader(tmp_path_factory, content):
    path = tmp_path_factory.getbasetemp() / "record.json"
    path.write_text(
        json.dumps(content) if isinstance(content, dict) else content, encoding="utf-8", errors="surrogatepass"
    )
    rec = tip_or_result(SessionRecord.load, path)
    if rec is not None:
        tip_or_result(audit, rec, {})
