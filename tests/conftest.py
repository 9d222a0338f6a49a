"""Fixtures shared across test tiers: a small labelled dataset generator and a trained MLP."""

import pytest
import torch

from tip_fed.core.models import MLP


def make_data(n, seed, shift=0.0):
    """n labelled 10-feature records; ``shift`` moves the distribution so sellers differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g) + shift
    y = (x[:, 0] + 0.5 * x[:, 1] > shift).long()
    return {"x": x, "y": y}


@pytest.fixture(scope="session")
def model():
    """A 10-16-2 MLP trained briefly on make_data, shared read-only by every test that needs one."""
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
    """Three sellers of 5, 33 and 70 records with shifted distributions."""
    return {f"s{i}": make_data(n, 10 + i, shift=0.3 * i) for i, n in enumerate([5, 33, 70])}
