"""The Flower ServerApp (buyer) and ClientApp (sellers) in one process over a local Grid.

No Ray and no network: a Grid subclass hands each message straight to the ClientApp with a
per-node Context that persists across messages, as a SuperNode's does. Decrypted values are
checked against the in-process runtime; failing and silent sellers against the valuation lists.
"""

import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from simulations.flower_apps import config_from_context, run_config_overrides
from simulations.settings import load_config
from tip_fed.config import FlowerConfig, PreconditionerConfig, ProjectionConfig, ProtocolConfig
from tip_fed.core.models import MLP
from tip_fed.core.tasks import get_task
from tip_fed.errors import ConfigError, ProtocolError
from tip_fed.flower import records
from tip_fed.flower.client_app import make_client_app, seller_from_node_config
from tip_fed.flower.server_app import Session, format_bindings, make_server_app, parse_bindings
from tip_fed.protocol import Buyer, BuyerSettings, Seller, SellerPolicy
from tip_fed.protocol.data import load_dataset, save_dataset

from ..conftest import make_data

TASK = get_task("classification")
CAUSAL = Path(__file__).resolve().parents[2] / "configs" / "causal.toml"


@pytest.fixture(autouse=True)
def task_identity():
    """Creating a Message outside a Flower runtime needs a task identity (platform.md §2.3)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


class LocalGrid(Grid):
    """Grid delivering messages to a ClientApp in this process; ``silent`` nodes never answer."""

    def __init__(self, client_app, node_configs: dict[int, dict], silent: Iterable[int] = ()):
        self.app = client_app
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config=cfg, state=RecordDict(), run_config={})
            for n, cfg in node_configs.items()
        }
        self.silent = set(silent)
        self.sent: list[list[int]] = []
        self.replies: dict[str, Message] = {}
        self._run = None

    def get_node_ids(self):
        return list(self.contexts)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def push_messages(self, messages):
        """Deliver at once (replies wait to be pulled); silent nodes' messages are never answered."""
        messages = list(messages)
        self.sent.append([m.metadata.dst_node_id for m in messages])
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(m.metadata.message_id)
            if m.metadata.dst_node_id not in self.silent:
                self.replies[m.metadata.message_id] = self._deliver(m)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    @property
    def run(self):
        return self._run

    def set_run(self, run_id):
        self._run = run_id

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, msg):
        """Like a SuperNode: an exception in the ClientApp becomes an error reply."""
        try:
            return self.app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as exc:
            return Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)


@pytest.fixture(scope="module")
def buyer_parts():
    torch.manual_seed(0)
    model = MLP([10, 16, 2]).eval()
    settings = BuyerSettings(
        projection=ProjectionConfig(rank=4),
        preconditioner=PreconditionerConfig(kind="identity"),
        protocol=ProtocolConfig(disclosure="per-sample"),
    )
    return model, settings


def _buyer(buyer_parts):
    model, settings = buyer_parts
    return Buyer(model, TASK, objective=make_data(30, 2, 0.5), train=make_data(60, 3), settings=settings)


@pytest.fixture()
def seller_files(tmp_path):
    return {f"s{i}": save_dataset(make_data(12 + i, 10 + i, 0.3 * i), tmp_path / f"s{i}.safetensors") for i in range(4)}


def _run(grid, buyer, expected=(), nodes=None, by_reference=True, **flower):
    done = {}
    cfg = FlowerConfig(timeout_s=1, node_wait_s=0, **flower)
    app = make_server_app(lambda ctx: Session(buyer, 20, expected, cfg, nodes=nodes or {}, by_reference=by_reference),
                          lambda v, ctx: done.update(v=v))
    server_ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    app(grid, server_ctx)
    return done["v"]


def test_flower_apps_value_every_seller_like_the_inprocess_runtime(buyer_parts, seller_files):
    # Prepare: node 1..4 each hold one seller file, as SuperNodes started with --node-config
    grid = LocalGrid(
        make_client_app(),
        {i + 1: {"exact-per-sample": True, "data-path": str(p)} for i, p in enumerate(seller_files.values())},
    )
    # Execute: at most 3 Offers in flight
    valuation = _run(grid, _buyer(buyer_parts), expected=list(seller_files), wave_size=3, by_reference=False)
    # Assert: same numbers as the in-process runtime on the same data (fresh keys: CKKS noise only)
    assert grid.sent == [[1, 2, 3], [4]]
    assert sorted(v.seller_id for v in valuation.sellers) == sorted(seller_files)
    assert valuation.rejected == {} and valuation.missing == []
    ref_buyer = _buyer(buyer_parts)
    offer = ref_buyer.offer(max_samples=20)
    ref = ref_buyer.settle(
        [
            Seller(s, load_dataset(p), policy=SellerPolicy(exact_per_sample=True)).respond(offer)
            for s, p in seller_files.items()
        ]
    ).by_id()
    scale = max(np.abs(r.per_sample).max() for r in ref.values())  # CKKS noise is absolute at this scale
    for v in valuation.sellers:
        assert v.total == pytest.approx(ref[v.seller_id].total, rel=1e-5, abs=1e-6 * scale)
        np.testing.assert_allclose(v.per_sample, ref[v.seller_id].per_sample, rtol=1e-5, atol=1e-6 * scale)


def test_a_flower_seller_releases_exact_per_sample_scores_only_by_its_own_choice(buyer_parts, seller_files):
    """The buyer asks for per-sample scores without noise: node 2 opted in, node 1 did not (default)."""
    files = list(seller_files.values())
    grid = LocalGrid(
        make_client_app(), {1: {"data-path": str(files[0])}, 2: {"exact-per-sample": True, "data-path": str(files[1])}}
    )
    valuation = _run(grid, _buyer(buyer_parts), expected=["s0", "s1"])
    assert [v.seller_id for v in valuation.sellers] == ["s1"]
    assert "per-sample scores only with differential-privacy noise" in str(valuation.rejected), valuation.rejected
    bad = LocalGrid(make_client_app(), {1: {"exact-per-sample": "yes", "data-path": str(files[0])}})
    assert "must be true or false" in str(_run(bad, _buyer(buyer_parts), expected=["s0"]).rejected)


def test_failing_seller_is_rejected_and_silent_seller_missing(buyer_parts, seller_files, tmp_path):
    # Prepare: node 2 points at a missing file (a TipError in the ClientApp), node 4 never answers
    configs = {i + 1: {"exact-per-sample": True, "data-path": str(p)} for i, p in enumerate(seller_files.values())}
    configs[2] = {"exact-per-sample": True, "data-path": str(tmp_path / "gone.safetensors"), "seller-id": "s1"}
    grid = LocalGrid(make_client_app(), configs, silent=[4])
    # Execute
    valuation = _run(grid, _buyer(buyer_parts), expected=list(seller_files))
    # Assert: the others are valued; the failure is listed with its reason, the silent one as missing
    assert sorted(v.seller_id for v in valuation.sellers) == ["s0", "s2"]
    assert list(valuation.rejected) == ["s1"] and "DataError" in valuation.rejected["s1"]
    assert "does not exist" in valuation.rejected["s1"]
    assert sorted(valuation.missing) == ["s1", "s3"]


def test_crashing_client_app_and_unnamed_silence_are_reported_by_node(buyer_parts, seller_files):
    # Prepare: a loader bug (not a TipError) makes Flower return an error reply for node 1
    def loader(context, answered):
        if context.node_id == 1:
            raise RuntimeError("loader bug")
        return seller_from_node_config(context, answered)

    configs = {i + 1: {"exact-per-sample": True, "data-path": str(p)} for i, p in enumerate(seller_files.values())}
    grid = LocalGrid(make_client_app(loader), configs, silent=[3])
    # Execute: no expected seller list, so silence is reported by node id
    valuation = _run(grid, _buyer(buyer_parts))
    # Assert
    assert sorted(v.seller_id for v in valuation.sellers) == ["s1", "s3"]
    assert list(valuation.rejected) == ["node-1"] and "loader bug" in valuation.rejected["node-1"]
    assert valuation.missing == ["node-3"]


def test_reply_claiming_another_sellers_id_is_refused_and_unbound_nodes_are_not_counted(buyer_parts, seller_files):
    # Prepare: nodes 1-3 are registered for s0-s2; node 3 claims to be s0; node 4, registered for
    # nobody, holds other data and claims to be s1 (a rogue SuperNode with a stranger's key)
    files = list(seller_files.values())
    configs = {
        1: {"exact-per-sample": True, "data-path": str(files[0])},
        2: {"exact-per-sample": True, "data-path": str(files[1])},
        3: {"exact-per-sample": True, "data-path": str(files[2]), "seller-id": "s0"},
        4: {"exact-per-sample": True, "data-path": str(files[3]), "seller-id": "s1"},
    }
    grid = LocalGrid(make_client_app(), configs)
    # Execute
    valuation = _run(
        grid, _buyer(buyer_parts), expected=["s0", "s1", "s2"], nodes={"s0": 1, "s1": 2, "s2": 3}, by_reference=False
    )
    # Assert: the rogue never got the Offer; each seller id is valued only from its own node
    assert sorted(n for wave in grid.sent for n in wave) == [1, 2, 3]
    by_id = valuation.by_id()
    assert sorted(by_id) == ["s0", "s1"] and by_id["s1"].n_samples == 13  # s1's own 13 records, not the rogue's 15
    assert set(valuation.rejected) == {"node-3", "node-4"}
    assert "registered for seller 's2' but its reply claims seller 's0'" in valuation.rejected["node-3"]
    assert "not registered for any seller" in valuation.rejected["node-4"]
    assert valuation.missing == ["s2"]


def test_seller_node_bindings_parse_and_refuse_ambiguity():
    assert parse_bindings(format_bindings({"a": 1, "b-2": 18446744073709551615})) == {"a": 1, "b-2": 2**64 - 1}
    assert parse_bindings("") == {}
    for bad in ("a", "a=x", "=3", "a=1,a=2", "a=1,b=1"):
        with pytest.raises(ConfigError):
            parse_bindings(bad)


def test_query_budget_holds_across_stateless_client_app_messages(buyer_parts, seller_files):
    # Prepare: one node; the ClientApp object is recreated per message, its Context persists
    path = seller_files["s0"]
    grid = LocalGrid(make_client_app(), {1: {"exact-per-sample": True, "data-path": str(path)}})
    buyer = _buyer(buyer_parts)
    offer = records.encode_offer(buyer.offer(max_samples=20))
    msg = Message(content=offer, dst_node_id=1, message_type=records.QUERY_TYPE)
    # Execute: the same Offer twice
    first, second = grid.send_and_receive([msg])[0], grid.send_and_receive([msg])[0]
    # Assert: answered once, refused the second time with the budget error
    assert records.decode_reply(first.content)[2] is None
    _, seller, error = records.decode_reply(second.content)
    assert seller == "s0" and error.startswith("BudgetExceededError")
    assert records.load_answered(grid.contexts[1].state) == {buyer.session_id: 1}


def test_records_round_trip_blobs_larger_than_a_chunk():
    blob = np.random.default_rng(0).integers(0, 256, size=12 * 2**20 + 7, dtype=np.uint8).tobytes()
    assert records.decode_offer(records.encode_offer(blob)) == blob
    assert records.decode_reply(records.encode_reply(blob, "s0")) == (blob, "s0", None)
    assert records.decode_reply(records.encode_error("x" * 5000, None)) == (None, None, "x" * records.MAX_ERROR_CHARS)


@pytest.mark.parametrize(
    "content",
    [
        RecordDict(),
        RecordDict({records.PAYLOAD: ArrayRecord({"other": Array(np.zeros(3, np.uint8))})}),
        RecordDict({records.PAYLOAD: ArrayRecord({records.BLOB: Array(np.zeros(3, np.float32))})}),
        RecordDict({records.PAYLOAD: ArrayRecord({records.BLOB: Array(np.zeros((2, 2), np.uint8))})}),
        RecordDict({records.PAYLOAD: ArrayRecord({records.BLOB: Array(np.zeros(0, np.uint8))})}),
        RecordDict(
            {
                records.PAYLOAD: ArrayRecord(
                    {records.BLOB: Array(dtype="uint8", shape=(9,), stype="numpy.ndarray", data=b"garbage")}
                )
            }
        ),
    ],
)
def test_malformed_records_raise_protocol_error(content):
    with pytest.raises(ProtocolError):
        records.decode_offer(content)
    with pytest.raises(ProtocolError):
        records.decode_reply(content)


def test_malformed_offer_becomes_an_error_reply_not_a_crash(seller_files):
    grid = LocalGrid(make_client_app(), {1: {"exact-per-sample": True, "data-path": str(seller_files["s0"])}})
    garbage = records.encode_offer(b"\x00not a protobuf offer")
    reply = grid.send_and_receive([Message(content=garbage, dst_node_id=1, message_type=records.QUERY_TYPE)])[0]
    _, _, error = records.decode_reply(reply.content)
    assert error is not None and "Error" in error.split(":")[0]


def test_node_without_data_path_explains_how_to_configure_it():
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ConfigError, match="--node-config"):
        seller_from_node_config(ctx, {})


def test_run_config_rebuilds_the_exact_tip_config():
    # the deployment runtime hands its resolved config to the ServerApp process as run config
    config = load_config(CAUSAL, ["seed=3", "causal.seller-classes=[[1], [4]]", "flower.wave-size=5"])
    run_config = {"config": "", "set": ";".join(run_config_overrides(config))}
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    assert config_from_context(ctx) == config
    # run_simulation passes an empty run config: every key has a default
    empty = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    assert config_from_context(empty) == load_config(CAUSAL)


def test_app_defaults_match_pyproject_run_config():
    # run_simulation passes an empty run config, so the app carries the same defaults as pyproject.toml
    import tomllib

    from simulations.flower_apps import DEFAULTS

    pyproject = tomllib.loads((CAUSAL.parents[1] / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == DEFAULTS
    assert "federations" not in pyproject["tool"]["flwr"]


def test_flower_sellers_with_a_model_cache_dir_are_offered_no_weights_the_second_time(
    buyer_parts, seller_files, tmp_path
):
    # Prepare: nodes 1 and 2 keep verified models on disk (ClientApps are recreated per message); node 3 does not
    files = list(seller_files.values())
    configs = {i + 1: {"exact-per-sample": True, "max-exact": -1, "data-path": str(files[i])} for i in range(3)}
    configs[1]["model-cache-dir"] = str(tmp_path / "models-1")
    configs[2]["model-cache-dir"] = str(tmp_path / "models-2")
    grid = LocalGrid(make_client_app(), configs)
    buyer = _buyer(buyer_parts)
    # Execute: two sessions of the same buyer, by reference
    first = _run(grid, buyer, expected=["s0", "s1", "s2"])
    second = _run(grid, buyer, expected=["s0", "s1", "s2"])
    # Assert: every node lacked the model at first; then only the node without a cache got weights again
    assert grid.sent == [[1, 2, 3], [1, 2, 3], [1, 2, 3], [3]]
    assert first.rejected == second.rejected == {} and first.missing == second.missing == []
    assert [len(list((tmp_path / f"models-{n}").glob("*.model"))) for n in (1, 2)] == [1, 1]
    a, b = first.by_id(), second.by_id()
    scale = max(np.abs(v.per_sample).max() for v in a.values())
    for sid in ("s0", "s1", "s2"):
        np.testing.assert_allclose(b[sid].per_sample, a[sid].per_sample, rtol=1e-5, atol=1e-6 * scale)


def test_node_model_cache_settings_are_checked(tmp_path, seller_files):
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"data-path": str(seller_files["s0"]), "model-cache-dir": str(tmp_path), "model-cache-mb": -1},
        state=RecordDict(),
        run_config={},
    )
    with pytest.raises(ConfigError, match="node config: model-cache-mb must be >= 0"):
        seller_from_node_config(ctx, {})
