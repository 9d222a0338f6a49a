"""Security-test fixtures beyond the shared ones (tests/conftest.py)."""

import pytest

from ..conftest import make_data
from .hostile import N_ROWS


@pytest.fixture(scope="module")
def records():
    """The records of the seller that hostile and flooding Offers are sent to."""
    return make_data(N_ROWS, 5)
