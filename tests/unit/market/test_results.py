"""One results format and one report for a run of N sessions: written, read back, rendered, compared."""

import csv
import json
import re

import numpy as np
import pytest

from tip_fed.errors import DataError
from tip_fed.market import metrics as M
from tip_fed.market.compare import compare_runs
from tip_fed.market.glossary import explain
from tip_fed.market.pooling import run_metrics
from tip_fed.market.report import render_report
from tip_fed.market.results import BASELINES, Session, flatten, read_results, write_run_files


def _session(rng, n_sellers, *, truth=True, baselines=True, scale=1.0):
    ids = [f"s{i:03d}" for i in range(n_sellers)]
    benefit = rng.normal(size=n_sellers)
    score = scale * (benefit + 0.3 * rng.normal(size=n_sellers))
    order = np.argsort(-score)
    rank = {ids[j]: k + 1 for k, j in enumerate(order)}
    rows = [{"seller_id": s, "n_samples": 10, "score": float(score[i]), "score_plaintext": float(score[i]) + 1e-9,
             "mean_score": float(score[i]) / 10, "rank": rank[s], "clipped": 0, "commitment": "c", "seconds": 0.1,
             **({m: float(rng.normal()) for m in BASELINES} if baselines else {})} for i, s in enumerate(ids)]
    gt = [{"seller_id": s, "loss_before": 1.0, "loss_after": 1.0 - float(benefit[i]), "benefit": float(benefit[i])}
          for i, s in enumerate(ids)] if truth else []
    pay = [{"seller_id": s, "rule": rule, "payout": 1.0 / n_sellers, "share": 1.0 / n_sellers}
           for s in ids for rule in ("flat", "proportional")]
    m = {"run": {"seconds": 1.0, "sellers": n_sellers, "missing": [], "rejected": {}, "valuation_seconds": 0.5,
                 "top_by_score": ids[order[0]]},
         "fidelity": {**M.fidelity(score, score + 1e-9), "within_tolerance": True, "worst_error_over_tolerance": 0.1},
         "payouts": {"reference": "benefit" if truth else None,
                     "rules": {"flat": {"gini": 0.0, "l1_vs_reference": 0.5, "spearman_vs_reference": None}}
                     if truth else {}}}
    manifest = {"valuation": {"session_id": "abcdef0123", "he_params": {"poly_modulus_degree": 8192}},
                "seeds": {"projection": 1}, "projection_dim": 64, "sellers": ids}
    return Session(rows, manifest, m, ground_truth=gt, payouts=pay), score, benefit


def _write(tmp_path, sessions, name="run"):
    out = tmp_path / name
    out.mkdir()
    m, per = run_metrics(sessions, runtime="inprocess", seconds=2.0, seed=0)
    write_run_files(out, {"scenario": "synthetic", "config": {"payouts": {"coalition-max": 10}}}, sessions, m, per)
    render_report(out)
    return out, m


def test_one_session_is_a_run_of_one_with_its_own_correlation(tmp_path):
    rng = np.random.default_rng(0)
    s, score, benefit = _session(rng, 6)
    out, m = _write(tmp_path, [s])
    assert m["run"]["sessions"] == 1
    assert m["validity"]["spearman"]["pooled"] == pytest.approx(M.spearman(score, benefit), abs=1e-12)
    assert m["validity"]["spearman"]["ci_low"] is None  # one session: nothing to resample
    assert "paired_vs_gradient_cosine" not in m["validity"]  # a paired test needs two sessions at least
    rows = list(csv.DictReader((out / "valuations.csv").open()))
    assert {r["session"] for r in rows} == {"0"} and len(rows) == 6
    r = read_results(out)
    assert r.n_sessions == 1 and len(r.benefit()) == 6
    report = (out / "report.md").read_text()
    assert "| rank | seller |" in report  # a single session lists its sellers
    for png in ("seller_values.png", "score_vs_benefit.png", "methods.png", "lorenz.png", "payout_shares.png",
                "fidelity.png"):
        assert (out / png).is_file(), png


def test_replicated_run_pools_sessions_and_states_what_few_sessions_cannot_show(tmp_path):
    rng = np.random.default_rng(1)
    sessions = [_session(rng, 8, scale=10.0 ** k)[0] for k in range(3)]
    out, m = _write(tmp_path, sessions)
    assert m["run"]["sessions"] == 3
    saved = json.loads((out / "metrics.json").read_text())
    assert [s["session"] for s in saved["sessions"]] == [0, 1, 2]
    assert saved["validity"]["spearman"]["n_replicates"] == 3 and saved["validity"]["spearman"]["ci_low"] is None
    paired = saved["validity"]["paired_vs_gradient_cosine"]["spearman"]
    assert paired["p_bootstrap"] is None and paired["p_sign_flip"] >= 0.25  # 3 sessions: p cannot go lower
    per = list(csv.DictReader((out / "sessions.csv").open()))
    assert [p["session"] for p in per] == ["0", "1", "2"]
    report = (out / "report.md").read_text()
    assert "no two-sided test can give p below 0.250" in report and "No bootstrap p" in report
    assert "| session | sellers |" in report  # per-session summary instead of one table per session


def test_every_metric_the_report_prints_is_explained(tmp_path):
    rng = np.random.default_rng(2)
    out, _ = _write(tmp_path, [_session(rng, 8)[0] for _ in range(3)])
    saved = json.loads((out / "metrics.json").read_text())
    unexplained = [k for k in flatten({k: v for k, v in saved.items() if k != "sessions"}) if not explain(k)]
    assert not unexplained
    report = (out / "report.md").read_text()
    assert all(f"`{k}`" in report for k in flatten({k: v for k, v in saved.items() if k != "sessions"}))
    tables = [block.splitlines() for block in report.split("\n\n") if block.startswith("| ")]
    for table in tables:  # a stray "|" in a cell would shift every column after it
        assert len({line.count("|") for line in table}) == 1, table[0]


def test_many_sellers_are_a_rank_view_and_a_short_table(tmp_path):
    rng = np.random.default_rng(3)
    s, _, _ = _session(rng, 560, baselines=False)
    out, _ = _write(tmp_path, [s])
    report = (out / "report.md").read_text()
    assert "The 10 highest and 10 lowest of 560 sellers" in report
    assert "`payouts.coalition-max` = 10 sellers and this market has 560" in report  # why no loo/shapley
    listed = [line for line in report.splitlines() if re.match(r"\| \d+ \| s\d{3} \|", line)]
    assert len(listed) == 20 and listed[0].startswith("| 1 |") and listed[-1].startswith("| 560 |")


def test_compare_matches_payouts_by_session(tmp_path):
    rng = np.random.default_rng(4)
    a, _ = _write(tmp_path, [_session(rng, 5)[0] for _ in range(2)], "a")
    text = compare_runs(a, a)
    assert "20 (seller, rule) pairs in both" in text and "| 1 | s004 | proportional |" in text


def test_a_directory_of_another_format_is_refused_with_a_reason(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(DataError, match="older tip-fed"):
        read_results(tmp_path)
