"""A fitted preconditioner saved as (summary, float64 factors) and rebuilt gives the same ``P``;
edited factors are refused, since a prepared query's files may have been tampered with."""

import pytest
import torch

from tip_fed.core.gradients import kfac_statistics, projected_grads
from tip_fed.core.models import MLP
from tip_fed.core.precondition import KINDS, fit_preconditioner, load_preconditioner
from tip_fed.core.projection import ProjectionSpec
from tip_fed.core.tasks import get_task
from tip_fed.errors import DataError

TASK = get_task("classification")


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    model = MLP([6, 5, 3]).eval()
    data = {"x": torch.randn(30, 6), "y": torch.randint(0, 3, (30,))}
    spec = ProjectionSpec.for_model(model, rank=3, seed=4)
    grads = projected_grads(model, spec, TASK, data).double()
    stats = kfac_statistics(model, spec, TASK, [data])
    return spec, {k: fit_preconditioner(k, spec, train_grads=grads, kfac_stats=stats) for k in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_gives_the_same_preconditioner(fitted, kind):
    spec, fits = fitted
    p = fits[kind]
    loaded = load_preconditioner(p.to_dict(), {k: v.clone() for k, v in p.tensors().items()}, spec)
    v = torch.randn(7, spec.dim, dtype=torch.float64)
    assert torch.equal(loaded.apply(v), p.apply(v))
    assert loaded.to_dict() == p.to_dict()


@pytest.mark.parametrize("kind", ["raw", "kfac", "ekfac"])
def test_edited_factors_are_refused(fitted, kind):
    spec, fits = fitted
    p = fits[kind]
    name = next(k for k in p.tensors() if k.endswith("denominator"))
    negative = {**p.tensors(), name: -p.tensors()[name]}
    with pytest.raises(DataError, match="must be > 0"):
        load_preconditioner(p.to_dict(), negative, spec)
    with pytest.raises(DataError, match="shape"):
        load_preconditioner(p.to_dict(), {**p.tensors(), name: p.tensors()[name][:1]}, spec)
    with pytest.raises(DataError, match="factors, not"):
        load_preconditioner(p.to_dict(), {**p.tensors(), "extra": torch.zeros(1, dtype=torch.float64)}, spec)
    other = ProjectionSpec.for_model(MLP([6, 5, 3]), rank=2, seed=4)
    with pytest.raises(DataError, match="does not fit"):
        load_preconditioner(p.to_dict(), p.tensors(), other)
