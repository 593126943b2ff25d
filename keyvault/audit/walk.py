"""Reading the audit chain fast enough to verify a million events in seconds.

:func:`keyvault.audit.verify_chain` judges the chain; this module only feeds it.
What costs time is reading events and re-serialising them, not SHA-256 (a million
hashes take about half a second), so:

* On PostgreSQL the database renders each event's canonical document
  (:data:`DOCUMENT_SQL`, the same bytes as :func:`keyvault.audit.canonical_bytes`
  for ASCII text and flat details). Python still computes every hash and checks
  every link: the database formats, it never vouches. A rendering that is not
  the canonical document (non-ASCII text, nested details, odd timestamps) just
  fails to hash to the stored value; such an event becomes a *suspect*, and the
  verifier re-checks it with ``canonical_bytes`` itself — only that verdict
  counts. Tests hold that the SQL rendering of any event is either exactly its
  canonical document or no canonical document at all, so a rendering that hashes
  correctly cannot hide an edit.
* The walk is split into sequence ranges read by ``jobs`` connections at once.
  They share one exported snapshot (``pg_export_snapshot``, as ``pg_dump -j``
  does), so every range, the chain head and the checkpoints are read as of one
  instant while writers carry on appending.
* Elsewhere (SQLite) events are read in keyset pages and rendered in Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.db import DataError, connection, transaction
from django.db.models import QuerySet

from keyvault.models.core import AuditEvent

PAGE_SIZE = 20_000  # events per keyset page
MAX_DEFAULT_JOBS = 4

ROW_FIELDS = (
    "sequence", "timestamp", "actor", "action", "target_type", "target_id", "outcome", "request_id",
    "ip_address", "details", "prev_hash", "hash",
)

# One event's canonical document, rendered by PostgreSQL: keys in sorted order,
# strings through to_json (the same escapes as Python's ensure_ascii JSON for
# ASCII text), details keys sorted bytewise and arrays of scalars compacted,
# ``abbrev(inet)`` (the inet output form Django reads), UTC microseconds.
# NULL where PostgreSQL cannot render the document (years outside 1000-9999,
# details that are not an object); the verifier renders those rows itself.
DOCUMENT_SQL = """
CASE WHEN e.timestamp >= '1000-01-01 00:00:00+00' AND e.timestamp < '10000-01-01 00:00:00+00'
          AND jsonb_typeof(e.details) = 'object' THEN
  '{"action":' || to_json(e.action::text)::text
  || ',"actor":' || to_json(e.actor::text)::text
  || ',"details":{' || coalesce((
       SELECT string_agg(to_json(d.key)::text || ':' || CASE WHEN jsonb_typeof(d.value) = 'array' THEN
                   '[' || coalesce((SELECT string_agg(a.value::text, ',' ORDER BY a.position)
                                    FROM jsonb_array_elements(d.value) WITH ORDINALITY AS a(value, position)), '')
                   || ']'
                 ELSE d.value::text END,
              ',' ORDER BY d.key COLLATE "C")
       FROM jsonb_each(e.details) AS d), '') || '}'
  || ',"ip_address":' || coalesce(to_json(abbrev(e.ip_address))::text, 'null')
  || ',"outcome":' || to_json(e.outcome::text)::text
  || ',"prev_hash":' || to_json(e.prev_hash::text)::text
  || ',"request_id":' || to_json(e.request_id::text)::text
  || ',"sequence":' || e.sequence::text
  || ',"target_id":' || to_json(e.target_id::text)::text
  || ',"target_type":' || to_json(e.target_type::text)::text
  || ',"timestamp":"' || to_char(e.timestamp AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') || '"}'
END"""

_TABLE = '"%s"' % AuditEvent._meta.db_table
# ``{table}``: the events table, schema-qualified (the rendering runs with search_path = pg_catalog, see _pinned).
_PAGE_SQL = f"SELECT e.sequence, e.prev_hash, e.hash, {DOCUMENT_SQL} FROM {{table}} AS e WHERE e.sequence > %s"
_PAGE_ORDER = " ORDER BY e.sequence LIMIT %s"
# What loading a tampered value can raise: bad JSON, a date Python cannot hold.
_UNLOADABLE = (ValueError, TypeError, OverflowError, DataError)
_SNAPSHOT_ID = re.compile(r"^[0-9A-F]+-[0-9A-F]+(-[0-9]+)?$")


@dataclass
class Segment:
    """What walking one contiguous stretch of the log found."""

    events: int = 0
    first: tuple[int, str] | None = None  # (sequence, prev_hash) of its first event
    last: tuple[int, str] | None = None  # (sequence, hash) of its last event
    suspects: list[int] = field(default_factory=list)  # rendered documents that did not hash to the stored hash
    failure: tuple[int, str] | None = None  # the first break inside the stretch: (sequence, reason)
    checkpoint_hashes: dict[int, str] = field(default_factory=dict)


def sequence_jump(last_good: int, found: int) -> str:
    return f"sequence jumps from #{last_good} to #{found} (event missing or inserted)"


LINK_BROKEN = "prev_hash does not match the previous event's hash (reordered, inserted or removed)"


def walk(rows: Iterable[tuple[int, str, str, str | None]], checkpoint_sequences: set[int]) -> Segment:
    """Check links and hashes of ``(sequence, prev_hash, hash, document)`` rows in sequence order.

    The first row is taken as given (the caller joins segments); the walk stops
    at the first gap or broken link. Content mismatches are only suspects here.
    """
    segment = Segment()
    sha256 = hashlib.sha256
    expected_sequence, expected_prev = None, None
    for sequence, prev_hash, stored_hash, document in rows:
        if expected_sequence is None:
            segment.first = (sequence, prev_hash)
        elif sequence != expected_sequence:
            segment.failure = (expected_sequence, sequence_jump(expected_sequence - 1, sequence))
            break
        elif prev_hash != expected_prev:
            segment.failure = (sequence, LINK_BROKEN)
            break
        if document is None or sha256(document.encode()).hexdigest() != stored_hash:
            segment.suspects.append(sequence)
        if sequence in checkpoint_sequences:
            segment.checkpoint_hashes[sequence] = stored_hash
        expected_sequence, expected_prev = sequence + 1, stored_hash
        segment.events += 1
    if segment.events:
        segment.last = (expected_sequence - 1, expected_prev)
    return segment


# -- reading on PostgreSQL -----------------------------------------------------


def _rendered_rows(cursor, table: str, after: int, before: int | None) -> Iterator[tuple]:
    """Rows ``after < sequence < before`` with their SQL-rendered documents, in keyset pages."""
    sql = _PAGE_SQL.replace("{table}", table) + ("" if before is None else " AND e.sequence < %s") + _PAGE_ORDER
    while True:
        params = [after, PAGE_SIZE] if before is None else [after, before, PAGE_SIZE]
        cursor.execute(sql, params)
        rows = cursor.fetchall()
        if not rows:
            return
        yield from rows
        after = rows[-1][0]


def walk_range(after: int, before: int | None, checkpoint_sequences: set[int]) -> Segment:
    """Walk the events ``after < sequence < before`` (``None``: to the end) on this connection."""
    if connection.vendor != "postgresql":
        return walk(_python_rendered_rows(after, before), checkpoint_sequences)
    # In a transaction of its own when there is none, or the settings would not hold.
    with transaction.atomic(), connection.cursor() as cursor, _pinned(cursor) as table:
        return walk(_rendered_rows(cursor, table, after, before), checkpoint_sequences)


def _range_bounds(cursor, jobs: int, min_per_job: int) -> list[tuple[int, int | None]]:
    """Up to ``jobs`` (after, before) sequence ranges covering every event, the last one open-ended."""
    cursor.execute(f"SELECT min(sequence), max(sequence) FROM {_TABLE}")
    low, high = cursor.fetchone()
    if low is None or jobs <= 1 or high - low + 1 < jobs * min_per_job:
        return [(-1, None)]
    step = (high - low) // jobs + 1
    cuts = [low + k * step for k in range(1, jobs)]
    return list(zip([-1, *[c - 1 for c in cuts]], [*cuts, None]))


def _walk_range_in_snapshot(snapshot: str, after: int, before: int | None, checkpoint_sequences: set[int]) -> Segment:
    """One range, on this worker thread's own connection, in a transaction that imports the verifier's snapshot."""
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                _begin_repeatable_read(cursor)
                cursor.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
            return walk_range(after, before, checkpoint_sequences)
    finally:
        connection.close()


def _begin_repeatable_read(cursor) -> None:
    """The first statement of the transaction: one read-only view of the log for all its reads."""
    cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")


# The rendering looks expensive to the planner, which then JIT-compiles every
# page: ~200 ms of compiling for ~100 ms of work. Off for the verifier's transaction.
# And the rendering must use PostgreSQL's own functions and operators only: the tables'
# owner can add an exact-type overload (``public.to_json(text)``) or an operator that
# the default search_path prefers, and make an edited event render as the original
# document, whose hash then matches. With search_path = pg_catalog nothing else is
# visible (temporary schemas are never searched for functions or operators).
_SET_LOCAL = "SELECT pg_catalog.set_config(%s, %s, true)"
_PINNED = {"jit": "off", "search_path": "pg_catalog"}


@contextmanager
def _pinned(cursor):
    """JIT off and search_path pg_catalog for the current transaction, then back to what they were (it may be
    the caller's). Yields the events table's schema-qualified name, as the caller's search_path found it."""
    cursor.execute("SELECT pg_catalog.to_regclass(%s)::pg_catalog.oid", [AuditEvent._meta.db_table])
    (table_oid,) = cursor.fetchone()
    previous = {}
    for name, value in _PINNED.items():
        cursor.execute("SELECT pg_catalog.current_setting(%s)", [name])
        (previous[name],) = cursor.fetchone()
        cursor.execute(_SET_LOCAL, [name, value])
    # Not visible on search_path any more, so regclass names it with its schema.
    cursor.execute("SELECT %s::pg_catalog.oid::pg_catalog.regclass::pg_catalog.text", [table_oid])
    (table,) = cursor.fetchone()
    yield table
    for name, value in previous.items():  # after an error the transaction, and the settings, roll back anyway
        cursor.execute(_SET_LOCAL, [name, value])


def default_jobs() -> int:
    return max(1, min(MAX_DEFAULT_JOBS, os.cpu_count() or 1))


@contextmanager
def consistent_view():
    """Run the verifier's reads as of one instant where the database allows it.

    On PostgreSQL, outside a transaction: a read-only REPEATABLE READ transaction
    whose snapshot parallel readers import. Inside the caller's transaction that
    transaction is the view (its uncommitted events would be invisible to other
    connections, so the walk stays on this one). SQLite: autocommit pages, as a
    transaction there would hold the write lock for the whole walk.
    """
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        yield _ChainReader(snapshot=None)
        return
    with transaction.atomic():
        with connection.cursor() as cursor:
            _begin_repeatable_read(cursor)
            cursor.execute("SELECT pg_export_snapshot()")
            (snapshot,) = cursor.fetchone()
        if not _SNAPSHOT_ID.match(snapshot):  # it is spliced into SQL below
            raise ValueError(f"unexpected snapshot id {snapshot!r}")
        yield _ChainReader(snapshot=snapshot)


@dataclass(frozen=True)
class _ChainReader:
    snapshot: str | None

    def segments(self, checkpoint_sequences: set[int], jobs: int | None = None) -> list[Segment]:
        """The whole log as segments in sequence order (one, unless read in parallel)."""
        if not self.snapshot:
            return [walk_range(-1, None, checkpoint_sequences)]
        with connection.cursor() as cursor:
            # A chain too short to be worth splitting is read in one go unless jobs are asked for.
            bounds = _range_bounds(cursor, jobs or default_jobs(), 1 if jobs else PAGE_SIZE)
        if len(bounds) == 1:
            return [walk_range(-1, None, checkpoint_sequences)]
        with ThreadPoolExecutor(max_workers=len(bounds), thread_name_prefix="audit-verify") as pool:
            futures = [pool.submit(_walk_range_in_snapshot, self.snapshot, after, before, checkpoint_sequences)
                       for after, before in bounds]
            return [future.result() for future in futures]


# -- reading elsewhere: rendered in Python -------------------------------------

_json_str = json.encoder.encode_basestring_ascii
_json_details = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode
_ZERO = timedelta(0)


def _utc_text(timestamp: datetime) -> str:
    if timestamp.utcoffset() != _ZERO:
        timestamp = timestamp.astimezone(UTC)
    return timestamp.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def fast_canonical_text(sequence, timestamp, actor, action, target_type, target_id, outcome, request_id,
                        ip_address, details, prev_hash) -> str:
    """Exactly :func:`keyvault.audit.canonical_bytes` (as text), assembled by hand for the hot loop.

    Keys in sorted order, the same JSON escaping (ASCII only); a test holds the two
    byte-equal on arbitrary events.
    """
    return (
        '{"action":' + _json_str(action)
        + ',"actor":' + _json_str(actor)
        + ',"details":' + _json_details(details)
        + ',"ip_address":' + ("null" if ip_address is None else _json_str(ip_address))
        + ',"outcome":' + _json_str(outcome)
        + ',"prev_hash":' + _json_str(prev_hash)
        + ',"request_id":' + _json_str(request_id)
        + ',"sequence":' + str(int(sequence))
        + ',"target_id":' + _json_str(target_id)
        + ',"target_type":' + _json_str(target_type)
        + ',"timestamp":"' + _utc_text(timestamp) + '"}'
    )


def load_rows(events: QuerySet) -> list[tuple]:
    """These events (an ordered queryset) as ``ROW_FIELDS`` tuples, as Django loads them.

    An event holding a value Django cannot load (tampered JSON, a timestamp out of
    range) comes back as ``(sequence, prev_hash, hash)`` only, so one bad row
    is reported rather than ending the walk with a traceback.
    """
    try:
        return list(events.values_list(*ROW_FIELDS))
    except _UNLOADABLE:
        pass
    rows = []
    for sequence, prev_hash, stored_hash in events.values_list("sequence", "prev_hash", "hash"):
        try:
            rows.append(AuditEvent.objects.filter(sequence=sequence).values_list(*ROW_FIELDS).get())
        except _UNLOADABLE:
            rows.append((sequence, prev_hash, stored_hash))
    return rows


def _python_rendered_rows(after: int, before: int | None) -> Iterator[tuple[int, str, str, str | None]]:
    """Events ``after < sequence < before`` as (sequence, prev_hash, hash, document), rendered here."""
    events = AuditEvent.objects.order_by("sequence")
    if before is not None:
        events = events.filter(sequence__lt=before)
    last = after
    while True:
        page = load_rows(events.filter(sequence__gt=last)[:PAGE_SIZE])
        if not page:
            return
        for row in page:
            if len(row) < len(ROW_FIELDS):
                yield row[0], row[1], row[2], None
            else:
                yield row[0], row[10], row[11], fast_canonical_text(*row[:11])
        last = page[-1][0]
