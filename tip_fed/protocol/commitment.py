"""Seller commitments: a Merkle tree over (sample, projected gradient) leaves.

The seller sends only the root with its scores. After a purchase it delivers the data; the buyer
recomputes the leaves and the root, so data swapped after scoring is detected, and any single
sample can be proven with a log-size path.

The commitment is hiding: every leaf hash also takes a 32-byte salt of its own, derived from a
fresh per-session salt seed that the seller keeps and reveals only at delivery (like its noise
seed). Without salts the root is a deterministic function of the records at the buyer's model, so
a buyer that knows every record but one recomputes the root for each candidate and tells
neighbouring datasets apart whatever DP noise the scores carry. An opened record (spot check)
travels with its own salt only, so the other leaves stay hidden.

The root also binds the record count: the published root is ``H(0x02 ‖ n ‖ tree root)``, and a
proof is checked for one leaf *position* in a tree of exactly n leaves (its left/right bits follow
from the index, its length from n). A seller that declares more records than it committed to, or
opens leaf i mod n' for a requested index i, has no valid proof.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence

import numpy as np
import torch

LEAF = b"\x00"
NODE = b"\x01"
ROOT = b"\x02"
SALT_BYTES = 32
_SALT_LABEL = b"tip-fed/v1/leaf-salt/"


def new_salt_seed() -> bytes:
    """A fresh per-session salt seed from OS entropy."""
    return secrets.token_bytes(SALT_BYTES)


def record_salt(salt_seed: bytes, index: int) -> bytes:
    """Salt of leaf ``index``: HMAC-SHA256 of the index under the session's salt seed."""
    if len(salt_seed) != SALT_BYTES:
        raise ValueError(f"a salt seed is {SALT_BYTES} bytes, got {len(salt_seed)}")
    return hmac.new(salt_seed, _SALT_LABEL + index.to_bytes(8, "big"), hashlib.sha256).digest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    arr = t.detach().cpu().contiguous().numpy()
    header = f"{arr.dtype.str}{arr.shape}".encode()
    return len(header).to_bytes(2, "big") + header + arr.tobytes()


def sample_bytes(batch: Mapping[str, torch.Tensor], i: int) -> bytes:
    """Canonical bytes of sample ``i`` of a dict-of-tensors batch (keys sorted)."""
    return b"".join(k.encode() + b"=" + _tensor_bytes(batch[k][i]) for k in sorted(batch))


def leaf_hash(sample: bytes, gradient: np.ndarray, salt: bytes) -> bytes:
    """Hash binding one sample to its projected gradient (float64 bytes), hidden by its salt."""
    if len(salt) != SALT_BYTES:
        raise ValueError(f"a leaf salt is {SALT_BYTES} bytes, got {len(salt)}")
    g = np.ascontiguousarray(gradient, dtype=np.float64).tobytes()
    return hashlib.sha256(LEAF + salt + len(sample).to_bytes(8, "big") + sample + g).digest()


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Root of the binary Merkle tree over ``leaves`` (odd nodes are promoted unchanged)."""
    if not leaves:
        return hashlib.sha256(NODE).digest()
    level = list(leaves)
    while len(level) > 1:
        nxt = [hashlib.sha256(NODE + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def bound_root(n: int, tree_root: bytes) -> bytes:
    """The published root: the Merkle tree root bound to its leaf count ``n``."""
    if n < 0:
        raise ValueError(f"a leaf count is >= 0, got {n}")
    return hashlib.sha256(ROOT + n.to_bytes(8, "big") + tree_root).digest()


def leaves(batch: Mapping[str, torch.Tensor], gradients: np.ndarray, salt_seed: bytes) -> list[bytes]:
    """Salted leaf hashes of every (sample, gradient) pair of a seller's data."""
    return [leaf_hash(sample_bytes(batch, i), gradients[i], record_salt(salt_seed, i))
            for i in range(int(gradients.shape[0]))]


def commit(batch: Mapping[str, torch.Tensor], gradients: np.ndarray, salt_seed: bytes) -> bytes:
    """Root over every (sample, gradient) pair of a seller's data, salted by ``salt_seed`` and bound
    to their count."""
    hashed = leaves(batch, gradients, salt_seed)
    return bound_root(len(hashed), merkle_root(hashed))


def commit_fresh(batch: Mapping[str, torch.Tensor], gradients: np.ndarray) -> tuple[bytes, bytes]:
    """(root, salt seed) of a new commitment: :func:`commit` under a fresh salt seed, which the
    seller reveals only with the purchased records."""
    salt_seed = new_salt_seed()
    return commit(batch, gradients, salt_seed), salt_seed


def merkle_proof(leaves: Sequence[bytes], index: int) -> list[tuple[bytes, bool]]:
    """Authentication path of leaf ``index``: (sibling hash, sibling is on the left) per level.

    Levels where the node is the odd one out (promoted unchanged) contribute nothing.
    """
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf {index} out of range for {len(leaves)} leaves")
    path: list[tuple[bytes, bool]] = []
    level, i = list(leaves), index
    while len(level) > 1:
        sibling = i ^ 1
        if sibling < len(level):
            path.append((level[sibling], sibling < i))
        nxt = [hashlib.sha256(NODE + level[j] + level[j + 1]).digest() for j in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level, i = nxt, i // 2
    return path


def path_shape(index: int, n: int) -> list[bool]:
    """Sibling-is-left bits of the path of leaf ``index`` in a tree of ``n`` leaves, one per level
    where the node has a sibling (levels where it is promoted unchanged have none)."""
    if not 0 <= index < n:
        raise IndexError(f"leaf {index} out of range for {n} leaves")
    bits: list[bool] = []
    i, size = index, n
    while size > 1:
        if i ^ 1 < size:
            bits.append(bool(i & 1))
        i, size = i // 2, (size + 1) // 2
    return bits


def verify_proof(root: bytes, leaf: bytes, path: Sequence[tuple[bytes, bool]], index: int, n: int) -> bool:
    """True when ``path`` leads from ``leaf``, at position ``index`` of a tree of ``n`` leaves, to the
    published ``root``: the path's length and left/right bits must be those of that position, so one
    leaf cannot be opened at another index, nor a tree of fewer leaves pass for n."""
    try:
        shape = path_shape(index, n)
    except IndexError:
        return False
    if len(path) != len(shape) or any(
        len(sibling) != len(leaf) or bool(left) != want for (sibling, left), want in zip(path, shape, strict=True)
    ):
        return False
    node = leaf
    for sibling, left in path:
        node = hashlib.sha256(NODE + (sibling + node if left else node + sibling)).digest()
    return bound_root(n, node) == root
