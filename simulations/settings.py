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
from tip_fed.toml_files import Section, build, load_typed, require, setting

__all__ = ["QUICK", "CausalConfig", "GroundTruthConfig", "HealthcareConfig", "LlmCorpusConfig", "SimulationConfig",
           "config_from_dict", "load_config"]

_require = require


@dataclass(frozen=True)
class GroundTruthConfig(Section, key="ground-truth"):
    """Realised benefit: fine-tune a copy of the buyer model on one seller's data."""

    enabled: bool = setting(True, "compute each seller's realised benefit by fine-tuning")
    lr: float = setting(0.05, "learning rate of the fine-tune", above=0)
    epochs: int = setting(1, "epochs of the fine-tune", at_least=1)
    batch_size: int = setting(16, "batch size of the fine-tune", at_least=1)
    layers: tuple[str, ...] = setting((), "fnmatch patterns over parameter names to fine-tune; empty = all")


@dataclass(frozen=True)
class CausalConfig(Section, key="causal"):
    """Causal-validity market on scikit-learn's handwritten digits.

    The buyer's model never saw ``missing`` classes; its objective needs them. One seller per
    entry of ``seller_classes``; the seller holding a missing class should be valued highest.
    """

    buyer_classes: tuple[int, ...] = setting((1, 2, 3), "digits the buyer's model is trained on", at_least=0,
                                             at_most=9)
    objective_classes: tuple[int, ...] = setting((1, 2, 3, 4), "digits of the buyer's objective set", at_least=0,
                                                 at_most=9)
    seller_classes: tuple[tuple[int, ...], ...] = setting(((1,), (2,), (3,), (4,)), "digits each seller holds "
                                                                                     "(one list per seller)")
    samples_per_seller: int = setting(60, "records per seller", at_least=1)
    objective_per_class: int = setting(20, "objective records per digit", at_least=1)
    hidden: int = setting(32, "hidden width of the buyer's MLP")
    train_epochs: int = setting(30, "epochs of the buyer's training")

    def __post_init__(self) -> None:
        super().__post_init__()
        sold = {c for group in self.seller_classes for c in group}
        _require(all(0 <= c <= 9 for c in sold), "causal.seller-classes", "classes must be digits 0..9")
        _require(len(self.seller_classes) >= 2, "causal.seller-classes", "needs at least two sellers")


@dataclass(frozen=True)
class HealthcareConfig(Section, key="healthcare"):
    """Hospital market: real clinical rows split into sites; synthetic sites for scale runs.

    Each replicate draws a buyer-train site, a different buyer-objective site and ``sellers``
    seller sites from a pool of ``sites``. When more sellers are asked for than the real data can
    populate (``sellers`` > ``sites`` - 2), the documented synthetic generator builds the sites.
    """

    dataset: str = setting("diabetes", "the patients split into sites (synthetic: generated sites)",
                           one_of=("diabetes", "breast-cancer", "flchain", "synthetic"))
    sites: int = setting(12, "sites the patients are split into (buyer-train, objective and sellers)", at_least=4)
    sellers: int = setting(8, "seller sites per replicate", at_least=2)
    replicates: int = setting(20, "markets drawn, each with its own sites", at_least=1)
    min_site_rows: int = setting(15, "fewest patients per site (configs/healthcare_cohort.toml: 200 for flchain)",
                                 at_least=4)
    label_noise: tuple[float, ...] = setting((0.0, 0.0, 0.0, 0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6),
                                             "label-flip rate of each site", at_least=0, at_most=1)
    hidden: int = setting(16, "hidden width of the buyer's MLP")
    train_epochs: int = setting(50, "epochs of the buyer's training")
    synthetic_rows: tuple[int, ...] = setting((20, 200), "[min, max] rows per synthetic site (log-uniform)",
                                              at_least=4)
    synthetic_features: int = setting(10, "features of synthetic sites")
    synthetic_bad_fraction: float = setting(0.3, "fraction of synthetic sites with shifted, noisy data", at_least=0,
                                            at_most=1)
    synthetic_shift: float = setting(0.5, "covariate shift of the bad synthetic sites")
    samples_per_seller: int | None = setting(None, "synthetic only: every site holds exactly this many rows (unset: "
                                                   "log-uniform sizes in synthetic-rows)", at_least=4)

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(bool(self.label_noise), "healthcare.label-noise", "must be a non-empty list of label-flip rates")
        _require(
            len(self.synthetic_rows) == 2 and self.synthetic_rows[0] <= self.synthetic_rows[1],
            "healthcare.synthetic-rows",
            "must be [min, max] rows per synthetic site with 4 <= min <= max",
        )


@dataclass(frozen=True)
class LlmCorpusConfig(Section, key="llm-corpus"):
    """LLM-corpus market: document sellers valued for a small GPT-2 (or BERT) trained locally.

    ``truth-sellers``: how many sellers (a random sample) get a ground-truth fine-tune; 0 = all.
    Every seller is valued under encryption either way.
    """

    model: str = setting("gpt2", "gpt2 (causal LM) or bert (sequence classification)", one_of=("gpt2", "bert"))
    vocab_size: int = setting(2000, "byte-level BPE vocabulary trained on the buyer's text (256 byte tokens and "
                                    "its merges)", at_least=300)
    block_len: int = setting(64, "tokens per block", at_least=8)
    n_embd: int = setting(64, "embedding width (a multiple of n-head)")
    n_layer: int = setting(4, "transformer layers")
    n_head: int = setting(4, "attention heads", at_least=1)
    pretrain_steps: int = setting(400, "steps of the buyer's pretraining")
    pretrain_lr: float = setting(3e-3, "learning rate of the buyer's pretraining")
    train_topics: int = setting(30, "topics the buyer pretrains on", at_least=1)
    train_modules: int = setting(50, "standard-library modules whose docstrings the buyer pretrains on (not sold)",
                                 at_least=0)
    objective_topics: int = setting(10, "topics of the buyer's objective", at_least=1)
    objective_blocks: int = setting(32, "blocks of the buyer's objective")
    doc_sellers: int = setting(500, "sellers of documents", at_least=1)
    low_sellers: int = setting(20, "sellers of low-quality text", at_least=0)
    max_blocks: int = setting(4, "most blocks per seller", at_least=1)
    train_sample: int = setting(256, "blocks of the buyer's training set sampled for the preconditioner", at_least=1)
    truth_sellers: int = setting(60, "sellers (a random sample) that get a ground-truth fine-tune; 0 = all",
                                 at_least=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.n_embd % self.n_head == 0, "llm-corpus.n-embd", "must be a multiple of llm-corpus.n-head")


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
