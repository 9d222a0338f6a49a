"""The library's settings, declared once: typed, frozen sections with a default and help per setting.

Every setting has a default, so an empty file is a valid config. Unknown keys, values of the wrong
type and values outside what a setting declares it allows are errors that name the key, because a
silently ignored typo in a valuation run changes the payouts without anyone noticing. The same
declarations give buyer.toml's settings (:class:`BuyerSettings`), the ``tip-fed seller serve``
flags and :class:`SellerPolicy`'s (:class:`SellerConfig`, :class:`SellerBudgetConfig`),
``tip-fed settings`` and the table in docs/settings.md. Market scenarios extend :class:`TipConfig`
with their own sections in ``simulations/settings.py``. Allowed-value lists live in
:mod:`tip_fed.kinds`, a leaf module that the settings here and the code implementing each kind
both import.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tip_fed.errors import ConfigError
from tip_fed.kinds import DISCLOSURES, PRECONDITIONER_KINDS, PROJECTION_KINDS, RUNTIMES
from tip_fed.toml_files import Section, apply_overrides, build, load_typed, require, setting, to_dict, toml_key

__all__ = ["DISCLOSURES", "PRECONDITIONER_KINDS", "PROJECTION_KINDS", "RUNTIMES", "SETTING_SECTIONS",
           "BuyerSettings", "CryptoConfig", "FlowerConfig", "GrpcConfig", "PayoutsConfig", "PreconditionerConfig",
           "ProjectionConfig", "ProtocolConfig", "SellerBudgetConfig", "SellerConfig", "TipConfig",
           "apply_overrides", "config_from_dict", "load_config", "parse_settings"]

_require = require


@dataclass(frozen=True)
class ProjectionConfig(Section, key="projection"):
    """LoGra-style per-layer projection of per-sample gradients (weights and biases).

    ``rank = "auto"`` (the default): the buyer measures on its own training samples how well
    projected scores agree with exact (unprojected) ones and picks per-layer ranks until the
    per-sample Spearman reaches ``fidelity_target`` or the projected dimension reaches ``max_dim``;
    a model whose exact spec fits ``max_dim`` is not projected at all (tip_fed.core.fidelity).
    An integer rank is used per side for every layer, clipped to each layer's size (a clipped
    side is exact).
    """

    rank: int | str = setting("auto", "'auto': per-layer ranks measured to reach fidelity-target (exact when the "
                                      "model fits max-dim); or one integer per-side rank, clipped to each layer's size")
    kind: str = setting("rademacher", "random projection matrices", one_of=PROJECTION_KINDS)
    include: tuple[str, ...] = setting((), "fnmatch patterns of the layers to project; empty = every supported layer")
    fidelity_target: float = setting(0.95, "rank = 'auto': per-sample Spearman of projected vs exact scores to reach "
                                           "on the buyer's own samples", above=0, at_most=1)
    max_dim: int = setting(16384, "rank = 'auto': largest projected dimension (all layers together)", at_least=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.rank, str):
            _require(self.rank == "auto", "projection.rank", f"must be an integer >= 1 or 'auto', got {self.rank!r}")
        else:
            _require(self.rank >= 1, "projection.rank", "must be >= 1 (or 'auto')")


@dataclass(frozen=True)
class PreconditionerConfig(Section, key="preconditioner"):
    """Inverse damped curvature applied to the buyer's objective gradient."""

    kind: str = setting("kfac", "curvature (raw = damped Fisher in projected space)", one_of=PRECONDITIONER_KINDS)
    damping: float | None = setting(None, "damping added to the curvature; unset = 0.1 x its mean eigenvalue",
                                    at_least=0)


@dataclass(frozen=True)
class CryptoConfig(Section, key="crypto"):
    """CKKS parameters for the session keys; checked for >= 128-bit security before use."""

    poly_modulus_degree: int = setting(8192, "CKKS ring degree (slots = half of it)")
    coeff_mod_bit_sizes: tuple[int, ...] = setting((60, 40, 40, 60), "bit sizes of the CKKS coefficient moduli")
    global_scale_bits: int = setting(40, "log2 of the CKKS encoding scale")


@dataclass(frozen=True)
class ProtocolConfig(Section, key="protocol"):
    """What the buyer asks of sellers in the Offer."""

    disclosure: str = setting("aggregate", "what sellers reveal: aggregate (one total each) or per-sample",
                              one_of=DISCLOSURES)
    grad_norm_bound: float | None = setting(None, "sellers clip each gradient to this norm; unset = derived from "
                                                  "the buyer's own gradients", above=0)
    query_budget: int = setting(1, "queries a seller answers per session", at_least=1)
    dp_epsilon: float | None = setting(None, "Gaussian noise sellers add to released scores: epsilon per query; "
                                             "unset = none asked", above=0)
    dp_delta: float = setting(1e-6, "delta of dp-epsilon", above=0, below=1)
    release_digits: int = setting(8, "released scores are rounded to score-bound x 10^-digits (0 = exact)",
                                  at_least=0, at_most=15)
    max_noise_std: float = setting(80.0, "largest gradient-noise std (units of the clip bound) a seller's reply "
                                         "may declare, noisier replies are rejected (80 admits epsilon >= 0.1 at "
                                         "delta >= 1e-6); never below what dp-epsilon itself asks for", above=0)


@dataclass(frozen=True)
class SellerConfig(Section, key="seller"):
    """What a seller grants whatever the buyer asks (``tip-fed seller serve`` flags, SellerPolicy)."""

    max_queries_per_session: int = setting(1, "queries answered per session", at_least=1)
    batch_size: int = setting(64, "records per gradient batch when scoring", at_least=1)
    expected_fingerprint: str | None = setting(None, "refuse Offers whose model fingerprint (hex) differs")
    dp_epsilon: float | None = setting(None, "Gaussian noise on every released score, epsilon per query (the "
                                             "stricter of this and the buyer's request applies)")
    dp_delta: float = setting(1e-6, "delta of dp-epsilon")
    ledger: str | None = setting(None, "privacy ledger file (per-buyer lifetime budget, answered keys) kept "
                                       "across restarts; unset = <data file>.ledger.json beside the data")
    lifetime_epsilon: float = setting(8.0, "per-buyer lifetime epsilon")
    lifetime_delta: float = setting(1e-5, "per-buyer lifetime delta")
    total_epsilon: float = setting(16.0, "seller-wide lifetime epsilon over all buyers together (they may collude)")
    total_delta: float = setting(1e-5, "seller-wide lifetime delta")
    max_exact: int = setting(1, "exact (noise-free) answers per buyer; without dp-epsilon the only guarantee "
                                "(-1 = unlimited)")
    total_max_exact: int = setting(16, "exact answers over all buyers together (-1 = unlimited)")
    exact_per_sample: bool = setting(False, "answer per-sample Offers without noise (exact scores of every "
                                            "record: only for data that is not private)")
    model_cache_mb: int = setting(2048, "MiB of buyers' model weights kept (verified, by fingerprint) so a repeat "
                                        "Offer need not ship them (0 = off)", at_least=0)
    model_cache_dir: str | None = setting(None, "keep cached models in this directory across restarts "
                                                "(owner-only, re-verified); unset = in memory")
    max_message_mb: int | None = setting(None, "largest gRPC message in MiB; unset = the largest Offer "
                                               "seller-budget.offer-memory-mb could accept", at_least=4, below=2048)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_exact", "total_max_exact"):  # -1 is a word here, not a bound
            _require(getattr(self, name) >= -1, f"seller.{toml_key(name)}", "must be >= 0 (or -1 for unlimited)")


@dataclass(frozen=True)
class SellerBudgetConfig(Section, key="seller-budget"):
    """What a long-lived seller (``tip-fed seller serve``) spends on Offers.

    Every Offer is costed from its own fields before anything is allocated (projection matrices,
    gradient matrix, model by dtype, CKKS key material, query ciphertexts, the message itself) and
    refused with a ResourceLimitError naming the setting to raise. The defaults fit a 24 GB machine,
    leaving room for the seller's own data. The seller's largest accepted gRPC message follows from
    ``offer-memory-mb`` (see tip_fed.protocol.resources.max_offer_bytes).
    """

    offer_memory_mb: int = setting(2048, "most memory one Offer may cost, MiB", at_least=1)
    in_flight_memory_mb: int = setting(8192, "most memory all Offers being answered at once may cost, MiB",
                                       at_least=1)
    max_sessions: int = setting(4, "Offers handled at once; more wait, up to max-calls", at_least=1)
    max_offers_per_peer: int = setting(1, "Offers one buyer (client certificate, else address) may have in at "
                                          "once, so one buyer's flood cannot queue ahead of the others", at_least=1)
    max_calls: int = setting(64, "calls held at once, running or waiting; more are refused with RESOURCE_EXHAUSTED",
                             at_least=1)
    he_key_memory_mb: int = setting(256, "most CKKS context and key memory of one Offer, MiB", at_least=1)
    projection_memory_mb: int = setting(512, "most projection-matrix memory of one Offer (rank x features per "
                                             "layer), MiB", at_least=1)
    max_layers: int = setting(1024, "most projected layers one Offer may list", at_least=1)
    # Twice the estimate of the heaviest honest benchmark Offer (GPT-2 style, 4 layers, 100 x 128
    # tokens: ~146 s estimated; the estimate runs 1-7x above measured seller CPU).
    offer_work_s: float = setting(300.0, "most estimated single-core seconds one Offer may cost", above=0)
    kept_sessions: int = setting(65536, "answered (session, buyer) pairs remembered for the query budget",
                                 at_least=1)
    session_window_s: float = setting(86400.0, "seconds an answered session is remembered", above=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            self.in_flight_memory_mb >= self.offer_memory_mb,
            "seller-budget.in-flight-memory-mb",
            "must be >= seller-budget.offer-memory-mb (one Offer must fit in what may be in flight)",
        )


@dataclass(frozen=True)
class FlowerConfig(Section, key="flower"):
    """How the buyer's ServerApp drives one session over the Flower Grid."""

    timeout_s: float = setting(600.0, "seconds to wait for a seller's reply", above=0)
    wave_size: int = setting(64, "most Offers in flight at once", at_least=1)
    min_sellers: int = setting(1, "sellers (SuperNodes) to wait for before offering", at_least=1)
    node_wait_s: float = setting(120.0, "seconds to wait for min-sellers nodes", at_least=0)
    num_cpus: float = setting(1.0, "CPUs per simulated seller (Flower simulation)", above=0)


@dataclass(frozen=True)
class GrpcConfig(Section, key="grpc"):
    """The native gRPC runtime: seller services on 127.0.0.1 over mutual TLS, queried by the buyer client."""

    timeout_s: float = setting(600.0, "deadline of one seller's Value call, seconds", above=0)
    retries: int = setting(2, "retries of unreachable sellers", at_least=0)
    startup_timeout_s: float = setting(120.0, "seconds for a started seller service to get ready", above=0)
    max_message_mb: int = setting(512, "largest message buyer and sellers exchange, MiB", at_least=4, below=2048)


@dataclass(frozen=True)
class PayoutsConfig(Section, key="payouts"):
    """Payout rules every run reports; coalition rules (loo, shapley) only up to ``coalition_max`` sellers."""

    budget: float = setting(1000.0, "what the buyer splits among sellers", above=0)
    temperature: float = setting(1.0, "softmax temperature of the softmax rule (scores scaled by their spread)",
                                 above=0)
    reserve: float = setting(0.5, "reserve price as a fraction of an equal split of the budget", at_least=0)
    coalition_max: int = setting(10, "most sellers for the coalition rules (loo, shapley)")
    shapley_exact_max: int = setting(8, "most sellers for exact Shapley values (above: permutation sampling)")
    shapley_permutations: int = setting(50, "sampled permutations of approximate Shapley values", at_least=1)
    max_records: int = setting(0, "most records any seller is paid on (0: its declared count, at most the Offer's "
                               "max-samples); a spot check does not prove a count", at_least=0)


#: The library sections a buyer sets (buyer.toml, a prepared query's settings).
SETTING_SECTIONS = ("projection", "preconditioner", "crypto", "protocol")


@dataclass(frozen=True)
class BuyerSettings(Section):
    """The buyer's choices: what a prepared query is fitted with and what its Offers ask."""

    seed: int = setting(0, "projection seed (every random draw of a run derives from it)", at_least=0,
                        at_most=2**63 - 1)
    batch_size: int = setting(64, "samples per gradient batch", at_least=1)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    preconditioner: PreconditionerConfig = field(default_factory=PreconditionerConfig)
    crypto: CryptoConfig = field(default_factory=CryptoConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)

    def buyer_settings(self, seed: int | None = None) -> BuyerSettings:
        """Only the buyer's settings (``seed`` replaced when given), as a prepared query keeps them."""
        return BuyerSettings(seed=self.seed if seed is None else seed, batch_size=self.batch_size,
                             **{k: getattr(self, k) for k in SETTING_SECTIONS})

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict with TOML (kebab-case) keys, for manifests."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BuyerSettings:
        """Inverse of :meth:`to_dict`; every section is validated by its typed class."""
        return build(BuyerSettings, data)


@dataclass(frozen=True)
class TipConfig(BuyerSettings):
    """Root of the library's settings: the buyer's, the sellers', the runtimes' and the payouts'."""

    runtime: str = setting("inprocess", "how sellers are reached", one_of=RUNTIMES)
    seller: SellerConfig = field(default_factory=SellerConfig)
    seller_budget: SellerBudgetConfig = field(default_factory=SellerBudgetConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    payouts: PayoutsConfig = field(default_factory=PayoutsConfig)


def config_from_dict(data: Mapping[str, Any], root: type[TipConfig] = TipConfig) -> Any:
    """Build and validate settings of class ``root`` from nested (TOML-shaped) data."""
    return build(root, data)


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> TipConfig:
    """Load a library TOML config (or only defaults when ``path`` is None) and apply overrides.

    Scenario configs (configs/*.toml) load with :func:`simulations.settings.load_config`."""
    return load_typed(TipConfig, path, overrides, "pass the path of a TOML config")


def parse_settings(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The buyer's settings and payouts of ``data`` (a buyer.toml), validated by their typed classes;
    ``where`` prefixes every error."""
    keys = (*SETTING_SECTIONS, "seed", "batch-size")
    try:
        settings = BuyerSettings.from_dict({k: data[k] for k in keys if k in data})
        payouts = data.get("payouts", {})
        if not isinstance(payouts, Mapping):
            raise ConfigError("'payouts' is a table of settings, not a value")
        payouts = build(PayoutsConfig, payouts, "payouts.")
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    return {"settings": settings, "payouts": payouts}
