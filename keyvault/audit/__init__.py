"""The audit log: the one place that writes audit events.

Every event is chained: ``hash = SHA-256(canonical JSON of the event, including
prev_hash)``. Appending locks the chain head row, so concurrent web processes and
workers append one after another and the chain never forks. An event is recorded
in the caller's transaction: if it cannot be written, the operation it records
fails too (fail-closed, as Vault refuses requests its audit devices cannot log).

On PostgreSQL the append runs inside the server (``keyvault_audit_append``, migration
0023): lock the head, hash, insert, move the head, in one call. An event recorded outside
any transaction (an API unwrap) is appended by such a call as a statement of its own, so the
head is let go when the server commits it, never held across a round trip to this process
(:func:`_append_serial`); an event that falls on a signed checkpoint is appended in a short
transaction instead, as the checkpoint is signed here before the commit. The threads of one
process that append outside a transaction at the same moment share that statement: a round
takes every event queued while the previous round ran (:mod:`keyvault.audit.batcher`), and
each caller returns once the round holding its event has committed, or raises with it.

Group commit (PostgreSQL, ``AUDIT_GROUP_COMMIT``; callers inside a transaction).
Appending in the caller's transaction held the head lock until that transaction
committed, so every audited operation was serial, one commit (fsync) each. With group
commit a caller first tries the appenders' advisory lock together with the head row,
and if both are free chains its event in the same call (:func:`_chain_on_server`).
Free: nobody else is appending, so the caller chains its event in its own transaction
exactly as the serial path does, holding the lock to its commit. Busy: the event is
written to an outbox (``AuditPendingEvent``, no sequence, no hash, but its canonical
JSON's pieces) in the caller's transaction — no wait, so callers run concurrently — and
the process skips the try for a moment (:data:`SKIP_TRIES_SECONDS`).
After that transaction commits the caller waits in :func:`_await_sequenced` until its
event is in the chain, in one statement (``keyvault_audit_await``, migration 0025): the
waiters queue for the appenders' lock inside the server; whoever holds it appends the
oldest committed outbox events in batches (sequence, prev-hash, hash; outbox rows
deleted in the same transaction) until its own is in, and the next waiter finds its
event appended. So 32 waiting callers cost one or two commits, not 32. A batch that
would reach a signed checkpoint is appended from Python in a transaction that signs it.
The uncontended path holds the lock to the caller's commit, as the serial path holds
the head: record the event last in the transaction (the key services do), or other
callers wait to return for as long as the work after it takes.

Why an outbox rather than a leader appending followers' events in its own
transaction: the event and the key-state change commit or roll back together, as
before — an event for an operation that rolled back, or an operation without its
event, cannot happen. The guarantees:

- no event, no success: the event (chained or in the outbox) is inserted in the
  caller's transaction, so if it cannot be written the operation rolls back with it;
- exactly one event per call: the event is inserted once, and an outbox row is moved
  into the chain and deleted in one transaction under the lock, so it is appended once;
- nothing lost when a writer is killed: before its commit, neither the operation nor
  the event exists; after it, the event is durable in the outbox and the next append
  by anyone takes it (under load within milliseconds; tests assert <= 5 s on a
  saturated 2-core machine), at the latest beat's sweep (``checkpoint_if_moved``,
  every ``AUDIT_CHECKPOINT_SECONDS``) or ``audit verify``. Until then the event is
  as exposed to someone who can delete rows as the chain's unwitnessed tail is
  (events after the newest witnessed checkpoint), a window of the same bound;
- the chain stays verifiable: only the lock holder assigns sequences, and the head
  row is locked as on the serial path; a checkpoint is signed at every
  ``AUDIT_CHECKPOINT_INTERVAL``-th event even inside a batch.

Measured (``bench/audit_append.py``, 2 shared cores, callers inside a transaction): group
commit reaches 1,000-1,300 events/s with 32 writers (500-700 before the wait moved into the
server), 2.6x the serial path, but not 5,000: the same insert-and-commit per call from 32
Python processes through psycopg (no Django, no chain) reaches only 2,500-4,800/s here,
PostgreSQL with C clients (pgbench) 5,100-9,600/s. The gap is on the Python side, Django and
round trips (docs/ops/production.md, *Audit group commit*). Callers outside a transaction (API
unwraps) append in rounds: 2,691 events/s with 32 writer threads in 8 processes, 4,946/s in 4,
against 949/s with one statement each (``bench/audit_append.py``, stop 27).
A caller that does not wait for sequencing (return at commit, a sequencer appending
later) was tried and rejected: with no back-pressure the outbox grew without bound
under load (10,541 unappended events after a minute of 24 writers on a saturated
host), so the not-yet-chained window was unbounded.

Many events of one call (an API batch): inside :func:`collected` :func:`record` buffers the
events and :func:`record_many` appends them together when the block ends, before the call
answers — one head lock and insert (serial, or uncontended group commit) or one multi-row
outbox insert waited for after the commit, instead of one append per event. The same
guarantees per event: none written unless all are (the call then fails), each once, in the
order recorded. Events recorded inside a nested ``atomic`` (which may roll back) are not
buffered but appended at once.

An event's timestamp is when the operation recorded it, so within the chain
timestamps are nearly but not strictly ordered. Callers that need the event's
position at once (report exports, checkpoints) pass ``sequenced=True`` and take the
serial path; SQLite (one host) always does.

Every ``AUDIT_CHECKPOINT_INTERVAL`` events, every ``AUDIT_CHECKPOINT_SECONDS`` when
the head has moved (beat) and on demand, the head is signed with the Ed25519 audit
signing key; each checkpoint also signs the previous checkpoint's signature, so the
checkpoints form a chain of their own, like CloudTrail digests. Each checkpoint is
also written outside the database (:mod:`keyvault.audit.witness`) once its
transaction commits, and verification requires both: checkpoints at the configured
density from genesis, and every witnessed checkpoint still in the database.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from keyvault.audit import walk as audit_walk
from keyvault.audit import witness as audit_witness
from keyvault.audit.batcher import AppendBatcher
from keyvault.audit.walk import ROW_FIELDS as _ROW_FIELDS
from keyvault.audit.witness import WitnessEntry
from keyvault.exceptions import AuditWitnessUnavailable
from keyvault.models.core import AuditChainHead, AuditCheckpoint, AuditEvent, AuditPendingEvent
from keyvault.models.prepared import prepared_cursor
from keyvault.web.request_meta import client_ip, request_id

GENESIS_HASH = "0" * 64
VERIFY_CHUNK = 5000
PENDING_BATCH = 2000
APPEND_LOCK_KEY = 0x6B76_6175_6469_7421  # the outbox appenders' advisory lock
_PENDING_FIELDS = ("timestamp", "actor", "action", "target_type", "target_id", "outcome", "request_id",
                   "ip_address", "details")
_INSERT_PENDING = ("INSERT INTO keyvault_auditpendingevent (" + ", ".join(_PENDING_FIELDS)
                   + ", canonical_pieces) VALUES {rows} RETURNING id")
_PENDING_ROW = "(%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb)"
_AWAIT_ON_SERVER = "SELECT keyvault_audit_await(%s, %s, %s, %s)"
_TRY_LOCK_IF_PENDING = "SELECT pg_try_advisory_lock(%s) FROM keyvault_auditpendingevent WHERE id = %s"
_WAIT_FOR_APPENDER = "SELECT pg_advisory_lock_shared(%s), pg_advisory_unlock_shared(%s)"
_TAKE_PENDING = (
    "DELETE FROM keyvault_auditpendingevent WHERE id IN "
    "(SELECT id FROM keyvault_auditpendingevent ORDER BY id LIMIT %s) "
    "RETURNING id, " + ", ".join(_PENDING_FIELDS)
)

Action = AuditEvent.Action
Outcome = AuditEvent.Outcome


@dataclass(frozen=True)
class Actor:
    """Who did something: a console/CLI user or a system component."""

    name: str
    user_id: int | None = None
    ip_address: str | None = None
    request_id: str = ""

    @classmethod
    def user(cls, user, *, ip_address: str | None = None, request_id: str = "") -> Actor:
        return cls(name=f"user:{user.get_username()}", user_id=user.pk, ip_address=ip_address, request_id=request_id)

    @classmethod
    def system(cls, component: str) -> Actor:
        return cls(name=f"system:{component}")

    @classmethod
    def from_request(cls, request) -> Actor:
        """The signed-in user, from the real client address (through trusted proxies) and a checked request id."""
        return cls.user(request.user, ip_address=client_ip(request), request_id=request_id(request))

    def __str__(self) -> str:
        return self.name


def hmac_value(value: str | bytes) -> str:
    """HMAC-SHA256 a sensitive value with the audit key, as Vault's audit devices do."""
    data = value.encode() if isinstance(value, str) else bytes(value)
    digest = hmac.new(settings.AUDIT_HMAC_KEY.encode(), data, hashlib.sha256).hexdigest()
    return f"hmac-sha256:{digest}"


def _check_details(value, path: str = "details") -> None:
    """Details are JSON scalars, lists and string-keyed dicts; never bytes."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{path} holds bytes; audit details never carry key material")
    if isinstance(value, float):
        raise TypeError(f"{path} is a float; use str or int so the hash is stable across databases")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{path} has a non-string key")
            _check_details(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_details(item, f"{path}[{index}]")
    elif value is not None and not isinstance(value, (str, int, bool)):
        raise TypeError(f"{path} has unsupported type {type(value).__name__}")


def canonical_bytes(
    *,
    sequence: int,
    timestamp: datetime,
    actor: str,
    action: str,
    target_type: str,
    target_id: str,
    outcome: str,
    request_id: str,
    ip_address: str | None,
    details: Mapping,
    prev_hash: str,
) -> bytes:
    """The exact bytes an event's hash covers. Changing this breaks every chain: don't."""
    document = {
        "sequence": sequence,
        "timestamp": timestamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "actor": actor,
        "action": action,
        "target_type": target_type,
        "target_id": target_id,
        "outcome": outcome,
        "request_id": request_id,
        "ip_address": ip_address,
        "details": details,
        "prev_hash": prev_hash,
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def event_hash(event: AuditEvent) -> str:
    """Recompute the hash of a stored event from its fields."""
    return hashlib.sha256(
        canonical_bytes(
            sequence=event.sequence,
            timestamp=event.timestamp,
            actor=event.actor,
            action=event.action,
            target_type=event.target_type,
            target_id=event.target_id,
            outcome=event.outcome,
            request_id=event.request_id,
            ip_address=event.ip_address,
            details=event.details,
            prev_hash=event.prev_hash,
        )
    ).hexdigest()


def _target(target) -> tuple[str, str]:
    if target is None:
        return "", ""
    if isinstance(target, tuple):
        return str(target[0]), str(target[1])
    return target._meta.model_name, str(target.pk if not hasattr(target, "name") else target.name)


def record(
    action: str,
    *,
    actor: Actor,
    target=None,
    outcome: str = Outcome.SUCCESS,
    details: Mapping | None = None,
    sequenced: bool = False,
) -> AuditEvent:
    """Record one event, atomically with the caller's transaction (see the module docstring).

    On PostgreSQL with group commit the event goes to the outbox in the caller's
    transaction and is appended to the chain right after it commits; the returned
    event then has no ``sequence`` yet. ``sequenced=True`` takes the serial path
    (the head locked in the caller's transaction) for callers that need the
    event's position at once (report exports, checkpoints).

    :param target: a model instance (KEKs are named by their name) or a
        ``(type, id)`` tuple.
    :raises TypeError: details hold bytes or other unserialisable values.
    """
    details = dict(details or {})
    _check_details(details)
    target_type, target_id = _target(target)
    fields = dict(
        timestamp=timezone.now(),
        actor=actor.name,
        action=str(action),
        target_type=target_type,
        target_id=target_id[:255],
        outcome=str(outcome),
        request_id=actor.request_id,
        ip_address=actor.ip_address,
        details=details,
    )
    buffer = _collecting.get()
    if buffer is not None and not sequenced and buffer.depth == _atomic_depth():
        buffer.events.append(fields)
        return _event_instance(fields)
    if sequenced or not _groups_commits():
        return _append_serial([fields])[0]
    return _append_grouped([fields])[0]


@dataclass
class _Collected:
    """Events :func:`record` buffered inside :func:`collected`, and the transaction depth they belong to."""

    depth: int
    events: list[dict]


_collecting: ContextVar[_Collected | None] = ContextVar("audit_collecting", default=None)


def _atomic_depth() -> int:
    return len(transaction.get_connection().atomic_blocks)


@contextmanager
def collected() -> Iterator[list[dict]]:
    """Inside the block :func:`record` buffers its events; a clean exit appends them all at once.

    For calls that record many events (an API batch): one append for all of them (one head
    lock and insert, or one multi-row outbox insert) instead of one each, with the same events,
    in the order recorded. Leaving by an exception drops the buffered events: the exception
    fails the call, as an event that cannot be written does. If the append fails, it raises
    here, so the call fails with no event of it written (fail-closed, as :func:`record`).

    Only events recorded at the block's own transaction depth are buffered: an event recorded
    inside a nested ``atomic`` (a key service's) is appended at once as usual, since that
    block may roll back and its event must roll back with it. ``sequenced=True`` events too.
    A ``collected`` block nested at the same depth buffers into the outer one; one inside a
    nested ``atomic`` collects and appends its own events, inside that transaction.
    """
    outer = _collecting.get()
    if outer is not None and outer.depth == _atomic_depth():
        yield outer.events
        return
    buffer = _Collected(depth=_atomic_depth(), events=[])
    token = _collecting.set(buffer)
    try:
        yield buffer.events
    finally:
        _collecting.reset(token)
    record_many(buffer.events)


def record_many(pending: Sequence[dict]) -> list[AuditEvent]:
    """Append events (field dicts as :func:`record` builds them) in one go, atomically with the caller's transaction.

    The guarantees of :func:`record`, per event: all of them are written or none (then this
    raises), each once. Serial path: one head lock, one insert. Group commit: in the chain
    in the caller's transaction if nobody else is appending, else one multi-row outbox
    insert, waited for after the commit (returned events then have no ``sequence``).
    """
    if not pending:
        return []
    if not _groups_commits():
        return _append_serial(list(pending))
    return _append_grouped(list(pending))


def _groups_commits() -> bool:
    """Whether an event recorded now goes through group commit: enabled here and inside a transaction.

    Outside one, the event is a transaction of its own: one statement (:func:`_append_serial`).
    """
    return group_commit_active() and transaction.get_connection().in_atomic_block


def group_commit_active() -> bool:
    """Whether :func:`record` uses the outbox here: PostgreSQL, enabled, and a transaction that will commit.

    Inside a Django ``TestCase`` transaction (the ``db`` fixture) nothing ever commits,
    so ``on_commit`` never runs and an outboxed event would never reach the chain:
    there the serial path keeps the event visible at once.
    """
    connection = transaction.get_connection()
    if not settings.AUDIT_GROUP_COMMIT or connection.vendor != "postgresql":
        return False
    return not (connection.atomic_blocks and connection.atomic_blocks[0]._from_testcase)


def _append_serial(pending: list[dict]) -> list[AuditEvent]:
    connection = transaction.get_connection()
    if connection.vendor != "postgresql":
        with transaction.atomic():
            return _append_locked(_locked_head(), pending)
    if not connection.in_atomic_block and connection.get_autocommit():
        # Encoded here, on the caller's thread: an event that cannot be encoded fails its caller alone.
        return _own_statement_appends.submit([(fields, _encoded_server_event(fields)) for fields in pending])
    with transaction.atomic():
        return _chain_on_server(pending)


def _append_round(items: list[tuple[dict, str]]) -> list[AuditEvent]:
    """One round of :data:`_own_statement_appends`, on the leading caller's thread and connection (autocommit)."""
    pending, encoded = [fields for fields, _ in items], [text for _, text in items]
    appended = _chain_on_server(pending, own_statement=True, encoded=encoded)
    if appended is None:  # a checkpoint falls due: appended in a transaction that signs it
        with transaction.atomic():
            appended = _chain_on_server(pending, encoded=encoded)
    return appended


#: Callers outside any transaction (API calls) in this process: their concurrent appends are one
#: statement (keyvault.audit.batcher); a lone caller's is its own, as before.
_own_statement_appends = AppendBatcher(_append_round)


def _append_locked(head: AuditChainHead, pending: list[dict]) -> list[AuditEvent]:
    """Chain ``pending`` after the locked head, in order: one insert, one head move, checkpoints due (SQLite)."""
    sequence, prev_hash = head.last_sequence, head.last_hash
    events, due = [], []
    interval = settings.AUDIT_CHECKPOINT_INTERVAL
    for fields in pending:
        sequence += 1
        fields = {**fields, "sequence": sequence, "prev_hash": prev_hash}
        prev_hash = hashlib.sha256(canonical_bytes(**fields)).hexdigest()
        events.append(AuditEvent(hash=prev_hash, **fields))
        if interval and sequence % interval == 0:
            due.append((sequence, prev_hash))
    AuditEvent.objects.bulk_create(events)
    AuditChainHead.objects.filter(pk=head.pk).update(last_sequence=sequence, last_hash=prev_hash)
    for checkpoint_sequence, digest in due:
        _sign_checkpoint(checkpoint_sequence, digest)
    return events


# Stand-ins for the two values of an event's canonical JSON that only the head decides; see
# _canonical_pieces. Neither the hex hash nor the decimal sequence ever needs escaping.
_PREV_SLOT = '"prev_hash":"~prev~"'
_SEQUENCE_MARK = 9_007_199_254_740_993
_SEQUENCE_SLOT = f'"sequence":{_SEQUENCE_MARK}'
_CHAIN_ON_SERVER = ("SELECT event_id, event_sequence, event_prev_hash, event_hash "
                    "FROM keyvault_audit_append(%s::boolean, %s::bigint, %s::integer, %s::jsonb)")


def _canonical_pieces(fields: dict) -> tuple[str, str, str]:
    """An event's canonical JSON (:func:`canonical_bytes`) cut around its previous hash and its sequence.

    ``before_prev + prev_hash + before_sequence + str(sequence) + after_sequence`` is the
    canonical JSON of the event at that position. The top-level slots are found from the end:
    with sorted keys only ``details`` (a nested key could be named alike) comes before
    ``prev_hash``; what follows either slot is strings, whose quotes JSON escapes.
    """
    text = canonical_bytes(**fields, sequence=_SEQUENCE_MARK, prev_hash="~prev~").decode("ascii")
    prev_at = text.rindex(_PREV_SLOT)
    before_prev, rest = text[:prev_at + len('"prev_hash":"')], text[prev_at + len(_PREV_SLOT) - 1:]
    sequence_at = rest.rindex(_SEQUENCE_SLOT)
    return (before_prev, rest[:sequence_at + len('"sequence":')], rest[sequence_at + len(_SEQUENCE_SLOT):])


def _chain_on_server(pending: list[dict], *, try_only: bool = False, own_statement: bool = False,
                     encoded: list[str] | None = None) -> list[AuditEvent] | None:
    """Chain ``pending`` with one call of ``keyvault_audit_append`` (PostgreSQL, in the caller's transaction).

    The head is locked, the events hashed and inserted and the head moved inside the server,
    so no round trip happens while other appenders wait for the head (migration 0023).
    Checkpoints that fall due are signed here, in the same transaction. ``try_only``: None
    unless the appenders' lock and the head were both free (group commit's uncontended path).
    ``own_statement`` (a caller outside any transaction): the call is its own transaction, so
    the head is let go when the server commits it, not a round trip later; None when a
    checkpoint would fall due (then nothing was appended: the caller appends in a transaction).
    ``encoded``: the events' :func:`_encoded_server_event` texts, made already.
    """
    interval = settings.AUDIT_CHECKPOINT_INTERVAL
    if encoded is None:
        encoded = [_encoded_server_event(fields) for fields in pending]
    events_json = "[" + ",".join(encoded) + "]"
    connection = transaction.get_connection()
    with prepared_cursor(connection) as cursor:  # on every audited call: parsed and planned once per connection
        cursor.execute(_CHAIN_ON_SERVER, [try_only, APPEND_LOCK_KEY, interval if own_statement else 0, events_json])
        rows = cursor.fetchall()
    if not rows:
        if try_only or own_statement:
            return None
        raise RuntimeError("the audit chain append returned no events")
    events = []
    for fields, (pk, sequence, prev_hash, digest) in zip(pending, rows, strict=True):
        event = _event_instance(fields, id=pk, sequence=sequence, prev_hash=prev_hash, hash=digest)
        event._state.adding, event._state.db = False, connection.alias
        events.append(event)
        if interval and sequence % interval == 0:
            _sign_checkpoint(sequence, digest)
    return events


@cache
def _event_attnames() -> tuple[str, ...]:
    return tuple(field.attname for field in AuditEvent._meta.concrete_fields)


def _event_instance(fields: dict, *, id: int | None = None, sequence: int | None = None, prev_hash: str = "",
                    hash: str = "") -> AuditEvent:
    """An ``AuditEvent`` of ``fields`` (as :func:`record` builds them), built positionally.

    Django's positional constructor (``Model.from_db``'s path) takes a third of the keyword one's
    time (3.6 against 11 us here), and every audited call builds one or two of these.
    """
    values = {**fields, "id": id, "sequence": sequence, "prev_hash": prev_hash, "hash": hash}
    return AuditEvent(*[values[name] for name in _event_attnames()])


def _encoded_server_event(fields: dict) -> str:
    return json.dumps(_server_event(fields))


def _server_event(fields: dict) -> dict:
    """One event as ``keyvault_audit_append`` reads it: the stored fields and its canonical JSON's pieces."""
    before_prev, before_sequence, after_sequence = _canonical_pieces(fields)
    return {**fields, "timestamp": fields["timestamp"].isoformat(), "before_prev": before_prev,
            "before_sequence": before_sequence, "after_sequence": after_sequence}


#: For this long after finding the appenders busy, a process goes straight to the outbox instead
#: of trying to chain in its own transaction. Under contention the try is a round trip that fails:
#: skipping it took 32 writers from 841 to 1,033 events/s (bench/audit_append.py), while a lone
#: writer keeps the one-commit path (885/s; always through the outbox: 539/s).
SKIP_TRIES_SECONDS = 1.0
_contended_at = float("-inf")  # per process (threads share it: a lost update only moves one try)


def _append_grouped(pending: list[dict]) -> list[AuditEvent]:
    """Chain ``pending`` in the caller's transaction if nobody else is appending, else put them in the outbox.

    Only for a caller inside a transaction: one outside any appends in a statement of its own
    (:func:`_append_serial`), which holds the head no longer than the server takes to commit.
    """
    global _contended_at
    if time.monotonic() - _contended_at >= SKIP_TRIES_SECONDS:  # else the try would most likely be a wasted round trip
        appended = _chain_on_server(pending, try_only=True)
        if appended is not None:  # nobody else appending: chained here, in the caller's transaction, as the serial path
            return appended
        _contended_at = time.monotonic()
    # The rows commit together, so an appender that takes the newest takes them all
    # (it takes the oldest committed ids first): waiting for the newest is enough.
    newest = _insert_pending(pending)[-1]  # in the caller's transaction
    transaction.on_commit(lambda: _await_sequenced(newest), robust=True)  # a lambda: robust logging needs a __qualname__
    return [_event_instance(fields) for fields in pending]


def _insert_pending(pending: Sequence[dict]) -> list[int]:
    """One round trip, no ORM (this insert is on every contended audited call's path): the outbox ids, ascending."""
    values = []
    for fields in pending:
        values.extend(fields[name] for name in _PENDING_FIELDS[:-1])
        values.append(json.dumps(fields["details"]))
        values.append(json.dumps(_canonical_pieces(fields)))
    with transaction.get_connection().cursor() as cursor:
        cursor.execute(_INSERT_PENDING.format(rows=", ".join([_PENDING_ROW] * len(pending))), values)
        return sorted(row[0] for row in cursor.fetchall())


def _await_sequenced(pending_id: int) -> AuditEvent | None:
    """After the caller commits: return once its event is in the chain, appending a batch if it can.

    First in one statement inside the server (``keyvault_audit_await``, migration 0025):
    queue for the appenders' lock unless the event is gone already, then append the
    outbox's oldest events in batches until it is in. When that statement leaves the
    append to Python (a batch reaching a checkpoint, or rows written without their
    pieces), the Python loop: one query both asks whether the event is still in the
    outbox and tries the lock. Gone: another caller appended it, return. Lock taken:
    append the committed outbox events in one transaction, signing checkpoints. Lock busy:
    wait for the holder to let go (a *shared* lock on the same key), then ask again.
    A failure here does not lose the event: it stays in the outbox, committed, for the
    next append (or the beat, or ``audit verify``) to take.
    """
    connection = transaction.get_connection()
    with connection.cursor() as cursor:
        cursor.execute(_AWAIT_ON_SERVER, [APPEND_LOCK_KEY, pending_id, PENDING_BATCH, settings.AUDIT_CHECKPOINT_INTERVAL])
        if cursor.fetchone()[0] == "appended":
            return None
    # A checkpoint falls due (signed here) or an outbox row from before migration 0025: from Python.
    while True:
        with connection.cursor() as cursor:
            cursor.execute(_TRY_LOCK_IF_PENDING, [APPEND_LOCK_KEY, pending_id])
            row = cursor.fetchone()
            if row is not None and not row[0]:
                cursor.execute(_WAIT_FOR_APPENDER, [APPEND_LOCK_KEY, APPEND_LOCK_KEY])
                continue
        if row is None:
            return None
        try:
            with transaction.atomic():
                appended = _append_outbox(PENDING_BATCH)
        finally:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [APPEND_LOCK_KEY])
        if pending_id in appended:
            return appended[pending_id]


def drain_pending(*, batch: int = PENDING_BATCH) -> dict[int, AuditEvent]:
    """Append up to ``batch`` committed outbox events to the chain in one short transaction, by outbox id."""
    with transaction.atomic():
        with transaction.get_connection().cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [APPEND_LOCK_KEY])
        return _append_outbox(batch)


def _append_outbox(batch: int) -> dict[int, AuditEvent]:
    """Under the appenders' lock, in a transaction: move the oldest ``batch`` outbox events into the chain."""
    _locked_head()  # serial-path writers (sequenced=True) lock only the head; creates it if missing
    with transaction.get_connection().cursor() as cursor:
        cursor.execute(_TAKE_PENDING, [batch])
        rows = sorted(cursor.fetchall())
    if not rows:
        return {}
    pending = [dict(zip(_PENDING_FIELDS, row[1:], strict=True)) for row in rows]
    for fields in pending:
        if isinstance(fields["details"], str):
            fields["details"] = json.loads(fields["details"])
    appended = _chain_on_server(pending)
    return {row[0]: event for row, event in zip(rows, appended, strict=True)}


def drain_all_pending() -> int:
    """Append every committed outbox event (the beat and ``audit verify`` sweep events whose writer died).

    The outbox is used on PostgreSQL only; elsewhere there is nothing to append.
    """
    if transaction.get_connection().vendor != "postgresql":
        return 0
    total = 0
    while count := len(drain_pending()):
        total += count
    return total


def newest_event(**filters) -> AuditEvent | None:
    """The newest event matching ``filters``, counting those committed but not yet appended.

    For decisions that read the log behind a row lock (a run started while a secret is
    re-pointed): once the other transaction commits, its event is in the outbox even
    before it is in the chain. An outbox event comes back unsaved, with no ``sequence``.
    """
    pending = AuditPendingEvent.objects.filter(**filters).order_by("-id").values(*_PENDING_FIELDS).first()
    if pending is not None:
        return AuditEvent(sequence=None, prev_hash="", hash="", **pending)
    return AuditEvent.objects.filter(**filters).order_by("-sequence").first()


def _locked_head() -> AuditChainHead:
    head = AuditChainHead.objects.select_for_update().filter(pk=1).first()
    if head is None:
        AuditChainHead.objects.get_or_create(pk=1, defaults={"last_sequence": 0, "last_hash": GENESIS_HASH})
        head = AuditChainHead.objects.select_for_update().get(pk=1)
    return head


# -- checkpoints ---------------------------------------------------------------


def _signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(base64.b64decode(settings.AUDIT_SIGNING_KEY))


def public_key_hex() -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return _signing_key().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def _checkpoint_message(sequence: int, event_hash_hex: str, prev_signature: str) -> bytes:
    return f"keyvault-audit-checkpoint:v1:{sequence}:{event_hash_hex}:{prev_signature}".encode("ascii")


def _sign_checkpoint(sequence: int, digest: str) -> AuditCheckpoint:
    previous = AuditCheckpoint.objects.order_by("-sequence").first()
    prev_signature = previous.signature if previous else ""
    signature = _signing_key().sign(_checkpoint_message(sequence, digest, prev_signature)).hex()
    cp = AuditCheckpoint.objects.create(
        sequence=sequence,
        event_hash=digest,
        signed_at=timezone.now(),
        public_key=public_key_hex(),
        prev_signature=prev_signature,
        signature=signature,
    )
    # Only a committed checkpoint is witnessed: a rolled-back one would read as "missing from the database".
    # (a lambda, not a partial: Django logs a robust callback's failure by its __qualname__)
    entry = WitnessEntry.of(cp)
    transaction.on_commit(lambda: audit_witness.publish(entry), robust=True)
    return cp


def checkpoint(*, actor: Actor) -> AuditCheckpoint:
    """Sign the chain head now (after recording that we did)."""
    with transaction.atomic():
        event = record(Action.AUDIT_CHECKPOINT, actor=actor, sequenced=True)
        existing = AuditCheckpoint.objects.filter(sequence=event.sequence).first()
        return existing or _sign_checkpoint(event.sequence, event.hash)


def checkpoint_if_moved() -> AuditCheckpoint | None:
    """Sign the head if events were appended since the newest checkpoint (beat, every ``AUDIT_CHECKPOINT_SECONDS``).

    No event is recorded for it, so an idle chain stays as it is; the checkpoint
    keeps the part of the chain no witness has seen to a few seconds' worth of events.
    """
    drain_all_pending()  # events whose writer died after committing them
    with transaction.atomic():
        head = _locked_head()  # writers wait: the head cannot move between reading it and signing it
        newest = AuditCheckpoint.objects.order_by("-sequence").values_list("sequence", flat=True).first()
        if head.last_sequence == 0 or (newest is not None and newest >= head.last_sequence):
            return None
        return _sign_checkpoint(head.last_sequence, head.last_hash)


# -- verification --------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of walking the chain."""

    ok: bool
    events: int
    checkpoints: int
    last_sequence: int
    last_hash: str
    broken_at: int | None = None
    reason: str = ""
    witness: str = ""  # what the witness check found, e.g. "witnessed to #9 by /var/lib/keyvault/audit-witness.jsonl"

    def __str__(self) -> str:
        if self.ok:
            return (
                f"OK: audit chain intact, {self.events} events to #{self.last_sequence} "
                f"(hash {self.last_hash[:16]}…), {self.checkpoints} signed checkpoints verified"
                + (f"; {self.witness}" if self.witness else "")
            )
        return f"BROKEN at #{self.broken_at}: {self.reason}"


def verify_chain(*, jobs: int | None = None, witness: str | None = None, use_witness: bool = True) -> VerifyResult:
    """Walk every event and checkpoint; report OK or the first broken position and why.

    Reading is :mod:`keyvault.audit.walk`'s job (on PostgreSQL, ``jobs`` connections
    sharing one snapshot); every hash, link and signature is checked here, in Python.
    Then the checkpoints must be dense enough (:func:`density_problem`) and hold
    everything a witness saw (:func:`witness_problem`): ``witness`` names a copy
    (file, http(s) URL, ``s3://``) to check instead of the configured witness
    files; ``use_witness=False`` skips the witness (``audit verify --no-witness``).
    """
    # Read the witness before the database: everything in it was committed before this
    # snapshot starts, so a checkpoint committed (and witnessed) during a long walk is
    # not mistaken for one the database lost.
    witnessed = _read_witnesses(witness) if use_witness else None
    with audit_walk.consistent_view() as view:
        checkpoint_sequences = set(AuditCheckpoint.objects.values_list("sequence", flat=True))
        segments = view.segments(checkpoint_sequences, jobs)
        expected_sequence, expected_prev = 1, GENESIS_HASH
        hashes_at_checkpoints: dict[int, str] = {}
        for segment in segments:
            problem = segment_problem(segment, expected_sequence, expected_prev)
            if problem:
                return _broken(problem[0] - 1, *problem)
            if segment.last:
                expected_sequence, expected_prev = segment.last[0] + 1, segment.last[1]
            hashes_at_checkpoints.update(segment.checkpoint_hashes)
        last_sequence = expected_sequence - 1
        count = sum(segment.events for segment in segments)
        head = AuditChainHead.objects.filter(pk=1).first()
        if head is not None and (head.last_sequence, head.last_hash) != (last_sequence, expected_prev):
            return _broken(count, last_sequence + 1 if head.last_sequence > last_sequence else head.last_sequence,
                           f"chain head records #{head.last_sequence} but the log ends at #{last_sequence} "
                           "(newest events removed or edited)")
        checked, problem, signed = _verify_checkpoints(hashes_at_checkpoints, last_sequence)
        if not problem and witnessed is not None:
            problem, witness_note = witness_problem(witnessed, signed, last_sequence)
        else:
            witness_note = "witness not checked (--no-witness)"
    problem = problem or density_problem(signed, last_sequence, settings.AUDIT_CHECKPOINT_INTERVAL)
    if problem:
        return _broken(count, problem[0], problem[1])
    return VerifyResult(ok=True, events=count, checkpoints=checked, last_sequence=last_sequence, last_hash=expected_prev,
                        witness=witness_note)


def segment_problem(segment: audit_walk.Segment, expected_sequence: int, expected_prev: str) -> tuple[int, str] | None:
    """The first break in a segment (sequence, reason), given where the chain before it ended."""
    if segment.first is not None:
        first_sequence, first_prev = segment.first
        if first_sequence != expected_sequence:
            return expected_sequence, audit_walk.sequence_jump(expected_sequence - 1, first_sequence)
        if first_prev != expected_prev:
            return first_sequence, audit_walk.LINK_BROKEN
    edited = _first_edited(segment.suspects)
    if edited is not None:
        return edited, "content does not match its hash (event edited)"
    return segment.failure


def _first_edited(sequences: list[int]) -> int | None:
    """The first of these events whose canonical bytes (the definition, not a rendering) miss its hash."""
    for start in range(0, len(sequences), 500):
        batch = AuditEvent.objects.filter(sequence__in=sequences[start:start + 500]).order_by("sequence")
        for row in audit_walk.load_rows(batch):
            if len(row) < len(_ROW_FIELDS):  # a value Django cannot even load
                return row[0]
            if hashlib.sha256(canonical_bytes(**dict(zip(_ROW_FIELDS, row[:11])))).hexdigest() != row[11]:
                return row[0]
    return None


def _verify_checkpoints(hashes: dict[int, str], last_sequence: int) -> tuple[int, tuple[int, str] | None, list[int]]:
    """How many checkpoints verified, the first problem, and the sequences of those verified."""
    prev_signature = ""
    signed: list[int] = []
    for cp in AuditCheckpoint.objects.order_by("sequence").iterator(chunk_size=VERIFY_CHUNK):
        if cp.sequence > last_sequence:
            return len(signed), (cp.sequence, f"checkpoint covers #{cp.sequence} but the log ends at #{last_sequence} "
                                 "(events removed)"), signed
        problem = checkpoint_problem(cp, hashes.get(cp.sequence), prev_signature)
        if problem:
            return len(signed), (cp.sequence, problem), signed
        prev_signature = cp.signature
        signed.append(cp.sequence)
    return len(signed), None, signed


def density_problem(signed: list[int], last_sequence: int, interval: int) -> tuple[int, str] | None:
    """The first place more than ``interval`` events go without a checkpoint (``interval`` 0: never).

    Every ``interval``-th event is signed as it is written, so no two consecutive
    checkpoints (counting genesis as #0) are more than ``interval`` apart, and fewer
    than ``interval`` events follow the last one. Time-based and on-demand checkpoints
    only add more. Deleting checkpoints to hide a rewrite leaves a gap: reported
    here as a missing checkpoint, never OK.
    """
    if not interval:
        return None
    previous = 0
    for sequence in signed:
        if sequence - previous > interval:
            return previous + interval, (f"missing checkpoint: none between #{previous} and #{sequence}, "
                                         f"one is signed every {interval} events (checkpoints deleted?)")
        previous = sequence
    if last_sequence - previous >= interval:
        return previous + interval, (f"missing checkpoint: none after #{previous} although the log ends at "
                                     f"#{last_sequence}, one is signed every {interval} events (checkpoints deleted?)")
    return None


@dataclass(frozen=True)
class _Witnessed:
    """What the witnesses held when verification began (``missing``: configured files that do not exist)."""

    entries: list[WitnessEntry]
    sources: list[str]
    missing: list[str]
    unreadable: str = ""


def _read_witnesses(spec: str | None) -> _Witnessed:
    try:
        witnesses = [audit_witness.destination(spec)] if spec else audit_witness.local_files()
    except AuditWitnessUnavailable as exc:
        return _Witnessed([], [], [], unreadable=str(exc))
    entries, sources, missing = [], [], []
    for witness in witnesses:
        if spec is None and not witness.exists():
            missing.append(witness.description)
            continue
        try:
            entries.extend(witness.read())
        except AuditWitnessUnavailable as exc:
            return _Witnessed([], [], [], unreadable=str(exc))
        sources.append(witness.description)
    return _Witnessed(entries, sources, missing)


def witness_problem(witnessed: _Witnessed, signed: list[int], last_sequence: int) -> tuple[tuple[int, str] | None, str]:
    """Whether the database still holds every checkpoint the witnesses saw, byte for byte; and a note for OK.

    The witnessed checkpoints must be validly signed by trusted keys and agree with each
    other; the newest must not lie beyond the end of the log ("chain shorter than
    witnessed"); each must be in the database exactly. The database's checkpoints chain
    to each other and to their events (checked before this), so the chain reaches them.
    A configured witness file that is missing while checkpoints exist is a break too:
    an operator must not lose the witness without noticing (``--no-witness`` skips it).
    """
    newest_signed = signed[-1] if signed else 0
    if witnessed.unreadable:
        return (max(newest_signed, 1), witnessed.unreadable), ""
    if witnessed.missing and signed:
        return (newest_signed, f"witness missing: {', '.join(witnessed.missing)} does not exist but the database "
                f"holds {len(signed)} signed checkpoints (restore it from a copy, or verify with --witness)"), ""
    if not witnessed.sources:
        if witnessed.missing:  # configured, but nothing signed yet to write there
            return None, f"witness {', '.join(witnessed.missing)} not started (no checkpoints yet)"
        return None, "no local witness file configured (check off-host copies with --witness)"
    by_sequence: dict[int, WitnessEntry] = {}
    for entry in witnessed.entries:
        known = by_sequence.setdefault(entry.sequence, entry)
        if known != entry:
            return (entry.sequence, f"the witness holds two different checkpoints for #{entry.sequence}"), ""
        problem = _signature_problem(entry.sequence, entry.event_hash, entry.prev_signature, entry.signature,
                                     entry.public_key)
        if problem:
            return (entry.sequence, f"witnessed checkpoint #{entry.sequence}: {problem}"), ""
    where = ", ".join(witnessed.sources)
    if not by_sequence:
        if signed:
            return (newest_signed, f"the witness ({where}) holds no checkpoint but the database holds {len(signed)}"), ""
        return None, f"witness {where} empty (no checkpoints yet)"
    newest = max(by_sequence)
    if newest > last_sequence:
        return (last_sequence + 1, f"chain shorter than witnessed: the witness holds a checkpoint at #{newest} "
                f"but the log ends at #{last_sequence} (events removed)"), ""
    sequences = sorted(by_sequence)
    for start in range(0, len(sequences), VERIFY_CHUNK):
        batch = sequences[start:start + VERIFY_CHUNK]
        stored = {cp.sequence: WitnessEntry.of(cp) for cp in AuditCheckpoint.objects.filter(sequence__in=batch)}
        for sequence in batch:
            if sequence not in stored:
                return (sequence, f"witnessed checkpoint #{sequence} is missing from the database"), ""
            if stored[sequence] != by_sequence[sequence]:
                return (sequence, f"checkpoint #{sequence} differs from the witnessed one"), ""
    return None, f"witnessed to #{newest} ({len(by_sequence)} checkpoints in {where})"


def checkpoint_problem(cp: AuditCheckpoint, event_hash: str | None, prev_signature: str) -> str:
    """Why a checkpoint does not vouch for the event hash at its sequence ("" if it does)."""
    if cp.event_hash != event_hash:
        return "checkpoint hash differs from the event's hash"
    if cp.prev_signature != prev_signature:
        return "checkpoint does not chain to the previous checkpoint"
    return _signature_problem(cp.sequence, cp.event_hash, cp.prev_signature, cp.signature, cp.public_key)


def _signature_problem(sequence: int, event_hash: str, prev_signature: str, signature: str, public_key: str) -> str:
    """Why a checkpoint's signature does not hold ("" if it is valid and by a trusted key)."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key)).verify(
            bytes.fromhex(signature), _checkpoint_message(sequence, event_hash, prev_signature)
        )
    except (InvalidSignature, ValueError, UnicodeEncodeError):
        return "checkpoint signature is invalid"
    if public_key not in trusted_public_keys():
        return "checkpoint signed by a key that is not trusted"
    return ""


def trusted_public_keys() -> set[str]:
    """The current signing key's public half plus any retired ones still trusted."""
    return {public_key_hex(), *settings.AUDIT_TRUSTED_PUBLIC_KEYS}


def _broken(events: int, sequence: int, reason: str) -> VerifyResult:
    """A failed verification; ``events`` verified before the break."""
    return VerifyResult(ok=False, events=events, checkpoints=0, last_sequence=sequence - 1, last_hash="",
                        broken_at=sequence, reason=reason)


def chain_position() -> tuple[int, str]:
    """The current head (sequence, hash) — stamped on exports and reports."""
    head = AuditChainHead.objects.filter(pk=1).first()
    return (head.last_sequence, head.last_hash) if head else (0, GENESIS_HASH)


def export(*, actor: Actor, format: str, since: datetime | None = None, until: datetime | None = None,
           since_text: str | None = None, until_text: str | None = None) -> Iterator[dict]:
    """Record an export (with the chain position it starts from), then yield its rows.

    The export is itself an audited event, recorded before streaming starts, so a copy
    of the log always says who took it. ``since_text``/``until_text`` are the bounds
    as the person gave them, for the record.
    """
    sequence, head_hash = chain_position()
    record(
        Action.AUDIT_EXPORTED,
        actor=actor,
        details={"format": format, "since": since_text, "until": until_text,
                 "chain_sequence": sequence, "chain_hash": head_hash},
    )
    return export_rows(since=since, until=until)


def export_rows(*, since: datetime | None = None, until: datetime | None = None) -> Iterator[dict]:
    """Events in chain order as plain dicts, with their hashes, for offline re-verification."""
    queryset = AuditEvent.objects.order_by("sequence")
    if since:
        queryset = queryset.filter(timestamp__gte=since)
    if until:
        queryset = queryset.filter(timestamp__lt=until)
    for event in queryset.iterator(chunk_size=VERIFY_CHUNK):
        yield event_document(event)


def event_document(event: AuditEvent) -> dict:
    """An event exactly as its hash covers it (see :func:`canonical_bytes`), plus the hash."""
    return {
        "sequence": event.sequence,
        "timestamp": event.timestamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "actor": event.actor,
        "action": event.action,
        "target_type": event.target_type,
        "target_id": event.target_id,
        "outcome": event.outcome,
        "request_id": event.request_id,
        "ip_address": event.ip_address,
        "details": event.details,
        "prev_hash": event.prev_hash,
        "hash": event.hash,
    }
