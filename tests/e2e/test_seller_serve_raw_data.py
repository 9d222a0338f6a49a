"""``tip-fed seller serve --data corpus.jsonl``: a seller process holding raw text, valued over gRPC.

The process is started on 127.0.0.1 with a free port, valued with ``value_sellers`` and
``Buyer.settle``, and must give the in-process seller's valuation of the same file; the test
stops the process it started, by PID.
"""

import contextlib
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, pre_tokenizers

from tip_fed.config import PreconditionerConfig, ProjectionConfig, ProtocolConfig
from tip_fed.core.models import MLP
from tip_fed.core.tasks import get_task
from tip_fed.errors import DataError
from tip_fed.grpc import SellerEndpoint, value_sellers, wait_until_healthy
from tip_fed.protocol import Buyer, BuyerSettings, Seller, SellerPolicy
from tip_fed.protocol.disclosure import NoisePolicy
from tip_fed.protocol.formats import TableFormat, TextFormat
from tip_fed.protocol.records import RawRecords, load_seller_data
from tip_fed.wire.tip.v1 import valuation_pb2 as pb
from tip_fed.wire.tip.v1 import valuation_pb2_grpc as rpc

from ..raw_data import docstring_corpus, text_buyer, text_records, train_tokenizer, write_jsonl
from .serving import serving

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _serving(data: Path):
    """``tip-fed seller serve --data DATA --insecure --port 0``, exact answers, until the block ends."""
    return serving(["--data", str(data), "--insecure", "--port", "0", "--exact-per-sample", "--max-exact", "-1",
                    "--total-max-exact", "-1"])


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".txt"])
def test_seller_serve_reads_tables_and_plain_text(tmp_path, suffix):
    path = tmp_path / f"site-7{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(docstring_corpus(30)) + "\n", encoding="utf-8")
    else:
        frame = pd.DataFrame({"age": range(30), "label": ["a", "b"] * 15})
        if suffix == ".csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path)
    with _serving(path) as (ready, _):
        assert ready["id"] == "site-7" and int(ready["n"]) == 30
        health = wait_until_healthy(SellerEndpoint("site-7", f"127.0.0.1:{ready['port']}"), tls=None, insecure=True,
                                    timeout_s=30)
        assert health.n_samples == 30


def test_seller_serve_jsonl_matches_the_in_process_seller(tmp_path):
    texts = docstring_corpus(100)
    settings = BuyerSettings(projection=ProjectionConfig(rank=4), preconditioner=PreconditionerConfig(kind="kfac"),
                             protocol=ProtocolConfig(disclosure="per-sample"))
    buyer = text_buyer(texts[:25], train_tokenizer(texts[:50]), settings, 24, train=texts[:50])
    data = tmp_path / "docs-corpus.jsonl"
    write_jsonl(data, texts[50:100])

    with _serving(data) as (ready, _):
        assert ready["id"] == "docs-corpus" and int(ready["n"]) == 50  # seller id = the file stem
        endpoint = SellerEndpoint("docs-corpus", f"127.0.0.1:{ready['port']}")
        wait_until_healthy(endpoint, tls=None, insecure=True, timeout_s=30)
        replies, failures = value_sellers([endpoint], buyer.offer(max_samples=100), insecure=True, timeout_s=120)
        assert failures == {}
        remote = buyer.settle(list(replies.values()), expected=["docs-corpus"])
    assert remote.rejected == {} and remote.missing == []

    local = buyer.settle([Seller("docs-corpus", load_seller_data(data), policy=SellerPolicy(exact_per_sample=True))
                          .respond(buyer.offer(max_samples=100))])
    r, here = remote.sellers[0], local.sellers[0]
    tol = 2e-6 * buyer.query_norm * buyer.grad_norm_bound  # two independent CKKS + sanitising noises
    assert r.n_samples == here.n_samples == 50
    assert np.max(np.abs(r.per_sample - here.per_sample)) <= tol
    assert abs(r.total - here.total) <= 50 * tol
    assert np.std(here.per_sample) > 100 * tol  # the scores differ between records: the comparison has teeth


AGGREGATE = BuyerSettings(projection=ProjectionConfig(rank=2), preconditioner=PreconditionerConfig(kind="identity"),
                          protocol=ProtocolConfig(disclosure="aggregate", query_budget=1))


@contextlib.contextmanager
def _serving_logged(data: Path, *args: str):
    """``tip-fed seller serve --data DATA --insecure --port 0 ARGS``: (ready line, every output line, stub)."""
    with serving(["--data", str(data), "--insecure", "--port", "0", *args]) as (ready, lines), \
            grpc.insecure_channel(f"127.0.0.1:{ready['port']}") as channel:
        yield ready, lines, rpc.SellerStub(channel)


def _call(stub, offer: bytes) -> grpc.RpcError | None:
    try:
        stub.Value(pb.ValueRequest(offer=pb.Offer.FromString(offer)), timeout=120)
    except grpc.RpcError as exc:
        return exc
    return None


def test_seller_serve_sells_only_the_fields_it_lists(tmp_path):
    """A buyer's format naming an unsold column (to read it back from an aggregate answer) is refused
    before any charge, without the seller's other field names; the honest Offer is answered after it."""
    rng = np.random.default_rng(3)
    n = 30
    frame = pd.DataFrame({"age": rng.integers(20, 80, n), "bmi": rng.uniform(18, 35, n).round(1),
                          "diagnosis": rng.choice(["benign", "malignant"], n),
                          "ssn": [f"123-45-{i:04d}" for i in range(n)], "hiv_status": rng.integers(0, 2, n)})
    data = tmp_path / "clinic.csv"
    frame.to_csv(data, index=False)
    mine = RawRecords.from_rows(frame.iloc[:20].astype(str).to_dict("records"), "buyer rows")

    def buyer(label: str) -> Buyer:
        torch.manual_seed(0)
        return Buyer(MLP([2, 4, 2]), get_task("classification"), objective=mine, train=mine, settings=AGGREGATE,
                     input_format=TableFormat.fit(mine, ["age", "bmi"], label))

    # --max-exact 1: one exact answer per buyer, so a charged refusal would refuse the honest Offer
    with _serving_logged(data, "--fields", "age,bmi,diagnosis", "--max-exact", "1") as (_, lines, stub):
        refused = _call(stub, buyer("hiv_status").offer(max_samples=100))
        assert refused is not None and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "clinic.csv offers no field 'hiv_status'" in refused.details()
        assert not [f for f in ("age", "bmi", "diagnosis", "ssn") if f in refused.details()]
        assert _call(stub, buyer("diagnosis").offer(max_samples=100)) is None
    assert any("offers the fields ['age', 'bmi', 'diagnosis'] of clinic.csv" in line for line in lines)


def test_seller_serve_answers_a_panicking_tokenizer_and_keeps_serving(tmp_path):
    """A tokenizer whose regex makes the Rust library panic (a BaseException) gets a status, not a call
    held open until the buyer's deadline; the seller logs it and answers the next buyer."""
    texts = docstring_corpus(60)
    tok = train_tokenizer(texts)
    data = tmp_path / "corpus.jsonl"
    write_jsonl(data, texts[10:40])
    bad = Tokenizer.from_str(tok.to_str())
    bad.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"(\w+\s?)+\d$"), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    with _serving_logged(data, "--max-exact", "-1", "--total-max-exact", "-1") as (_, lines, stub):
        for _ in range(3):
            hostile = pb.Offer.FromString(text_buyer(texts[:6], tok, AGGREGATE, 16).offer(max_samples=100))
            hostile.input.text.tokenizer_json = bad.to_str().encode()
            refused = _call(stub, hostile.SerializeToString())
            assert refused is not None and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "records do not fit the offer's input format" in refused.details()
        assert _call(stub, text_buyer(texts[:6], tok, AGGREGATE, 16).offer(max_samples=100)) is None
    assert any("tokenizer failed on corpus.jsonl" in line and "retry-limit" in line for line in lines)


def test_seller_serve_refuses_a_model_too_short_for_the_format_alike_for_every_dataset(tmp_path):
    """A DP buyer ships a BERT with 12 positions and asks for max_length 512, after the longest record's
    token count (which the model's error text used to state: "expanded size of the tensor (41)"). The
    seller process refuses it before any charge, with details that name no record length and read the
    same as an in-process seller's over other records; the honest Offer is answered after it."""
    texts = docstring_corpus(60)
    tok = train_tokenizer(texts)
    data = tmp_path / "corpus.jsonl"
    write_jsonl(data, texts[10:40])
    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                  vocab_size=tok.get_vocab_size(), max_position_embeddings=12, is_decoder=True)
    bert = transformers.BertLMHeadModel(cfg).eval()
    dp = BuyerSettings(projection=ProjectionConfig(rank=2), preconditioner=PreconditionerConfig(kind="identity"),
                       protocol=ProtocolConfig(disclosure="aggregate", query_budget=1, dp_epsilon=1.0))
    buyer = Buyer(bert, get_task("causal-lm"), objective=text_records(texts[:8]), train=text_records(texts[:8]),
                  input_format=TextFormat.from_tokenizer(tok, 12), settings=dp)
    hostile = pb.Offer.FromString(buyer.offer(max_samples=100))
    hostile.input.text.max_length = 512
    longest = max(len(tok.encode(t).ids) for t in texts[10:40])
    assert 12 < longest < 512
    with _serving_logged(data, "--dp-epsilon", "1") as (_, _lines, stub):
        refused = _call(stub, hostile.SerializeToString())
        assert refused is not None and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "placeholder batch" in refused.details() and str(longest) not in refused.details()
        assert _call(stub, buyer.offer(max_samples=100)) is None  # nothing was charged or spent
    elsewhere = Seller("corpus", text_records(texts[20:50]), policy=SellerPolicy(noise=NoisePolicy(1.0)))
    with pytest.raises(DataError) as info:
        elsewhere.respond(hostile.SerializeToString())
    assert str(info.value) == refused.details()
