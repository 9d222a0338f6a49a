"""Commitments bind each sample to its gradient; any change moves the root."""

import hashlib

import numpy as np
import torch

from tip_fed.protocol import commitment


def _data():
    return {"x": torch.arange(12, dtype=torch.float32).reshape(4, 3), "y": torch.tensor([0, 1, 0, 1])}


SEED = bytes(range(32))


def test_root_is_deterministic_and_sensitive():
    data, g = _data(), np.arange(8, dtype=float).reshape(4, 2)
    root = commitment.commit(data, g, SEED)
    assert root == commitment.commit(_data(), g.copy(), SEED) and len(root) == 32
    assert commitment.commit(data, g, commitment.new_salt_seed()) != root  # salted: the same data, another root
    swapped = _data()
    swapped["y"][2] = 1
    assert commitment.commit(swapped, g, SEED) != root
    g2 = g.copy()
    g2[3, 1] *= 3
    assert commitment.commit(data, g2, SEED) != root
    assert commitment.commit({"x": data["x"][[1, 0, 2, 3]], "y": data["y"][[1, 0, 2, 3]]}, g, SEED) != root


def test_merkle_root_matches_hand_computation():
    leaves = [hashlib.sha256(bytes([i])).digest() for i in range(3)]
    h = lambda a, b: hashlib.sha256(b"\x01" + a + b).digest()  # noqa: E731
    assert commitment.merkle_root(leaves) == h(h(leaves[0], leaves[1]), leaves[2])
    assert commitment.merkle_root(leaves[:1]) == leaves[0]


def test_the_bound_root_matches_hand_computation():
    leaves = [hashlib.sha256(bytes([i])).digest() for i in range(3)]
    tree = commitment.merkle_root(leaves)
    assert commitment.bound_root(3, tree) == hashlib.sha256(b"\x02" + (3).to_bytes(8, "big") + tree).digest()
    batch = {"x": torch.arange(6, dtype=torch.float32).reshape(3, 2)}
    g, seed = np.ones((3, 2)), bytes(range(32))
    hashed = commitment.leaves(batch, g, seed)
    assert commitment.commit(batch, g, seed) == commitment.bound_root(3, commitment.merkle_root(hashed))
