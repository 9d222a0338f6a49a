"""Sellers holding raw records (CSV, Parquet, JSONL) valued in real CKKS sessions.

The buyer ships its input format in the Offer; every seller encodes its own file with it. Each
decrypted score is checked against a plaintext reference that encodes the same files
independently: pandas for the table (standardised with the buyer's means and population stds),
transformers' PreTrainedTokenizerFast for the text.
"""

import numpy as np
import pandas as pd
import pytest
import torch
import transformers

from tip_fed.config import PreconditionerConfig, ProjectionConfig, ProtocolConfig
from tip_fed.core.gradients import projected_grads
from tip_fed.core.influence import clip_rows
from tip_fed.core.tasks import get_task
from tip_fed.errors import ProtocolError
from tip_fed.protocol import Buyer, BuyerSettings, Seller, SellerPolicy
from tip_fed.protocol.audit import audit
from tip_fed.protocol.formats import TextFormat
from tip_fed.protocol.records import RawRecords, load_seller_data

from ..raw_data import (
    FEATURES,
    LABEL,
    cancer_table,
    docstring_corpus,
    table_buyer,
    text_buyer,
    train_tokenizer,
    write_jsonl,
)

EXACT = SellerPolicy(exact_per_sample=True)
MAX_LENGTH = 24


def _settings(disclosure="per-sample"):
    return BuyerSettings(projection=ProjectionConfig(rank=4), preconditioner=PreconditionerConfig(kind="kfac"),
                         protocol=ProtocolConfig(disclosure=disclosure))


def _plain(buyer, task, batch):
    g = projected_grads(buyer.model, buyer.spec, task, batch).double()
    clipped, _ = clip_rows(g, buyer.grad_norm_bound)
    return (clipped @ buyer.query).numpy()


def _check(valuation, buyer, plain):
    tol = 1e-6 * buyer.query_norm * buyer.grad_norm_bound  # CKKS + sanitising noise, as test_protocol
    assert valuation.rejected == {} and sorted(v.seller_id for v in valuation.sellers) == sorted(plain)
    for v in valuation.sellers:
        ref = plain[v.seller_id]
        assert v.n_samples == len(ref)
        assert np.max(np.abs(v.per_sample - ref)) <= tol
        assert abs(v.total - ref.sum()) <= len(ref) * tol
    totals = [plain[s].sum() for s in sorted(plain)]
    assert len(set(np.round(totals, 6))) == len(totals)  # sellers really differ: the check is not vacuous


@pytest.fixture(scope="module")
def table_market(tmp_path_factory):
    """A buyer MLP trained on 200 breast-cancer rows; sellers: three CSV files and one Parquet file."""
    tmp = tmp_path_factory.mktemp("table")
    frame = cancer_table()
    mine, objective = frame.iloc[:200], frame.iloc[200:260]
    buyer = table_buyer(mine, _settings(), objective=objective, hidden=16, steps=100)
    paths = {}
    for i, (start, n) in enumerate([(260, 40), (300, 70), (370, 25)]):
        paths[f"clinic-{i}"] = tmp / f"clinic-{i}.csv"
        frame.iloc[start : start + n].to_csv(paths[f"clinic-{i}"], index=False)
    paths["registry"] = tmp / "registry.parquet"
    # a Parquet seller with its columns in another order and an extra column the buyer does not use
    part = frame.iloc[395:455].assign(site="north")
    part[[LABEL, "site", *reversed(FEATURES)]].to_parquet(paths["registry"])
    return buyer, mine, paths


def _pandas_batch(path, mine):
    """The reference encoding: pandas reads the file, standardises with the buyer's own statistics."""
    df = pd.read_parquet(path) if str(path).endswith(".parquet") else pd.read_csv(path)
    x = (df[FEATURES] - mine[FEATURES].mean()) / mine[FEATURES].std(ddof=0)
    y = (df[LABEL] == "malignant").astype("int64")  # classes sorted: benign 0, malignant 1
    return {"x": torch.tensor(x.to_numpy(), dtype=torch.float32), "y": torch.tensor(y.to_numpy())}


def test_table_sellers_match_a_pandas_reference(table_market):
    buyer, mine, paths = table_market
    assert buyer.input_format.classes == ("benign", "malignant")
    offer = buyer.offer(max_samples=100)
    sellers = {sid: Seller(sid, load_seller_data(p), policy=EXACT) for sid, p in paths.items()}
    valuation = buyer.settle([s.respond(offer) for s in sellers.values()])
    task = get_task("classification")
    _check(valuation, buyer, {sid: _plain(buyer, task, _pandas_batch(p, mine)) for sid, p in paths.items()})

    # delivery and audit use the encoded tensors the scores were computed on
    report = audit(buyer.record(valuation), {sid: s.deliver(valuation.session_id) for sid, s in sellers.items()})
    assert report.passed, report.to_markdown()
    delivered = sellers["registry"].deliver(valuation.session_id).data
    assert torch.equal(delivered["y"], _pandas_batch(paths["registry"], mine)["y"])


def test_tensor_and_raw_sellers_answer_the_same_offer_alike(table_market):
    """A seller already holding the encoded tensors ignores the input format and scores the same."""
    buyer, mine, paths = table_market
    offer = buyer.offer(max_samples=100)
    raw = Seller("raw", load_seller_data(paths["clinic-1"]), policy=EXACT)
    tensors = Seller("tensors", _pandas_batch(paths["clinic-1"], mine), policy=EXACT)
    v = buyer.settle([raw.respond(offer), tensors.respond(offer)]).by_id()
    tol = 2e-6 * buyer.query_norm * buyer.grad_norm_bound
    assert v["raw"].n_samples == v["tensors"].n_samples == 70
    assert np.max(np.abs(v["raw"].per_sample - v["tensors"].per_sample)) <= tol


def test_a_raw_seller_refuses_an_offer_without_input_format(table_market, model):
    buyer, _, paths = table_market
    seller = Seller("clinic-0", load_seller_data(paths["clinic-0"]), policy=EXACT)
    from ..conftest import make_data

    plain = Buyer(model, get_task("classification"), objective=make_data(20, 2), settings=_settings())
    with pytest.raises(ProtocolError, match=r"holds raw records .* no input format"):
        seller.respond(plain.offer(max_samples=100))
    # the same seller still answers a buyer that sends its format
    assert buyer.settle([seller.respond(buyer.offer(max_samples=100))]).rejected == {}


@pytest.fixture(scope="module")
def text_market(tmp_path_factory):
    """A tiny GPT-2 with a tokenizer trained on stdlib docstrings; three JSONL sellers."""
    tmp = tmp_path_factory.mktemp("text")
    texts = docstring_corpus(200)
    tok = train_tokenizer(texts[:80])
    # records whose kept tokens repeat another's would be (rightly) flagged as padding by the audit
    seen, unique = set(), []
    for text in texts:
        head = tuple(tok.encode(text).ids[:MAX_LENGTH])
        if head not in seen:
            seen.add(head)
            unique.append(text)
    texts = unique
    assert len(texts) >= 160
    buyer = text_buyer(texts[:30], tok, _settings(), MAX_LENGTH, train=texts[:80])
    parts = {"corpus-a": texts[80:100], "corpus-b": texts[100:135], "corpus-c": texts[135:160]}
    paths = {}
    for sid, part in parts.items():
        paths[sid] = tmp / f"{sid}.jsonl"
        write_jsonl(paths[sid], part)
    return buyer, tok, parts, paths


def hf_batch(tok, texts):
    """The reference encoding: transformers' fast tokenizer around the same tokenizer object."""
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>")
    enc = hf(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_text_sellers_match_a_transformers_tokenizer_reference(text_market):
    buyer, tok, parts, paths = text_market
    offer = buyer.offer(max_samples=100)
    sellers = [Seller(sid, load_seller_data(p), policy=EXACT) for sid, p in paths.items()]
    valuation = buyer.settle([s.respond(offer) for s in sellers])
    task = get_task("causal-lm")
    refs = {sid: hf_batch(tok, part) for sid, part in parts.items()}
    assert any(int(r["attention_mask"].sum(1).min()) < r["attention_mask"].shape[1] for r in refs.values())  # padded
    assert any(int(r["attention_mask"].sum(1).max()) == MAX_LENGTH for r in refs.values())  # truncated
    _check(valuation, buyer, {sid: _plain(buyer, task, refs[sid]) for sid in parts})
    report = audit(buyer.record(valuation), {s.seller_id: s.deliver(valuation.session_id) for s in sellers})
    assert report.passed, report.to_markdown()


def test_text_scores_do_not_depend_on_padding(text_market):
    """Pad positions never count: a record scored alone (no padding) equals its padded score."""
    buyer, tok, parts, _ = text_market
    task = get_task("causal-lm")
    by_length = sorted(parts["corpus-a"] + parts["corpus-b"], key=len)
    texts = by_length[:3] + by_length[-3:]
    padded = _plain(buyer, task, hf_batch(tok, texts))
    alone = np.concatenate([_plain(buyer, task, hf_batch(tok, [t])) for t in texts])
    assert hf_batch(tok, texts)["attention_mask"].float().mean() < 1
    np.testing.assert_allclose(padded, alone, rtol=1e-4, atol=1e-6 * np.abs(alone).max())


def test_labelled_text_sellers_for_sequence_classification(tmp_path):
    """JSONL records with a label field; a GPT-2 sequence classifier; reference via transformers."""
    texts = docstring_corpus(120)
    tok = train_tokenizer(texts[:60])
    pad = tok.token_to_id("<|pad|>")
    median = sorted(len(t) for t in texts)[len(texts) // 2]
    kind = ["long" if len(t) > median else "short" for t in texts]
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=tok.get_vocab_size(), n_positions=64,
                                  num_labels=2, pad_token_id=pad)
    model = transformers.GPT2ForSequenceClassification(cfg).eval()
    fmt = TextFormat.from_tokenizer(tok, MAX_LENGTH, label_field="kind", classes=("short", "long"), pad_id=pad)
    rows = [{"text": t, "kind": k} for t, k in zip(texts, kind, strict=True)]
    task = get_task("sequence-classification")
    buyer = Buyer(model, task, objective=RawRecords.from_rows(rows[:40]), train=RawRecords.from_rows(rows[:60]),
                  settings=_settings(), input_format=fmt)
    parts = {"reviews-a": slice(60, 90), "reviews-b": slice(90, 120)}
    paths = {sid: tmp_path / f"{sid}.jsonl" for sid in parts}
    for sid, part in parts.items():
        write_jsonl(paths[sid], texts[part], kind=kind[part])
    offer = buyer.offer(max_samples=100)
    replies = [Seller(sid, load_seller_data(p), policy=EXACT).respond(offer) for sid, p in paths.items()]
    valuation = buyer.settle(replies)
    plain = {}
    for sid, part in parts.items():
        ref = hf_batch(tok, texts[part])
        ref["labels"] = torch.tensor([int(k == "long") for k in kind[part]])
        plain[sid] = _plain(buyer, task, ref)
    _check(valuation, buyer, plain)


def test_seller_serve_says_in_one_line_what_is_wrong_with_a_data_file(tmp_path, capsys):
    from tip_fed.cli import main

    bad = tmp_path / "notes.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    assert main(["seller", "serve", "--data", str(bad), "--port", "0", "--insecure"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tip-fed: error: ") and "notes.jsonl, line 2: malformed JSON" in err and err.count("\n") == 1
