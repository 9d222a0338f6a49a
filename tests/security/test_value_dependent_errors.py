"""A buyer-crafted model that raises on some record values cannot turn them into a refusal or an error text.

The buyer picks the model type, its config and the tokenizer. Two attacks on a DP seller holding text:

* a GPT-2 with 16 positions and a tokenizer that turns "HIV" into 40 tokens: the batch holding that
  record overran the position table, and the seller refused the Offer (charged) while the clean
  neighbour was answered, an exact bit beside the noised answer;
* a BERT with 12 positions: the refusal carried the exception text, which stated the longest
  record's token count ("The expanded size of the tensor (41) must match the existing size (12)").

Now text is padded to the format's max_length (no width depends on a record), the model is run on a
record-free batch of that shape before the charge (a model that fails on it is refused for free, the
same way for every dataset), and a record the model still raises on scores as a zero row, so every
Offer that passes the check is answered in the normal, noised form. Real tokenizers, transformers
models, TenSEAL, Seller and Buyer.
"""

import logging
import re

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from tip_fed.config import PreconditionerConfig, ProjectionConfig, ProtocolConfig
from tip_fed.core.projection import ProjectionSpec
from tip_fed.core.tasks import get_task
from tip_fed.errors import DataError, TipError
from tip_fed.protocol import Buyer, BuyerSettings, Seller, SellerPolicy
from tip_fed.protocol.data import dataset_gradients
from tip_fed.protocol.disclosure import NoisePolicy
from tip_fed.protocol.formats import TextFormat
from tip_fed.protocol.records import RawRecords
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

WORDS = ("the patient was seen for a routine visit and reported mild pain fever cough after travel no other "
         "complaints").split()
VOCAB = {w: i for i, w in enumerate(["<pad>", "<unk>", "z", *WORDS])}
DP = SellerPolicy(noise=NoisePolicy(1.0))


def _tokenizer(trap: bool) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    if trap:  # the secret word becomes 40 tokens; every other text stays below the model's positions
        tok.normalizer = normalizers.Replace("HIV", " z" * 40)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def _texts(rng: np.random.Generator, n: int, words: int | None = None) -> list[dict[str, str]]:
    return [{"text": " ".join(rng.choice(WORDS, words or int(rng.integers(4, 11))))} for _ in range(n)]


def _lying_offer(model, tok: Tokenizer, *, own_length: int, offered_length: int) -> tuple[Buyer, bytes]:
    """A DP buyer whose own records fit the model (``own_length`` tokens), and its Offer asking the
    seller to encode at ``offered_length``: what a buyer after the seller's record lengths sends."""
    rows = RawRecords.from_rows(_texts(np.random.default_rng(1), 20))
    buyer = Buyer(model, get_task("causal-lm"), objective=rows, train=rows,
                  input_format=TextFormat.from_tokenizer(tok, own_length, pad_id=0),
                  settings=BuyerSettings(projection=ProjectionConfig(rank=2),
                                         preconditioner=PreconditionerConfig(kind="identity"),
                                         protocol=ProtocolConfig(disclosure="aggregate", dp_epsilon=1.0)))
    msg = pb.Offer.FromString(buyer.offer(100))
    msg.input.text.max_length = offered_length
    return buyer, msg.SerializeToString()


def _outcome(offer: bytes, rows: list[dict[str, str]]) -> tuple[str, str, tuple[float, int]]:
    """(answered|refused, the reply's form or the refusal text, the seller's ledger after) of one Offer."""
    seller = Seller("clinic", RawRecords.from_rows(rows, "clinic.jsonl"), policy=DP)
    try:
        reply = pb.Reply.FromString(seller.respond(offer))
    except TipError as exc:
        return "refused", f"{type(exc).__name__}: {exc}", seller._ledger.spent(None)
    form = (reply.n_samples, reply.n_rows, len(reply.scores), reply.clipped, reply.dp_epsilon, reply.noise_std)
    return "answered", repr(form), seller._ledger.spent(None)


@pytest.fixture(scope="module")
def gpt2_16():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(VOCAB), n_positions=16,
                                  pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def bert_12():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                  vocab_size=len(VOCAB), max_position_embeddings=12, is_decoder=True, pad_token_id=0)
    return transformers.BertLMHeadModel(cfg).eval()


def test_a_position_trap_on_one_record_does_not_tell_neighbours_apart(gpt2_16, caplog):
    """GPT-2 with 16 positions, the "HIV" trap tokenizer and max_length 64: both neighbours get the same
    refusal, before any charge, at every try (it was: the clean one answered, the other refused, 8/8)."""
    tok = _tokenizer(trap=True)
    rng = np.random.default_rng(0)
    base = _texts(rng, 30)
    neighbour = [*base[:-1], {"text": "patient reported fever after travel HIV"}]
    _, offer = _lying_offer(gpt2_16, tok, own_length=16, offered_length=64)
    with caplog.at_level(logging.WARNING):
        outcomes = {name: [_outcome(offer, rows) for _ in range(2)]
                    for name, rows in (("D", base), ("D'", neighbour))}
    assert outcomes["D"] == outcomes["D'"]  # the buyer's view is the same: nothing to tell them apart by
    kind, text, spent = outcomes["D"][0]
    assert kind == "refused" and spent == (0.0, 0)  # refused for free: the model fails on any input
    assert "do not fit the model" in text and "64" in text  # it says what is wrong: the offered width


def test_a_trap_inside_the_model_width_answers_both_neighbours_alike(gpt2_16):
    """The same trap at the model's own width (max_length 16): the trapped record is truncated like any
    other, both neighbours are answered in the same form and charged alike under DP."""
    tok = _tokenizer(trap=True)
    base = _texts(np.random.default_rng(0), 30)
    neighbour = [*base[:-1], {"text": "patient reported fever after travel HIV"}]
    _, offer = _lying_offer(gpt2_16, tok, own_length=16, offered_length=16)
    (k1, form1, spent1), (k2, form2, spent2) = (_outcome(offer, rows) for rows in (base, neighbour))
    assert k1 == k2 == "answered" and form1 == form2
    assert spent1 == spent2 and spent1[0] > 0


@pytest.mark.parametrize("longest", [17, 23, 41])
def test_no_refusal_states_a_record_length(bert_12, longest):
    """BERT with 12 positions: the refusal is the same text whatever the longest record, states no
    record-derived number, and charges nothing (it was: "expanded size of the tensor (41)", charged)."""
    tok = _tokenizer(trap=False)
    _, offer = _lying_offer(bert_12, tok, own_length=12, offered_length=64)
    rng = np.random.default_rng(longest)
    kind, text, spent = _outcome(offer, [*_texts(rng, 29), *_texts(rng, 1, longest)])
    assert kind == "refused" and spent == (0.0, 0)
    numbers = set(re.findall(r"\d+", text))
    # only what the buyer knows: the model's 12 positions, its own 64, the 30 records every reply states
    assert str(longest) not in numbers and numbers <= {"1", "12", "30", "64"}
    assert text == _outcome(offer, _texts(np.random.default_rng(0), 30))[1]  # same text for every dataset


class _RaisesOnValue(torch.nn.Module):
    """A model that raises (an index out of range) on any record whose first feature exceeds 4: the
    general case of a value-dependent exception inside whatever module the buyer picks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.first, self.last = torch.nn.Linear(5, 4), torch.nn.Linear(4, 2)
        self.table = torch.nn.Parameter(torch.zeros(5), requires_grad=False)

    def forward(self, x):
        index = (x[:, 0] > 4).long() * 10  # row 10 of a 5-row table: IndexError for those records only
        return self.last(torch.tanh(self.first(x))) + self.table[index].unsqueeze(1)


def test_a_record_the_model_raises_on_is_a_zero_row_and_the_others_are_exact(caplog):
    """The batch that raises is scored one record at a time: the raising record is a zero row, every
    other row equals its own single-record gradient, whatever the batch size (seller, audit and spot
    check use different ones), and the exception text goes to the log only."""
    model = _RaisesOnValue().eval()
    spec = ProjectionSpec.for_model(model, rank=2)
    task = get_task("classification")
    x = torch.randn(9, 5)
    x[4, 0] = 7.0
    data = {"x": x, "y": torch.randint(0, 2, (9,))}
    with caplog.at_level(logging.WARNING, logger="tip_fed.protocol.data"):
        rows = {size: dataset_gradients(model, spec, task, data, size) for size in (1, 4, 9)}
    assert "index" in caplog.text.lower()  # the details are the seller's
    for g in rows.values():
        assert bool((g[4] == 0).all()) and int((g == 0).all(dim=1).sum()) == 1
        torch.testing.assert_close(g, rows[1], rtol=1e-5, atol=1e-7)
    clean = {k: torch.cat([v[:4], v[5:]]) for k, v in data.items()}
    torch.testing.assert_close(torch.cat([rows[9][:4], rows[9][5:]]),
                               dataset_gradients(model, spec, task, clean, 9), rtol=1e-5, atol=1e-7)


def test_a_model_failing_on_every_input_is_refused_before_the_charge(bert_12):
    """Refused in the seller's open step (DataError, uncharged), and the honest Offer of another
    buyer is then answered by the same seller: nothing was spent."""
    _, offer = _lying_offer(bert_12, _tokenizer(trap=False), own_length=12, offered_length=13)
    seller = Seller("clinic", RawRecords.from_rows(_texts(np.random.default_rng(2), 30), "clinic.jsonl"), policy=DP)
    with pytest.raises(DataError, match="placeholder batch"):
        seller.respond(offer)
    assert seller._ledger.spent(None) == (0.0, 0) and len(seller._sessions) == 0
    honest, good = _lying_offer(bert_12, _tokenizer(trap=False), own_length=12, offered_length=12)
    assert honest.settle([seller.respond(good)]).rejected == {}


def test_a_tensor_seller_refuses_a_model_that_does_not_fit_its_records_before_the_charge(make_buyer):
    """The same check for a seller of tensors: a 10-feature model against 7-feature records fails on the
    placeholder batch (zeros of the records' width), so the DP buyer's ledger is not charged."""
    seller = Seller("s", {"x": torch.randn(6, 7), "y": torch.zeros(6, dtype=torch.long)}, policy=DP)
    with pytest.raises(DataError, match="do not fit the model"):
        seller.respond(make_buyer(disclosure="aggregate", dp_epsilon=1.0).offer(max_samples=100))
    assert seller._ledger.spent(None) == (0.0, 0) and len(seller._sessions) == 0
