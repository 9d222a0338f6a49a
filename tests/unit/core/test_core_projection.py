"""ProjectionSpec and the portable projection generator.

Independent checks: a pure-Python Philox4x64-10 + sha256 key derivation written from the
module docstring, orthonormalisation by numpy's (LAPACK) QR instead of the generator's
fixed-order Gram-Schmidt, a published test vector, a second process, and the JL property
E[(Px)·(Py)] = x·y measured over many seeds.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tip_fed.core.gradients import projected_grads
from tip_fed.core.projection import (
    LayerProjection,
    ProjectionSpec,
    projection_matrices,
)
from tip_fed.core.projection_matrix import _log
from tip_fed.errors import ConfigError, DataError, ModelError

VECTOR = Path(__file__).with_name("projection_vector.json")
MASK64 = (1 << 64) - 1


def small_spec(kind: str = "rademacher", seed: int = 7) -> ProjectionSpec:
    return ProjectionSpec(
        layers=(LayerProjection("a.fc1", 12, 9, 4, 3), LayerProjection("b", 9, 3, 2, 3, True)),
        seed=seed,
        kind=kind,
    )


# ----------------------------------------------------------------- reference generator


def philox_words(key: int, count: int) -> list[int]:
    """Random123 Philox4x64-10 on counters 1, 2, ... (written from the spec, not numpy)."""
    words: list[int] = []
    counter = 1
    while len(words) < count:
        c = [counter & MASK64, counter >> 64, 0, 0]
        k = [key & MASK64, key >> 64]
        for _ in range(10):
            p0 = 0xD2E7470EE14C6C93 * c[0]
            p1 = 0xCA5A826395121157 * c[2]
            c = [(p1 >> 64) ^ c[1] ^ k[0], p1 & MASK64, (p0 >> 64) ^ c[3] ^ k[1], p0 & MASK64]
            k = [(k[0] + 0x9E3779B97F4A7C15) & MASK64, (k[1] + 0xBB67AE8584CAA73B) & MASK64]
        words.extend(c)
        counter += 1
    return words[:count]


def reference_key(seed: int, name: str, side: str) -> int:
    digest = hashlib.sha256(f"tip_fed/projection/v2\n{seed}\n{name}\n{side}".encode()).digest()
    return int.from_bytes(digest[:16], "little")


def reference_raw(seed: int, kind: str, name: str, side: str, rank: int, features: int):
    count = rank * features
    key = reference_key(seed, name, side)
    if kind == "rademacher":
        words = philox_words(key, (count + 63) // 64)
        values = [(-1.0 if (words[j // 64] >> (j % 64)) & 1 else 1.0) for j in range(count)]
    else:
        words = philox_words(key, 4 * count + 64)
        values = []
        for k in range(0, len(words), 2):
            u = float(words[k] >> 11) * 2.0**-52 - 1.0
            v = float(words[k + 1] >> 11) * 2.0**-52 - 1.0
            s = u * u + v * v
            if 0.0 < s < 1.0:
                f = math.sqrt((-2.0 * math.log(s)) / s)
                values += [u * f, v * f]
            if len(values) >= count:
                break
        values = values[:count]
    return np.array(values).reshape(rank, features)


def reference_matrix(seed: int, kind: str, name: str, side: str, rank: int, features: int):
    """The documented matrix, orthonormalised by LAPACK QR (not the generator's Gram-Schmidt)."""
    if rank == features:
        return np.eye(features)
    accepted: list[np.ndarray] = []
    attempt = 0
    while len(accepted) < rank:
        stream = side if attempt == 0 else f"{side}+{attempt}"
        for row in reference_raw(seed, kind, name, stream, rank, features):
            if accepted:
                basis = np.array(accepted)
                coef, *_ = np.linalg.lstsq(basis.T, row, rcond=None)
                residual = row - basis.T @ coef
            else:
                residual = row
            if residual @ residual > 1e-12 * (row @ row) and len(accepted) < rank:
                accepted.append(row)
        attempt += 1
    q, r = np.linalg.qr(np.array(accepted).T)  # Gram-Schmidt order = QR of the transpose
    q = q * np.sign(np.diag(r))  # unique: positive diagonal of R, as Gram-Schmidt gives
    return q.T * math.sqrt(features / rank)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_matrices_follow_the_documented_generator(kind: str) -> None:
    # Prepare
    spec = small_spec(kind)
    for layer in spec.layers:
        # Execute
        p_in, p_out = projection_matrices(spec, layer, torch.float64)
        ref_in = reference_matrix(spec.seed, kind, layer.name, "in", layer.rank_in, layer.in_dim)
        ref_out = reference_matrix(
            spec.seed, kind, layer.name, "out", layer.rank_out, layer.out_features
        )
        # Assert: equal up to rounding (LAPACK's Householder QR vs fixed-order Gram-Schmidt).
        np.testing.assert_allclose(p_in.numpy(), ref_in, rtol=0, atol=1e-13)
        np.testing.assert_allclose(p_out.numpy(), ref_out, rtol=0, atol=1e-13)


def test_portable_log_matches_library_log() -> None:
    x = np.concatenate([np.geomspace(1e-300, 1.0, 20000, endpoint=False), [0.5, 0.7071067811865476]])
    ours = _log(x)
    np.testing.assert_allclose(ours, np.log(x), rtol=4e-16, atol=4e-16)


def test_published_vector_is_reproduced_bit_for_bit() -> None:
    data = json.loads(VECTOR.read_text())
    assert {case["spec"]["kind"] for case in data["cases"]} == {"rademacher", "gaussian"}
    for case in data["cases"]:
        spec = ProjectionSpec.from_dict(case["spec"])
        assert spec.fingerprint() == case["fingerprint"]
        for entry in case["layers"]:
            p_in, p_out = projection_matrices(spec, entry["name"], torch.float64)
            for side, matrix in (("in", p_in), ("out", p_out)):
                expected = entry[side]
                key = reference_key(spec.seed, entry["name"], side)
                assert f"{key:032x}" == expected["philox_key_hex"]
                raw = [f"{w:016x}" for w in philox_words(key, 4)]
                assert raw == expected["first_raw_words_hex"]
                values = matrix.numpy()
                assert list(values.shape) == expected["shape"]
                first = [float.fromhex(x) for x in expected["first_entries"]]
                np.testing.assert_allclose(values.reshape(-1)[:8], first, rtol=0, atol=1e-13)
                digest = hashlib.sha256(values.astype("<f8").tobytes()).hexdigest()
                assert digest == expected["sha256"]


_HASH_SNIPPET = """
import hashlib, json, sys, torch
from tip_fed.core.projection import ProjectionSpec, projection_matrices
spec = ProjectionSpec.from_dict(json.loads(sys.argv[1]))
h = hashlib.sha256()
for layer in spec.layers:
    for m in projection_matrices(spec, layer, torch.float32):
        h.update(m.numpy().tobytes())
print(h.hexdigest())
"""


def matrices_hash(spec: ProjectionSpec) -> str:
    digest = hashlib.sha256()
    for layer in spec.layers:
        for matrix in projection_matrices(spec, layer, torch.float32):
            digest.update(matrix.numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_matrices_identical_in_another_process(kind: str) -> None:
    spec = ProjectionSpec(
        layers=(LayerProjection("x", 300, 200, 16, 8), LayerProjection("y.z", 64, 2, 64, 2)),
        seed=123456789,
        kind=kind,
    )
    result = subprocess.run(
        [sys.executable, "-c", _HASH_SNIPPET, json.dumps(spec.to_dict())],
        capture_output=True, text=True, check=True, timeout=120,
    )
    assert result.stdout.strip() == matrices_hash(spec)


# ----------------------------------------------------------------- statistics


def projected_inner(seed: int, kind: str, x: np.ndarray, y: np.ndarray, ranks: tuple[int, int]):
    layer = LayerProjection("layer", x.shape[1], x.shape[0], ranks[0], ranks[1])
    spec = ProjectionSpec(layers=(layer,), seed=seed, kind=kind)
    p_in, p_out = (m.numpy() for m in projection_matrices(spec, layer, torch.float64))
    return float(np.sum((p_out @ x @ p_in.T) * (p_out @ y @ p_in.T)))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_inner_products_preserved_in_expectation(kind: str) -> None:
    # Prepare: weight-gradient-shaped x, y ([out, in]) with a clear positive inner product.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 8))
    y = x + rng.normal(size=(6, 8))
    exact = float(np.sum(x * y))
    # Execute
    samples = {
        ranks: np.array([projected_inner(s, kind, x, y, ranks) for s in range(1500)])
        for ranks in ((2, 2), (6, 6))
    }
    # Assert: unbiased within 5 standard errors, variance shrinks with rank.
    for values in samples.values():
        standard_error = values.std(ddof=1) / math.sqrt(len(values))
        assert abs(values.mean() - exact) < 5 * standard_error
    assert samples[(6, 6)].var() < 0.6 * samples[(2, 2)].var()


def test_gaussian_entries_have_normal_moments() -> None:
    spec = ProjectionSpec(layers=(LayerProjection("g", 5000, 4, 40, 4),), seed=1, kind="gaussian")
    p_in, _ = projection_matrices(spec, "g", torch.float64)
    z = p_in.numpy().reshape(-1) * math.sqrt(40)  # unit variance
    assert abs(z.mean()) < 0.01
    assert abs(z.var() - 1.0) < 0.01
    assert abs(np.mean(z**4) - 3.0) < 0.05
    assert abs(np.mean(z > 1.0) - 0.158655) < 0.003


# ----------------------------------------------------------------- exact and well-conditioned


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_full_rank_side_is_the_identity_and_lower_ranks_are_orthonormal(kind: str) -> None:
    # Prepare: a layer clipped to its size on the out side, projected on the in side.
    layer = LayerProjection("head", 40, 2, 8, 2)
    for seed in range(20):
        spec = ProjectionSpec(layers=(layer,), seed=seed, kind=kind)
        # Execute
        p_in, p_out = (m.numpy() for m in projection_matrices(spec, layer, torch.float64))
        # Assert: exact on the full side; all singular values sqrt(40/8) below.
        assert np.array_equal(p_out, np.eye(2))
        singular = np.linalg.svd(p_in, compute_uv=False)
        np.testing.assert_allclose(singular, math.sqrt(40 / 8), rtol=1e-13)


def test_two_logit_output_layer_is_never_dropped() -> None:
    """A 2-class softmax gradient lies along [1, -1]; a ±1 square P_out zeroed it for some seeds."""
    # Prepare: healthcare-shaped model, MLP [10, 16, 2], clipped rank 8.
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)
    ).double()
    x = torch.randn(12, 10, dtype=torch.float64)
    y = torch.randint(0, 2, (12,))
    exact = []
    for i in range(12):  # explicit per-sample weight gradient of the output layer
        loss = torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        weight, bias = torch.autograd.grad(loss, [model[2].weight, model[2].bias])
        exact.append(torch.cat([weight, bias[:, None]], 1))  # bias: the constant-1 input column
    for seed in range(8):
        spec = ProjectionSpec.for_model(model, rank=8, seed=seed)
        out_layer = spec.layer("2")
        assert out_layer.rank_out == out_layer.out_features == 2
        p_in, p_out = projection_matrices(spec, out_layer, torch.float64)
        # Execute
        grads = projected_grads(model, spec, "classification", {"x": x, "y": y})
        block = grads[:, spec.offsets()[1]:].reshape(12, 2, 8)
        # Assert: the block is the exact gradient projected on the in side only, never zero.
        for i in range(12):
            torch.testing.assert_close(block[i], exact[i] @ p_in.T, rtol=1e-10, atol=1e-12)
        assert torch.equal(p_out, torch.eye(2, dtype=torch.float64))
        assert float(block.norm()) > 0.1 * float(torch.stack(exact).norm())


# ----------------------------------------------------------------- spec


def test_spec_layout_roundtrip_and_fingerprint() -> None:
    spec = small_spec()
    assert spec.dim == 4 * 3 + 2 * 3
    assert spec.offsets() == (0, 12)
    assert spec.layers[0].dim == 12
    again = ProjectionSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.fingerprint() == spec.fingerprint()
    assert len({small_spec().fingerprint(), small_spec(seed=8).fingerprint(),
                small_spec("gaussian").fingerprint()}) == 3


def test_matrices_dtype_and_copies() -> None:
    spec = small_spec("gaussian")
    p32, _ = projection_matrices(spec, "a.fc1")
    p64, _ = projection_matrices(spec, "a.fc1", torch.float64)
    assert p32.dtype == torch.float32 and p64.shape == (4, 12)
    assert torch.equal(p32, p64.float())
    p64.zero_()  # must not corrupt the cache
    assert torch.equal(projection_matrices(spec, "a.fc1", torch.float64)[0].float(), p32)
    rademacher, _ = projection_matrices(small_spec(), "a.fc1", torch.float64)
    assert torch.allclose(rademacher @ rademacher.T, torch.eye(4, dtype=torch.float64) * 12 / 4)
    with pytest.raises(ConfigError):
        projection_matrices(spec, "a.fc1", torch.float16)
    with pytest.raises(ConfigError):
        projection_matrices(spec, "missing")


class TwoLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        self.head = torch.nn.Linear(3, 2)


def test_for_model_finds_linear_layers_in_order_with_clipped_ranks() -> None:
    spec = ProjectionSpec.for_model(TwoLayer(), rank=4, seed=3)
    rows = [
        (layer.name, layer.in_features, layer.out_features, layer.rank_in, layer.rank_out, layer.bias)
        for layer in spec.layers
    ]
    assert rows == [("body.0", 5, 16, 4, 4, True), ("body.2", 16, 3, 4, 3, True), ("head", 3, 2, 4, 2, True)]
    assert spec.layer("head").in_dim == 4  # in_features + the bias column: clipped to 4, not 3
    unbiased = ProjectionSpec.for_model(TwoLayer(), rank=4, seed=3, bias=False)
    assert [(layer.rank_in, layer.bias) for layer in unbiased.layers] == [(4, False), (4, False), (3, False)]
    mixed = TwoLayer()
    mixed.head = torch.nn.Linear(3, 2, bias=False)
    assert [layer.bias for layer in ProjectionSpec.for_model(mixed, rank=4).layers] == [True, True, False]
    tuple_spec = ProjectionSpec.for_model(TwoLayer(), rank=(2, 5), include=["body.*"])
    assert [(layer.rank_in, layer.rank_out) for layer in tuple_spec.layers] == [(2, 5), (2, 3)]
    with pytest.raises(ModelError, match="matched"):
        ProjectionSpec.for_model(TwoLayer(), include=["nothing*"])
    with pytest.raises(ModelError):
        ProjectionSpec.for_model(torch.nn.ReLU())
    with pytest.raises(ConfigError):
        ProjectionSpec.for_model(TwoLayer(), rank=0)


def test_for_model_finds_transformers_conv1d() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=8))
    spec = ProjectionSpec.for_model(model, rank=2, include=["*.mlp.*", "*attn.c_attn"])
    dims = {layer.name: (layer.in_features, layer.out_features) for layer in spec.layers}
    assert all(layer.bias and layer.in_dim == layer.in_features + 1 for layer in spec.layers)
    assert dims == {
        "transformer.h.0.attn.c_attn": (8, 24),
        "transformer.h.0.mlp.c_fc": (8, 32),
        "transformer.h.0.mlp.c_proj": (32, 8),
    }


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda d: d.pop("seed"), DataError),
        (lambda d: d.update(extra=1), DataError),
        (lambda d: d.update(kind="sparse"), ConfigError),
        (lambda d: d.update(seed=-1), ConfigError),
        (lambda d: d.update(seed="7"), ConfigError),
        (lambda d: d.update(version=1), ConfigError),
        (lambda d: d.update(generator="torch"), ConfigError),
        (lambda d: d.update(layers=[]), ConfigError),
        (lambda d: d.update(layers="x"), DataError),
        (lambda d: d["layers"][0].update(rank_in=13), ConfigError),
        (lambda d: d["layers"][0].update(rank_out=0), ConfigError),
        (lambda d: d["layers"][0].pop("name"), DataError),
        (lambda d: d["layers"][0].pop("bias"), DataError),
        (lambda d: d["layers"][1].update(bias=1), ConfigError),
        (lambda d: d["layers"][1].update(rank_in=11), ConfigError),
        (lambda d: d["layers"].append(dict(d["layers"][0])), ConfigError),
    ],
)
def test_from_dict_rejects_bad_specs(mutate, error) -> None:
    data = json.loads(json.dumps(small_spec().to_dict()))
    mutate(data)
    with pytest.raises(error):
        ProjectionSpec.from_dict(data)


def test_from_dict_rejects_non_mapping() -> None:
    with pytest.raises(DataError):
        ProjectionSpec.from_dict([1, 2])  # type: ignore[arg-type]


# ----------------------------------------------------------------- the published vector


def write_vector(path: Path = VECTOR) -> None:
    """Regenerate ``projection_vector.json``: run this file as a script.

    Keys, raw words and first entries come from this module's independent reference (pure
    Python Philox, numpy QR); only ``sha256`` (bit-exactness) is taken from tip_fed itself.
    """
    layers = (LayerProjection("encoder.layer.0.dense", 10, 6, 3, 2, True), LayerProjection("lm_head", 5, 7, 5, 4))
    cases = []
    for kind in ("rademacher", "gaussian"):
        spec = ProjectionSpec(layers=layers, seed=42, kind=kind)
        entries = []
        for layer in spec.layers:
            entry: dict[str, object] = {"name": layer.name}
            ours = projection_matrices(spec, layer, torch.float64)
            sides = (("in", layer.rank_in, layer.in_dim), ("out", layer.rank_out, layer.out_features))
            for (side, rank, features), matrix in zip(sides, ours, strict=True):
                key = reference_key(spec.seed, layer.name, side)
                ref = reference_matrix(spec.seed, kind, layer.name, side, rank, features)
                entry[side] = {
                    "philox_key_hex": f"{key:032x}",
                    "first_raw_words_hex": [f"{w:016x}" for w in philox_words(key, 4)],
                    "shape": [rank, features],
                    "first_entries": [float(x).hex() for x in ref.reshape(-1)[:8]],
                    "sha256": hashlib.sha256(matrix.numpy().astype("<f8").tobytes()).hexdigest(),
                }
            entries.append(entry)
        cases.append({"spec": spec.to_dict(), "fingerprint": spec.fingerprint(), "layers": entries})
    description = (
        "tip_fed projection generator v2 test vector: see tip_fed/core/projection.py. "
        "first_entries: float64 (float.hex), row-major, first 8 of each matrix, from an "
        "independent computation (pure-Python Philox, numpy QR); agree to 1e-13. sha256: over "
        "tip_fed's whole float64 matrix as little-endian bytes, row-major (bit-exactness)."
    )
    path.write_text(json.dumps({"description": description, "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    write_vector()
