"""The market simulations' settings: the library's :class:`~tip_fed.config.TipConfig` plus the
scenario sections, declared like the library's (a default and help per setting).

``quick = true`` is a preset: :class:`SimulationConfig` applies it to its own sections when it is
built, so what a run reads, what its manifest records and what a manifest loads back are the same
effective settings (and a manifest's config, loaded again, gives the same run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tip_fed.config import TipConfig
from tip_fed.toml_files import build, load_typed, require, setting

__all__ = ["QUICK", "CausalConfig", "GroundTruthConfig", "HealthcareConfig", "LlmCorpusConfig", "SimulationConfig",
           "config_from_dict", "load_config"]

_require = require


@dataclass(frozen=True)
class GroundTruthConfig:
    """Realised benefit: fine-tune a copy of the buyer model on one seller's data."""

    enabled: bool = setting(True, "compute each seller's realised benefit by fine-tuning")
    lr: float = setting(0.05, "learning rate of the fine-tune")
    epochs: int = setting(1, "epochs of the fine-tune")
    batch_size: int = setting(16, "batch size of the fine-tune")
    layers: tuple[str, ...] = setting((), "fnmatch patterns over parameter names to fine-tune; empty = all")

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

    buyer_classes: tuple[int, ...] = setting((1, 2, 3), "digits the buyer's model is trained on")
    objective_classes: tuple[int, ...] = setting((1, 2, 3, 4), "digits of the buyer's objective set")
    seller_classes: tuple[tuple[int, ...], ...] = setting(((1,), (2,), (3,), (4,)), "digits each seller holds "
                                                                                     "(one list per seller)")
    samples_per_seller: int = setting(60, "records per seller")
    objective_per_class: int = setting(20, "objective records per digit")
    hidden: int = setting(32, "hidden width of the buyer's MLP")
    train_epochs: int = setting(30, "epochs of the buyer's training")

    def __post_init__(self) -> None:
        every = set(self.buyer_classes) | set(self.objective_classes)
        every |= {c for group in self.seller_classes for c in group}
        _require(all(0 <= c <= 9 for c in every), "causal", "classes must be digits 0..9")
        _require(len(self.seller_classes) >= 2, "causal.seller-classes", "needs at least two sellers")
        _require(self.samples_per_seller >= 1, "causal.samples-per-seller", "must be >= 1")
        _require(self.objective_per_class >= 1, "causal.objective-per-class", "must be >= 1")


@dataclass(frozen=True)
class HealthcareConfig:
    """Hospital market: real clinical rows split into sites; synthetic sites for scale runs.

    Each replicate draws a buyer-train site, a different buyer-objective site and ``sellers``
    seller sites from a pool of ``sites``. When more sellers are asked for than the real data can
    populate (``sellers`` > ``sites`` - 2), the documented synthetic generator builds the sites.
    """

    dataset: str = setting("diabetes", "diabetes, breast-cancer, flchain or synthetic")
    sites: int = setting(12, "sites the patients are split into (buyer-train, objective and sellers)")
    sellers: int = setting(8, "seller sites per replicate")
    replicates: int = setting(20, "markets drawn, each with its own sites")
    min_site_rows: int = setting(15, "fewest patients per site (configs/healthcare_cohort.toml: 200 for flchain)")
    label_noise: tuple[float, ...] = setting((0.0, 0.0, 0.0, 0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6),
                                             "label-flip rate of each site, in [0, 1]")
    hidden: int = setting(16, "hidden width of the buyer's MLP")
    train_epochs: int = setting(50, "epochs of the buyer's training")
    synthetic_rows: tuple[int, ...] = setting((20, 200), "[min, max] rows per synthetic site (log-uniform)")
    synthetic_features: int = setting(10, "features of synthetic sites")
    synthetic_bad_fraction: float = setting(0.3, "fraction of synthetic sites with shifted, noisy data")
    synthetic_shift: float = setting(0.5, "covariate shift of the bad synthetic sites")
    samples_per_seller: int | None = setting(None, "synthetic only: every site holds exactly this many rows")

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
class LlmCorpusConfig:
    """LLM-corpus market: document sellers valued for a small GPT-2 (or BERT) trained locally.

    ``truth-sellers``: how many sellers (a random sample) get a ground-truth fine-tune; 0 = all.
    Every seller is valued under encryption either way.
    """

    model: str = setting("gpt2", "gpt2 (causal LM) or bert (sequence classification)")
    vocab_size: int = setting(2000, "byte-level BPE vocabulary trained on the buyer's text")
    block_len: int = setting(64, "tokens per block")
    n_embd: int = setting(64, "embedding width")
    n_layer: int = setting(4, "transformer layers")
    n_head: int = setting(4, "attention heads")
    pretrain_steps: int = setting(400, "steps of the buyer's pretraining")
    pretrain_lr: float = setting(3e-3, "learning rate of the buyer's pretraining")
    train_topics: int = setting(30, "topics the buyer pretrains on")
    train_modules: int = setting(50, "standard-library modules whose docstrings the buyer pretrains on (not sold)")
    objective_topics: int = setting(10, "topics of the buyer's objective")
    objective_blocks: int = setting(32, "blocks of the buyer's objective")
    doc_sellers: int = setting(500, "sellers of documents")
    low_sellers: int = setting(20, "sellers of low-quality text")
    max_blocks: int = setting(4, "most blocks per seller")
    train_sample: int = setting(256, "blocks of the buyer's training set sampled for the preconditioner")
    truth_sellers: int = setting(60, "sellers (a random sample) that get a ground-truth fine-tune; 0 = all")

    def __post_init__(self) -> None:
        _require(self.model in ("gpt2", "bert"), "llm-corpus.model", "must be 'gpt2' or 'bert'")
        _require(self.vocab_size >= 300, "llm-corpus.vocab-size", "must be >= 300 (byte-level BPE has 256 base tokens)")
        _require(self.block_len >= 8, "llm-corpus.block-len", "must be >= 8 tokens")
        _require(self.n_head >= 1, "llm-corpus.n-head", "must be >= 1")
        _require(self.n_embd % self.n_head == 0, "llm-corpus.n-embd", "must be a multiple of llm-corpus.n-head")
        _require(min(self.train_topics, self.objective_topics, self.doc_sellers, self.max_blocks) >= 1, "llm-corpus",
                 "train-topics, objective-topics, doc-sellers and max-blocks must be >= 1")
        _require(self.low_sellers >= 0, "llm-corpus.low-sellers", "must be >= 0")
        _require(self.train_modules >= 0, "llm-corpus.train-modules", "must be >= 0")
        _require(self.train_sample >= 1, "llm-corpus.train-sample", "must be >= 1")
        _require(self.truth_sellers >= 0, "llm-corpus.truth-sellers", "must be >= 0 (0 = every seller)")


#: What ``quick = true`` sets, per section (a smoke run in minutes, not for citing).
QUICK: dict[str, dict[str, Any]] = {
    "healthcare": {"replicates": 3, "sellers": 8},
    "llm_corpus": {"doc_sellers": 16, "low_sellers": 2, "pretrain_steps": 60, "max_blocks": 2, "train_sample": 64,
                   "truth_sellers": 0},
}


@dataclass(frozen=True)
class SimulationConfig(TipConfig):
    """Root of a market simulation's settings; ``scenario`` picks the market."""

    scenario: str = setting("causal", "the market: causal, healthcare or llm_corpus")
    quick: bool = setting(False, "the quick preset: smaller markets (see simulations.settings.QUICK), "
                                 "recorded in the manifest as the settings it sets")
    sellers: int = setting(0, "sellers per market; 0 = the scenario's own setting (healthcare: scale mode when "
                              "above its real sites)")
    ground_truth: GroundTruthConfig = field(default_factory=GroundTruthConfig)
    causal: CausalConfig = field(default_factory=CausalConfig)
    healthcare: HealthcareConfig = field(default_factory=HealthcareConfig)
    llm_corpus: LlmCorpusConfig = field(default_factory=LlmCorpusConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quick:  # frozen: the preset is applied once, as the object is built
            for name, values in QUICK.items():
                object.__setattr__(self, name, dataclasses.replace(getattr(self, name), **values))


def config_from_dict(data: Mapping[str, Any]) -> SimulationConfig:
    """Build and validate a :class:`SimulationConfig` from nested (TOML-shaped) data, e.g. a manifest's config."""
    return build(SimulationConfig, data)


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> SimulationConfig:
    """Load a scenario TOML config (or only defaults when ``path`` is None) and apply overrides."""
    return load_typed(
        SimulationConfig, path, overrides, "pass a path such as configs/causal.toml")
