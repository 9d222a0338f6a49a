"""A hostile buyer attacks raw-data sellers through the input format of its Offer.

Each attack takes an honest Offer, rewrites its input format, and sends it to a real seller
holding raw records. Every one must be refused with a TipError that says what is wrong, before the
seller tokenizes or allocates anything it sizes, and without spending the seller's budgets: the
honest Offer of the same session is answered afterwards (per-session budget of one query, and the
seller's ledger allows one exact answer per buyer).
"""

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, pre_tokenizers

from tip_fed.config import PreconditionerConfig, ProjectionConfig, ProtocolConfig
from tip_fed.errors import DataError, ProtocolError, TipError
from tip_fed.protocol import BuyerSettings, Seller, formats
from tip_fed.protocol.formats import MAX_TOKENIZER_BYTES, TextFormat
from tip_fed.protocol.ledger import PrivacyBudgetExhaustedError
from tip_fed.protocol.records import RawRecords, load_seller_data
from tip_fed.protocol.resources import ResourceLimitError
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

from ..raw_data import (
    FEATURES,
    cancer_table,
    docstring_corpus,
    table_buyer,
    text_buyer,
    text_records,
    train_tokenizer,
)

SETTINGS = BuyerSettings(projection=ProjectionConfig(rank=2), preconditioner=PreconditionerConfig(kind="identity"),
                         protocol=ProtocolConfig(disclosure="aggregate", query_budget=1))


@pytest.fixture(scope="module")
def text_market():
    texts = docstring_corpus(60)
    buyer = text_buyer(texts[:10], train_tokenizer(texts), SETTINGS, 16)
    return buyer, text_records(texts[10:40], "corpus.jsonl")


@pytest.fixture(scope="module")
def table_market():
    frame = cancer_table()
    return table_buyer(frame.iloc[:150], SETTINGS), RawRecords.from_rows(frame.iloc[150:200].to_dict("records"),
                                                                         "clinic.csv")


def _tamper(offer: bytes, edit) -> bytes:
    msg = pb.Offer.FromString(offer)
    edit(msg.input)
    return msg.SerializeToString()


def _refused_then_honest_answered(buyer, records, edit, error, match, monkeypatch=None):
    seller = Seller("victim", records)
    offer = buyer.offer(max_samples=100)
    if monkeypatch is not None:  # the tokenizer must never be parsed for this attack
        def parse(_):
            raise AssertionError("the seller parsed the hostile tokenizer")
        monkeypatch.setattr(formats, "parse_tokenizer", parse)
    with pytest.raises(error, match=match) as info:
        seller.respond(_tamper(offer, edit))
    assert isinstance(info.value, TipError)
    if monkeypatch is not None:
        monkeypatch.undo()
    # nothing was spent: the same session's honest offer is still answered, exactly once
    assert buyer.settle([seller.respond(offer)]).rejected == {}
    return str(info.value)


def _huge_tokenizer(inp):
    inp.text.tokenizer_json = b'{"x": "' + b"a" * MAX_TOKENIZER_BYTES + b'"}'


def _set(**fields):
    def edit(inp):
        target = inp.text if inp.WhichOneof("kind") == "text" else inp.table
        for name, value in fields.items():
            if isinstance(value, list):
                del getattr(target, name)[:]
                getattr(target, name).extend(value)
            else:
                setattr(target, name, value)
    return edit


def test_oversized_tokenizer_is_refused_before_parsing(text_market, monkeypatch):
    buyer, records = text_market
    _refused_then_honest_answered(buyer, records, _huge_tokenizer, ProtocolError,
                                  rf"tokenizer_json is {MAX_TOKENIZER_BYTES + 9} bytes, above .* not parsed",
                                  monkeypatch)


@pytest.mark.parametrize("blob, match", [
    (b"not json at all", "not a valid tokenizers serialization: expected ident"),
    (b'{"model": {"type": "BPE", "vocab": 5}}', "not a valid tokenizers serialization"),
    (b"\xff\xfe{}", "not UTF-8 text"),
])
def test_malformed_tokenizer_is_a_protocol_error(text_market, blob, match):
    buyer, records = text_market
    _refused_then_honest_answered(buyer, records, _set(tokenizer_json=blob), ProtocolError, match)


def test_huge_max_length_is_refused_by_costing_before_tokenizing(text_market, monkeypatch):
    buyer, records = text_market
    _refused_then_honest_answered(buyer, records, _set(max_length=10**7), ResourceLimitError,
                                  r"the offer would take about \d+ MiB .* above", monkeypatch)


def test_max_length_beyond_any_sense_is_refused_at_decoding(text_market, monkeypatch):
    buyer, records = text_market
    _refused_then_honest_answered(buyer, records, _set(max_length=2**31), ProtocolError,
                                  r"max_length 2147483648 is outside \[1, 16777216\]", monkeypatch)


@pytest.mark.parametrize("edit, match", [
    (_set(offset=[0.0]), r"6 features but 1 offsets and 6 scales; it needs one of each per feature"),
    (_set(scale=[float("nan")] * 6), "scale has a non-finite value"),
    (_set(offset=[float("inf")] * 6), "offset has a non-finite value"),
    (_set(scale=[0.0] * 6), "zero scale"),
    (_set(features=[f"c{i}" for i in range(10**6)], offset=[0.0] * 10**6, scale=[1.0] * 10**6),
     r"lists 1000000 feature columns, above the 65536"),
    (_set(classes=[str(i) for i in range(70_000)]), "lists 70000 classes, above the 65536"),
    (_set(dtype="int8"), r"dtype 'int8' is not one of \['float32', 'float64'\]"),
    (_set(features=["x" * 1000, *FEATURES[1:]]), "name of 1000 characters, above 256"),
    (_set(label_key="x"), "two distinct, non-empty batch keys"),
])
def test_hostile_table_formats_are_refused(table_market, edit, match):
    buyer, records = table_market
    _refused_then_honest_answered(buyer, records, edit, ProtocolError, match)


def test_a_format_naming_fields_the_records_lack_is_refused_before_any_charge(table_market, caplog):
    """The refusal comes before any charge, so it names only the field asked for: listing the others
    would hand a buyer the seller's schema for free. The seller's own log has them."""
    buyer, records = table_market
    with caplog.at_level(logging.WARNING, logger="tip_fed.protocol.formats"):
        message = _refused_then_honest_answered(buyer, records, _set(features=["age", *FEATURES[1:]]), DataError,
                                                r"clinic.csv offers no field 'age'; .*ask the seller which fields")
    assert not [f for f in records.fields if f in message]
    assert "'mean radius'" in caplog.text and "'age'" in caplog.text


@pytest.fixture
def clinic_file(tmp_path):
    """A clinic's CSV with columns it does not sell: an HIV status and a social security number."""
    frame = cancer_table().iloc[150:200].copy()
    rng = np.random.default_rng(5)
    frame["hiv_status"] = rng.integers(0, 2, len(frame)).astype(str)
    frame["ssn"] = [f"{rng.integers(100, 999)}-{rng.integers(10, 99)}-{rng.integers(1000, 9999)}" for _ in frame.index]
    path = tmp_path / "clinic.csv"
    frame.to_csv(path, index=False)
    return path


def _read_hiv_status(inp):
    _set(label="hiv_status", classes=["0", "1"])(inp)


def test_a_format_reading_a_field_the_seller_does_not_sell_is_refused_before_any_charge(table_market, clinic_file):
    """A buyer's format naming an unsold column as its label (to read it back from one aggregate
    answer) is refused at the schema check, and the refusal lists none of the fields there are."""
    buyer, _ = table_market
    sold = [*FEATURES, "diagnosis"]
    records = load_seller_data(clinic_file, fields=sold)
    assert records.fields == set(sold) and all(set(r) == set(sold) for r in records.rows)  # dropped at loading
    message = _refused_then_honest_answered(buyer, records, _read_hiv_status, DataError,
                                            r"clinic.csv offers no field 'hiv_status'; .*ask the seller")
    assert not [f for f in [*sold, "ssn"] if f in message]
    # the attack has teeth: a seller offering every field of its file answers the same Offer
    everything = Seller("victim", load_seller_data(clinic_file))
    assert buyer.settle([everything.respond(_tamper(buyer.offer(max_samples=100), _read_hiv_status))]).rejected == {}


def _regex_bomb(tokenizer_json: str) -> str:
    """The tokenizer with a pre-tokenizer regex that backtracks catastrophically on ordinary text."""
    bad = Tokenizer.from_str(tokenizer_json)
    bad.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"(\w+\s?)+\d$"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    return bad.to_str()


def test_a_tokenizer_that_panics_is_a_tip_error_not_an_escape(text_market):
    """The Rust library reports a regex past Oniguruma's retry limit as a panic, a BaseException that
    an ``except Exception`` lets escape (over gRPC: a call that hangs until its deadline)."""
    buyer, records = text_market
    hostile = _regex_bomb(buyer.input_format.tokenizer_json)
    with pytest.raises(BaseException) as raw:
        Tokenizer.from_str(hostile).encode_batch([r["text"] for r in records.rows])
    assert not isinstance(raw.value, Exception)  # the library really panics on these records
    with pytest.raises(ProtocolError, match=r"the buyer's tokenizer failed on corpus\.jsonl: .*retry-limit"):
        TextFormat(hostile, 16).encode(records)
    seller = Seller("victim", records)
    with pytest.raises(DataError, match="records do not fit the offer's input format"):
        seller.respond(_tamper(buyer.offer(max_samples=100), _set(tokenizer_json=hostile.encode())))


@pytest.mark.parametrize("edit", [
    _set(classes=["benign"]),  # is any record malignant?
    _set(features=["diagnosis", *FEATURES[1:]]),  # read a text column as a number
])
def test_probing_record_values_through_refusals_is_charged_and_reveals_no_value(table_market, edit, caplog):
    """Whether a format fits the records' values is information about them: the refusal names no
    value and no record, and it costs the buyer its answer (here its one exact answer)."""
    buyer, records = table_market
    seller = Seller("victim", records)
    offer = buyer.offer(max_samples=100)
    with pytest.raises(DataError, match="records do not fit the offer's input format") as info:
        seller.respond(_tamper(offer, edit))
    message = str(info.value)
    assert "malignant" not in message and "benign" not in message and "record " not in message
    assert "malignant" in caplog.text or "benign" in caplog.text  # the seller's own log says which value
    with pytest.raises(PrivacyBudgetExhaustedError, match="already received 1 exact"):
        seller.respond(offer)


def test_an_empty_input_format_is_refused(table_market):
    buyer, records = table_market
    _refused_then_honest_answered(buyer, records, lambda inp: inp.ClearField("table"), ProtocolError,
                                  "input format is empty")


_names = st.sampled_from(["mean radius", "worst area", "diagnosis", "text", "x", "y", "", "nope", "é" * 300])
_floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
_tables = st.builds(
    lambda f, label, classes, off, sc, fk, lk, dt: pb.InputFormat(table=pb.TableInput(
        features=f, label=label, classes=classes, offset=off, scale=sc, features_key=fk, label_key=lk, dtype=dt)),
    st.lists(_names, max_size=4), _names, st.lists(st.sampled_from(["benign", "malignant", "1", ""]), max_size=3),
    st.lists(_floats, max_size=4), st.lists(_floats, max_size=4), _names, _names,
    st.sampled_from(["float32", "float64", "int8", ""]))
_texts = st.builds(
    lambda blob, n, field, label, classes, pad, special: pb.InputFormat(
        text=pb.TextInput(
            tokenizer_json=blob,
            max_length=n,
            text_field=field,
            label_field=label,
            classes=classes,
            pad_id=pad,
            add_special_tokens=special,
        )
    ),
    st.one_of(
        st.binary(max_size=64), st.just(b'{"model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}')
    ),
    st.integers(0, 2**32 - 1),
    _names,
    _names,
    st.lists(_names, max_size=2),
    st.integers(0, 2**32 - 1),
    st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(st.one_of(_tables, _texts, st.just(pb.InputFormat())))
def test_any_input_format_gives_tensors_or_a_tip_error(msg):
    """Whatever a buyer puts in the format, decoding and encoding either work or raise a TipError."""
    records = {
        "table": RawRecords.from_rows(cancer_table().iloc[:5].to_dict("records")),
        "text": text_records(["some text", "more text here"]),
    }
    try:
        formats.check_input_pb(msg)
        fmt = formats.format_from_pb(msg)
        batch = fmt.encode(records[msg.WhichOneof("kind")])
    except TipError:
        return
    assert all(v.shape[0] in (2, 5) for v in batch.values())


def test_max_length_below_the_special_tokens_cannot_outgrow_what_was_costed():
    """tokenizers silently skips truncation when max_length is below the special tokens' count."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({"a": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    records = text_records(["a " * 50])
    with pytest.raises(ProtocolError, match="52-token records under max_length 1: its special tokens alone"):
        formats.TextFormat.from_tokenizer(tok, 1).encode(records)
    assert formats.TextFormat.from_tokenizer(tok, 2).encode(records)["input_ids"].tolist() == [[1, 2]]
