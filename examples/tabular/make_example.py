"""Write the tabular example's data: the buyer's rows and trained model, and three clinics' tables.

The rows are scikit-learn's breast-cancer set (569 tumours, 30 measurements, shipped with
scikit-learn: nothing is downloaded). The buyer trains a small torch ``nn.Sequential`` on its own
200 rows and wants it to do better on 60 more (its objective). Three clinics hold the rest:

- ``clinic-a.csv``: 120 rows like the buyer's;
- ``clinic-b.csv``: 120 rows whose diagnosis was recorded wrongly for 40% of them;
- ``clinic-c.csv``: the benign tumours among the remaining rows only.

Run from anywhere: ``python make_example.py`` writes ``data/`` next to this file.
"""

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_breast_cancer

FEATURES = ["mean radius", "mean texture", "mean smoothness", "mean concavity", "worst area", "worst concave points",
            "worst symmetry", "worst fractal dimension"]
LABEL = "diagnosis"
HERE = Path(__file__).resolve().parent


def model(n_features: int) -> torch.nn.Sequential:
    """The architecture that buyer.toml's [model] sequential declares."""
    return torch.nn.Sequential(torch.nn.Linear(n_features, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def main() -> None:
    raw = load_breast_cancer(as_frame=True)
    rows = raw.frame[FEATURES].copy()
    rows[LABEL] = [str(raw.target_names[t]) for t in raw.target]  # "malignant" / "benign"
    rows = rows.sample(frac=1.0, random_state=0).reset_index(drop=True)
    train, objective, rest = rows.iloc[:200], rows.iloc[200:260], rows.iloc[260:]

    data = HERE / "data"
    data.mkdir(exist_ok=True)
    train.to_csv(data / "train.csv", index=False)
    objective.to_csv(data / "objective.csv", index=False)
    rest.iloc[:120].to_csv(data / "clinic-a.csv", index=False)
    noisy = rest.iloc[120:240].copy()
    flip = np.random.default_rng(0).random(len(noisy)) < 0.4
    noisy.loc[flip, LABEL] = noisy.loc[flip, LABEL].map({"malignant": "benign", "benign": "malignant"})
    noisy.to_csv(data / "clinic-b.csv", index=False)
    rest.iloc[240:][rest.iloc[240:][LABEL] == "benign"].to_csv(data / "clinic-c.csv", index=False)
    # 'tip-fed seller serve' keeps each clinic's privacy ledger beside its table, so a restart gives no buyer a
    # fresh budget. This is a new example: its clinics start with unspent ledgers (a real seller keeps its own).
    for ledger in data.glob("clinic-*.csv.ledger.json*"):
        ledger.unlink()

    # The buyer's model sees each feature standardised with the mean and population standard
    # deviation (ddof=0) of its training rows: what buyer.toml's [format] kind = "table" sends sellers.
    x = (train[FEATURES] - train[FEATURES].mean()) / train[FEATURES].std(ddof=0)
    x = torch.tensor(x.to_numpy(), dtype=torch.float32)
    y = torch.tensor((train[LABEL] == "malignant").to_numpy(), dtype=torch.long)  # classes: benign 0, malignant 1
    torch.manual_seed(0)
    net = model(len(FEATURES))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(data / "model.safetensors"))
    print(f"wrote {data}/: train.csv ({len(train)} rows), objective.csv ({len(objective)}), clinic-a.csv, "
          "clinic-b.csv, clinic-c.csv and model.safetensors")


if __name__ == "__main__":
    main()
