"""The library's settings, declared once: typed, frozen sections with a default and help per setting.

Every setting has a default, so an empty file is a valid config. Unknown keys and values of the
wrong type are errors that name the key, because a silently ignored typo in a valuation run
changes the payouts without anyone noticing. The same declarations give buyer.toml's settings
(:class:`BuyerSettings`), the ``tip-fed seller serve`` flags and :class:`SellerPolicy`'s
(:class:`SellerConfig`, :class:`SellerBudgetConfig`), ``tip-fed settings`` and the table in
docs/settings.md. Market scenarios extend :class:`TipConfig` with their own sections in
``simulations/settings.py``. Allowed-value lists live here (light to import) and the modules that
use them import them from here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tip_fed.errors import ConfigError
from tip_fed.toml_files import apply_overrides, build, load_typed, require, setting, to_dict, toml_key

__all__ = ["DISCLOSURES", "PRECONDITIONER_KINDS", "PROJECTION_KINDS", "RUNTIMES", "SETTING_SECTIONS",
           "BuyerSettings", "CryptoConfig", "FlowerConfig", "GrpcConfig", "PayoutsConfig", "PreconditionerConfig",
           "ProjectionConfig", "ProtocolConfig", "SellerBudgetConfig", "SellerConfig", "TipConfig",
           "apply_overrides", "config_from_dict", "load_config", "parse_settings"]

RUNTIMES = ("inprocess", "flower-simulation", "flower-deployment", "grpc")
DISCLOSURES = ("aggregate", "per-sample")
PROJECTION_KINDS = ("rademacher", "gaussian")
PRECONDITIONER_KINDS = ("identity", "raw", "kfac", "ekfac")
_require = require


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    _require(value in allowed, key, f"must be one of {', '.join(allowed)}, got {value!r}")


@dataclass(frozen=True)
class ProjectionConfig:
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
    kind: str = setting("rademacher", f"random projection matrices: {' or '.join(PROJECTION_KINDS)}")
    include: tuple[str, ...] = setting((), "fnmatch patterns of the layers to project; empty = every supported layer")
    fidelity_target: float = setting(0.95, "rank = 'auto': per-sample Spearman of projected vs exact scores to reach "
                                           "on the buyer's own samples")
    max_dim: int = setting(16384, "rank = 'auto': largest projected dimension (all layers together)")

    def __post_init__(self) -> None:
        if isinstance(self.rank, str):
            _require(self.rank == "auto", "projection.rank", f"must be an integer >= 1 or 'auto', got {self.rank!r}")
        else:
            _require(self.rank >= 1, "projection.rank", "must be >= 1 (or 'auto')")
        _one_of(self.kind, PROJECTION_KINDS, "projection.kind")
        _require(0 < self.fidelity_target <= 1, "projection.fidelity-target",
                 "must be in (0, 1] (per-sample Spearman of projected vs exact scores)")
        _require(self.max_dim >= 1, "projection.max-dim", "must be >= 1 (largest projected dimension)")


@dataclass(frozen=True)
class PreconditionerConfig:
    """Inverse damped curvature applied to the buyer's objective gradient."""

    kind: str = setting("kfac", f"curvature: {', '.join(PRECONDITIONER_KINDS)} (raw = damped Fisher in projected "
                                "space)")
    damping: float | None = setting(None, "damping added to the curvature; unset = 0.1 x its mean eigenvalue")

    def __post_init__(self) -> None:
        _one_of(self.kind, PRECONDITIONER_KINDS, "preconditioner.kind")
        _require(self.damping is None or self.damping >= 0, "preconditioner.damping", "must be >= 0")


@dataclass(frozen=True)
class CryptoConfig:
    """CKKS parameters for the session keys; checked for >= 128-bit security before use."""

    poly_modulus_degree: int = setting(8192, "CKKS ring degree (slots = half of it)")
    coeff_mod_bit_sizes: tuple[int, ...] = setting((60, 40, 40, 60), "bit sizes of the CKKS coefficient moduli")
    global_scale_bits: int = setting(40, "log2 of the CKKS encoding scale")


@dataclass(frozen=True)
class ProtocolConfig:
    """What the buyer asks of sellers in the Offer."""

    disclosure: str = setting("aggregate", "what sellers reveal: aggregate (one total each) or per-sample")
    grad_norm_bound: float | None = setting(None, "sellers clip each gradient to this norm; unset = derived from "
                                                  "the buyer's own gradients")
    query_budget: int = setting(1, "queries a seller answers per session")
    dp_epsilon: float | None = setting(None, "Gaussian noise sellers add to released scores: epsilon per query; "
                                             "unset = none asked")
    dp_delta: float = setting(1e-6, "delta of dp-epsilon")
    release_digits: int = setting(8, "released scores are rounded to score-bound x 10^-digits (0 = exact)")
    max_noise_std: float = setting(80.0, "largest gradient-noise std (units of the clip bound) a seller's reply "
                                         "may declare, noisier replies are rejected (80 admits epsilon >= 0.1 at "
                                         "delta >= 1e-6); never below what dp-epsilon itself asks for")

    def __post_init__(self) -> None:
        _one_of(self.disclosure, DISCLOSURES, "protocol.disclosure")
        _require(math.isfinite(self.max_noise_std) and self.max_noise_std > 0, "protocol.max-noise-std",
                 "must be a finite number > 0 (gradient-noise std in units of the clip bound)")
        _require(
            self.grad_norm_bound is None or (math.isfinite(self.grad_norm_bound) and self.grad_norm_bound > 0),
            "protocol.grad-norm-bound",
            "must be > 0 (or unset to derive it from the buyer's own gradients)",
        )
        _require(self.query_budget >= 1, "protocol.query-budget", "must be >= 1")
        _require(
            self.dp_epsilon is None or (math.isfinite(self.dp_epsilon) and self.dp_epsilon > 0),
            "protocol.dp-epsilon",
            "must be a finite number > 0 (or unset for no noise)",
        )
        _require(math.isfinite(self.dp_delta) and 0 < self.dp_delta < 1, "protocol.dp-delta", "must be in (0, 1)")
        _require(0 <= self.release_digits <= 15, "protocol.release-digits", "must be in 0..15 (0 = no rounding)")


@dataclass(frozen=True)
class SellerConfig:
    """What a seller grants whatever the buyer asks (``tip-fed seller serve`` flags, SellerPolicy)."""

    max_queries_per_session: int = setting(1, "queries answered per session")
    batch_size: int = setting(64, "records per gradient batch when scoring")
    expected_fingerprint: str | None = setting(None, "refuse Offers whose model fingerprint (hex) differs")
    dp_epsilon: float | None = setting(None, "Gaussian noise on every released score, epsilon per query (the "
                                             "stricter of this and the buyer's request applies)")
    dp_delta: float = setting(1e-6, "delta of dp-epsilon")
    ledger: str | None = setting(None, "privacy ledger file (per-buyer lifetime budget, answered keys) kept "
                                       "across restarts; unset = in memory only")
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
                                        "Offer need not ship them (0 = off)")
    model_cache_dir: str | None = setting(None, "keep cached models in this directory across restarts "
                                                "(owner-only, re-verified); unset = in memory")
    max_message_mb: int | None = setting(None, "largest gRPC message in MiB; unset = the largest Offer "
                                               "seller-budget.offer-memory-mb could accept")

    def __post_init__(self) -> None:
        for name in ("max_queries_per_session", "batch_size"):
            _require(getattr(self, name) >= 1, f"seller.{toml_key(name)}", "must be >= 1")
        for name in ("max_exact", "total_max_exact"):
            _require(getattr(self, name) >= -1, f"seller.{toml_key(name)}", "must be >= 0 (or -1 for unlimited)")
        _require(self.model_cache_mb >= 0, "seller.model-cache-mb", "must be >= 0 (0 turns the model cache off)")
        _require(self.max_message_mb is None or 4 <= self.max_message_mb < 2048, "seller.max-message-mb",
                 "must be in 4..2047 (MiB per gRPC message)")


@dataclass(frozen=True)
class SellerBudgetConfig:
    """What a long-lived seller (``tip-fed seller serve``) spends on Offers.

    Every Offer is costed from its own fields before anything is allocated (projection matrices,
    gradient matrix, model by dtype, CKKS key material, query ciphertexts, the message itself) and
    refused with a ResourceLimitError naming the setting to raise. The defaults fit a 24 GB machine,
    leaving room for the seller's own data. The seller's largest accepted gRPC message follows from
    ``offer-memory-mb`` (see tip_fed.protocol.resources.max_offer_bytes).
    """

    offer_memory_mb: int = setting(2048, "most memory one Offer may cost, MiB")
    in_flight_memory_mb: int = setting(8192, "most memory all Offers being answered at once may cost, MiB")
    max_sessions: int = setting(4, "Offers handled at once; more wait, up to max-calls")
    max_offers_per_peer: int = setting(1, "Offers one buyer (client certificate, else address) may have in at "
                                          "once, so one buyer's flood cannot queue ahead of the others")
    max_calls: int = setting(64, "calls held at once, running or waiting; more are refused with RESOURCE_EXHAUSTED")
    he_key_memory_mb: int = setting(256, "most CKKS context and key memory of one Offer, MiB")
    projection_memory_mb: int = setting(512, "most projection-matrix memory of one Offer (rank x features per "
                                             "layer), MiB")
    max_layers: int = setting(1024, "most projected layers one Offer may list")
    # Twice the estimate of the heaviest honest benchmark Offer (GPT-2 style, 4 layers, 100 x 128
    # tokens: ~146 s estimated; the estimate runs 1-7x above measured seller CPU).
    offer_work_s: float = setting(300.0, "most estimated single-core seconds one Offer may cost")
    kept_sessions: int = setting(65536, "answered (session, buyer) pairs remembered for the query budget")
    session_window_s: float = setting(86400.0, "seconds an answered session is remembered")

    def __post_init__(self) -> None:
        for name in ("offer_memory_mb", "in_flight_memory_mb", "max_sessions", "max_offers_per_peer", "max_calls",
                     "he_key_memory_mb", "projection_memory_mb", "max_layers", "kept_sessions"):
            _require(getattr(self, name) >= 1, f"seller-budget.{toml_key(name)}", "must be >= 1")
        _require(
            self.in_flight_memory_mb >= self.offer_memory_mb,
            "seller-budget.in-flight-memory-mb",
            "must be >= seller-budget.offer-memory-mb (one Offer must fit in what may be in flight)",
        )
        _require(self.offer_work_s > 0, "seller-budget.offer-work-s", "must be > 0 (seconds)")
        _require(self.session_window_s > 0, "seller-budget.session-window-s", "must be > 0 (seconds)")


@dataclass(frozen=True)
class FlowerConfig:
    """How the buyer's ServerApp drives one session over the Flower Grid."""

    timeout_s: float = setting(600.0, "seconds to wait for a seller's reply")
    wave_size: int = setting(64, "most Offers in flight at once")
    min_sellers: int = setting(1, "sellers (SuperNodes) to wait for before offering")
    node_wait_s: float = setting(120.0, "seconds to wait for min-sellers nodes")
    num_cpus: float = setting(1.0, "CPUs per simulated seller (Flower simulation)")

    def __post_init__(self) -> None:
        _require(self.timeout_s > 0, "flower.timeout-s", "must be > 0 (seconds to wait for a seller's reply)")
        _require(self.wave_size >= 1, "flower.wave-size", "must be >= 1 (most Offers in flight at once)")
        _require(self.min_sellers >= 1, "flower.min-sellers", "must be >= 1")
        _require(self.node_wait_s >= 0, "flower.node-wait-s", "must be >= 0")
        _require(self.num_cpus > 0, "flower.num-cpus", "must be > 0 (CPUs per simulated seller)")


@dataclass(frozen=True)
class GrpcConfig:
    """The native gRPC runtime: seller services on 127.0.0.1 over mutual TLS, queried by the buyer client."""

    timeout_s: float = setting(600.0, "deadline of one seller's Value call, seconds")
    retries: int = setting(2, "retries of unreachable sellers")
    startup_timeout_s: float = setting(120.0, "seconds for a started seller service to get ready")
    max_message_mb: int = setting(512, "largest message buyer and sellers exchange, MiB")

    def __post_init__(self) -> None:
        _require(self.timeout_s > 0, "grpc.timeout-s", "must be > 0 (deadline of one seller's Value call)")
        _require(self.retries >= 0, "grpc.retries", "must be >= 0 (retries of unreachable sellers)")
        _require(self.startup_timeout_s > 0, "grpc.startup-timeout-s",
                 "must be > 0 (seconds for a seller to get ready)")
        _require(4 <= self.max_message_mb < 2048, "grpc.max-message-mb", "must be in 4..2047 (MiB per gRPC message)")


@dataclass(frozen=True)
class PayoutsConfig:
    """Payout rules every run reports; coalition rules (loo, shapley) only up to ``coalition_max`` sellers."""

    budget: float = setting(1000.0, "what the buyer splits among sellers")
    temperature: float = setting(1.0, "softmax temperature of the softmax rule (scores scaled by their spread)")
    reserve: float = setting(0.5, "reserve price as a fraction of an equal split of the budget")
    coalition_max: int = setting(10, "most sellers for the coalition rules (loo, shapley)")
    shapley_exact_max: int = setting(8, "most sellers for exact Shapley values (above: permutation sampling)")
    shapley_permutations: int = setting(50, "sampled permutations of approximate Shapley values")

    def __post_init__(self) -> None:
        _require(self.budget > 0, "payouts.budget", "must be > 0")
        _require(self.temperature > 0, "payouts.temperature", "must be > 0")
        _require(self.reserve >= 0, "payouts.reserve", "must be >= 0 (a fraction of an equal split of the budget)")
        _require(self.shapley_permutations >= 1, "payouts.shapley-permutations", "must be >= 1")


#: The library sections a buyer sets (buyer.toml, a prepared query's settings).
SETTING_SECTIONS = ("projection", "preconditioner", "crypto", "protocol")


@dataclass(frozen=True)
class BuyerSettings:
    """The buyer's choices: what a prepared query is fitted with and what its Offers ask."""

    seed: int = setting(0, "projection seed (every random draw of a run derives from it)")
    batch_size: int = setting(64, "samples per gradient batch")
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    preconditioner: PreconditionerConfig = field(default_factory=PreconditionerConfig)
    crypto: CryptoConfig = field(default_factory=CryptoConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)

    def __post_init__(self) -> None:
        _require(0 <= self.seed < 2**63, "seed", "must be an integer in 0..2**63-1 (the projection seed)")
        _require(self.batch_size >= 1, "batch-size", "must be an integer >= 1 (samples per gradient batch)")

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

    runtime: str = setting("inprocess", f"how sellers are reached: {', '.join(RUNTIMES)}")
    seller: SellerConfig = field(default_factory=SellerConfig)
    seller_budget: SellerBudgetConfig = field(default_factory=SellerBudgetConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    payouts: PayoutsConfig = field(default_factory=PayoutsConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        _one_of(self.runtime, RUNTIMES, "runtime")


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
