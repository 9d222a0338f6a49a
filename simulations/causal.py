"""Causal-validity market on scikit-learn's handwritten digits (1,797 real 8x8 images).

The buyer trains an MLP on some digit classes; its objective set also contains classes it never
saw. Each seller holds the images of other classes. The seller holding a missing class is the one
whose data should be worth most, by encrypted score and by realised benefit alike.
"""

from __future__ import annotations

import numpy as np
import torch

from simulations.market import Market
from simulations.settings import SimulationConfig
from tip_fed.core.models import MLP
from tip_fed.core.tasks import get_task
from tip_fed.errors import ConfigError


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def _batch(x: np.ndarray, y: np.ndarray) -> dict[str, torch.Tensor]:
    return {"x": torch.from_numpy(x), "y": torch.from_numpy(y)}


def train_classifier(model: torch.nn.Module, data: dict[str, torch.Tensor], epochs: int, seed: int) -> None:
    """Full-batch Adam on cross-entropy; small data, so a few dozen epochs suffice."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(data["x"]), data["y"]).backward()
        opt.step()
    model.eval()


def build(config: SimulationConfig) -> Market:
    """Split digits into buyer-train, objective and per-seller sets by class; train the buyer."""
    c = config.causal
    rng = np.random.default_rng(config.seed)
    x, y = _load_digits()
    pools = {k: list(rng.permutation(np.flatnonzero(y == k))) for k in range(10)}

    def take(cls: int, n: int, what: str) -> np.ndarray:
        if len(pools[cls]) < n:
            raise ConfigError(
                f"digit class {cls} has too few images left for {what} ({len(pools[cls])} < {n}); "
                "lower causal.samples-per-seller or causal.objective-per-class"
            )
        idx, pools[cls] = pools[cls][:n], pools[cls][n:]
        return np.asarray(idx)

    objective_idx = np.concatenate([take(k, c.objective_per_class, "the objective") for k in c.objective_classes])
    seller_idx = {}
    for group in c.seller_classes:
        per_class = max(1, c.samples_per_seller // len(group))
        name = "digits-" + "-".join(str(k) for k in group)
        seller_idx[name] = np.concatenate([take(k, per_class, f"seller {name}") for k in group])
    train_per_class = min(len(pools[k]) for k in c.buyer_classes)
    train_idx = np.concatenate(
        [take(k, min(train_per_class, 100), "the buyer's training set") for k in c.buyer_classes]
    )

    torch.manual_seed(config.seed)
    model = MLP([64, c.hidden, 10])
    train = _batch(x[train_idx], y[train_idx])
    train_classifier(model, train, c.train_epochs, config.seed)

    missing = set(c.objective_classes) - set(c.buyer_classes)
    best = [n for n, group in zip(seller_idx, c.seller_classes, strict=True) if missing & set(group)]
    sellers = {name: _batch(x[idx], y[idx]) for name, idx in seller_idx.items()}
    return Market(
        name="causal",
        model=model,
        task=get_task("classification"),
        train=train,
        objective=_batch(x[objective_idx], y[objective_idx]),
        sellers=sellers,
        expected_best=best[0] if len(best) == 1 else None,
        info={
            "dataset": "sklearn.datasets.load_digits",
            "buyer_classes": list(c.buyer_classes),
            "objective_classes": list(c.objective_classes),
            "missing_classes": sorted(missing),
        },
    )
