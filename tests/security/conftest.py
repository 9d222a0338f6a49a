"""Shared fixtures for the security tests: a small trained MLP, seller data, buyer factory."""

import pytest
import torch

from tip_fed.config import PreconditionerConfig, ProjectionConfig, ProtocolConfig
from tip_fed.core.models import MLP
from tip_fed.core.tasks import get_task
from tip_fed.protocol import Buyer, BuyerSettings

TASK = get_task("classification")


def make_data(n, seed, shift=0.0):
    """n labelled 10-feature records; ``shift`` moves the distribution so sellers differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g) + shift
    y = (x[:, 0] + 0.5 * x[:, 1] > shift).long()
    return {"x": x, "y": y}


@pytest.fixture(scope="session")
def model():
    torch.manual_seed(0)
    m = MLP([10, 16, 2])
    data = make_data(200, 1)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(50):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(data["x"]), data["y"]).backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="session")
def seller_data():
    return {f"s{i}": make_data(n, 10 + i, shift=0.3 * i) for i, n in enumerate([5, 33, 70])}


@pytest.fixture(scope="session")
def make_buyer(model):
    def factory(disclosure="per-sample", budget=1, **protocol):
        settings = BuyerSettings(
            projection=ProjectionConfig(rank=4),
            preconditioner=PreconditionerConfig(kind="identity"),
            protocol=ProtocolConfig(disclosure=disclosure, query_budget=budget, **protocol),
        )
        return Buyer(model, TASK, objective=make_data(40, 2, shift=0.5), train=make_data(120, 3), settings=settings)

    return factory
