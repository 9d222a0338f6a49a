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
        (1, 1, 1, 4096, 1, 1, 4096),
        (64, 64, 1, 64, 8, 8, 4096),
        (100, 128, 1, 32, 8, 16, 4096),
        (256, 256, 1, 16, 8, 32, 4096),
        (1024, 1024, 1, 4, 4, 256, 4096),
        (4096, 4096, 1, 1, 8, 512, 4096),
        (5000, 8192, 2, 1, 4, 1024, 4096),
    ],
)
def test_plan_layout(
    dim: int, padded: int, chunks: int, r: int, baby: int, giant: int, rpb: int
) -> None:
    # 10 rows fit the smallest block (16 products, or k_c); the cost model picks the copies
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
    assert plan.baby * plan.giant == plan.chunk_dim
    assert plan.replication * plan.chunk_dim == plan.slots
    assert plan.diagonals(plan.block_rows(10)[0]) == min(16, plan.chunk_dim)
    assert PackingPlan.from_dict(plan.to_dict()) == plan


def test_block_schedule_and_output_slots() -> None:
    plan = plan_packing(1024, 4096)
    assert plan.baby == 32 and plan.min_block_rows == 64  # 64 rows x 1024 / 4096 = 16 products
    assert plan.block_rows(1) == [64] and plan.block_rows(100) == [128]
    assert plan.block_rows(4096) == [4096] and plan.block_rows(4097) == [4096, 64]
    assert plan.block_rows(10_000) == [4096, 4096, 2048]
    assert plan.blocks(0) == 0 and plan.blocks(4097) == 2
    assert plan.split(64) == (16, 1) and plan.split(4096) == (32, 32)
    np.testing.assert_array_equal(plan.output_slots(4096, 3), [0, 1, 2])
    # block of 64 rows: D = 16, row q*16 + c sits in slot q*1024 + c
    np.testing.assert_array_equal(plan.output_slots(64, 18), [*range(16), 1024, 1025])
    for r in (64, 128, 4096):  # every row gets its own slot
        assert len(set(plan.output_slots(r, r).tolist())) == r
    with pytest.raises(ConfigError):
        plan.output_slots(4096, 4097)
    with pytest.raises(ConfigError):
        plan.output_slots(100, 1)  # not a block size of this plan


def test_plan_helpers() -> None:
    plan = plan_packing(1024, 4096)
    # giant steps rotate by baby (32), folds by D..k_c/2 for the smallest block (D = 16)
    assert plan.galois_steps == (16, 32, 64, 128, 256, 512)
    assert plan_packing(64, 1).galois_steps == (8, 16, 32)
    assert plan_packing(5000, 1).galois_steps == (4, 16, 32, 64, 128, 256, 512, 1024, 2048)
    assert plan_packing(4, 100, query_copies=4).galois_steps == ()  # one full block, D = k = copies
    assert 32 * 150_000 < plan.query_bytes < 32 * 175_000
    assert plan.reply_bytes(8192) == 2 * plan.reply_bytes(1)
    assert 0 < plan.est_seconds(1024) < plan.est_seconds(4096)
    # more rows, more blocks sharing the copies: the cost model sends more of them
    copies = [plan_packing(1024, n).baby for n in (1, 101, 1001, 4096, 8192)]
    assert copies == sorted(copies) and copies[0] < copies[-1] == 64
    assert plan_packing(1024, 4096, query_copies=128).giant == 8


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
    for copies in (0, 3, 256, True):  # not a power of two, or more than k_c = 128
        with pytest.raises(ConfigError, match="power of two"):
            plan_packing(100, 10, query_copies=copies)
    with pytest.raises(ConfigError, match="power of two"):
        PackingPlan.from_dict({**plan.to_dict(), "baby": 5})
    insecure = {
        **plan.to_dict(),
        "params": {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [40, 40, 40, 40]},
    }
    with pytest.raises(InsecureParametersError):
        PackingPlan.from_dict(insecure)


def test_explicit_params_are_used() -> None:
    big = HEParams(16384, (60, 40, 40, 60), 40)
    plan = plan_packing(1024, 100, big)
    assert plan.params == big and plan.replication == 8 and plan.rows_per_block == 8192
