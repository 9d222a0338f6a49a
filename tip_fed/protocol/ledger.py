"""Per-buyer privacy ledger of a long-lived seller: what every buyer has been told, composed.

Why: a per-session query budget means nothing when sessions are free. A seller therefore charges
every answered query to the buyer that asked (its authenticated identity: the client certificate
verified under mutual TLS; every other buyer, whatever its network address or Flower run, shares
the one identity :data:`ANONYMOUS`, since a buyer can call from as many addresses as it likes)
and refuses once the composed guarantee would exceed the lifetime budget. Composition is done by Google's
``dp-accounting`` Renyi-DP accountant, never by hand: each answered query is one
``GaussianDpEvent(noise_multiplier)``. (Its privacy-loss-distribution accountant is ~10 % tighter
but takes 0.3-4 s per composition, which a seller would pay on every Offer; RDP takes ~0.5 ms.)

The ledger also remembers every public key it answered, with its session: the same key under a
new session is refused, because publishing decryptions under one key across sessions is the
IND-CPA-D setting (a buyer can always make a fresh public key for an old secret key; this check
catches accidental reuse, the fresh-key rule in the buyer catches the rest on the buyer's side).

Identities are cheap for a buyer that controls a certificate authority the seller trusts, and
buyers may collude, so every charge is also composed into one seller-wide account over ALL buyers:
the dataset's total privacy loss, refused once ``total_epsilon`` at ``total_delta`` would be
exceeded. The per-buyer budget keeps one buyer from spending everyone's share.

Exact (noise-free) releases cannot be composed into a finite epsilon: each one is an exact linear
functional of the clipped gradients, and enough of them rebuild the gradient sum (or, with a trap
model, records). They are counted per buyer and seller-wide and refused past ``max_exact`` (default
1 per buyer) and ``total_max_exact`` (default 16 over all buyers): without DP this count is the
only guarantee a seller has.

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
from tip_fed.files import write_private

#: Identity every buyer without an authenticated peer shares.
ANONYMOUS = "<unauthenticated>"
_VERSION = 1
#: A seller serving a data file keeps its ledger in ``<data file>`` + this unless its ``ledger`` setting names one.
LEDGER_SUFFIX = ".ledger.json"


def default_ledger(data_path: str | Path) -> Path:
    """Where a seller serving ``data_path`` (``tip-fed seller serve``, a Flower SuperNode) keeps its privacy
    ledger when its ``ledger`` setting names none: beside the data it accounts for, so a restarted seller
    reads the budgets its buyers already spent."""
    path = Path(data_path)
    return path.with_name(path.name + LEDGER_SUFFIX)


class PrivacyBudgetExhaustedError(BudgetExceededError):
    """A buyer's lifetime privacy budget at this seller is spent."""


class KeyReuseError(SessionError):
    """A public key this seller already answered under another session came back."""


@dataclass(frozen=True)
class LedgerPolicy:
    """Lifetime budgets: per buyer identity and seller-wide (all buyers together), composed over all
    answered queries; exact (noise-free) answers counted per buyer and seller-wide (None = unlimited)."""

    epsilon: float = 8.0
    delta: float = 1e-5
    max_exact: int | None = 1
    total_epsilon: float = 16.0
    total_delta: float = 1e-5
    total_max_exact: int | None = 16

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ConfigError(f"ledger lifetime epsilon must be a finite number > 0, got {self.epsilon!r}")
        if not (math.isfinite(self.delta) and 0 < self.delta < 1):
            raise ConfigError(f"ledger lifetime delta must be in (0, 1), got {self.delta!r}")
        if not (math.isfinite(self.total_epsilon) and self.total_epsilon > 0):
            raise ConfigError(
                f"ledger total (seller-wide) epsilon must be a finite number > 0, got {self.total_epsilon!r}"
            )
        if not (math.isfinite(self.total_delta) and 0 < self.total_delta < 1):
            raise ConfigError(f"ledger total (seller-wide) delta must be in (0, 1), got {self.total_delta!r}")
        for name in ("max_exact", "total_max_exact"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"ledger {name} must be >= 0 or unset, got {value!r}")


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
        self._state: dict[str, Any] = _empty()
        if self.path is not None:
            self._file_lock = FileLock(str(self.path) + ".lock", timeout=30)
            with self._locked():
                pass  # load (and validate) now: a broken or unwritable ledger must stop the seller at start

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Thread lock, plus the file lock and a fresh read of the file when persisted."""
        with self._lock:
            if self.path is None:
                yield
                return
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self._file_lock:
                    self._state = _load(self.path)
                    yield
            except Timeout:
                raise DataError(f"privacy ledger {self.path} is locked by another process for 30 s") from None
            except OSError as exc:  # unwritable directory, full disk: no answer leaves uncharged
                raise DataError(
                    f"privacy ledger {self.path} cannot be read or written ({exc.strerror or exc}); point the "
                    "seller's ledger setting (seller serve --ledger FILE, [seller] ledger, node config ledger=FILE) "
                    "at a file in a directory it owns"
                ) from None

    def spent(self, buyer: str | None) -> tuple[float, int]:
        """(composed epsilon at the lifetime delta, exact releases) charged to ``buyer`` so far."""
        with self._locked():
            entry = self._state["buyers"].get(buyer or ANONYMOUS)
        if entry is None:
            return 0.0, 0
        return composed_epsilon(_multipliers(entry), self.policy.delta), int(entry["exact"])

    def spent_total(self) -> tuple[float, int]:
        """(composed epsilon at the seller-wide delta, exact releases) over all buyers so far."""
        with self._locked():
            entry = self._state["total"]
        return composed_epsilon(_multipliers(entry), self.policy.total_delta), int(entry["exact"])

    def charge(self, *, buyer: str | None, key: str, session_id: str, noise_multiplier: float | None) -> float:
        """Charge one answered query, or refuse it. Returns the buyer's composed epsilon after it.

        Raises KeyReuseError for a known public key under a new session, and
        PrivacyBudgetExhaustedError when the buyer's or the seller-wide lifetime budget (or an
        exact-release limit) would be exceeded; nothing is recorded then.
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
            total = self._state["total"]
            policy = self.policy
            if noise_multiplier is None:
                _check_exact(entry, policy.max_exact, f"buyer {who!r} already received", "max_exact", "--max-exact")
                _check_exact(
                    total,
                    policy.total_max_exact,
                    "all buyers together already received",
                    "total_max_exact",
                    "--total-max-exact",
                )
                eps = composed_epsilon(_multipliers(entry), policy.delta)
                entry["exact"] += 1
                total["exact"] += 1
            else:
                if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
                    raise ConfigError(f"noise multiplier must be a finite number > 0, got {noise_multiplier!r}")
                eps, mine = _compose_one(
                    entry,
                    noise_multiplier,
                    policy.delta,
                    policy.epsilon,
                    f"buyer {who!r} has spent its lifetime privacy budget at this seller",
                    "nothing more will be answered to this buyer (LedgerPolicy.epsilon, --lifetime-epsilon)",
                )
                _, everyone = _compose_one(
                    total,
                    noise_multiplier,
                    policy.total_delta,
                    policy.total_epsilon,
                    "this seller's data has spent its seller-wide privacy budget over all buyers",
                    "nothing more will be answered to any buyer (LedgerPolicy.total_epsilon, --total-epsilon)",
                )
                _commit_multipliers(entry, mine)
                _commit_multipliers(total, everyone)
            if owner is None:
                entry["sessions"] += 1
            entry["updated"] = time.time()
            self._state["buyers"][who] = entry
            self._state["keys"][key] = session_id
            if self.path is not None:
                write_private(self.path, json.dumps(self._state, sort_keys=True) + "\n")
            return eps


def _empty() -> dict[str, Any]:
    return {"version": _VERSION, "buyers": {}, "keys": {}, "total": {"gaussian": {}, "exact": 0}}


def _check_exact(entry: dict[str, Any], limit: int | None, who: str, setting: str, flag: str) -> None:
    """Refuse one more exact (noise-free) answer past ``limit``."""
    if limit is not None and entry["exact"] + 1 > limit:
        raise PrivacyBudgetExhaustedError(
            f"{who} {entry['exact']} exact (noise-free) answers from this seller, the limit "
            f"(LedgerPolicy.{setting}, seller serve {flag}); ask for differential-privacy noise (dp-epsilon), "
            "or have the seller raise the limit"
        )


def _compose_one(
    entry: dict[str, Any], multiplier: float, delta: float, budget: float, what: str, then: str
) -> tuple[float, dict[float, int]]:
    """(epsilon, multipliers) of ``entry`` with one more Gaussian answer; refused past ``budget``."""
    mult = _multipliers(entry)
    mult[multiplier] = mult.get(multiplier, 0) + 1
    eps = composed_epsilon(mult, delta)
    if eps > budget:
        raise PrivacyBudgetExhaustedError(
            f"{what}: one more answer would compose to epsilon {eps:.4g} > {budget:g} at delta {delta:g}; {then}"
        )
    return eps, mult


def _commit_multipliers(entry: dict[str, Any], mult: dict[float, int]) -> None:
    entry["gaussian"] = {repr(m): c for m, c in mult.items()}


def _multipliers(entry: dict[str, Any]) -> dict[float, int]:
    return {float(m): int(c) for m, c in entry.get("gaussian", {}).items()}


def _load(path: Path) -> dict[str, Any]:
    if not path.exists():
        return _empty()
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
    state.setdefault("total", {"gaussian": {}, "exact": 0})  # ledgers written before the seller-wide account
    return state
