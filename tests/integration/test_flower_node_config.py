"""A seller SuperNode's node config takes the ``[seller]`` settings of ``tip-fed seller serve``.

The keys go through the same typed declarations and :meth:`SellerPolicy.from_config` as the
service's ``--config``; a mistyped key is refused rather than leaving a default in force, and the
privacy ledger is always a file.
"""

import pytest
from flwr.app import Context, RecordDict

from tip_fed.errors import ConfigError, DataError
from tip_fed.flower.client_app import policy_from_node_config, seller_from_node_config
from tip_fed.protocol.data import save_dataset
from tip_fed.protocol.ledger import default_ledger

from ..conftest import make_data

SELLER_TOML = """
[seller]
max-exact = 2
dp-epsilon = 4.0
lifetime-epsilon = 5.0
ledger = "{ledger}"

[seller-budget]
max-layers = 7
"""


@pytest.fixture
def data_file(tmp_path):
    return save_dataset(make_data(8, 1), tmp_path / "clinic.safetensors")


def _seller(node_config):
    ctx = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    return seller_from_node_config(ctx, {})


def test_the_default_node_keeps_its_ledger_beside_its_data_and_the_serve_defaults(data_file):
    policy = policy_from_node_config({"data-path": str(data_file)}, data_file)
    assert policy.ledger == str(data_file) + ".ledger.json" == str(default_ledger(data_file))
    assert policy.lifetime.max_exact == 1 and policy.lifetime.total_max_exact == 16 and policy.lifetime.epsilon == 8.0
    assert not policy.exact_per_sample and policy.noise.epsilon is None
    assert policy.model_cache_mb == 0  # a model cache in memory dies with the message: only model-cache-dir keeps one
    assert _seller({"data-path": str(data_file)}).policy == policy


def test_a_config_file_sets_the_node_and_its_keys_win(data_file, tmp_path):
    toml = tmp_path / "seller.toml"
    toml.write_text(SELLER_TOML.format(ledger=tmp_path / "books" / "ledger.json"))
    node = {"data-path": str(data_file), "config": str(toml), "dp-epsilon": 2.0, "seller-budget.max-sessions": 3,
            "model-cache-dir": str(tmp_path / "models")}
    policy = policy_from_node_config(node, data_file)
    assert policy.lifetime.max_exact == 2 and policy.lifetime.epsilon == 5.0  # from the file
    assert policy.noise.epsilon == 2.0  # the node's key over the file's 4.0
    assert policy.budget.max_layers == 7 and policy.budget.max_sessions == 3
    assert policy.ledger == str(tmp_path / "books" / "ledger.json")
    assert policy.model_cache_mb == 2048 and policy.model_cache_dir == str(tmp_path / "models")


@pytest.mark.parametrize(("key", "value"), [("max_exact", 5), ("dp-epsilo", 1.0), ("seller-budget.max-layer", 3),
                                            ("offer-memory-mb", 64)])
def test_an_unknown_node_key_is_refused_by_name(data_file, key, value):
    with pytest.raises(ConfigError, match=f"node config key\\(s\\) '{key}' unknown.*max-exact"):
        _seller({"data-path": str(data_file), key: value})


@pytest.mark.parametrize(("key", "value", "match"), [
    ("max-exact", -2, "node config: max-exact must be >= 0"),
    ("dp-epsilon", "lots", "node config: dp-epsilon"),
    ("exact-per-sample", "yes", "node config: exact-per-sample"),
    ("seller-budget.max-layers", 0, "seller-budget.max-layers must be >= 1"),
    ("config", 3, "node config 'config' must be the path of a TOML file"),
])
def test_bad_values_are_refused_with_the_node_key(data_file, key, value, match):
    with pytest.raises(ConfigError, match=match):
        _seller({"data-path": str(data_file), key: value})


def test_a_ledger_the_seller_cannot_write_stops_it_before_any_answer(data_file):
    # the ledger's directory is a file: the seller refuses to start rather than answer uncharged
    with pytest.raises(DataError, match=r"privacy ledger .* cannot be read or written.*ledger setting"):
        _seller({"data-path": str(data_file), "ledger": str(data_file / "ledger.json")})


def test_a_toml_node_config_read_by_flower_itself_sets_the_seller(data_file, tmp_path):
    """``flower-supernode --node-config node.toml``: Flower flattens the tables with dots."""
    from flwr.common.config import parse_config_args

    node_toml = tmp_path / "node.toml"
    node_toml.write_text(f'data-path = "{data_file}"\nseller-id = "clinic-a"\n'
                         + SELLER_TOML.format(ledger=tmp_path / "ledger.json"))
    node_config = parse_config_args([str(node_toml)])
    assert node_config["seller.max-exact"] == 2 and node_config["seller-budget.max-layers"] == 7
    seller = _seller(node_config)
    assert seller.seller_id == "clinic-a" and seller.policy.lifetime.max_exact == 2
    assert seller.policy.budget.max_layers == 7 and seller.policy.ledger == str(tmp_path / "ledger.json")
    with pytest.raises(ConfigError, match=r"'seller\.max-exact' and the same key without 'seller\.'"):
        _seller({**node_config, "max-exact": 3})


def test_simulated_nodes_keep_a_ledger_file_per_seller(tmp_path):
    from tip_fed.flower.runs import files_loader
    from tip_fed.protocol import SellerPolicy

    files = {f"s{i}": save_dataset(make_data(6, i), tmp_path / f"s{i}.safetensors") for i in range(2)}

    def ledger(loader, i):
        ctx = Context(run_id=1, node_id=i, node_config={"partition-id": i}, state=RecordDict(), run_config={})
        return loader(ctx, {}).policy.ledger

    load = files_loader(files, SellerPolicy(), tmp_path / "ledgers")
    assert [ledger(load, i) for i in range(2)] == [str(tmp_path / "ledgers" / f"s{i}.json") for i in range(2)]
    assert ledger(files_loader(files, SellerPolicy(ledger=str(tmp_path / "one.json")), tmp_path), 0) == str(
        tmp_path / "one.json")
