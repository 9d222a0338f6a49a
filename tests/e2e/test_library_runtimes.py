"""The library drivers as a user without any simulation code calls them: one buyer, three sellers.

The sellers' data files are named otherwise than their seller ids (a user's files are), so a
driver that took ids from file names, or matched files to ids by sorting, would value the wrong
seller. Aggregate disclosure, the default every seller accepts without an opt-in, on every
runtime; each driver must give the in-process valuation and leave no process behind.
"""

import pytest

from tip_fed.config import (
    FlowerConfig,
    GrpcConfig,
    PreconditionerConfig,
    ProjectionConfig,
)
from tip_fed.core.tasks import get_task
from tip_fed.errors import ConfigError
from tip_fed.protocol import Buyer, BuyerSettings, Seller
from tip_fed.protocol.data import save_dataset
from tip_fed.runtimes import (
    local_seller_fleet,
    value_flower_simulation,
    value_grpc,
    value_inprocess,
)
from tip_fed.runtimes.reaper import running

from ..conftest import make_data

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAX_SAMPLES = 100


def _buyer(model):
    settings = BuyerSettings(projection=ProjectionConfig(rank=4), preconditioner=PreconditionerConfig(kind="identity"))
    return Buyer(model, get_task("classification"), objective=make_data(40, 2, shift=0.5), train=make_data(120, 3),
                 settings=settings)


@pytest.fixture(scope="module")
def files(tmp_path_factory, seller_data):
    """Seller id -> data file, in the reverse order of the file names (s0 -> upload-2, ...)."""
    folder = tmp_path_factory.mktemp("library-sellers")
    ids = list(seller_data)
    return {sid: save_dataset(seller_data[sid], folder / f"upload-{len(ids) - 1 - i}.safetensors")
            for i, sid in enumerate(ids)}


@pytest.fixture(scope="module")
def reference(model, seller_data):
    return value_inprocess(_buyer(model), {sid: Seller(sid, data) for sid, data in seller_data.items()}, MAX_SAMPLES)


def _assert_same(got, ref):
    assert got.missing == [] and got.rejected == {}
    g, r = got.by_id(), ref.by_id()
    assert sorted(g) == sorted(r) == ["s0", "s1", "s2"]
    scale = max(abs(v.total) for v in r.values())
    # the sellers' totals differ by far more than CKKS and sanitising noise (~1e-8 of the scale)
    assert min(abs(a.total - b.total) for a in r.values() for b in r.values() if a is not b) > 1e-3 * scale
    for sid, want in r.items():
        assert g[sid].n_samples == want.n_samples
        assert abs(g[sid].total - want.total) <= 1e-6 * scale, (sid, g[sid].total, want.total)


def test_inprocess_refuses_sellers_keyed_by_another_id(model, seller_data):
    with pytest.raises(ConfigError, match="keyed by their own seller id"):
        value_inprocess(_buyer(model), {"s0": Seller("s1", seller_data["s1"])}, MAX_SAMPLES)


def test_local_grpc_fleet_values_each_file_under_its_seller_id(model, files, reference):
    with local_seller_fleet(files, settings=GrpcConfig(startup_timeout_s=180)) as fleet:
        pids = list(fleet.pids.values())
        assert [e.name for e in fleet.endpoints] == list(files) and running(pids) == pids
        valuation = value_grpc(_buyer(model), fleet.endpoints, fleet.tls, GrpcConfig(timeout_s=180), MAX_SAMPLES)
    assert running(pids) == []
    transport = valuation.manifest["transport"]
    assert (transport["security"], transport["seller_identity"], transport["failures"]) == ("mtls", "certificate", {})
    _assert_same(valuation, reference)


def test_flower_simulation_values_each_file_under_its_seller_id(model, files, reference):
    valuation = value_flower_simulation(_buyer(model), files, MAX_SAMPLES,
                                        flower=FlowerConfig(node_wait_s=90, timeout_s=180))
    _assert_same(valuation, reference)
