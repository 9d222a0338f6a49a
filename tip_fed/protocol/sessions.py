"""The seller's table of answered sessions: the per-session query budget, bounded in size and time.

Keyed by session id and the authenticated peer, so that an Offer from another peer carrying a
rival's session id spends only its own sender's budget, never the rival's.

Why entries expire instead of being evicted: an Offer carries no timestamp, so a seller cannot tell
an old session id from a new one, and forgetting an answered session early would let its buyer be
answered again by resending the same session id. So an entry is kept for ``window_s`` seconds after
the session was first answered and is never dropped before; while the table holds ``capacity``
live entries, Offers for *new* sessions are refused (ResourceLimitError naming
``seller-budget.kept-sessions``) rather than any answered session being forgotten. A buyer thus
gets at most the query budget per session per window; memory stays bounded (about 200 bytes per
entry, 13 MB at the default 65,536); only Offers that were answered keep an entry (the seller takes
one when it admits an Offer and gives it back if the Offer is refused later), so filling the table
costs a flooder a full valid Offer each. Across windows, the total a buyer can learn is bounded by
the seller's per-buyer privacy accounting, not by this table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping

from tip_fed.errors import BudgetExceededError
from tip_fed.protocol.resources import ResourceLimitError


def session_key(session_id: str, peer: str | None) -> str:
    """Table key: the session id alone when the carrier already identifies the buyer (in-process,
    a Flower run's own state), else ``session_id/peer``."""
    return session_id if peer is None else f"{session_id}/{peer}"


class AnsweredSessions:
    """Queries answered per (session, peer); callers hold their own lock around :meth:`spend`.

    ``counts`` may be a dict owned by the caller (a Flower ClientApp keeps it in its run state and
    passes it to every recreated Seller); it is updated in place and pruned with the table.
    """

    def __init__(
        self,
        counts: MutableMapping[str, int] | None = None,
        *,
        capacity: int = 65536,
        window_s: float = 86400.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counts: MutableMapping[str, int] = counts if counts is not None else {}
        self.capacity, self.window_s, self._clock = capacity, window_s, clock
        now = clock()
        # First-answered time of each key, in insertion (= time) order, so pruning is O(expired).
        self._stamps: dict[str, float] = {key: now for key in self.counts}

    def used(self, key: str) -> int:
        """Queries already answered under ``key``."""
        return int(self.counts.get(key, 0))

    def check(self, key: str, limit: int, seller_id: str) -> None:
        """BudgetExceededError if ``key`` has used its ``limit`` (spends nothing)."""
        used = self.used(key)
        if used >= limit:
            session = key.split("/", 1)[0]
            raise BudgetExceededError(
                f"seller {seller_id} already answered {used} quer{'y' if used == 1 else 'ies'} in session "
                f"{session[:8]}…, its budget; start a new session with fresh keys"
            )

    def spend(self, session_id: str, limit: int, seller_id: str, peer: str | None = None) -> str:
        """Check and count one more query of ``session_id`` from ``peer`` (atomic under the caller's
        lock); the table key it was counted under, for :meth:`refund`."""
        key = session_key(session_id, peer)
        self._prune()
        self.check(key, limit, seller_id)
        if key not in self.counts and len(self.counts) >= self.capacity:
            raise ResourceLimitError(
                f"this seller keeps {len(self.counts)} answered sessions from the last {self.window_s:.0f} s and "
                "forgets none of them early (that would let a session be answered twice)", "kept_sessions")
        if key not in self._stamps:
            self._stamps[key] = self._clock()
        self.counts[key] = self.used(key) + 1
        return key

    def refund(self, key: str) -> None:
        """Undo one :meth:`spend` whose query was not answered after all (scoring failed)."""
        used = self.used(key)
        if used > 1:
            self.counts[key] = used - 1
        elif used == 1:
            del self.counts[key]
            self._stamps.pop(key, None)

    def _prune(self) -> None:
        horizon = self._clock() - self.window_s
        while self._stamps:
            key, stamp = next(iter(self._stamps.items()))
            if stamp > horizon:
                break
            del self._stamps[key]
            self.counts.pop(key, None)

    def __len__(self) -> int:
        return len(self.counts)
