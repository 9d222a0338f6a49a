"""Replicated markets: every party values the same replicate, and an unfaithful session fails.

The corrupted exchanges below go through the real in-process runtime (real CKKS sessions); only
what they are handed is wrong, as it was when a rebuilt party fell back to replicate 0.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from simulations import exchanges, flower_apps
from simulations.fidelity import FidelityError
from simulations.runner import run_scenario
from simulations.scenarios import build_market, build_markets, make_buyer, projection_seed
from simulations.settings import load_config
from tip_fed.errors import ConfigError
from tip_fed.market.results import read_csv

HEALTHCARE = Path(__file__).resolve().parents[2] / "configs" / "healthcare.toml"
TINY = ["seed=5", "healthcare.replicates=2", "healthcare.sellers=4", "healthcare.sites=6"]


@pytest.fixture(scope="module")
def config():
    return load_config(HEALTHCARE, TINY)


@pytest.fixture(scope="module")
def markets(config):
    return build_markets(config)


def _context(config, replicate=None):
    run_config = {"config": "", "set": ";".join(flower_apps.run_config_overrides(config))}
    if replicate is not None:
        run_config["replicate"] = replicate
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def test_projection_seeds_are_drawn_per_replicate_and_reproducible():
    seeds = [projection_seed(5, r) for r in range(20)]
    assert len(set(seeds)) == 20
    assert seeds == [projection_seed(5, r) for r in range(20)]
    assert seeds != [projection_seed(6, r) for r in range(20)]
    assert all(0 <= s < 2**63 for s in seeds)
    assert projection_seed(5, None) == 5  # a single market keeps the config seed


def test_each_replicate_has_its_own_market_and_buyer(config, markets):
    assert [m.replicate for m in markets] == [0, 1]
    buyers = [make_buyer(m, config) for m in markets]
    assert buyers[0].spec.seed != buyers[1].spec.seed
    assert buyers[0].model_fingerprint != buyers[1].model_fingerprint
    again = build_market(config, 1)
    assert make_buyer(again, config).model_fingerprint == buyers[1].model_fingerprint
    with pytest.raises(ConfigError, match=r"replicate 2 does not exist.*0\.\.1"):
        build_market(config, 2)


def test_server_app_session_and_rebuilt_sellers_follow_the_run_config_replicate(config, markets):
    for rep, market in enumerate(markets):
        session = flower_apps._session(_context(config, rep))
        want = make_buyer(market, config)
        assert session.buyer.model_fingerprint == want.model_fingerprint
        assert session.buyer.spec.seed == want.spec.seed
        assert list(session.expected) == list(market.sellers)
        # a simulated ClientApp with no data dir rebuilds the same replicate's sellers
        load = flower_apps.partition_loader(None)
        node = Context(run_id=1, node_id=1, node_config={"partition-id": 1}, state=RecordDict(),
                       run_config=_context(config, rep).run_config)
        seller = load(node, {})
        assert seller.seller_id == list(market.sellers)[1]
    # no replicate key (run_simulation's empty run config): replicate 0
    assert flower_apps._session(_context(config)).buyer.spec.seed == make_buyer(markets[0], config).spec.seed
    with pytest.raises(ConfigError, match="'replicate' must be an integer"):
        flower_apps.replicate_from_context(_context(config, "1"))


def _corrupt_sellers(config, market, buyer, progress):
    """The real exchange, but every seller answers with another replicate's seller data."""
    other = build_market(config, 1 - market.replicate)
    swapped = dict(zip(market.sellers, other.sellers.values(), strict=True))
    return exchanges.exchange_inprocess(config, dataclasses.replace(market, sellers=swapped), buyer, progress)


def _wrong_buyer(config, market, buyer, progress):
    """The real exchange, valued by the other replicate's buyer (rebuilt without the replicate)."""
    other = make_buyer(build_market(config, 1 - market.replicate), config)
    return exchanges.exchange_inprocess(config, market, other, progress)


@pytest.mark.parametrize(("exchange", "match"), [
    (_corrupt_sellers, r"disagree with the plaintext reference for \d+ score\(s\).*hospital-\d\d total: .*Tolerance"),
    (_wrong_buyer, "valued by another buyer than this market's: model fingerprint .* projection seed"),
])
def test_unfaithful_session_fails_and_writes_no_results(config, tmp_path, monkeypatch, exchange, match):
    monkeypatch.setitem(exchanges.EXCHANGES, "inprocess", exchange)
    with pytest.raises(FidelityError, match=match):
        run_scenario(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "metrics.json").exists()
    assert not list((tmp_path / "out").rglob("valuations.csv"))


def test_dp_noised_run_is_held_to_its_noise_not_to_ckks(tmp_path):
    config = load_config(HEALTHCARE, [*TINY, "healthcare.replicates=1", "protocol.dp-epsilon=2.0"])
    run_scenario(config, tmp_path, progress=False)
    fid = json.loads((tmp_path / "metrics.json").read_text())["sessions"][0]["fidelity"]
    n_max = max(int(r["n_samples"]) for r in read_csv(tmp_path / "valuations.csv"))
    ckks_only = n_max * fid["slot_tolerance"] * fid["score_unit"]
    # the sellers' DP noise moves totals far beyond CKKS error, and the run still passes on the noise level
    assert fid["max_abs_error"] > 10 * ckks_only
    assert fid["within_tolerance"] and fid["worst_error_over_tolerance"] <= 1
    seeds = json.loads((tmp_path / "manifest.json").read_text())["sessions"][0]["seeds"]
    assert seeds == {"config": 5, "replicate": 0, "projection": projection_seed(5, 0)}
    assert np.isfinite(fid["pearson"])


def test_export_sellers_writes_the_replicate_asked_for(config, markets, tmp_path, capsys):
    from tip_fed.cli import main

    args = ["export-sellers", str(HEALTHCARE), *(x for s in TINY for x in ("--set", s))]
    assert main([*args, "--out", str(tmp_path / "r1"), "--replicate", "1"]) == 0
    assert sorted(p.stem for p in (tmp_path / "r1").glob("*.safetensors")) == sorted(markets[1].sellers)
    assert sorted(markets[1].sellers) != sorted(markets[0].sellers)
    assert main([*args, "--out", str(tmp_path / "r2"), "--replicate", "2"]) == 2
    assert "replicate 2 does not exist" in capsys.readouterr().err
