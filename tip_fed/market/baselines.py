"""Baseline seller-valuation methods, scored on the same sellers and benefits as TIP.

Paper §6.2: gradient cosine (mean cosine between the objective's mean gradient and each seller
sample's gradient), data cosine (mean cosine between the objective's mean feature vector and each
sample's features), random scores, plus data size. They answer "does TIP beat the cheap obvious
alternatives?" and, for gradient cosine, "does the curvature and magnitude information matter?".
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from tip_fed.errors import DataError
from tip_fed.market.results import BASELINES
from tip_fed.protocol.data import Batch, check_batch

METHODS = BASELINES  # their names are declared with the results files, which load no torch


def _cos_rows(rows: np.ndarray, target: np.ndarray) -> np.ndarray:
    denom = np.linalg.norm(rows, axis=1) * np.linalg.norm(target)
    out = np.zeros(rows.shape[0])
    ok = denom > 0
    out[ok] = rows[ok] @ target / denom[ok]
    return out


def gradient_cosine(seller_grads: np.ndarray, objective_grads: np.ndarray) -> float:
    """Mean over seller samples of cos(mean objective gradient, sample gradient)."""
    g = np.asarray(seller_grads, float)
    if g.ndim != 2 or g.shape[1] != np.asarray(objective_grads).shape[-1]:
        raise DataError(f"gradient shapes disagree: seller {g.shape}, objective {np.asarray(objective_grads).shape}")
    return float(_cos_rows(g, np.asarray(objective_grads, float).mean(0)).mean())


def features(data: Batch, vocab_size: int | None = None) -> np.ndarray:
    """Per-sample feature vectors: ``x`` flattened, or a bag of tokens for token batches."""
    n = check_batch(data)
    if "x" in data:
        return data["x"].reshape(n, -1).double().numpy()
    if "input_ids" in data:
        ids = data["input_ids"].long()
        mask = data.get("attention_mask", torch.ones_like(ids)).bool()
        size = vocab_size or int(ids.max()) + 1
        bag = torch.zeros(n, size, dtype=torch.float64)
        bag.scatter_add_(1, ids.clamp(max=size - 1), mask.double())
        return bag.numpy()
    raise DataError(f"no features to compare: the batch has keys {sorted(data)}, expected 'x' or 'input_ids'")


def data_cosine(seller_features: np.ndarray, objective_features: np.ndarray) -> float:
    """Mean over seller samples of cos(mean objective feature vector, sample features)."""
    return float(_cos_rows(np.asarray(seller_features, float), np.asarray(objective_features, float).mean(0)).mean())


def random_scores(seller_ids: list[str], seed: int) -> dict[str, float]:
    """Standard-normal scores: the chance floor of every correlation."""
    draws = np.random.default_rng(seed).standard_normal(len(seller_ids))
    return {sid: float(x) for sid, x in zip(seller_ids, draws, strict=True)}


def score_all(
    seller_grads: Mapping[str, np.ndarray],
    objective_grads: np.ndarray,
    sellers: Mapping[str, Batch],
    objective: Batch,
    seed: int,
) -> dict[str, dict[str, float]]:
    """Every baseline for every seller: ``{method: {seller_id: score}}``."""
    vocab = None
    if "input_ids" in objective:
        vocab = 1 + max(int(objective["input_ids"].max()), *(int(d["input_ids"].max()) for d in sellers.values()))
    obj_feats = features(objective, vocab)
    ids = list(sellers)
    return {
        "gradient_cosine": {s: gradient_cosine(seller_grads[s], objective_grads) for s in ids},
        "data_cosine": {s: data_cosine(features(sellers[s], vocab), obj_feats) for s in ids},
        "random": random_scores(ids, seed),
        "data_size": {s: float(check_batch(sellers[s])) for s in ids},
    }
