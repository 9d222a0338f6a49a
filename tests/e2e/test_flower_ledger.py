"""Real Flower processes: a seller SuperNode's privacy ledger binds across runs and a restart.

A loopback deployment (SuperLink, one seller SuperNode with the defaults: no DP, one exact answer
per buyer; TLS, node authentication, the library's signed buyer app) is valued three times by
the same prepared query, each a new ``flwr run`` and so a new session with fresh keys, and the
SuperNode is restarted between the second and the third. Every message runs in a new
``flwr-clientapp`` process, so only the ledger file can remember the first answer.
"""

import json

import pytest

import tip_fed
from tip_fed.buyer_config import load_buyer_config, prepare_from_config
from tip_fed.runtimes import LocalDeployment, PrivateRun

from ..integration.test_buyer_formats import write_table_market

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
SELLER = "csv-clinic"


def _restart_supernode(deployment: LocalDeployment, name: str, data_path) -> None:
    """Stop the seller's SuperNode and its superexec, then start it again with the same key and data."""
    names = (f"supernode-{name}", f"superexec-supernode-{name}")
    for child in [c for c in deployment.group.children if c.name in names]:
        child.proc.terminate()
        child.proc.wait(30)
    deployment.start_supernode(name, deployment.keys / name, data_path, seller_id=name)


def test_a_flower_seller_answers_one_exact_session_across_runs_and_a_restart(tmp_path):
    write_table_market(tmp_path)
    prepare_from_config(load_buyer_config(tmp_path / "buyer.toml")).save(tmp_path / "query")
    with PrivateRun("tip-test-flower-ledger-") as run:
        data = tmp_path / f"{SELLER}.csv"
        deployment = LocalDeployment(run.root, reaper=run.reaper)
        with deployment.group:
            deployment.up({SELLER: data})
            sellers = tmp_path / "sellers.toml"
            sellers.write_text(
                'runtime = "flower-deployment"\nmax-samples = 100\n[flower]\nnode-wait-s = 120\ntimeout-s = 300\n'
                f'[superlink]\naddress = "127.0.0.1:{deployment.port}"\n'
                f'root-certificates = "{deployment.certs / "ca.crt"}"\npublisher-key = "{deployment.publisher}"\n'
                f'[[sellers]]\nid = "{SELLER}"\nnode-id = {deployment.nodes[SELLER]}\n'
            )
            first = tip_fed.value(tmp_path / "query", sellers)
            second = tip_fed.value(tmp_path / "query", sellers)
            _restart_supernode(deployment, SELLER, data)
            third = tip_fed.value(tmp_path / "query", sellers)
            ledger = json.loads((deployment.root / "ledgers" / f"{SELLER}.json").read_text())
    assert [v.seller_id for v in first.sellers] == [SELLER] and first.rejected == {}
    for later in (second, third):
        assert not later.sellers
        assert "already received 1 exact (noise-free) answers" in later.rejected[SELLER], later.rejected
    assert ledger["total"]["exact"] == 1 and len(ledger["keys"]) == 1  # one answer charged, one key recorded
