"""How far the console has verified the audit chain: the banner on the audit log and the dashboard.

A full :func:`keyvault.audit.verify_chain` reads every event (about 5 s per million
on PostgreSQL), too long for a page load. Instead the console keeps a *verified
anchor* (sequence, hash and last checkpoint signature of the newest event it has
verified) and, at most once a minute, checks only the events appended since, at
most ``INCREMENTAL_BUDGET`` of them per page load. Events before the anchor are
not re-read on page loads: catching an edit there takes "Verify now" (a full
verification by someone allowed to export the log) or ``manage.py audit verify``;
the banner says which kind of check it shows. The event at the anchor is re-read
each time, so a rewrite of the verified tip shows.

The anchor and the status live in one database row (:class:`AuditVerification`),
so every web process and host shows the same banner: a break found by a full
verification in one process is shown by all of them until a full verification
passes. Plain columns, not a pickled cache entry: whoever can write the database
must not be able to run code in the web process through it.

"Verify now" runs at most once per ``AUDIT_VERIFY_NOW_SECONDS`` (a full walk is
seconds of database work per million events; repeated clicks must not turn into a
denial of service): across processes through the cache (shared once ``HMD_CACHE_URL``
points at Redis) and through the last recorded full verification, which every
process sees in the audit log. The banner also says when the newest checkpoint could
not be written to an external witness (:mod:`keyvault.audit.witness`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from django.conf import settings
from django.core.cache import cache
from django.utils import timezone

from keyvault import audit
from keyvault.audit import Actor, events
from keyvault.audit import walk as audit_walk
from keyvault.audit import witness as audit_witness
from keyvault.exceptions import AuditVerificationTooSoon
from keyvault.models import AuditChainHead, AuditCheckpoint, AuditEvent, AuditVerification

CHAIN_STATUS_TTL = timedelta(seconds=60)
INCREMENTAL_BUDGET = 20_000
VERIFY_NOW_CACHE_KEY = "keyvault:audit:verify-now"


@dataclass(frozen=True)
class ChainAnchor:
    """The newest event verified, and the checkpoint signature the next checkpoint must chain to."""

    sequence: int
    hash: str
    checkpoint_signature: str


@dataclass(frozen=True)
class ChainStatus:
    """What the banner shows."""

    ok: bool
    verified_to: int
    checked_at: datetime
    pending: int = 0
    broken_at: int | None = None
    reason: str = ""
    full_verified_at: datetime | None = None
    witness_problem: str = ""  # the newest checkpoint could not be written to an external witness

    def __str__(self) -> str:
        if not self.ok:
            return f"BROKEN at #{self.broken_at}: {self.reason}"
        text = f"chain verified to #{self.verified_to} at {self.checked_at:%Y-%m-%d %H:%M:%S} UTC"
        if self.pending:
            text += f"; {self.pending} newer event(s) not verified yet"
        return text


def verify_since(anchor: ChainAnchor, *, budget: int | None = None) -> tuple[ChainStatus, ChainAnchor]:
    """Verify the events after ``anchor`` (at most ``budget``): hashes, links, checkpoints, head.

    Returns the status and the anchor to continue from (unchanged when broken).
    """
    budget = INCREMENTAL_BUDGET if budget is None else budget
    head_sequence, head_hash = _head()
    if anchor.sequence:
        tip = AuditEvent.objects.filter(sequence=anchor.sequence).values_list("hash", flat=True).first()
        if tip != anchor.hash:
            return _broken(anchor.sequence, "event changed or removed since it was verified", anchor), anchor
    if head_sequence < anchor.sequence:
        return _broken(head_sequence + 1, f"chain head records #{head_sequence} but #{anchor.sequence} was verified "
                       "(newest events removed)", anchor), anchor
    target = min(head_sequence, anchor.sequence + budget)
    checkpoints = list(AuditCheckpoint.objects.filter(sequence__gt=anchor.sequence, sequence__lte=target)
                       .order_by("sequence"))
    segment = audit_walk.walk_range(anchor.sequence, target + 1, {cp.sequence for cp in checkpoints})
    problem = audit.segment_problem(segment, anchor.sequence + 1, anchor.hash)
    if problem:
        return _broken(*problem, anchor), anchor
    last_sequence, last_hash = segment.last or (anchor.sequence, anchor.hash)
    if last_sequence < target:
        return _broken(last_sequence + 1, f"chain head records #{head_sequence} but the log ends at #{last_sequence} "
                       "(newest events removed)", anchor), anchor
    signature = anchor.checkpoint_signature
    for cp in checkpoints:
        problem = audit.checkpoint_problem(cp, segment.checkpoint_hashes.get(cp.sequence), signature)
        if problem:
            return _broken(cp.sequence, problem, anchor), anchor
        signature = cp.signature
    if target == head_sequence and head_hash is not None and head_sequence and last_hash != head_hash:
        return _broken(head_sequence, "chain head hash differs from the last event's hash", anchor), anchor
    status = ChainStatus(ok=True, verified_to=target, checked_at=timezone.now(), pending=head_sequence - target)
    return status, ChainAnchor(target, last_hash, signature)


def chain_status(*, budget: int | None = None) -> ChainStatus:
    """The recorded status if younger than a minute (or a break a full check found), else extend from the anchor."""
    record = _record()
    fresh = record.checked_at is not None and timezone.now() - record.checked_at < CHAIN_STATUS_TTL
    if record.broken_by_full_check or fresh:
        return replace(_status_of(record), witness_problem=audit_witness.last_failure())
    status, anchor = verify_since(ChainAnchor(record.anchor_sequence, record.anchor_hash,
                                              record.anchor_checkpoint_signature), budget=budget)
    # Never over a break a full check found, never moving the anchor back (another process may be ahead).
    AuditVerification.objects.filter(pk=1, broken_by_full_check=False, anchor_sequence__lte=anchor.sequence).update(
        anchor_sequence=anchor.sequence, anchor_hash=anchor.hash, anchor_checkpoint_signature=anchor.checkpoint_signature,
        checked_at=status.checked_at, pending=status.pending, broken_at=status.broken_at, reason=status.reason[:500],
    )
    return replace(status, full_verified_at=record.full_verified_at, witness_problem=audit_witness.last_failure())


def verify_fully(*, actor: Actor, jobs: int | None = None, witness: str | None = None, use_witness: bool = True,
                 throttle: bool = True) -> audit.VerifyResult:
    """Walk the whole chain (``audit.verify_chain``), record that we did, and set the banner from the result.

    The console's "Verify now" and ``manage.py audit verify`` both come here. Only the
    console is throttled (``throttle``): an operator's shell is not an anonymous button.
    A pass that skipped the witness (``use_witness=False``) does not refresh the banner's
    verified anchor; a break found any way is always recorded.

    :raises AuditVerificationTooSoon: ``throttle`` and a full verification started less than
        ``AUDIT_VERIFY_NOW_SECONDS`` ago (here, or recorded by any process).
    """
    if throttle:
        _claim_verify_slot()
    audit.drain_all_pending()  # committed events whose writer died before appending them
    result = audit.verify_chain(jobs=jobs, witness=witness, use_witness=use_witness)
    events.chain_verified(result, actor=actor, witness=result.witness if result.ok and use_witness else "")
    if result.ok and not use_witness:
        return result
    now = timezone.now()
    _record()
    if result.ok:
        last_cp = AuditCheckpoint.objects.filter(sequence__lte=result.last_sequence).order_by("-sequence").first()
        AuditVerification.objects.filter(pk=1).update(
            anchor_sequence=result.last_sequence, anchor_hash=result.last_hash,
            anchor_checkpoint_signature=last_cp.signature if last_cp else "",
            checked_at=now, pending=0, broken_at=None, reason="", broken_by_full_check=False, full_verified_at=now,
        )
    else:
        AuditVerification.objects.filter(pk=1).update(
            checked_at=now, broken_at=result.broken_at, reason=result.reason[:500], broken_by_full_check=True,
        )
    return result


def _claim_verify_slot() -> None:
    """Take the one full verification allowed per ``AUDIT_VERIFY_NOW_SECONDS``, or refuse with the wait."""
    seconds = settings.AUDIT_VERIFY_NOW_SECONDS
    if seconds <= 0:
        return
    now = timezone.now()
    latest = (AuditEvent.objects.filter(action=audit.Action.AUDIT_VERIFIED, timestamp__gt=now - timedelta(seconds=seconds))
              .order_by("-timestamp").values_list("timestamp", flat=True).first())
    if latest is not None or not cache.add(VERIFY_NOW_CACHE_KEY, now.isoformat(), timeout=seconds):
        since = latest or now
        wait = max(1, int(seconds - (now - since).total_seconds()))
        raise AuditVerificationTooSoon(
            f"a full verification ran less than {seconds} s ago; try again in {wait} s", retry_after=wait)


def _record() -> AuditVerification:
    record, _ = AuditVerification.objects.get_or_create(pk=1, defaults={"anchor_hash": audit.GENESIS_HASH})
    return record


def _status_of(record: AuditVerification) -> ChainStatus:
    return ChainStatus(ok=record.broken_at is None, verified_to=record.anchor_sequence, checked_at=record.checked_at,
                       pending=record.pending, broken_at=record.broken_at, reason=record.reason,
                       full_verified_at=record.full_verified_at)


def _head() -> tuple[int, str | None]:
    head = AuditChainHead.objects.filter(pk=1).first()
    if head is not None:
        return head.last_sequence, head.last_hash
    return AuditEvent.objects.order_by("-sequence").values_list("sequence", flat=True).first() or 0, None


def _broken(sequence: int, reason: str, anchor: ChainAnchor) -> ChainStatus:
    return ChainStatus(ok=False, verified_to=anchor.sequence, checked_at=timezone.now(), broken_at=sequence,
                       reason=reason)
