"""Measuring the CKKS operations of packed scoring: on a session's own query, refused for another plan."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tip_fed.crypto import (
    HEParams,
    OpCosts,
    SessionKeys,
    encrypt_query,
    load_public_context,
    measure_op_costs,
    plan_packing,
)
from tip_fed.errors import CodecError, ConfigError


@pytest.fixture(scope="module")
def session():
    plan = plan_packing(64, 8)  # N = 8192, folded blocks: the plan rotates
    keys = SessionKeys.generate(plan)
    ctx = load_public_context(keys.public_context_bytes(), plan)
    query = encrypt_query(keys, plan, np.ones(64) / 8)
    yield plan, ctx, query
    keys.destroy()


def test_every_operation_is_timed_on_the_query(session):
    plan, ctx, query = session
    assert plan.galois_steps  # so the rotation is really run
    costs = measure_op_costs(ctx, plan, query, calls=32)
    assert isinstance(costs, OpCosts)
    values = [costs.multiply_plain_s, costs.multiply_plain_cpu_s, costs.add_s, costs.rotate_s]
    assert all(math.isfinite(v) and v > 0 for v in values), costs


def test_another_plan_or_no_query_is_refused(session):
    plan, ctx, query = session
    other = plan_packing(64, 8, HEParams(poly_modulus_degree=16384))
    with pytest.raises(ConfigError, match="packing plan is for"):
        measure_op_costs(ctx, other, query)
    with pytest.raises(ConfigError, match="calls must be"):
        measure_op_costs(ctx, plan, query, calls=0)
    with pytest.raises(ConfigError, match="query ciphertexts"):
        measure_op_costs(ctx, plan, [])
    with pytest.raises(CodecError):
        measure_op_costs(ctx, plan, [b"not a ciphertext"])
