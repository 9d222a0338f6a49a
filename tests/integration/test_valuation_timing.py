"""The valuation phase (Offer out to last seller settled) is timed and written with the run's metrics."""

import json

from simulations.exchanges import exchange_inprocess
from simulations.runner import run_scenario
from simulations.scenarios import build_market, make_buyer
from simulations.settings import load_config

SYNTHETIC = ["healthcare.dataset=synthetic", "healthcare.samples-per-seller=10"]


def test_buyer_times_offer_to_settlement():
    config = load_config("configs/healthcare.toml", ["sellers=4", *SYNTHETIC])
    market = build_market(config)
    buyer = make_buyer(market, config)
    assert buyer.valuation_seconds is None
    valuation = exchange_inprocess(config, market, buyer, False)
    assert len(valuation.sellers) == 4 and buyer.valuation_seconds is not None and buyer.valuation_seconds > 0
    buyer.offer(max_samples=10)  # a new session: nothing settled yet
    assert buyer.valuation_seconds is None


def test_run_metrics_carry_the_valuation_phase(tmp_path):
    run_scenario(load_config("configs/healthcare.toml", ["sellers=6", *SYNTHETIC]), tmp_path, progress=False)
    top = json.loads((tmp_path / "metrics.json").read_text())["run"]
    rep = json.loads((tmp_path / "metrics.json").read_text())["sessions"][0]["run"]
    assert 0 < rep["valuation_seconds"] == top["valuation_seconds"] < top["seconds"]
    assert rep["valuation_seconds_per_seller"] == rep["valuation_seconds"] / 6
