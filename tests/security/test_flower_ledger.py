"""A Flower seller keeps its privacy ledger across messages, sessions and ClientApp instances.

The attack: a buyer opens new sessions (fresh keys each) against one Flower seller. A Flower
ClientApp is rebuilt for every message (a deployed SuperNode even runs each message in a new
process), so a seller whose ledger lived in memory started every message with an empty one: every
new session got its exact answer and the DP budget never composed. Each Offer here goes through the
real ClientApp code path in a fresh run Context, as a new ``flwr run`` delivers it.

A damaged query ciphertext, and noise the packing cannot hold, are refused while the Offer is
opened, before the ledger is charged: they cost the buyer's lifetime budget nothing.
"""

import json
import subprocess
import sys

import pytest
from flwr.app import Context, Message, RecordDict

from tip_fed.errors import ConfigError, CryptoError
from tip_fed.flower import records
from tip_fed.flower.client_app import make_client_app
from tip_fed.protocol import Seller, SellerPolicy
from tip_fed.protocol.data import save_dataset
from tip_fed.protocol.disclosure import NoisePolicy
from tip_fed.protocol.ledger import PrivacyLedger, composed_epsilon, default_ledger
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

from ..integration.test_flower_apps import task_identity  # noqa: F401 - autouse: Messages need a task identity

SESSIONS = 4


def _ask(offer: bytes, node_config: dict, run_id: int):
    """One Offer through a freshly made ClientApp, in a new run's Context: (reply bytes, error text)."""
    ctx = Context(run_id=run_id, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    out = make_client_app()(Message(content=records.encode_offer(offer), dst_node_id=1,
                                    message_type=records.QUERY_TYPE), ctx)
    reply, _, error = records.decode_reply(out.content)
    return reply, error


def _sessions(buyer, node_config, n=SESSIONS):
    """``n`` new sessions (fresh keys each) against one seller node: the replies and the refusals."""
    answers = [_ask(buyer.offer(max_samples=100), node_config, run_id=i + 1) for i in range(n)]
    return [r for r, _ in answers if r is not None], [e for _, e in answers if e is not None]


@pytest.fixture
def seller_file(tmp_path, seller_data):
    return save_dataset(seller_data["s1"], tmp_path / "clinic.safetensors")


def test_new_sessions_get_one_exact_answer_from_a_flower_seller_by_default(make_buyer, seller_file):
    replies, refused = _sessions(make_buyer("aggregate"), {"data-path": str(seller_file)})
    assert (len(replies), len(refused)) == (1, SESSIONS - 1)
    assert all("already received 1 exact (noise-free) answers" in e for e in refused)
    assert PrivacyLedger(default_ledger(seller_file)).spent(None) == (0.0, 1)  # beside the data, on disk


def test_the_max_exact_of_the_node_config_binds(make_buyer, seller_file, tmp_path):
    ledger = tmp_path / "state" / "ledger.json"
    replies, refused = _sessions(make_buyer("aggregate"),
                                 {"data-path": str(seller_file), "max-exact": 2, "ledger": str(ledger)})
    assert (len(replies), len(refused)) == (2, SESSIONS - 2)
    assert PrivacyLedger(ledger).spent(None) == (0.0, 2) and not default_ledger(seller_file).exists()


def test_the_dp_budget_composes_across_messages_and_clientapps(make_buyer, seller_file, tmp_path):
    ledger, eps, lifetime = tmp_path / "ledger.json", 1.0, 2.0
    node = {"data-path": str(seller_file), "ledger": str(ledger), "dp-epsilon": eps, "lifetime-epsilon": lifetime}
    # independent reference: how many Gaussian answers of this multiplier compose to <= lifetime (RDP)
    multiplier = NoisePolicy(eps, 1e-6).noise_multiplier
    fits = max(k for k in range(1, 50) if composed_epsilon({multiplier: k}, 1e-5) <= lifetime)
    assert fits == 3  # a budget that takes more than one answer and fewer than asked
    replies, refused = _sessions(make_buyer("aggregate"), node, n=fits + 2)
    assert (len(replies), len(refused)) == (fits, 2)
    assert all("spent its lifetime privacy budget" in e for e in refused)
    spent, exact = PrivacyLedger(ledger).spent(None)
    assert exact == 0 and spent == pytest.approx(composed_epsilon({multiplier: fits}, 1e-5))


CHILD = """
import json, sys
from pathlib import Path
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from tip_fed.flower import records
from tip_fed.flower.client_app import make_client_app
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 9, 1, 1
offer, node = Path(sys.argv[1]).read_bytes(), json.loads(sys.argv[2])
ctx = Context(run_id=9, node_id=1, node_config=node, state=RecordDict(), run_config={})
msg = Message(content=records.encode_offer(offer), dst_node_id=1, message_type=records.QUERY_TYPE)
out = make_client_app()(msg, ctx)
print(records.decode_reply(out.content)[2])
"""


def test_a_new_seller_process_reads_the_spent_dp_budget(make_buyer, seller_file, tmp_path):
    """What a restarted SuperNode runs: the ClientApp in a new process (as ``flwr-clientapp`` does for
    every message) refuses the buyer whose budget the earlier processes spent."""
    ledger = tmp_path / "ledger.json"
    node = {"data-path": str(seller_file), "ledger": str(ledger), "dp-epsilon": 1.0, "lifetime-epsilon": 1.5}
    multiplier = NoisePolicy(1.0, 1e-6).noise_multiplier
    assert composed_epsilon({multiplier: 2}, 1e-5) <= 1.5 < composed_epsilon({multiplier: 3}, 1e-5)
    buyer = make_buyer("aggregate")
    replies, refused = _sessions(buyer, node, n=2)
    assert (len(replies), refused) == (2, [])
    (tmp_path / "offer.bin").write_bytes(buyer.offer(max_samples=100))
    child = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "offer.bin"), json.dumps(node)],
                           capture_output=True, text=True, timeout=300, check=False)
    assert child.returncode == 0, child.stderr[-2000:]
    assert "spent its lifetime privacy budget" in child.stdout, child.stdout + child.stderr[-2000:]
    assert PrivacyLedger(ledger).spent(None)[0] == pytest.approx(composed_epsilon({multiplier: 2}, 1e-5))


def _damage_query(offer: bytes) -> bytes:
    """The same Offer with its first query ciphertext cut short (it still decodes as an Offer)."""
    msg = pb.Offer.FromString(offer)
    msg.query[0] = msg.query[0][: len(msg.query[0]) // 2]
    return msg.SerializeToString()


def test_a_damaged_query_costs_the_buyer_no_exact_answer(make_buyer, seller_file, tmp_path):
    ledger = tmp_path / "ledger.json"
    node = {"data-path": str(seller_file), "ledger": str(ledger)}
    buyer = make_buyer("aggregate")
    honest = buyer.offer(max_samples=100)
    reply, error = _ask(_damage_query(honest), node, run_id=1)
    assert reply is None and "query ciphertext 0" in error
    assert PrivacyLedger(ledger).spent_total() == (0.0, 0)
    reply, error = _ask(honest, node, run_id=1)  # same run, same session: its one exact answer is still due
    assert error is None and buyer.settle([reply]).rejected == {}


def test_noise_the_packing_cannot_hold_is_refused_before_the_charge(make_buyer, seller_data, tmp_path):
    ledger = tmp_path / "ledger.json"
    seller = Seller("s1", seller_data["s1"], policy=SellerPolicy(ledger=str(ledger)))
    buyer = make_buyer("per-sample", dp_epsilon=0.25)  # per-coordinate std ~40 > ~15.9 the last level holds
    offer = buyer.offer(max_samples=100)
    with pytest.raises(ConfigError, match=r"exceeds .* what these CKKS parameters can hold"):
        seller.respond(offer)
    assert PrivacyLedger(ledger).spent_total() == (0.0, 0)


def test_a_damaged_query_is_refused_before_a_long_lived_seller_charges_its_ledger(make_buyer, seller_data):
    seller = Seller("s1", seller_data["s1"])  # max-exact 1: a charged refusal would leave nothing for the honest Offer
    buyer = make_buyer("aggregate")
    honest = buyer.offer(max_samples=100)
    with pytest.raises(CryptoError, match="query ciphertext 0"):
        seller.respond(_damage_query(honest))
    assert buyer.settle([seller.respond(honest)]).rejected == {}
