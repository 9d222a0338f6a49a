"""HE parameter security checks and the packing planner (pure Python, fast)."""

from __future__ import annotations

import numpy as np
import pytest

from tip_fed.crypto import HEParams, PackingPlan, check_params, plan_packing, security_bits
from tip_fed.errors import ConfigError, InsecureParametersError


def test_defaults_and_slots() -> None:
    p = HEParams()
    assert p.slots == 4096 and p.total_bits == 200
    assert security_bits(p) == 128
    check_params(p)
    assert HEParams.from_dict(p.to_dict()) == p
    assert HEParams.from_dict({"coeff_mod_bit_sizes": [60, 40, 40, 60]}) == p


@pytest.mark.parametrize(
    ("n", "bits", "level"),
    [
        (8192, (60, 40, 40, 60), 128),  # 200 <= 218
        (8192, (60, 40, 50), 192),  # 150 <= 152
        (8192, (40, 20, 20, 30), 256),  # 110 <= 118
        (16384, (60, 40, 40, 60), 256),  # 200 <= 237
        (8192, (60, 60, 60, 40), 0),  # 220 > 218
        (4096, (40, 40, 40, 40), 0),  # 160 > 109
        (32768, (60,) * 14, 128),  # 840 <= 881
        (1024, (27,), 128),
        (1024, (28,), 0),
        (3000, (20,), 0),  # not in the standard table
    ],
)
def test_security_bits_table(n: int, bits: tuple[int, ...], level: int) -> None:
    assert security_bits(HEParams(n, bits, 40)) == level


@pytest.mark.parametrize(
    "params",
    [HEParams(8192, (60, 60, 60, 60, 60), 60), HEParams(4096, (40, 40, 40, 40), 40)],
)
def test_insecure_params_rejected(params: HEParams) -> None:
    with pytest.raises(InsecureParametersError, match="128") as info:
        check_params(params)
    assert str(params.total_bits) in str(info.value)
    with pytest.raises(InsecureParametersError):
        plan_packing(64, 10, params)


def test_higher_security_request() -> None:
    with pytest.raises(InsecureParametersError, match="192"):
        check_params(HEParams(), min_security_bits=192)
    check_params(HEParams(16384, (60, 40, 40, 60), 40), min_security_bits=256)


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        (HEParams(3000, (60, 40, 40, 60), 40), "power of two"),
        (HEParams(65536, (60, 40, 40, 60), 40), "not supported"),
        (HEParams(8192, (60, 60), 40), "at least 3 primes"),
        (HEParams(8192, (60, 40, 60), 40), "2 levels"),
        (HEParams(8192, (60, 40, 40, 60), 30), "global_scale_bits"),
        (HEParams(8192, (50, 40, 40, 60), 40), "first prime"),
        (HEParams(8192, (60, 40, 40, 40), 40), "special"),
        (HEParams(8192, (60, 10, 10, 60), 10), "20..60"),
    ],
)
def test_bad_configs(params: HEParams, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        check_params(params)


def test_params_from_dict_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        HEParams.from_dict({"poly_modulus_degree": 8192, "colour": 1})
    with pytest.raises(ConfigError, match="integer"):
        HEParams.from_dict({"poly_modulus_degree": "8192"})
    with pytest.raises(ConfigError):
        HEParams.from_dict([8192])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dim", "padded", "chunks", "r", "baby", "giant", "rpb"),
    [
        (1, 64, 1, 64, 1, 1, 64),
        (64, 64, 1, 64, 1, 1, 64),
        (100, 128, 1, 32, 2, 2, 128),
        (256, 256, 1, 16, 4, 4, 256),
        (1024, 1024, 1, 4, 16, 16, 1024),
        (4096, 4096, 1, 1, 64, 64, 4096),
        (5000, 8192, 2, 1, 64, 64, 4096),
    ],
)
def test_plan_layout(
    dim: int, padded: int, chunks: int, r: int, baby: int, giant: int, rpb: int
) -> None:
    plan = plan_packing(dim, 10)
    assert plan.params == HEParams()
    assert (
        plan.padded_dim,
        plan.chunks,
        plan.replication,
        plan.baby,
        plan.giant,
        plan.rows_per_block,
    ) == (padded, chunks, r, baby, giant, rpb)
    assert plan.baby * plan.giant * plan.replication == plan.chunk_dim
    assert plan.padded_dim**2 >= plan.slots
    assert PackingPlan.from_dict(plan.to_dict()) == plan


def test_plan_helpers() -> None:
    plan = plan_packing(1024, 4096)
    assert plan.blocks(1) == 1 and plan.blocks(1024) == 1 and plan.blocks(1025) == 2
    assert plan.blocks(0) == 0
    np.testing.assert_array_equal(plan.output_slots(3), [0, 4, 8])
    # chained baby steps (R), Horner giant steps (R*B'), fold steps R/2..1
    assert plan.galois_steps == (1, 2, 4, 64)
    assert plan_packing(64, 1).galois_steps == (1, 2, 4, 8, 16, 32)
    assert plan_packing(5000, 1).galois_steps == (1, 64)
    assert 150_000 < plan.query_bytes < 175_000
    assert plan.reply_bytes(4096) == 4 * plan.reply_bytes(1)
    assert 0 < plan.est_seconds(1024) < plan.est_seconds(4096)
    with pytest.raises(ConfigError):
        plan.output_slots(plan.rows_per_block + 1)


def test_plan_validation() -> None:
    for dim, rows in ((0, 10), (10, 0), (True, 10), (10, 2.5), (-3, 1), (2**21, 1)):
        with pytest.raises(ConfigError):
            plan_packing(dim, rows)  # type: ignore[arg-type]
    plan = plan_packing(100, 10)
    tampered = plan.to_dict()
    tampered["replication"] = 8
    with pytest.raises(ConfigError, match="do not match"):
        PackingPlan.from_dict(tampered)
    with pytest.raises(ConfigError, match="unknown"):
        PackingPlan.from_dict({**plan.to_dict(), "extra": 1})
    with pytest.raises(ConfigError, match="inconsistent"):
        PackingPlan(plan.params, 100, 128, 1, 8, 2, 2, 128)
    insecure = {
        **plan.to_dict(),
        "params": {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [40, 40, 40, 40]},
    }
    with pytest.raises(InsecureParametersError):
        PackingPlan.from_dict(insecure)


def test_explicit_params_are_used() -> None:
    big = HEParams(16384, (60, 40, 40, 60), 40)
    plan = plan_packing(1024, 100, big)
    assert plan.params == big and plan.replication == 8 and plan.rows_per_block == 1024
