"""tip_fed's per-sample scores at default settings against exact influence from kronfluence.

The reference is a library tip_fed does not share code with: kronfluence 1.0.1 on a float64
copy of the same trained weights, *unprojected*, over every Linear weight and bias, with the
labelled (empirical) Fisher and kronfluence's damping heuristic, 0.1 × the mean eigenvalue of
each layer, the convention tip_fed's default follows. Its ``identity`` strategy gives the
exact gradient dot products, its ``ekfac`` strategy exact-gradient EKFAC influence; both are
averaged over the buyer's objective set as tip_fed's query is. tip_fed's side is the
production path: the simulation's buyer with the library's default settings (only the
preconditioner kind changed), and the sellers' clipped per-sample gradients.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import types

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch.utils.data import TensorDataset

from simulations import causal, healthcare
from simulations.market import Market
from simulations.scenarios import make_buyer, plaintext_reference
from simulations.settings import SimulationConfig

kronfluence = pytest.importorskip("kronfluence", reason="install the dev extra: kronfluence==1.0.1")
from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402 - only once importorskip found it
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.task import Task  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]

SEEDS = range(5)
F64 = torch.float64
IDENTITY_MIN = 0.95
EKFAC_MIN = 0.9


class CrossEntropy(Task):
    """The classification loss of tip_fed's ``classification`` task, summed as kronfluence wants."""

    def compute_train_loss(self, batch, model, sample=False):  # type: ignore[no-untyped-def]
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y, reduction="sum")

    def compute_measurement(self, batch, model):  # type: ignore[no-untyped-def]
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y, reduction="sum")


def _dataset(x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
    return TensorDataset(x.to(F64), y)


def kronfluence_scores(market: Market, strategy: str, out_dir: str) -> np.ndarray:
    """Mean over the objective set of kronfluence's pairwise scores, one per seller record."""
    task = CrossEntropy()
    model = prepare_model(copy.deepcopy(market.model).to(F64).eval(), task)
    analyzer = Analyzer(analysis_name=strategy, model=model, task=task, cpu=True,
                        disable_tqdm=True, disable_model_save=True, output_dir=out_dir)
    factor_args = FactorArguments(
        strategy=strategy, use_empirical_fisher=True, activation_covariance_dtype=F64,
        gradient_covariance_dtype=F64, eigendecomposition_dtype=F64,
        per_sample_gradient_dtype=F64, lambda_dtype=F64,
    )
    train = _dataset(market.train["x"], market.train["y"])
    analyzer.fit_all_factors(factors_name=strategy, dataset=train, per_device_batch_size=1024,
                             factor_args=factor_args, overwrite_output_dir=True)
    sellers = list(market.sellers.values())
    records = _dataset(torch.cat([s["x"] for s in sellers]), torch.cat([s["y"] for s in sellers]))
    score_args = ScoreArguments(damping_factor=None, per_sample_gradient_dtype=F64,
                                precondition_dtype=F64, score_dtype=F64)
    analyzer.compute_pairwise_scores(
        scores_name=strategy, factors_name=strategy,
        query_dataset=_dataset(market.objective["x"], market.objective["y"]), train_dataset=records,
        per_device_query_batch_size=1024, per_device_train_batch_size=1024,
        score_args=score_args, overwrite_output_dir=True,
    )
    pairwise = analyzer.load_pairwise_scores(strategy)["all_modules"]  # [objective, records]
    return pairwise.mean(dim=0).numpy()


def tip_fed_scores(market: Market, config: SimulationConfig, kind: str) -> np.ndarray:
    """Per-sample plaintext scores of every seller record, in seller order, at ``config``."""
    config = dataclasses.replace(
        config, preconditioner=dataclasses.replace(config.preconditioner, kind=kind)
    )
    buyer = make_buyer(market, config)
    return np.concatenate([plaintext_reference(buyer, market, sid) for sid in market.sellers])


def build_market(scenario: str, seed: int) -> tuple[Market, SimulationConfig]:
    config = SimulationConfig(scenario=scenario, seed=seed)
    if scenario == "causal":
        return causal.build(config), config
    one = dataclasses.replace(config.healthcare, replicates=1)
    return healthcare.build(dataclasses.replace(config, healthcare=one))[0], config


@pytest.fixture(autouse=True)
def quiet_kronfluence(monkeypatch: pytest.MonkeyPatch) -> None:
    """kronfluence runs gc.collect() between phases (seconds in a large process); results are
    unchanged without it. Its per-phase INFO logs are silenced too."""
    from kronfluence.utils import state

    monkeypatch.setattr(state, "gc", types.SimpleNamespace(collect=lambda: 0))
    logging.getLogger("kronfluence").setLevel(logging.WARNING)


@pytest.mark.parametrize("scenario", ["causal", "healthcare"])
@pytest.mark.parametrize("seed", SEEDS)
def test_scores_rank_records_as_exact_influence_does(scenario: str, seed: int, tmp_path) -> None:
    # Prepare
    market, config = build_market(scenario, seed)
    # Execute
    exact = kronfluence_scores(market, "identity", str(tmp_path))
    exact_ekfac = kronfluence_scores(market, "ekfac", str(tmp_path))
    ours = tip_fed_scores(market, config, "identity")
    ours_ekfac = tip_fed_scores(market, config, "ekfac")
    # Assert: per-sample Spearman, signed (same orientation: positive = helpful).
    rho_identity = spearmanr(ours, exact).statistic
    rho_ekfac = spearmanr(ours_ekfac, exact_ekfac).statistic
    print(f"{scenario} seed {seed}: n={ours.size} identity {rho_identity:.4f} ekfac {rho_ekfac:.4f}")
    assert rho_identity >= IDENTITY_MIN
    assert rho_ekfac >= EKFAC_MIN
