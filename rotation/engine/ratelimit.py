"""Quota-aware rate limit for rotation traffic: one budget per KMS provider, shared by every worker.

A rotation must never eat the request quota production traffic needs (AWS KMS shares one
quota per account and region across all cryptographic operations). So each provider has
a cap on the calls per second rotations make, all workers together, and the engine backs
off on its own when the provider throttles anyway.

**Design.** The budget is a row per provider (:class:`ProviderRateLimit`) in the database
every worker already shares, used as a GCRA ("virtual scheduling") token bucket: a batch
reserves ``calls`` in one short transaction that locks the row, gets the slot
``[start, start + calls / rate)`` and moves ``next_free_at`` past it; it then paces its
calls inside that slot. Slots never overlap, so the cap holds across any number of
workers and hosts without a clock of its own beyond the hosts' (keep them NTP-synced).
Why the database rather than Redis: it is there in every deployment (SQLite for one
host, PostgreSQL for many), the operator's cap lives in it anyway, and the cost is one
row update per batch (not per call). Reservations are taken *outside* a batch's
transaction, so the row is locked for a moment only.

**Adaptive backoff** (AIMD, as TCP does). A :class:`~keyvault.kms.Throttled` error halves
the allowed share of the cap (at most once per :data:`DECREASE_INTERVAL`, so one burst of
refusals seen by several workers halves it once), pauses every reservation until the
provider's ``retry_after`` (or :data:`DEFAULT_PAUSE`), then lets the share grow back by
:data:`RECOVERY_PER_SECOND`. A provider without a cap that throttles is limited from
then on to the rate measured when it did, scaled the same way, until it recovers fully.

**Live changes.** :func:`set_cap` (console, ``manage.py rotation rate-limit``) changes the
row; the next reservation of every worker uses it, within about :data:`BATCH_SECONDS`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from django.conf import settings
from django.db import connection, transaction

from keyvault.audit import Actor, events
from rotation.models import ProviderRateLimit

#: A batch reserves at most this many seconds of its provider's allowed rate: it holds its
#: rows locked while it paces, so a low cap makes batches smaller, not longer.
BATCH_SECONDS = 2.0
#: ... but never fewer rows than this (a remote call per row is worth a transaction).
MIN_ROWS = 10
#: A paced batch calls its provider in chunks of about this many seconds of its rate.
PACE_SECONDS = 0.25
#: Share of the cap lost per throttling error, and the floor it never goes below.
DECREASE = 0.5
MIN_FACTOR = 1 / 64
#: One halving per this many seconds: the refusals of one burst arrive together.
DECREASE_INTERVAL = 2.0
#: Share of the cap regained per second after a pause (half to full in 25 s).
RECOVERY_PER_SECOND = 0.02
#: Pause after a throttling error that did not say how long to wait.
DEFAULT_PAUSE = 1.0
#: Seconds over which the measured rate is averaged.
WINDOW_SECONDS = 5.0
#: The starting point of a provider without a cap that throttles before anything was measured.
FALLBACK_RATE = 10.0


def default_caps() -> dict[str, int]:
    """``HMD_ROTATION_RATE_LIMITS``: the cap of each provider nobody has changed in the console."""
    return dict(getattr(settings, "ROTATION_RATE_LIMITS", {}))


@dataclass(frozen=True)
class Lane:
    """One provider's part of a :class:`Grant`: its slot and its pace."""

    provider: str
    start: float
    seconds_per_row: float
    rate: float | None
    calls_per_row: int


@dataclass(frozen=True)
class Grant:
    """Rows a batch may rewrap, and when each may go (epoch seconds)."""

    rows: int
    lanes: tuple[Lane, ...]

    def ready_at(self, row: int) -> float:
        """When the call for row ``row`` (0-based) of this grant may be made."""
        return max((lane.start + row * lane.seconds_per_row for lane in self.lanes), default=0.0)

    def chunk_rows(self, total: int) -> int:
        """Rows per provider call of a paced batch: about :data:`PACE_SECONDS` of the slowest lane (all if unlimited)."""
        slowest = max((lane.seconds_per_row for lane in self.lanes), default=0.0)
        return max(1, total if slowest <= 0 else int(PACE_SECONDS / slowest))

    def wait_for(self, row: int) -> None:
        """Sleep until row ``row`` may go."""
        delay = self.ready_at(row) - time.time()
        if delay > 0:
            time.sleep(delay)


@dataclass(frozen=True)
class RateStatus:
    """What the run page and ``rotation status`` show for one provider."""

    provider: str
    cap: int | None
    cap_source: str
    allowed: float | None
    factor: float
    paused_for: float
    throttles: int
    measured: float | None

    def describe(self) -> str:
        cap = f"cap {self.cap:,} calls/s ({self.cap_source})" if self.cap else f"no cap ({self.cap_source})"
        allowed = "no limit" if self.allowed is None else f"{self.allowed:,.0f} calls/s"
        text = f"{self.provider}: {cap}; allowed now {allowed}"
        if self.factor < 1:
            text += f" ({self.factor:.0%} after {self.throttles} throttling error(s))"
        if self.paused_for > 0:
            text += f"; paused {self.paused_for:.1f} s (provider asked to wait)"
        if self.measured is not None:
            text += f"; measured {self.measured:,.0f} calls/s"
        return text

    def as_dict(self) -> dict:
        return {"provider": self.provider, "cap": self.cap, "cap_source": self.cap_source, "allowed": self.allowed,
                "factor": round(self.factor, 4), "paused_for": round(self.paused_for, 2), "throttles": self.throttles,
                "measured": None if self.measured is None else round(self.measured, 1)}


# -- reading a row ----------------------------------------------------------------------


def _cap(row: ProviderRateLimit) -> tuple[int | None, str]:
    """The cap in force (None: no cap) and where it comes from."""
    if row.cap is not None:
        return (row.cap or None), "set by an operator"
    default = default_caps().get(row.provider)
    return (default or None), "HMD_ROTATION_RATE_LIMITS default" if default else "none set"


def _factor(row: ProviderRateLimit, now: float) -> float:
    """The share allowed at ``now``: the stored one, grown back since it was set (never during a pause)."""
    if row.factor >= 1:
        return 1.0
    grown = RECOVERY_PER_SECOND * max(0.0, now - max(row.factor_since, row.blocked_until))
    return min(1.0, row.factor + grown)


def _allowed(row: ProviderRateLimit, now: float) -> float | None:
    """Calls per second allowed at ``now``; None for no limit."""
    cap, _ = _cap(row)
    factor = _factor(row, now)
    if cap:
        return max(cap * factor, 0.001)
    if factor < 1 and row.base_rate:
        return max(row.base_rate * factor, 0.001)
    return None


def _measured(row: ProviderRateLimit, now: float) -> float | None:
    """Calls per second reserved lately: the last full window, or the current one (counted over at least 1 s)."""
    elapsed = now - row.window_started
    if not row.window_started or elapsed > 2 * WINDOW_SECONDS + 10:
        return None  # nothing reserved lately
    if elapsed >= WINDOW_SECONDS or row.measured_rate is None:
        return row.window_calls / max(elapsed, 1.0)
    return row.measured_rate


def _locked(providers) -> list[ProviderRateLimit]:
    """The providers' rows, created if missing, locked in name order (no deadlock between workers).

    Inside the caller's transaction (see :func:`_pacing`).
    """
    names = sorted(set(providers))
    rows = list(ProviderRateLimit.objects.select_for_update().filter(provider__in=names).order_by("provider"))
    if len(rows) < len(names):
        for name in names:
            ProviderRateLimit.objects.get_or_create(provider=name)
        rows = list(ProviderRateLimit.objects.select_for_update().filter(provider__in=names).order_by("provider"))
    return rows


@contextmanager
def _pacing():
    """A short transaction for the bucket's bookkeeping.

    On its own (not nested in someone's transaction) it skips waiting for PostgreSQL's
    WAL flush at commit: this is pacing state, and a crash that loses its last update
    loses nothing. Nested, it leaves the caller's durability alone.
    """
    outermost = connection.get_autocommit()
    with transaction.atomic():
        if outermost and connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL synchronous_commit TO OFF")
        yield


def _count(row: ProviderRateLimit, calls: float, now: float) -> None:
    """Add ``calls`` to the measuring window (rolled over every WINDOW_SECONDS)."""
    if now - row.window_started >= WINDOW_SECONDS:
        if row.window_started and now - row.window_started < 2 * WINDOW_SECONDS + 10:
            row.measured_rate = row.window_calls / (now - row.window_started)
        row.window_started, row.window_calls = now, 0.0
    row.window_calls = max(0.0, row.window_calls + calls)


# -- the engine's side ----------------------------------------------------------------------


def reserve(costs: Mapping[str, int], rows: int, *, now: float | None = None) -> Grant:
    """Reserve calls for up to ``rows`` data keys at every provider in ``costs`` (name -> calls per key).

    The grant may be for fewer rows: at most :data:`BATCH_SECONDS` of the slowest
    provider's allowed rate (never fewer than :data:`MIN_ROWS`). Call :func:`release`
    with the rows actually used.
    """
    now = time.time() if now is None else now
    with _pacing():
        locked = _locked(costs)
        allowed = {row.provider: _allowed(row, now) for row in locked}
        for row in locked:
            if allowed[row.provider] is not None:
                fits = int(allowed[row.provider] * BATCH_SECONDS / costs[row.provider])
                rows = min(rows, max(MIN_ROWS, fits))
        lanes = []
        for row in locked:
            rate, per_row = allowed[row.provider], costs[row.provider]
            start = max(now, row.blocked_until, row.next_free_at if rate is not None else 0.0)
            seconds_per_row = per_row / rate if rate is not None else 0.0
            if rate is not None:
                row.next_free_at = start + rows * seconds_per_row
            _count(row, rows * per_row, now)
            row.save(update_fields=["next_free_at", "window_started", "window_calls", "measured_rate", "updated_at"])
            lanes.append(Lane(row.provider, start, seconds_per_row, rate, per_row))
    return Grant(rows=rows, lanes=tuple(lanes))


def release(grant: Grant, used: int, *, now: float | None = None) -> None:
    """Give back the calls of rows a grant did not use (fewer rows were left than reserved)."""
    unused = grant.rows - used
    if unused <= 0:
        return
    now = time.time() if now is None else now
    with _pacing():
        lanes = {lane.provider: lane for lane in grant.lanes}
        for row in _locked(lanes):
            lane = lanes[row.provider]
            if lane.rate is not None:
                row.next_free_at = max(now, row.next_free_at - unused * lane.seconds_per_row)
            _count(row, -unused * lane.calls_per_row, now)
            row.save(update_fields=["next_free_at", "window_started", "window_calls", "measured_rate", "updated_at"])


def throttled(providers, *, retry_after: float | None = None, now: float | None = None) -> None:
    """A provider refused calls for its quota: pause, and lower the share of the cap (AIMD)."""
    now = time.time() if now is None else now
    pause = retry_after if retry_after and retry_after > 0 else DEFAULT_PAUSE
    with _pacing():
        for row in _locked(providers):
            factor = _factor(row, now)
            if now - row.last_throttled_at >= DECREASE_INTERVAL:
                if factor >= 1 and not _cap(row)[0]:
                    row.base_rate = _measured(row, now) or FALLBACK_RATE
                factor = max(MIN_FACTOR, factor * DECREASE)
                row.last_throttled_at = now
            row.factor = factor
            row.blocked_until = max(row.blocked_until, now + pause)
            row.factor_since = row.blocked_until
            row.next_free_at = max(row.next_free_at, row.blocked_until)
            row.throttles += 1
            row.save()


# -- people's side ----------------------------------------------------------------------------


def status(provider: str, *, now: float | None = None) -> RateStatus:
    """The cap, the rate allowed now and the measured rate at ``provider`` (nothing is written)."""
    now = time.time() if now is None else now
    row = ProviderRateLimit.objects.filter(provider=provider).first() or ProviderRateLimit(provider=provider)
    cap, source = _cap(row)
    return RateStatus(provider=provider, cap=cap, cap_source=source, allowed=_allowed(row, now),
                      factor=_factor(row, now), paused_for=max(0.0, row.blocked_until - now),
                      throttles=row.throttles, measured=_measured(row, now))


def for_run(run) -> list[RateStatus]:
    """The rate limits a KEK run is paced by: its KEK's provider, and a migration's destination provider."""
    providers = {run.kek.provider} if run.kek_id else set()
    if run.destination_kek_id:
        providers.add(run.destination_kek.provider)
    return [status(name) for name in sorted(providers)]


def set_cap(provider: str, cap: int | None, *, actor: Actor, now: float | None = None) -> ProviderRateLimit:
    """Set rotation's cap at ``provider`` (None: back to the default; 0: no cap); running batches follow at once.

    :raises ValueError: a negative cap.
    """
    if cap is not None and cap < 0:
        raise ValueError("a rate limit is 0 (no cap) or a positive number of calls per second")
    now = time.time() if now is None else now
    with transaction.atomic():
        row = _locked([provider])[0]
        before = _cap(row)[0]
        row.cap = cap
        # Slots already handed out were paced at the old rate; the new one applies from now.
        row.next_free_at = min(row.next_free_at, now)
        row.save()
        after, source = _cap(row)
        events.rate_limit_changed(provider, actor=actor, before=before, after=after, source=source)
    return row
