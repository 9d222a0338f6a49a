"""Run independent per-block work on several cores with fork: the parent plus forked children.

TenSEAL's sealapi bindings hold the GIL for the whole of every call (benchmarks/gil_probe.py: a
second Python thread cannot run during ``rotate_vector``, ``multiply_plain`` or ``encode``), so a
thread pool cannot put a second core to work on CKKS evaluation. Forked children can: each
inherits the seller's loaded context, query ciphertexts and cached encodings copy-on-write
(nothing is re-serialised on the way in) and pipes back only its reply bytes, while the parent
works through its own share. A fork costs about 0.1 s for a 1 GB process (page tables), so this
pays off only with several blocks. Without ``os.fork``, or with one worker or one item, the
work runs inline, in order.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["default_workers", "map_forked"]


def default_workers() -> int:
    """Cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _child(fn: Callable[..., Any], items: Sequence[tuple[Any, ...]], share: list[int], fd: int) -> None:
    """Forked side: compute the share, pickle ("ok", results) or ("error", exception), exit."""
    try:
        try:
            payload: tuple[str, Any] = ("ok", [fn(*items[i]) for i in share])
        except BaseException as exc:
            payload = ("error", exc)
        with os.fdopen(fd, "wb") as fh:
            try:
                data = pickle.dumps(payload)
            except Exception:
                data = pickle.dumps(("error", RuntimeError(repr(payload[1]))))
            fh.write(data)
    finally:
        os._exit(0)  # never return into the caller's stack (e.g. a test runner) in the child


def map_forked(fn: Callable[..., Any], items: Sequence[tuple[Any, ...]], workers: int) -> list[Any]:
    """``[fn(*item) for item in items]`` over up to ``workers`` processes (this one included), in order."""
    n = min(int(workers), len(items))
    if n <= 1 or not hasattr(os, "fork"):
        return [fn(*item) for item in items]
    shares = [list(range(i, len(items), n)) for i in range(n)]  # round-robin: partial block last
    children: list[tuple[int, int, list[int]]] = []
    out: list[Any] = [None] * len(items)
    try:
        for share in shares[1:]:
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                _child(fn, items, share, write_fd)
            os.close(write_fd)
            children.append((pid, read_fd, share))
        for i in shares[0]:
            out[i] = fn(*items[i])
    finally:
        results = []
        for pid, read_fd, share in children:
            with os.fdopen(read_fd, "rb") as fh:
                data = fh.read()
            os.waitpid(pid, 0)
            results.append((share, data))
    for share, data in results:
        if not data:
            raise RuntimeError("a worker process died")
        # The bytes come from our own forked child over a private pipe, never from a peer.
        status, payload = pickle.loads(data)  # noqa: S301
        if status != "ok":
            raise payload
        for i, value in zip(share, payload, strict=True):
            out[i] = value
    return out
