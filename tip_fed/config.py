"""One typed, frozen settings tree and its single loader (TOML file + ``key=value`` overrides).

Every setting has a default, so an empty file is a valid config. Unknown keys and values of the
wrong type are errors that name the key, because a silently ignored typo in a valuation run
changes the payouts without anyone noticing.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tip_fed.errors import ConfigError

RUNTIMES = ("inprocess", "flower-simulation", "flower-deployment", "grpc")
DISCLOSURES = ("aggregate", "per-sample")


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

    rank: int | str = "auto"
    kind: str = "rademacher"
    include: tuple[str, ...] = ()
    fidelity_target: float = 0.95
    max_dim: int = 16384

    def __post_init__(self) -> None:
        if isinstance(self.rank, str):
            _require(self.rank == "auto", "projection.rank", f"must be an integer >= 1 or 'auto', got {self.rank!r}")
        else:
            _require(self.rank >= 1, "projection.rank", "must be >= 1 (or 'auto')")
        _require(self.kind in ("rademacher", "gaussian"), "projection.kind", "must be 'rademacher' or 'gaussian'")
        _require(0 < self.fidelity_target <= 1, "projection.fidelity-target",
                 "must be in (0, 1] (per-sample Spearman of projected vs exact scores)")
        _require(self.max_dim >= 1, "projection.max-dim", "must be >= 1 (largest projected dimension)")


@dataclass(frozen=True)
class PreconditionerConfig:
    """Inverse damped curvature applied to the buyer's objective gradient."""

    kind: str = "kfac"
    damping: float | None = None

    def __post_init__(self) -> None:
        kinds = ("identity", "raw", "kfac", "ekfac")
        _require(self.kind in kinds, "preconditioner.kind", f"must be one of {', '.join(kinds)}")
        _require(self.damping is None or self.damping >= 0, "preconditioner.damping", "must be >= 0")


@dataclass(frozen=True)
class CryptoConfig:
    """CKKS parameters for the session keys; checked for >= 128-bit security before use."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)
    global_scale_bits: int = 40


@dataclass(frozen=True)
class ProtocolConfig:
    """What the buyer asks of sellers in the Offer."""

    disclosure: str = "aggregate"
    grad_norm_bound: float | None = None
    query_budget: int = 1
    # Gaussian noise sellers add to released scores, (epsilon, delta) per query; unset = none asked.
    dp_epsilon: float | None = None
    dp_delta: float = 1e-6
    # Released scores are rounded to multiples of score_bound * 10**-release_digits (0 = exact).
    release_digits: int = 8

    def __post_init__(self) -> None:
        _require(self.disclosure in DISCLOSURES, "protocol.disclosure", "must be 'aggregate' or 'per-sample'")
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
class GroundTruthConfig:
    """Realised benefit: fine-tune a copy of the buyer model on one seller's data."""

    enabled: bool = True
    lr: float = 0.05
    epochs: int = 1
    batch_size: int = 16
    layers: tuple[str, ...] = ()  # fnmatch patterns over parameter names to fine-tune; empty = all

    def __post_init__(self) -> None:
        _require(self.lr > 0, "ground-truth.lr", "must be > 0")
        _require(self.epochs >= 1, "ground-truth.epochs", "must be >= 1")
        _require(self.batch_size >= 1, "ground-truth.batch-size", "must be >= 1")


@dataclass(frozen=True)
class CausalConfig:
    """Causal-validity market on scikit-learn's handwritten digits.

    The buyer's model never saw ``missing`` classes; its objective needs them. One seller per
    entry of ``seller_classes``; the seller holding a missing class should be valued highest.
    """

    buyer_classes: tuple[int, ...] = (1, 2, 3)
    objective_classes: tuple[int, ...] = (1, 2, 3, 4)
    seller_classes: tuple[tuple[int, ...], ...] = ((1,), (2,), (3,), (4,))
    samples_per_seller: int = 60
    objective_per_class: int = 20
    hidden: int = 32
    train_epochs: int = 30

    def __post_init__(self) -> None:
        every = set(self.buyer_classes) | set(self.objective_classes)
        every |= {c for group in self.seller_classes for c in group}
        _require(all(0 <= c <= 9 for c in every), "causal", "classes must be digits 0..9")
        _require(len(self.seller_classes) >= 2, "causal.seller-classes", "needs at least two sellers")
        _require(self.samples_per_seller >= 1, "causal.samples-per-seller", "must be >= 1")
        _require(self.objective_per_class >= 1, "causal.objective-per-class", "must be >= 1")


@dataclass(frozen=True)
class FlowerConfig:
    """How the buyer's ServerApp drives one session over the Flower Grid."""

    timeout_s: float = 600.0
    wave_size: int = 64
    min_sellers: int = 1
    node_wait_s: float = 120.0
    num_cpus: float = 1.0

    def __post_init__(self) -> None:
        _require(self.timeout_s > 0, "flower.timeout-s", "must be > 0 (seconds to wait for a seller's reply)")
        _require(self.wave_size >= 1, "flower.wave-size", "must be >= 1 (most Offers in flight at once)")
        _require(self.min_sellers >= 1, "flower.min-sellers", "must be >= 1")
        _require(self.node_wait_s >= 0, "flower.node-wait-s", "must be >= 0")
        _require(self.num_cpus > 0, "flower.num-cpus", "must be > 0 (CPUs per simulated seller)")


@dataclass(frozen=True)
class GrpcConfig:
    """The native gRPC runtime: seller services on 127.0.0.1 over mutual TLS, queried by the buyer client."""

    timeout_s: float = 600.0
    retries: int = 2
    startup_timeout_s: float = 120.0
    max_message_mb: int = 512

    def __post_init__(self) -> None:
        _require(self.timeout_s > 0, "grpc.timeout-s", "must be > 0 (deadline of one seller's Value call)")
        _require(self.retries >= 0, "grpc.retries", "must be >= 0 (retries of unreachable sellers)")
        _require(self.startup_timeout_s > 0, "grpc.startup-timeout-s", "must be > 0 (seconds for a seller to get "
                                             "ready)")
        _require(4 <= self.max_message_mb < 2048, "grpc.max-message-mb", "must be in 4..2047 (MiB per gRPC message)")


@dataclass(frozen=True)
class SellerBudgetConfig:
    """What a long-lived seller (``tip-fed seller serve``) spends on Offers.

    Every Offer is costed from its own fields before anything is allocated (projection matrices,
    gradient matrix, model by dtype, CKKS key material, query ciphertexts, the message itself) and
    refused with a ResourceLimitError naming the setting to raise. The defaults fit a 24 GB machine:
    at most 4 Offers handled at once (up to 64 calls waiting, the rest refused), at most 1 per buyer
    (so one buyer's flood cannot queue ahead of the others: scoring runs one Offer at a time),
    2 GiB and 300 estimated CPU seconds each, 8 GiB together, leaving room for the seller's own data.
    The seller's largest accepted gRPC message follows from ``offer-memory-mb`` (see
    tip_fed.protocol.resources.max_offer_bytes).
    """

    offer_memory_mb: int = 2048  # most memory one Offer may cost (MiB)
    in_flight_memory_mb: int = 8192  # most memory all Offers being answered at once may cost (MiB)
    max_sessions: int = 4  # Offers handled at once; more wait for a slot (at most max-calls in all)
    max_offers_per_peer: int = 1  # Offers one buyer (client certificate, else address) may have in at once
    max_calls: int = 64  # calls a seller service holds at once, running or waiting; more are refused
    he_key_memory_mb: int = 256  # CKKS context tables + public and Galois keys of one Offer (MiB)
    projection_memory_mb: int = 512  # projection matrices of one Offer (MiB; rank x features per layer)
    max_layers: int = 1024  # projected layers one Offer may list
    # Estimated single-core seconds one Offer may cost. Twice the estimate of the heaviest honest
    # benchmark Offer (GPT-2 style, 4 layers, 100 x 128 tokens: ~146 s estimated; the estimate runs
    # 1-7x above measured seller CPU), so it bounds how long one admitted Offer holds the scoring.
    offer_work_s: float = 300.0
    kept_sessions: int = 65536  # answered (session, buyer) pairs remembered for the query budget
    session_window_s: float = 86400.0  # how long an answered session is remembered (seconds)

    def __post_init__(self) -> None:
        for name in (
            "offer_memory_mb",
            "in_flight_memory_mb",
            "max_sessions",
            "max_offers_per_peer",
            "max_calls",
            "he_key_memory_mb",
            "projection_memory_mb",
            "max_layers",
            "kept_sessions",
        ):
            _require(getattr(self, name) >= 1, f"seller-budget.{_toml_key(name)}", "must be >= 1")
        _require(
            self.in_flight_memory_mb >= self.offer_memory_mb,
            "seller-budget.in-flight-memory-mb",
            "must be >= seller-budget.offer-memory-mb (one Offer must fit in what may be in flight)",
        )
        _require(self.offer_work_s > 0, "seller-budget.offer-work-s", "must be > 0 (seconds)")
        _require(self.session_window_s > 0, "seller-budget.session-window-s", "must be > 0 (seconds)")


@dataclass(frozen=True)
class HealthcareConfig:
    """Hospital market: real clinical rows split into sites; synthetic sites for scale runs.

    Each replicate draws a buyer-train site, a different buyer-objective site and ``sellers``
    seller sites from a pool of ``sites``. When more sellers are asked for than the real data can
    populate (``sellers`` > ``sites`` - 2), the documented synthetic generator builds the sites.
    """

    dataset: str = "diabetes"
    sites: int = 12
    sellers: int = 8
    replicates: int = 20
    min_site_rows: int = 15  # diabetes' 442 patients; configs/healthcare_cohort.toml sets 200 for flchain
    label_noise: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6)
    hidden: int = 16
    train_epochs: int = 50
    synthetic_rows: tuple[int, ...] = (20, 200)
    synthetic_features: int = 10
    synthetic_bad_fraction: float = 0.3
    synthetic_shift: float = 0.5
    samples_per_seller: int | None = None  # synthetic only: every site holds exactly this many rows

    def __post_init__(self) -> None:
        _require(
            self.dataset in ("diabetes", "breast-cancer", "flchain", "synthetic"),
            "healthcare.dataset",
            "must be 'diabetes', 'breast-cancer', 'flchain' or 'synthetic'",
        )
        _require(
            self.min_site_rows >= 4,
            "healthcare.min-site-rows",
            "must be >= 4 patients per site (the flchain cohort config uses 200)",
        )
        _require(self.sites >= 4, "healthcare.sites", "must be >= 4 (buyer-train, objective and two sellers)")
        _require(self.sellers >= 2, "healthcare.sellers", "must be >= 2")
        _require(self.replicates >= 1, "healthcare.replicates", "must be >= 1")
        _require(
            bool(self.label_noise) and all(0 <= q <= 1 for q in self.label_noise),
            "healthcare.label-noise",
            "must be a non-empty list of label-flip rates in [0, 1]",
        )
        _require(
            len(self.synthetic_rows) == 2 and 4 <= self.synthetic_rows[0] <= self.synthetic_rows[1],
            "healthcare.synthetic-rows",
            "must be [min, max] rows per synthetic site with 4 <= min <= max",
        )
        _require(0 <= self.synthetic_bad_fraction <= 1, "healthcare.synthetic-bad-fraction", "must be in [0, 1]")
        _require(
            self.samples_per_seller is None or self.samples_per_seller >= 4,
            "healthcare.samples-per-seller",
            "must be >= 4 rows per synthetic site (leave it unset for log-uniform sizes in synthetic-rows)",
        )


@dataclass(frozen=True)
class PayoutsConfig:
    """Payout rules every run reports; coalition rules (loo, shapley) only up to ``coalition_max`` sellers."""

    budget: float = 1000.0
    temperature: float = 1.0
    reserve: float = 0.5  # reserve price as a fraction of an equal split of the budget
    coalition_max: int = 10
    shapley_exact_max: int = 8
    shapley_permutations: int = 50

    def __post_init__(self) -> None:
        _require(self.budget > 0, "payouts.budget", "must be > 0")
        _require(self.temperature > 0, "payouts.temperature", "must be > 0")
        _require(self.reserve >= 0, "payouts.reserve", "must be >= 0 (a fraction of an equal split of the budget)")
        _require(self.shapley_permutations >= 1, "payouts.shapley-permutations", "must be >= 1")


@dataclass(frozen=True)
class LlmCorpusConfig:
    """LLM-corpus market: document sellers valued for a small GPT-2 (or BERT) trained locally.

    ``truth-sellers``: how many sellers (a random sample) get a ground-truth fine-tune; 0 = all.
    Every seller is valued under encryption either way.
    """

    model: str = "gpt2"
    vocab_size: int = 2000
    block_len: int = 64
    n_embd: int = 64
    n_layer: int = 4
    n_head: int = 4
    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    train_topics: int = 30
    train_modules: int = 50  # standard-library modules whose docstrings the buyer pretrains on (not sold)
    objective_topics: int = 10
    objective_blocks: int = 32
    doc_sellers: int = 500
    low_sellers: int = 20
    max_blocks: int = 4
    train_sample: int = 256
    truth_sellers: int = 60

    def __post_init__(self) -> None:
        _require(self.model in ("gpt2", "bert"), "llm-corpus.model", "must be 'gpt2' or 'bert'")
        _require(self.vocab_size >= 300, "llm-corpus.vocab-size", "must be >= 300 (byte-level BPE has 256 base tokens)")
        _require(self.block_len >= 8, "llm-corpus.block-len", "must be >= 8 tokens")
        _require(self.n_embd % self.n_head == 0, "llm-corpus.n-embd", "must be a multiple of llm-corpus.n-head")
        _require(min(self.train_topics, self.objective_topics, self.doc_sellers, self.max_blocks) >= 1, "llm-corpus",
                 "train-topics, objective-topics, doc-sellers and max-blocks must be >= 1")
        _require(self.low_sellers >= 0, "llm-corpus.low-sellers", "must be >= 0")
        _require(self.train_modules >= 0, "llm-corpus.train-modules", "must be >= 0")
        _require(self.train_sample >= 1, "llm-corpus.train-sample", "must be >= 1")
        _require(self.truth_sellers >= 0, "llm-corpus.truth-sellers", "must be >= 0 (0 = every seller)")


@dataclass(frozen=True)
class TipConfig:
    """Root of the settings tree; ``scenario`` picks the market simulation."""

    scenario: str = "causal"
    seed: int = 0
    runtime: str = "inprocess"
    quick: bool = False
    sellers: int = 0  # sellers per market; 0 = the scenario's own setting (healthcare: scale mode when large)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    preconditioner: PreconditionerConfig = field(default_factory=PreconditionerConfig)
    crypto: CryptoConfig = field(default_factory=CryptoConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    ground_truth: GroundTruthConfig = field(default_factory=GroundTruthConfig)
    causal: CausalConfig = field(default_factory=CausalConfig)
    healthcare: HealthcareConfig = field(default_factory=HealthcareConfig)
    payouts: PayoutsConfig = field(default_factory=PayoutsConfig)
    llm_corpus: LlmCorpusConfig = field(default_factory=LlmCorpusConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    seller_budget: SellerBudgetConfig = field(default_factory=SellerBudgetConfig)

    def __post_init__(self) -> None:
        _require(self.runtime in RUNTIMES, "runtime", f"must be one of {', '.join(RUNTIMES)}")

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict with TOML (kebab-case) keys, for manifests."""
        return _to_dict(self)


def _require(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {what}")


def _toml_key(name: str) -> str:
    return name.replace("_", "-")


def _to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {_toml_key(f.name): _to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_dict(v) for v in obj]
    return obj


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``hint``; lists become tuples."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        inner = args[0]
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{key} = {value} is too large for a floating-point setting") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported setting type {hint!r}")  # pragma: no cover


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {_toml_key(f.name): f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = _toml_key(raw_key)
        full = f"{prefix}{key}"
        if key not in names:
            valid = ", ".join(sorted(f"{prefix}{k}" for k in names))
            raise ConfigError(f"unknown setting '{full}'; valid keys here: {valid}")
        name = names[key]
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ConfigError(f"'{full}' is a table of settings, not a value")
            kwargs[name] = _build(hint, value, f"{full}.")
        else:
            kwargs[name] = _coerce(value, hint, full)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # pragma: no cover - dataclass internals
        raise ConfigError(f"invalid settings under '{prefix or 'top level'}': {exc}") from exc


def _parse_value(text: str) -> Any:
    """Parse an override value as a TOML literal; bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (as given to ``--set``) onto a nested dict."""
    merged = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. seed=3")
        dotted, text = item.split("=", 1)
        parts = [p.strip() for p in dotted.strip().split(".")]
        if not all(parts):
            raise ConfigError(f"override '{item}' has an empty key part")
        node = merged
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is a value, not a table")
            node = child
        node[parts[-1]] = _parse_value(text.strip())
    return merged


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def config_from_dict(data: Mapping[str, Any]) -> TipConfig:
    """Build and validate a :class:`TipConfig` from nested (TOML-shaped) data."""
    return _build(TipConfig, data, "")


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> TipConfig:
    """Load a TOML config (or only defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist; pass a path such as configs/causal.toml")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file '{p}' is not valid TOML: {exc}") from exc
    return config_from_dict(apply_overrides(data, overrides))


#: The library sections a buyer sets (buyer.toml, a prepared query's settings).
SETTING_SECTIONS = ("projection", "preconditioner", "crypto", "protocol")


def parse_settings(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The protocol sections plus ``seed`` and ``batch-size`` of ``data``, validated by their typed
    classes; keyword arguments of :class:`~tip_fed.protocol.prepared.BuyerSettings`."""
    cfg = config_from_dict({k: data[k] for k in (*SETTING_SECTIONS, "payouts") if k in data})
    seed, batch = data.get("seed", 0), data.get("batch-size", 64)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(f"{where}seed must be an integer in 0..2**63-1 (the projection seed), got {seed!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"{where}batch-size must be an integer >= 1 (samples per gradient batch), got {batch!r}")
    return {**{k: getattr(cfg, k) for k in SETTING_SECTIONS}, "seed": seed, "batch_size": batch, "payouts": cfg.payouts}
