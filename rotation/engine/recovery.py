"""The frequent beat job: what a crash, a broker outage or a database restart left behind.

Three things, each cheap enough to run every few seconds (``ROTATION_RECOVERY_SECONDS``):

* the outbox: tasks written but not sent (the broker was down, or their sender died);
* partitions whose lease ran out (their worker died): sent again, for any worker to take;
* runs with no progress for longer than their phase allows: their next phase sent again.

Everything it sends is idempotent, so sending something twice costs a query, never a key.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from rotation.engine import leases
from rotation.engine.dispatch import dispatcher
from rotation.models import RotationRun

log = logging.getLogger(__name__)
S = RotationRun.State

#: Seconds without progress before the sweep sends a run's phase again (HMD_ROTATION_STALL_SECONDS
#: overrides them). Phases that should move get short ones; rewrapping follows the lease
#: (:func:`stall_thresholds`); ``waiting`` is a run waiting for a person (or a paused one).
DEFAULT_STALL_SECONDS = {"queued": 120, "rotating": 120, "verifying": 60, "waiting": 300}
#: The phases a worker should be moving; retiring runs are sent by their due date instead.
STALL_PHASES = (S.QUEUED, S.ROTATING, S.REWRAPPING, S.VERIFYING)
#: What the secret driver writes while a person has a step to do.
WAITING_FOR_A_PERSON = "waiting for a person"


def stall_thresholds() -> dict[str, timedelta]:
    """Per phase, how long a run may go without progress: ``HMD_ROTATION_STALL_SECONDS`` over the defaults.

    The setting is either one number (every phase) or ``phase=seconds`` pairs; rewrapping
    defaults to two lease periods (a partition's own lease recovers it sooner).
    """
    defaults = {**DEFAULT_STALL_SECONDS, "rewrapping": 2 * leases.lease_seconds()}
    configured = getattr(settings, "ROTATION_STALL_SECONDS", {}) or {}
    if isinstance(configured, (int, float)):
        configured = dict.fromkeys(defaults, configured)
    return {phase: timedelta(seconds=seconds) for phase, seconds in {**defaults, **configured}.items()}


def recover(*, now: datetime | None = None) -> dict[str, int]:
    """Send the outbox, take over expired leases, re-send stalled runs; returns how many of each."""
    now = now or timezone.now()
    return {
        "messages": dispatcher.send_outbox(now=now),
        "partitions": len(take_over_expired_partitions(now=now)),
        "runs": len(resume_stalled_runs(now=now)),
    }


def take_over_expired_partitions(*, now: datetime) -> list[int]:
    """Send again every partition whose lease ran out; the first worker to claim it continues it."""
    sent = []
    for partition in leases.expired(now=now)[:100]:
        with transaction.atomic():
            if not leases.reset_for_redispatch(partition, now=now):
                continue  # a worker took it over meanwhile
            log.warning("run #%s: the lease on ids [%s, %s) ran out (held by %s); sent again", partition.run_id,
                        partition.lo, partition.hi, partition.owner or "nobody yet")
            priority = 0 if partition.run.kind == RotationRun.Kind.EMERGENCY else None
            dispatcher("rewrap_partition", partition.run_id, partition.pk, priority=priority)
        sent.append(partition.pk)
    return sent


def resume_stalled_runs(*, now: datetime) -> list[int]:
    """Send again the phase of working runs with no progress for longer than their phase allows (a lost worker).

    A paused run is left alone until its retry is due; a rewrapping run with no open
    partition (its last worker died before moving it on) waits one lease period at most.
    """
    thresholds = stall_thresholds()
    ids = []
    for run in RotationRun.objects.filter(state__in=STALL_PHASES):
        if run.paused_reason.startswith(WAITING_FOR_A_PERSON):
            threshold = thresholds["waiting"]
        else:
            threshold = thresholds[run.state]
        if run.state == S.REWRAPPING and not leases.open_partitions(run.pk).exists():
            threshold = min(threshold, leases.lease_period())
        last_sign = max(filter(None, (run.heartbeat_at or run.created_at, run.next_attempt_at)))
        if last_sign > now - threshold:
            continue
        # Only the sweep that moves the heartbeat sends the phase: two sweeps never both do.
        if not RotationRun.objects.filter(pk=run.pk, heartbeat_at=run.heartbeat_at).update(heartbeat_at=now):
            continue
        dispatcher("execute_run", run.pk, priority=0 if run.kind == RotationRun.Kind.EMERGENCY else None)
        ids.append(run.pk)
    return ids
