"""What ``tip-fed simulate`` says before and after a run: early refusals and the closing summary."""

import subprocess
import sys

import pytest

from tip_fed import cli
from tip_fed.market.summary import MAX_LINES, summary_lines


def test_a_misspelled_config_is_reported_before_heavy_imports():
    """A fresh interpreter: the error arrives without torch, tenseal or the scenarios being imported."""
    code = ("import sys; from tip_fed import cli; rc = cli.main(['simulate', 'configs/nope.toml']); "
            "heavy = [m for m in ('torch', 'tenseal', 'simulations.runner', 'flwr') if m in sys.modules]; "
            "print(rc, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2 []"
    assert "configs/nope.toml" in out.stderr and "does not exist" in out.stderr


@pytest.mark.parametrize("command", [["simulate", "configs/causal.toml"], ["export-sellers", "configs/causal.toml"],
                                     ["buyer", "prepare", "examples/tabular/buyer.toml"]],
                         ids=["simulate", "export-sellers", "buyer-prepare"])
def test_a_non_empty_out_is_refused_unless_forced(tmp_path, capsys, command):
    (tmp_path / "valuations.csv").write_text("seller_id\nold-run\n")
    assert cli.main([*command, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err
    assert (tmp_path / "valuations.csv").read_text() == "seller_id\nold-run\n"  # nothing lost


def test_a_file_as_out_is_refused(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("x")
    assert cli.main(["simulate", "configs/causal.toml", "--out", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err


SINGLE = {
    "run": {"sessions": 1, "sellers": 4, "seconds": 2.4, "valuation_seconds": 0.39, "top_by_score": "digits-4",
            "top_by_benefit": "digits-4", "missing": []},
    "validity": {"spearman": {"pooled": 1.0}, "pearson": {"pooled": 0.99}, "top1_rate": 1.0, "n_sellers": 4},
    "fidelity": {"pearson": 1.0, "max_rel_error": 5e-10, "n_scores": 244},
    "payouts": {"reference": "benefit", "rules": {"flat": {"gini": 0.0}, "proportional": {"gini": 0.75}}},
}
REPLICATED = {
    "run": {"sessions": 3, "sellers": 8, "runtime": "inprocess", "seconds": 61.0},
    "validity": {
        "spearman": {"pooled": 0.88},
        "top1_rate": 2 / 3,
        "paired_vs_gradient_cosine": {
            "spearman": {
                "delta_z": 0.4,
                "p_wilcoxon": 0.25,
                "p_sign_flip": 0.25,
                "p_bootstrap": None,
                "n_replicates": 3,
            }
        },
    },
    "fidelity": {"pearson": 1.0, "max_rel_error": 1e-9, "n_scores": 24},
}


@pytest.mark.parametrize("metrics", [SINGLE, REPLICATED, {}], ids=["single", "replicated", "empty"])
def test_the_summary_is_short_and_says_only_what_was_computed(metrics):
    lines = summary_lines(metrics, "out")
    assert 1 <= len(lines) <= MAX_LINES
    assert lines[-1].startswith("results     out/")
    text = "\n".join(lines)
    if metrics is SINGLE:
        assert "4 sellers" in text and "digits-4" in text and "Spearman with realised benefit 1" in text
        assert "top seller found" in text
        assert "missing" not in text
    if metrics is REPLICATED:
        assert "8 sellers x 3 sessions" in text and "0.88" in text and "67 % of sessions" in text
        assert "n_replicates 3" in text and "p_sign_flip 0.25" in text and "bootstrap" not in text
    if not metrics:
        assert "validity" not in text and "fidelity" not in text
    assert "None" not in text  # what was not measured is left out, never printed as None


def test_a_valuation_phase_timed_in_another_process_is_left_out():
    """A Flower deployment's buyer runs in the SuperLink's ServerApp: this process cannot time its phase."""
    deployment = {**SINGLE, "run": {**SINGLE["run"], "valuation_seconds": None}}
    assert summary_lines(deployment, "out")[0] == "valued      4 sellers in 2.4 s"
    assert summary_lines(SINGLE, "out")[0] == "valued      4 sellers in 2.4 s (valuation phase 0.39 s)"


def test_an_equal_split_has_gini_0_not_its_floating_point_residue():
    residue = {**SINGLE, "payouts": {"reference": "benefit", "rules": {"flat": {"gini": -1.8e-17}}}}
    assert "gini flat 0" in "\n".join(summary_lines(residue, "out"))
    assert "e-17" not in "\n".join(summary_lines(residue, "out"))


def test_a_long_run_reads_in_minutes():
    long = {**REPLICATED, "run": {**REPLICATED["run"], "seconds": 1174.6}}
    assert summary_lines(long, "out")[0] == "valued      8 sellers x 3 sessions over inprocess in 19 min 35 s"


def test_the_front_door_exports_what_a_user_needs_and_stays_light():
    code = (
        "import sys, tip_fed; light = 'torch' not in sys.modules; "
        "from tip_fed import Buyer, Seller, TipError, load_dataset, SellerPolicy; "
        "print(light, Buyer.__module__, Seller.__module__, issubclass(TipError, Exception))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "tip_fed.protocol.buyer", "tip_fed.protocol.seller", "True"]
    import tip_fed

    missing = [n for n in tip_fed.__all__ if not hasattr(tip_fed, n)]
    assert not missing
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        tip_fed.Nope  # noqa: B018
