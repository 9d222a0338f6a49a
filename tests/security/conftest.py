"""Security-test fixtures: a buyer factory over the shared model and data (tests/conftest.py)."""

import pytest

from tip_fed.config import PreconditionerConfig, ProjectionConfig, ProtocolConfig
from tip_fed.core.tasks import get_task
from tip_fed.protocol import Buyer, BuyerSettings

from ..conftest import make_data

TASK = get_task("classification")


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
