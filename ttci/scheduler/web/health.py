"""The scheduler's readiness checks (GET /readyz, ttci/infra/health.py): its database takes
writes. How many hosts are up, and which replica holds each background loop's lease, are shown,
never a failure: with no host up the scheduler still takes requests (they wait in the queue)."""

from __future__ import annotations

from ttci.infra.health import Check, store_writable
from ttci.scheduler.service import Scheduler

__all__ = ["scheduler_checks"]


def scheduler_checks(scheduler: Scheduler) -> dict[str, Check]:
    def hosts() -> str:
        with scheduler.store.lock:
            rows = scheduler.store.db.execute("select state from hosts").fetchall()
        up = sum(1 for (state,) in rows if state == "up")
        return f"{up} of {len(rows)} up"

    def leases() -> str:
        """Which replica runs each background loop (a detail, never a failure)."""
        held = scheduler.leases.holders()
        parts = [
            f"{n}: {'this replica' if h['mine'] else h['holder']}"
            + ("" if h["live"] else " (expired)")
            for n, h in sorted(held.items())
        ]
        return "; ".join(parts) or "none taken yet"

    return {
        "database": lambda: store_writable(scheduler.store),
        "hosts": hosts,
        "leases": leases,
    }
