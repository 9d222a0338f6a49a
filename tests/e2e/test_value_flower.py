"""One prepared query (a Sequential buyer whose [format] reads CSV) valued over every runtime a
sellers.toml names: in-process, Flower simulation, a local Flower deployment (SuperLink and one
SuperNode per seller file, TLS, node authentication, the library's signed buyer app), and an
existing SuperLink reached through [superlink] with the publisher key the SuperNodes trust.

Every Flower valuation must equal the in-process one within CKKS tolerance, per seller, under the
seller's own id (the sellers hold CSV, Parquet and JSONL files: raw records encoded by the format
each Offer carries). Every process a test starts is stopped when it ends.
"""

import pytest

import tip_fed
from tip_fed.buyer_config import load_buyer_config, prepare_from_config
from tip_fed.errors import TipError
from tip_fed.flower import trust
from tip_fed.runtimes import LocalDeployment, PrivateRun

from ..integration.test_buyer_formats import sellers_toml, write_table_market

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
FLOWER = "[flower]\nnode-wait-s = 120\ntimeout-s = 300\n"


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    d = tmp_path_factory.mktemp("flower-buyer")
    _, _, sellers = write_table_market(d)
    prepared = prepare_from_config(load_buyer_config(d / "buyer.toml"))
    prepared.save(d / "query")
    reference = tip_fed.value(d / "query", sellers_toml(d, "inprocess"))
    tolerance = 1e-6 * prepared.query_norm * prepared.grad_norm_bound  # per record: CKKS, sanitising, float32 order
    return d, sellers, (reference, tolerance)


def _assert_same(got, expected, sellers):
    ref, tolerance = expected
    assert got.missing == [] and got.rejected == {}, (got.missing, got.rejected)
    g, r = got.by_id(), ref.by_id()
    assert sorted(g) == sorted(r) == sorted(sellers)
    scale = max(abs(v.total) for v in r.values())
    # the sellers' totals differ by far more than the tolerance, so the check below can fail
    assert min(abs(a.total - b.total) for a in r.values() for b in r.values() if a is not b) > 1e-3 * scale
    assert max(v.n_samples for v in r.values()) * tolerance < 1e-3 * scale
    for sid, want in r.items():
        assert g[sid].n_samples == want.n_samples == len(sellers[sid])
        assert abs(g[sid].total - want.total) <= want.n_samples * tolerance, (sid, g[sid].total, want.total)


def test_flower_simulation_equals_inprocess(market):
    d, sellers, reference = market
    valuation = tip_fed.value(d / "query", sellers_toml(d, "flower-simulation", FLOWER))
    _assert_same(valuation, reference, sellers)


def test_local_flower_deployment_equals_inprocess(market):
    """What ``tip-fed value buyer.toml --sellers sellers.toml --out DIR`` runs, query fitted in memory:
    the ServerApp loads it from a private copy that is gone afterwards."""
    d, sellers, reference = market
    result = tip_fed.value_files(d / "buyer.toml", sellers_toml(d, "flower-deployment", FLOWER), d / "out-deployment")
    _assert_same(result.valuation, reference, sellers)
    assert result.valuation.manifest["transport"]["superlink"] == "local"
    assert result.metrics["run"]["runtime"] == "flower-deployment" and result.metrics["run"]["sellers"] == 3
    assert (d / "out-deployment" / "report.md").is_file()


def test_an_existing_superlink_equals_inprocess(market):
    """A deployment someone else runs: the buyer knows the SuperLink's address and CA, the node id
    registered for each seller and the publisher key the SuperNodes trust; nothing else. Signed
    with another key, the library's app is refused."""
    d, sellers, reference = market
    files = {
        sid: d / name
        for sid, name in (
            ("csv-clinic", "csv-clinic.csv"),
            ("parquet-clinic", "parquet-clinic.parquet"),
            ("jsonl-clinic", "jsonl-clinic.jsonl"),
        )
    }
    with PrivateRun("tip-test-superlink-") as run:
        deployment = LocalDeployment(run.root, reaper=run.reaper)
        with deployment.group:
            deployment.up(files)
            nodes = "".join(f'[[sellers]]\nid = "{sid}"\nnode-id = {node}\n' for sid, node in deployment.nodes.items())

            def remote_toml(key):
                path = d / f"remote-{key.name}.toml"
                path.write_text(
                    f'runtime = "flower-deployment"\nmax-samples = 100\n{FLOWER}[superlink]\n'
                    f'address = "127.0.0.1:{deployment.port}"\n'
                    f'root-certificates = "{deployment.certs / "ca.crt"}"\npublisher-key = "{key}"\n{nodes}'
                )
                return path

            # the same app signed with a key the deployment does not trust never runs
            stranger, _, _ = trust.create_publisher_key(run.root / "stranger", "stranger")
            with pytest.raises(TipError):
                tip_fed.value(d / "query", remote_toml(stranger))
            guard_log = (deployment.group.log_dir / "superlink-guard.log").read_text()
            assert "REFUSED untrusted app" in guard_log, guard_log[-2000:]
            valuation = tip_fed.value(d / "query", remote_toml(deployment.publisher))
    _assert_same(valuation, reference, sellers)
    assert valuation.manifest["transport"]["superlink"] == f"127.0.0.1:{deployment.port}"
