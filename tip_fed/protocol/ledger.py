"""Per-buyer privacy ledger of a long-lived seller: what every buyer has been told, composed.

Why: a per-session query budget means nothing when sessions are free. A seller therefore charges
every answered query to the buyer that asked (its authenticated identity: the mTLS client
certificate or the Flower node; every unauthenticated buyer shares one identity) and refuses once
the composed guarantee would exceed the lifetime budget. Composition is done by Google's
``dp-accounting`` Renyi-DP accountant, never by hand: each answered query is one
``GaussianDpEvent(noise_multiplier)``. (Its privacy-loss-distribution accountant is ~10 % tighter
but takes 0.3-4 s per composition, which a seller would pay on every Offer; RDP takes ~0.5 ms.)

The ledger also remembers every public key it answered, with its session: the same key under a
new session is refused, because publishing decryptions under one key across sessions is the
IND-CPA-D setting (a buyer can always make a fresh public key for an old secret key; this check
catches accidental reuse, the fresh-key rule in the buyer catches the rest on the buyer's side).

Exact (noise-free) releases cannot be composed into a finite epsilon. They are recorded and
counted, and refused once ``max_exact`` is reached for that buyer (``None`` = not limited).

Persistence: one JSON file, rewritten atomically (temp file, fsync, rename) under a file lock
(``filelock``) so that a crash never leaves half a ledger and two seller processes sharing one
file never lose a charge. A charge is written before the reply leaves the seller.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dp_accounting
from dp_accounting.rdp import RdpAccountant
from filelock import FileLock, Timeout

from tip_fed.errors import BudgetExceededError, ConfigError, DataError, SessionError
from tip_fed.protocol.audit import write_private

#: Identity every buyer without an authenticated peer shares.
ANONYMOUS = "<unauthenticated>"
_VERSION = 1


class PrivacyBudgetExhaustedError(BudgetExceededError):
    """A buyer's lifetime privacy budget at this seller is spent."""


class KeyReuseError(SessionError):
    """A public key this seller already answered under another session came back."""


@dataclass(frozen=True)
class LedgerPolicy:
    """Lifetime budget per buyer identity: (epsilon, delta) composed over all answered queries."""

    epsilon: float = 8.0
    delta: float = 1e-5
    max_exact: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ConfigError(f"ledger lifetime epsilon must be a finite number > 0, got {self.epsilon!r}")
        if not (math.isfinite(self.delta) and 0 < self.delta < 1):
            raise ConfigError(f"ledger lifetime delta must be in (0, 1), got {self.delta!r}")
        if self.max_exact is not None and self.max_exact < 0:
            raise ConfigError(f"ledger max_exact must be >= 0 or unset, got {self.max_exact!r}")


def composed_epsilon(multipliers: dict[float, int], delta: float) -> float:
    """Epsilon at ``delta`` of ``count`` Gaussian mechanisms per noise multiplier (RDP accountant)."""
    if not multipliers:
        return 0.0
    accountant = RdpAccountant()
    for m, count in sorted(multipliers.items()):
        accountant.compose(dp_accounting.GaussianDpEvent(m), count)
    return float(accountant.get_epsilon(delta))


class PrivacyLedger:
    """Charges answered queries to buyer identities; in memory, or persisted at ``path``."""

    def __init__(self, path: str | Path | None = None, policy: LedgerPolicy | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.policy = policy or LedgerPolicy()
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {"version": _VERSION, "buyers": {}, "keys": {}}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file_lock = FileLock(str(self.path) + ".lock", timeout=30)
            with self._locked():
                pass  # load (and validate) now: a broken ledger must stop the seller at start

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Thread lock, plus the file lock and a fresh read of the file when persisted."""
        with self._lock:
            if self.path is None:
                yield
                return
            try:
                with self._file_lock:
                    self._state = _load(self.path)
                    yield
            except Timeout:
                raise DataError(f"privacy ledger {self.path} is locked by another process for 30 s") from None

    def spent(self, buyer: str | None) -> tuple[float, int]:
        """(composed epsilon at the lifetime delta, exact releases) charged to ``buyer`` so far."""
        with self._locked():
            entry = self._state["buyers"].get(buyer or ANONYMOUS)
        if entry is None:
            return 0.0, 0
        return composed_epsilon(_multipliers(entry), self.policy.delta), int(entry["exact"])

    def charge(self, *, buyer: str | None, key: str, session_id: str, noise_multiplier: float | None) -> float:
        """Charge one answered query, or refuse it. Returns the buyer's composed epsilon after it.

        Raises KeyReuseError for a known public key under a new session, and
        PrivacyBudgetExhaustedError when the lifetime budget (or the exact-release limit) would be
        exceeded; nothing is recorded then.
        """
        who = buyer or ANONYMOUS
        with self._locked():
            owner = self._state["keys"].get(key)
            if owner is not None and owner != session_id:
                raise KeyReuseError(
                    f"this seller already answered public key {key[:12]}… in session {owner[:8]}…; every "
                    "session needs a fresh key pair (reusing one lets decryptions be combined across sessions)"
                )
            entry = self._state["buyers"].get(who, {"gaussian": {}, "exact": 0, "sessions": 0})
            mult = _multipliers(entry)
            if noise_multiplier is None:
                limit = self.policy.max_exact
                if limit is not None and entry["exact"] + 1 > limit:
                    raise PrivacyBudgetExhaustedError(
                        f"buyer {who!r} already received {entry['exact']} exact (noise-free) answers from this "
                        f"seller, its limit; ask for differential-privacy noise (dp-epsilon) instead"
                    )
                eps = composed_epsilon(mult, self.policy.delta)
                entry["exact"] += 1
            else:
                if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
                    raise ConfigError(f"noise multiplier must be a finite number > 0, got {noise_multiplier!r}")
                mult[noise_multiplier] = mult.get(noise_multiplier, 0) + 1
                eps = composed_epsilon(mult, self.policy.delta)
                if eps > self.policy.epsilon:
                    raise PrivacyBudgetExhaustedError(
                        f"buyer {who!r} has spent its lifetime privacy budget at this seller: one more answer "
                        f"would compose to epsilon {eps:.3g} > {self.policy.epsilon:g} at delta "
                        f"{self.policy.delta:g}; nothing more will be answered to this buyer"
                    )
                entry["gaussian"] = {repr(m): c for m, c in mult.items()}
            if owner is None:
                entry["sessions"] += 1
            entry["updated"] = time.time()
            self._state["buyers"][who] = entry
            self._state["keys"][key] = session_id
            if self.path is not None:
                write_private(self.path, json.dumps(self._state, sort_keys=True) + "\n")
            return eps


def _multipliers(entry: dict[str, Any]) -> dict[float, int]:
    return {float(m): int(c) for m, c in entry.get("gaussian", {}).items()}


def _load(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"version": _VERSION, "buyers": {}, "keys": {}}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"privacy ledger {path} is not valid JSON ({exc}); restore it from a backup") from None
    ok = (
        isinstance(state, dict)
        and state.get("version") == _VERSION
        and isinstance(state.get("buyers"), dict)
        and isinstance(state.get("keys"), dict)
    )
    if not ok:
        raise DataError(f"privacy ledger {path} is not a version-{_VERSION} tip-fed ledger; restore it from a backup")
    return state
