"""Leases on rewrap partitions: who is rewrapping which id range, until when.

A worker takes a partition's lease before its first batch and renews it before each
one, so a lease that runs out means its worker died (or stalled longer than a lease).
Any worker may then take the partition over, and the sweep re-dispatches it: a killed
worker costs about one lease period, even while other partitions keep moving.

Every change is one conditional ``UPDATE``, so two workers never both believe they
hold a lease. Times are the workers' clocks (kept in sync by NTP; a lease is tens of
seconds, so a second of skew does not matter).
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Case, F, IntegerField, Q, Value, When
from django.utils import timezone

from rotation.models import RewrapPartition, RotationRun

#: Seconds a lease lasts when HMD_ROTATION_LEASE_SECONDS is not set.
DEFAULT_LEASE_SECONDS = 30


_PROCESS_TOKEN = secrets.token_hex(4)


def lease_seconds() -> int:
    return int(getattr(settings, "ROTATION_LEASE_SECONDS", DEFAULT_LEASE_SECONDS))


def lease_period() -> timedelta:
    return timedelta(seconds=lease_seconds())


def owner_name(token: str) -> str:
    """A lease owner: where it runs (host and pid, for people), then ``|token``, what it is (for the claim)."""
    return f"{socket.gethostname()[:100]}:{os.getpid()}|{token}"[-200:]


def process_owner() -> str:
    """This process as a lease owner (direct callers, ``drive``, tests): one partition at a time."""
    return owner_name(f"process-{os.getpid()}-{_PROCESS_TOKEN}")


def task_owner(task_id: str) -> str:
    """A Celery task as a lease owner: its retries keep the id (on any worker), so a retry gets its lease back."""
    return owner_name(f"task-{task_id}")


def _token(owner_name: str) -> str:
    return owner_name.rpartition("|")[2]


def _one_if(condition: Q) -> Case:
    """1 where the row (before the update) matches ``condition``, else 0: counts takeovers in the same UPDATE."""
    return Case(When(condition, then=Value(1)), default=Value(0), output_field=IntegerField())


def create(run: RotationRun, ranges: list[tuple[int, int]], *, now: datetime) -> list[RewrapPartition]:
    """New partitions, sent but not yet taken; unclaimed after one lease period, the sweep sends them again."""
    expires = now + lease_period()
    return RewrapPartition.objects.bulk_create(
        RewrapPartition(run=run, lo=lo, hi=hi, cursor=lo - 1, lease_expires_at=expires) for lo, hi in ranges
    )


def open_partitions(run_id: int):
    return RewrapPartition.objects.filter(run_id=run_id, done_at__isnull=True)


def claimable(*, owner: str, now: datetime) -> Q:
    """Open, and not taken, taken by ``owner`` already (a retry, maybe elsewhere), or with a lease that ran out."""
    mine = Q(owner__endswith="|" + _token(owner))
    return Q(done_at__isnull=True) & (Q(owner="") | mine | Q(lease_expires_at__lt=now))


def claim(partition_id: int, owner: str, *, now: datetime | None = None) -> RewrapPartition | None:
    """Take the lease of one partition; ``None`` if another worker holds it or it is done."""
    now = now or timezone.now()
    taken = RewrapPartition.objects.filter(claimable(owner=owner, now=now), pk=partition_id).update(
        owner=owner, lease_expires_at=now + lease_period(),
        takeovers=F("takeovers") + _one_if(~Q(owner="") & ~Q(owner__endswith="|" + _token(owner))),
    )
    return RewrapPartition.objects.get(pk=partition_id) if taken else None


def claim_next(run_id: int, owner: str, *, now: datetime | None = None) -> RewrapPartition | None:
    """An idle worker takes any claimable partition of the run: not yet started, or left by a dead worker."""
    now = now or timezone.now()
    candidates = open_partitions(run_id).filter(claimable(owner=owner, now=now)).order_by("lease_expires_at", "lo")
    for partition_id in candidates.values_list("pk", flat=True)[:20]:
        partition = claim(partition_id, owner, now=now)
        if partition is not None:
            return partition
    return None


def renew(partition: RewrapPartition, owner: str, *, cursor: int, now: datetime | None = None) -> bool:
    """Extend the lease before a batch and note how far the partition got; False if it was taken over."""
    now = now or timezone.now()
    return bool(RewrapPartition.objects.filter(pk=partition.pk, owner=owner, done_at__isnull=True).update(
        lease_expires_at=now + lease_period(), cursor=cursor,
    ))


def postpone(partition_id: int, owner: str, *, until: datetime) -> None:
    """Keep the lease past a retry's countdown, so the sweep does not send the partition again meanwhile."""
    RewrapPartition.objects.filter(pk=partition_id, owner=owner, done_at__isnull=True).update(
        lease_expires_at=until + lease_period(),
    )


def release(partition: RewrapPartition, owner: str, *, now: datetime | None = None) -> None:
    """The partition is done (its owner stays, for the record)."""
    RewrapPartition.objects.filter(pk=partition.pk, owner=owner, done_at__isnull=True).update(
        done_at=now or timezone.now(), lease_expires_at=None,
    )


def close_all(run_id: int, *, now: datetime) -> int:
    """Nothing is left to rewrap: partitions still open (their worker died or is about to notice) are done."""
    return open_partitions(run_id).update(done_at=now, lease_expires_at=None)


def expired(*, now: datetime):
    """Open partitions of rewrapping runs whose lease ran out, oldest first."""
    return (RewrapPartition.objects.filter(done_at__isnull=True, lease_expires_at__lt=now,
                                           run__state=RotationRun.State.REWRAPPING)
            .select_related("run").order_by("lease_expires_at"))


def reset_for_redispatch(partition: RewrapPartition, *, now: datetime) -> bool:
    """Hand an expired partition back (no owner, a fresh lease to be claimed in); False if someone was faster."""
    return bool(RewrapPartition.objects.filter(pk=partition.pk, done_at__isnull=True, lease_expires_at__lt=now).update(
        owner="", lease_expires_at=now + lease_period(),
        takeovers=F("takeovers") + _one_if(~Q(owner="")),
    ))


# -- read-only view: the run page and ``manage.py rotation status`` -------------------

#: Open partitions listed one by one; a run has a handful (DEFAULT_PARTITIONS), so this only bounds the odd big run.
PARTITIONS_SHOWN = 50
EXPIRED_LABEL = "expired \N{EM DASH} will be taken over"
UNTAKEN_LABEL = "not taken yet"


@dataclass(frozen=True)
class PartitionView:
    """One open partition as people see it; ``owner`` comes from workers, so every page escapes it."""

    id: int
    lo: int
    hi: int
    owner: str
    lease_expires_at: datetime | None
    lease_expired: bool
    handled: int
    size: int
    takeovers: int

    @property
    def lease_label(self) -> str:
        if self.lease_expired:
            return EXPIRED_LABEL
        return f"until {self.lease_expires_at:%Y-%m-%d %H:%M:%S}" if self.lease_expires_at else "\N{EM DASH}"

    @property
    def progress_label(self) -> str:
        percent = 100.0 * self.handled / self.size if self.size > 0 else 100.0
        return f"{self.handled}/{self.size} ids ({percent:.0f}%)"

    def as_dict(self) -> dict:
        return {
            "id": self.id, "lo": self.lo, "hi": self.hi, "owner": self.owner or None,
            "owner_label": self.owner or UNTAKEN_LABEL,
            "lease_expires_at": self.lease_expires_at.isoformat() if self.lease_expires_at else None,
            "lease_expired": self.lease_expired, "lease_label": self.lease_label, "cursor_handled": self.handled,
            "size": self.size, "progress_label": self.progress_label, "takeovers": self.takeovers,
        }


@dataclass(frozen=True)
class PartitionOverview:
    done: int
    open: int
    shown: list[PartitionView]

    @property
    def summary(self) -> str:
        return f"{self.done} done, {self.open} open"

    def as_dict(self) -> dict:
        return {"done": self.done, "open": self.open, "summary": self.summary,
                "open_partitions": [view.as_dict() for view in self.shown]}


def _view(partition: RewrapPartition, now: datetime) -> PartitionView:
    expires = partition.lease_expires_at
    return PartitionView(
        id=partition.pk, lo=partition.lo, hi=partition.hi, owner=partition.owner, lease_expires_at=expires,
        lease_expired=expires is not None and expires < now,
        handled=max(0, min(partition.cursor + 1, partition.hi) - partition.lo), size=partition.hi - partition.lo,
        takeovers=partition.takeovers,
    )


def overview(run_id: int, *, now: datetime | None = None) -> PartitionOverview:
    """Counts of a run's done and open partitions, and its open ones (id range, owner, lease, cursor)."""
    now = now or timezone.now()
    partitions = RewrapPartition.objects.filter(run_id=run_id)
    open_ones = list(open_partitions(run_id).order_by("lo")[:PARTITIONS_SHOWN])
    total = partitions.count()
    open_count = open_partitions(run_id).count() if len(open_ones) == PARTITIONS_SHOWN else len(open_ones)
    return PartitionOverview(done=total - open_count, open=open_count, shown=[_view(p, now) for p in open_ones])
