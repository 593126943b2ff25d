"""Reports an auditor can hand to an assessor, and their tamper-evident exports.

Each report is a plain function ``(filters, now) -> rows`` registered in
:data:`REPORTS`; :func:`build` runs one and stamps it with the audit chain position
it was produced at. :func:`export` serialises a report (CSV, JSON or HTML), records
an ``audit.exported`` event carrying the SHA-256 of the exported body, and seals the
file with a trailer naming that hash and event. :func:`verify_export` recomputes the
hash of a file and finds its event, so an auditor can prove later that a file is the
one Keyvault produced (``manage.py audit verify-export FILE``).

The sealed formats:

* CSV and HTML: the body, then one last line
  ``# keyvault-export: body-sha256=<hex> audit-event=#<n> report=<name>`` (CSV) or the
  same text inside ``<!-- … -->`` (HTML). The hash covers every byte before that line.
* JSON: the body is one canonical JSON object (sorted keys, no spaces, ASCII); the
  sealed file adds a last member ``"export": {"audit_event": n, "body_sha256": hex}``.
  The hash covers the canonical serialisation of the object without ``export``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.db.models import Prefetch, Q, QuerySet
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from keyvault import audit
from keyvault.audit import Actor, events
from keyvault.console import dashboard
from keyvault.exceptions import KeyvaultError
from keyvault.models import AuditEvent, KeyEncryptionKey, KeyVersion
from rotation import services as rotation_services
from rotation.models import NIST_MAX_ORIGINATOR_DAYS, Approval, RotationPolicy, RotationRun, RunStep

#: The most rows one report returns; a longer result says it was truncated (narrow the period).
#: A paged report's CSV (``stream_csv``) has no such limit: it is streamed, never held whole.
MAX_ROWS = 50_000
#: Rows on one console page of a paged report (``build_page``).
PAGE_ROWS = 100
#: Rows fetched per round trip (server-side cursor) while a CSV is streamed.
STREAM_CHUNK_ROWS = 2_000
FORMATS = ("csv", "json", "html")
CONTENT_TYPES = {"csv": "text/csv; charset=utf-8", "json": "application/json", "html": "text/html; charset=utf-8"}
TRAILER = re.compile(
    r"keyvault-export: body-sha256=(?P<sha>[0-9a-f]{64}) audit-event=#(?P<seq>\d+) report=(?P<report>[a-z_-]+)"
)


class InvalidReportRequest(KeyvaultError, ValueError):
    """A report name, filter or format is not valid (shown to the user; a 400, never a 500)."""


class ExportNotVerified(KeyvaultError):
    """The file is not an intact Keyvault export, or no audit event records it."""


# -- filters -------------------------------------------------------------------------


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if moment else None


def parse_moment(value: str | None, *, name: str) -> datetime | None:
    """``2026-01-31`` (midnight UTC) or an ISO 8601 date-time; naive values are UTC."""
    if value is None or not str(value).strip():
        return None
    text = str(value).strip()
    try:
        parsed = parse_datetime(text)
        if parsed is None:
            day = parse_date(text)
            if day is None:
                raise ValueError
            parsed = datetime(day.year, day.month, day.day)
    except ValueError:
        raise InvalidReportRequest(f"{name}: not a date (YYYY-MM-DD) or ISO 8601 date-time: {text[:40]!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Filters:
    """What a report is narrowed to. ``until`` is exclusive, like ``audit export``."""

    since: datetime | None = None
    until: datetime | None = None
    user: str = ""
    kek: str = ""

    def as_dict(self) -> dict:
        return {"since": _iso(self.since), "until": _iso(self.until), "user": self.user or None,
                "kek": self.kek or None}

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.as_dict().items() if v]
        return " ".join(parts) or "none"


def parse_filters(data: Mapping, *, allowed: tuple[str, ...] = ("since", "until", "user", "kek")) -> Filters:
    """Filters from a query dict or CLI options.

    :raises InvalidReportRequest: a bad date, ``since`` not before ``until``, an unknown
        KEK, an over-long user name, or a filter the report does not take.
    """
    values = {name: (data.get(name) or "") for name in ("since", "until", "user", "kek")}
    values = {name: str(value).strip() for name, value in values.items()}
    unsupported = [name for name, value in values.items() if value and name not in allowed]
    if unsupported:
        raise InvalidReportRequest(f"this report does not filter by {', '.join(unsupported)}")
    since = parse_moment(values["since"], name="since")
    until = parse_moment(values["until"], name="until")
    if since and until and since >= until:
        raise InvalidReportRequest("since must be before until")
    user = values["user"]
    if len(user) > 150 or any(ch.isspace() or not ch.isprintable() for ch in user):
        raise InvalidReportRequest("user: not a user name")
    kek = values["kek"]
    # A name with NUL or control characters names no key, and PostgreSQL would refuse it as a parameter.
    if kek and (not kek.isprintable() or not KeyEncryptionKey.objects.filter(name=kek).exists()):
        raise InvalidReportRequest(f"kek: no key-encryption key named {kek[:100]!r}")
    return Filters(since=since, until=until, user=user, kek=kek)


# -- reports ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    key: str
    label: str


@dataclass
class Report:
    """A built report: rows (dicts of str/int/bool/None or lists of str) and what it was built from."""

    name: str
    title: str
    description: str
    columns: list[Column]
    rows: list[dict]
    filters: Filters
    generated_at: datetime
    chain_sequence: int
    chain_hash: str
    truncated: bool = False
    notes: list[str] = field(default_factory=list)
    #: A keyset page (``build_page``): the key to continue after, if there are more rows.
    paged: bool = False
    next_after: int | None = None

    def document(self, *, generated_by: str) -> dict:
        """The JSON body (without the seal)."""
        return {
            "report": self.name,
            "title": self.title,
            "generated_at": _iso(self.generated_at),
            "generated_by": generated_by,
            "filters": self.filters.as_dict(),
            "audit_chain_position": {"sequence": self.chain_sequence, "hash": self.chain_hash},
            "columns": [column.key for column in self.columns],
            "rows": self.rows,
            "row_count": len(self.rows),
            "truncated": self.truncated,
            "notes": self.notes,
        }


def keyset_beyond(queryset: QuerySet, *, key: str, cursor: int, older: bool, time_field: str = "") -> QuerySet:
    """Rows strictly before (``older``) or after the row whose unique ``key`` is ``cursor``.

    In ``key`` order, or with ``time_field`` in (time, key) order: the bound on time alone lets a
    (time, key) index start at the cursor's row, and the OR settles rows of the same moment.
    """
    op = "lt" if older else "gt"
    if not time_field:
        return queryset.filter(**{f"{key}__{op}": cursor})
    moment = queryset.model._default_manager.filter(**{key: cursor}).values_list(time_field, flat=True).first()
    if moment is None:  # no such row: start from the edge
        return queryset
    return queryset.filter(**{f"{time_field}__{op}e": moment}).filter(
        Q(**{f"{time_field}__{op}": moment}) | Q(**{f"{key}__{op}": cursor}))


@dataclass(frozen=True)
class Keyset:
    """How a report that can be large is paged and streamed: by a unique key, in ascending order.

    ``queryset(filters, up_to)`` gives the report's objects ordered by ``key`` and no later than the
    audit chain position ``up_to`` (so a page or a file matches the position it is stamped with);
    ``row`` turns one object into a row; ``notes`` says what the filters mean.
    """

    queryset: Callable[[Filters, int], QuerySet]
    key: str
    row: Callable[[object], dict]
    notes: Callable[[Filters], list[str]]
    #: Ordered by (``time_field``, ``key``) when the filters narrow the time (served by one index).
    time_field: str = ""

    def time_ordered(self, filters: Filters) -> bool:
        return bool(self.time_field and (filters.since or filters.until))


@dataclass(frozen=True)
class ReportSpec:
    name: str
    title: str
    description: str
    filters: tuple[str, ...]
    columns: tuple[Column, ...]
    rows: Callable[[Filters, datetime], tuple[list[dict], list[str]]]
    #: Set for reports that can be large: the console pages them by key and streams their CSV.
    keyset: Keyset | None = None


def _when(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if moment else None


def _period(value: timedelta | None) -> str | None:
    if value is None:
        return None
    from rotation.models import format_period

    return format_period(value)


def _user_filter_q(username: str) -> Q:
    return Q(initiator=f"user:{username}") | Q(approvals__approver__username=username)


# (1) key inventory with rotation history


def inventory_rows(filters: Filters, now: datetime) -> tuple[list[dict], list[str]]:
    """One row per KEK version: the key, the version's life, and the rotation that made it."""
    versions = KeyVersion.objects.select_related("kek").order_by("kek__name", "number")
    if filters.kek:
        versions = versions.filter(kek__name=filters.kek)
    if filters.since:
        versions = versions.filter(created_at__gte=filters.since)
    if filters.until:
        versions = versions.filter(created_at__lt=filters.until)
    policies = {p.kek_id: p for p in RotationPolicy.objects.filter(kek__isnull=False)}
    runs = {}
    for run in RotationRun.objects.filter(kek__isnull=False, target_version__isnull=False).order_by("created_at"):
        runs[(run.kek_id, run.target_version)] = run
    versions = list(versions[: MAX_ROWS + 1])
    from keyvault.keys import services

    coverage = services.coverage_by_kek({version.kek_id for version in versions})  # one query, not one per KEK
    rows = []
    for version in versions:
        kek = version.kek
        if kek.pk not in policies:  # the policy the sweep will give it
            policies[kek.pk] = rotation_services.policy_of(kek)
        policy = policies[kek.pk]
        run = runs.get((kek.pk, version.number))
        if run is not None:
            made_by = f"run #{run.pk} ({run.get_kind_display().lower()}, {run.get_state_display().lower()}) " \
                      f"started by {run.initiator}"
        elif version.number == 1:
            made_by = "created with the key"
        else:
            made_by = "rotated directly (see audit log)"
        rows.append({
            "kek": kek.name,
            "provider": kek.provider,
            "kek_state": kek.state,
            "kek_created_at": _when(kek.created_at),
            "rotation_period": _period(policy.period),
            "next_rotation_at": _when(policy.next_due_at),
            "version": version.number,
            "version_state": version.state,
            "primary": version.is_primary,
            "version_created_at": _when(version.created_at),
            "age_days": (now - version.created_at).days,
            "data_keys": coverage.get(kek.pk, {}).get(version.number, 0),
            "encryptions": version.encrypt_count,
            "made_by": made_by,
        })
    return rows, []


INVENTORY_COLUMNS = (
    Column("kek", "KEK"), Column("provider", "Provider"), Column("kek_state", "KEK state"),
    Column("kek_created_at", "KEK created (UTC)"), Column("rotation_period", "Rotation period"),
    Column("next_rotation_at", "Next rotation (UTC)"), Column("version", "Version"),
    Column("version_state", "Version state"), Column("primary", "Primary"),
    Column("version_created_at", "Version created (UTC)"), Column("age_days", "Age (days)"),
    Column("data_keys", "Data keys wrapped"), Column("encryptions", "Encryptions"),
    Column("made_by", "Made by"),
)


# (2) rotations in a period, with approvers and evidence


def rotation_rows(filters: Filters, now: datetime) -> tuple[list[dict], list[str]]:
    """Every run created in the period, with its approvals and each runbook step's evidence."""
    runs = RotationRun.objects.select_related("kek", "destination_kek").prefetch_related(
        Prefetch("approvals", queryset=Approval.objects.select_related("approver").order_by("created_at")),
        Prefetch("steps", queryset=RunStep.objects.order_by("order")),
    ).order_by("created_at", "pk")
    if filters.since:
        runs = runs.filter(created_at__gte=filters.since)
    if filters.until:
        runs = runs.filter(created_at__lt=filters.until)
    if filters.kek:
        runs = runs.filter(kek__name=filters.kek)
    if filters.user:
        runs = runs.filter(_user_filter_q(filters.user)).distinct()
    rows = []
    for run in runs[: MAX_ROWS + 1]:
        approvals = [
            f"{a.approver.get_username()} {a.get_decision_display().lower()}d"
            f"{' (break-glass)' if a.break_glass else ''} at {_when(a.created_at)}: {a.comment}"
            for a in run.approvals.all()
        ]
        evidence = [
            f"[{step.status}] {step.key}"
            + (f" by {step.done_by} at {_when(step.done_at)}" if step.done_at else "")
            + (f": {step.evidence}" if step.evidence else "")
            for step in run.steps.all()
        ]
        rows.append({
            "run": run.pk,
            "target": run.target_label,
            "kind": run.kind,
            "state": run.state,
            "initiator": run.initiator,
            "reason": run.reason,
            "incident_ref": run.incident_ref,
            "created_at": _when(run.created_at),
            "started_at": _when(run.started_at),
            "finished_at": _when(run.finished_at),
            "previous_version": run.previous_version,
            "new_version": run.target_version,
            "data_keys": run.total_deks,
            "rewrapped": run.rewrapped,
            "failed": run.failed_deks,
            "approvals": approvals,
            "break_glass": any(a.break_glass for a in run.approvals.all()),
            "evidence": evidence,
        })
    return rows, []


ROTATION_COLUMNS = (
    Column("run", "Run"), Column("target", "Target"), Column("kind", "Kind"), Column("state", "State"),
    Column("initiator", "Initiated by"), Column("reason", "Reason"), Column("incident_ref", "Incident"),
    Column("created_at", "Requested (UTC)"), Column("started_at", "Started (UTC)"),
    Column("finished_at", "Finished (UTC)"), Column("previous_version", "From version"),
    Column("new_version", "To version"), Column("data_keys", "Data keys"), Column("rewrapped", "Rewrapped"),
    Column("failed", "Failed"), Column("approvals", "Approvals"), Column("break_glass", "Break-glass"),
    Column("evidence", "Runbook evidence"),
)


# (3) who did what: audit events by actor or by target


def activity_events(filters: Filters, up_to: int | None = None) -> QuerySet:
    """Audit events in chain order, by a user (as actor) and/or about a KEK (as target).

    Each filter is served by an index ending in ``sequence`` (``audit_actor_seq``,
    ``audit_target_seq``), so a page of them is one index range scan. A period is listed in
    time order (``audit_time_seq``), which is chain order as the chain stamps events in turn.
    """
    period = filters.since or filters.until
    chosen = AuditEvent.objects.order_by(*(("timestamp", "sequence") if period else ("sequence",)))
    if filters.user:
        chosen = chosen.filter(actor=f"user:{filters.user}")
    if filters.kek:
        chosen = chosen.filter(target_type="keyencryptionkey", target_id=filters.kek)
    if filters.since:
        chosen = chosen.filter(timestamp__gte=filters.since)
    if filters.until:
        chosen = chosen.filter(timestamp__lt=filters.until)
    if up_to is not None:
        chosen = chosen.filter(sequence__lte=up_to)
    return chosen


def activity_notes(filters: Filters) -> list[str]:
    if not filters.user and not filters.kek:
        return ["No user or KEK given: every event in the period is listed."]
    return []


def activity_rows(filters: Filters, now: datetime) -> tuple[list[dict], list[str]]:
    """Audit events in chain order, by a user (as actor) and/or about a KEK (as target)."""
    rows = [_activity_row(event) for event in activity_events(filters)[: MAX_ROWS + 1]]
    return rows, activity_notes(filters)


def _activity_row(event: AuditEvent) -> dict:
    """The chain's own serialisation of the event (``audit.event_document``), details as one JSON cell."""
    row = audit.event_document(event)
    del row["prev_hash"]
    row["details"] = json.dumps(row["details"], sort_keys=True, separators=(",", ":"))
    return row


ACTIVITY_COLUMNS = (
    Column("sequence", "#"), Column("timestamp", "Time (UTC)"), Column("actor", "Actor"), Column("action", "Action"),
    Column("target_type", "Target type"), Column("target_id", "Target"), Column("outcome", "Outcome"),
    Column("ip_address", "IP address"), Column("request_id", "Request id"), Column("details", "Details"),
    Column("hash", "Event hash"),
)


# (4) overdue rotations and other violations


def violation_rows(filters: Filters, now: datetime) -> tuple[list[dict], list[str]]:
    """Overdue rotations, versions past their cryptoperiod, policies beyond NIST, failed or paused runs."""
    rows = []
    for item in dashboard.due_rotations(now=now, horizon_days=0, kek=filters.kek):
        if not item.overdue:
            continue
        rows.append({
            "kind": "overdue_rotation", "target": item.target, "since": _when(item.due_at),
            "days": item.overdue_days,
            "detail": f"rotation due {_when(item.due_at)} (every {_period(item.period)})"
                      + (f"; run {item.active_run} in progress" if item.active_run else "; no run in progress"),
        })
    for item in dashboard.past_cryptoperiod(now=now, kek=filters.kek):
        what = "primary version still encrypting" if item.rule == "originator" else "old version still decrypting"
        rows.append({
            "kind": f"past_{item.rule}_period", "target": f"KEK {item.kek} v{item.version}",
            "since": _when(item.created_at + timedelta(days=item.limit_days)), "days": item.age_days - item.limit_days,
            "detail": f"{what}: {item.age_days} days old, limit {item.limit_days} days ({item.source})",
        })
    policies = RotationPolicy.objects.select_related("kek").filter(kek__isnull=False).order_by("kek__name")
    if filters.kek:
        policies = policies.filter(kek__name=filters.kek)
    for policy in policies:
        for warning in policy.warnings():
            rows.append({
                "kind": "policy_beyond_nist", "target": policy.target_label, "since": _when(policy.updated_at),
                "days": max(0, policy.period.days - NIST_MAX_ORIGINATOR_DAYS), "detail": warning,
            })
    for item in dashboard.problem_runs(since=filters.since, until=filters.until, kek=filters.kek):
        rows.append({
            "kind": "failed_run" if item.problem.startswith("failed") else "paused_run",
            "target": f"{item.target} run #{item.run_id}", "since": _when(item.created_at),
            "days": (now - item.created_at).days, "detail": item.problem,
        })
    notes = ["Rotations, cryptoperiods and policies are as of the report time; since/until narrow the runs only."]
    return rows, notes


VIOLATION_COLUMNS = (
    Column("kind", "Finding"), Column("target", "Target"), Column("since", "Since (UTC)"),
    Column("days", "Days"), Column("detail", "Detail"),
)


REPORTS: dict[str, ReportSpec] = {
    spec.name: spec
    for spec in (
        ReportSpec("inventory", "Key inventory with rotation history",
                   "Every KEK version: provider, state, age, data keys it wraps and the rotation that made it. "
                   "since/until select versions created in the period.",
                   ("since", "until", "kek"), INVENTORY_COLUMNS, inventory_rows),
        ReportSpec("rotations", "Rotations in a period, with approvers and evidence",
                   "Every rotation run requested in the period: who started it, who approved it, and each runbook "
                   "step with its evidence. user: runs started or approved by that user.",
                   ("since", "until", "user", "kek"), ROTATION_COLUMNS, rotation_rows),
        ReportSpec("activity", "Who did what",
                   "Audit events, with their hashes, by a user (actor) and/or about a KEK (target).",
                   ("since", "until", "user", "kek"), ACTIVITY_COLUMNS, activity_rows,
                   keyset=Keyset(activity_events, "sequence", _activity_row, activity_notes, "timestamp")),
        ReportSpec("violations", "Overdue rotations and violations",
                   "Overdue rotations, key versions past their cryptoperiod (policy period, else NIST SP 800-57), "
                   "policies beyond NIST guidance, failed and paused rotation runs.",
                   ("since", "until", "kek"), VIOLATION_COLUMNS, violation_rows),
    )
}


def get_spec(name: str) -> ReportSpec:
    try:
        return REPORTS[name]
    except KeyError:
        raise InvalidReportRequest(f"no report named {name[:40]!r} (choose from {', '.join(REPORTS)})") from None


def build(name: str, filters: Filters | Mapping | None = None, *, now: datetime | None = None) -> Report:
    """Run report ``name``, stamped with the audit chain position it was produced at."""
    spec = get_spec(name)
    if not isinstance(filters, Filters):
        filters = parse_filters(filters or {}, allowed=spec.filters)
    now = now or timezone.now()
    sequence, head_hash = audit.chain_position()  # taken first: the rows reflect at least this position
    rows, notes = spec.rows(filters, now)
    truncated = len(rows) > MAX_ROWS
    if truncated:
        rows = rows[:MAX_ROWS]
        notes = [*notes, f"Only the first {MAX_ROWS:,} rows are included; narrow the period."]
    return Report(name=spec.name, title=spec.title, description=spec.description, columns=list(spec.columns),
                  rows=rows, filters=filters, generated_at=now, chain_sequence=sequence, chain_hash=head_hash,
                  truncated=truncated, notes=notes)


def build_page(name: str, filters: Filters | Mapping | None = None, *, after: int | None = None,
               limit: int | None = None, now: datetime | None = None) -> Report:
    """One page of report ``name``: ``limit`` (:data:`PAGE_ROWS`) rows after key ``after`` (keyset paging, no OFFSET).

    A report without a :class:`Keyset` is small and is built whole (:func:`build`).
    """
    spec = get_spec(name)
    if spec.keyset is None:
        return build(name, filters, now=now)
    if not isinstance(filters, Filters):
        filters = parse_filters(filters or {}, allowed=spec.filters)
    limit = limit or PAGE_ROWS
    sequence, head_hash = audit.chain_position()
    chosen = spec.keyset.queryset(filters, sequence)
    if after is not None:
        chosen = keyset_beyond(chosen, key=spec.keyset.key, cursor=after, older=False,
                               time_field=spec.keyset.time_field if spec.keyset.time_ordered(filters) else "")
    objects = list(chosen[: limit + 1])
    more = len(objects) > limit
    objects = objects[:limit]
    return Report(name=spec.name, title=spec.title, description=spec.description, columns=list(spec.columns),
                  rows=[spec.keyset.row(obj) for obj in objects], filters=filters, generated_at=now or timezone.now(),
                  chain_sequence=sequence, chain_hash=head_hash, notes=spec.keyset.notes(filters), paged=True,
                  next_after=getattr(objects[-1], spec.keyset.key) if more else None)


# -- exports -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Export:
    """A sealed export: the bytes to hand over, and what the audit log recorded about them."""

    report: str
    format: str
    content: bytes
    body_sha256: str
    event_sequence: int
    rows: int

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]

    @property
    def filename(self) -> str:
        return f"keyvault-{self.report}-{self.event_sequence}.{self.format}"


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return "\n".join(str(item) for item in value)
    return str(value)


# -- CSV for spreadsheets (OWASP "CSV Injection") -------------------------------------------------
#
# A spreadsheet runs a cell that starts with = + - @ (or tab or CR) as a formula. It does not only
# start cells at the commas we write: depending on its import settings it splits on ; tab | or line
# breaks too, and skips spaces and quotes before the content. So ``x;=1+1`` in one CSV cell becomes
# the formula ``=1+1`` in a spreadsheet that splits on ';'. Every trigger that could start a cell
# however the file is split gets an apostrophe in front (the spreadsheets' "this is text" mark).

#: What makes a spreadsheet read a cell as a formula.
FORMULA_TRIGGERS = frozenset("=+-@\t\r")
#: What a spreadsheet may start a new cell or line after.
CELL_SEPARATORS = frozenset(",;\t|\r\n")
#: What a spreadsheet may skip before a cell's content.
_SKIPPED_BEFORE_CONTENT = frozenset(' "')


def neutralise_formulas(text: str) -> str:
    """``text`` with an apostrophe before every formula trigger that could start a spreadsheet cell.

    Nothing else changes: removing the added apostrophes gives ``text`` back.
    """
    if not FORMULA_TRIGGERS.intersection(text):
        return text
    out = []
    may_start_cell = True
    for char in text:
        if may_start_cell and char in FORMULA_TRIGGERS:
            out.append("'")
        out.append(char)
        if char in CELL_SEPARATORS:
            may_start_cell = True
        elif char not in _SKIPPED_BEFORE_CONTENT:
            may_start_cell = False
    return "".join(out)


class SpreadsheetSafeWriter:
    """``csv.writer`` whose text cells pass through :func:`neutralise_formulas` (numbers stay numbers).

    Every CSV Keyvault writes (reports, ``audit export --format csv``) goes through this. Text cells
    are always quoted, as OWASP advises: with minimal quoting a lone CR inside a cell is written bare
    and splits the row when read back.
    """

    def __init__(self, out, *, lineterminator: str = "\n") -> None:
        self._writer = csv.writer(out, lineterminator=lineterminator, quoting=csv.QUOTE_NONNUMERIC)
        self._header_writer = csv.writer(out, lineterminator=lineterminator)

    def writeheader(self, names) -> None:
        """The column names: our own identifiers, written bare."""
        self._header_writer.writerow(names)

    def writerow(self, values) -> None:
        self._writer.writerow([neutralise_formulas(value) if isinstance(value, str) else value for value in values])


def _one_line(value: str) -> str:
    return neutralise_formulas(" ".join(str(value).split()))


def _csv_preamble(out, report: Report, *, generated_by: str, rows_line: str | None) -> SpreadsheetSafeWriter:
    """The commented header lines and the column names; returns the writer for the rows."""
    out.write(f"# Keyvault report: {report.name} - {_one_line(report.title)}\n")
    out.write(f"# generated_at: {_iso(report.generated_at)}\n")
    out.write(f"# generated_by: {_one_line(generated_by)}\n")
    out.write(f"# filters: {_one_line(report.filters.describe())}\n")
    out.write(f"# audit_chain_position: sequence={report.chain_sequence} hash={report.chain_hash}\n")
    if rows_line is not None:
        out.write(f"# rows: {rows_line}\n")
    for note in report.notes:
        out.write(f"# note: {_one_line(note)}\n")
    writer = SpreadsheetSafeWriter(out)
    writer.writeheader([column.key for column in report.columns])
    return writer


def render_csv(report: Report, *, generated_by: str) -> bytes:
    out = io.StringIO()
    writer = _csv_preamble(out, report, generated_by=generated_by,
                           rows_line=f"{len(report.rows)}{' (truncated)' if report.truncated else ''}")
    for row in report.rows:
        writer.writerow([_csv_value(row.get(column.key)) for column in report.columns])
    return out.getvalue().encode("utf-8")


def _csv_value(value):
    """A number as it is (a spreadsheet reads -5 as a number, not a formula); anything else as text."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) else _cell(value)


def canonical_json(document: Mapping) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def render_html(report: Report, *, generated_by: str, standalone: bool = True) -> bytes:
    context = {"report": report, "generated_by": generated_by, "table": marked_table(report), "standalone": standalone,
               "generated_iso": _iso(report.generated_at)}
    text = render_to_string("keyvault/reports/export.html", context)
    return (text if text.endswith("\n") else text + "\n").encode("utf-8")


def table(report: Report) -> list[list[tuple[bool, object]]]:
    """Rows as ``(is_list, value)`` cells in column order, for templates: lists stay lists, the rest is text."""
    def cell(value):
        if isinstance(value, list):
            return True, [str(item) for item in value]
        return False, "—" if value is None or value == "" else _cell(value)

    return [[cell(row.get(column.key)) for column in report.columns] for row in report.rows]


#: Outcomes a report marks (red in the console and the HTML export).
PROBLEM_OUTCOMES = frozenset({AuditEvent.Outcome.FAILURE, AuditEvent.Outcome.DENIED})


def marked_table(report: Report) -> list[tuple[bool, list]]:
    """:func:`table`'s rows, each with a flag: is its outcome a failure or a denial?"""
    return [(row.get("outcome") in PROBLEM_OUTCOMES, cells) for row, cells in zip(report.rows, table(report))]


def _body(report: Report, fmt: str, generated_by: str) -> bytes:
    if fmt == "csv":
        return render_csv(report, generated_by=generated_by)
    if fmt == "json":
        return canonical_json(report.document(generated_by=generated_by))
    if fmt == "html":
        return render_html(report, generated_by=generated_by)
    raise InvalidReportRequest(f"format: choose from {', '.join(FORMATS)}")


def _seal(body: bytes, fmt: str, *, digest: str, sequence: int, report: str) -> bytes:
    text = f"keyvault-export: body-sha256={digest} audit-event=#{sequence} report={report}"
    if fmt == "json":
        return body[:-1] + b',"export":' + canonical_json({"audit_event": sequence, "body_sha256": digest}) + b"}\n"
    if fmt == "html":
        return body + f"<!-- {text} -->\n".encode("ascii")
    return body + f"# {text}\n".encode("ascii")


def export(report: Report, *, fmt: str, actor: Actor) -> Export:
    """Serialise ``report``, record the export in the audit log with the body's SHA-256, and seal the file.

    The event is written before the bytes are handed out: if it cannot be written, there is no export.
    """
    if fmt not in FORMATS:
        raise InvalidReportRequest(f"format: choose from {', '.join(FORMATS)}")
    body = _body(report, fmt, actor.name)
    digest = hashlib.sha256(body).hexdigest()
    event = events.report_exported(report.name, actor=actor, fmt=fmt, filters=report.filters.as_dict(),
                                   rows=len(report.rows), truncated=report.truncated,
                                   chain_sequence=report.chain_sequence, chain_hash=report.chain_hash,
                                   body_sha256=digest)
    return Export(report=report.name, format=fmt, content=_seal(body, fmt, digest=digest, sequence=event.sequence,
                                                                  report=report.name),
                  body_sha256=digest, event_sequence=event.sequence, rows=len(report.rows))


class StreamedExport:
    """A CSV export of a paged report, produced row chunk by row chunk as it is iterated.

    The body is the same sealed CSV :func:`export` writes, except that the row count comes last
    (``# rows: N`` just before the seal) since it is known only then. The ``audit.exported``
    event is recorded when the last row has been written, with the SHA-256 of everything before
    the seal, and the seal names it: a download cut short has no seal and does not verify
    (``audit verify-export``), and no event claims it. ``body_sha256``, ``event_sequence`` and
    ``rows`` are set once the iteration is complete.
    """

    format = "csv"
    content_type = CONTENT_TYPES["csv"]

    def __init__(self, name: str, filters: Filters | Mapping | None, *, actor: Actor,
                 now: datetime | None = None) -> None:
        spec = get_spec(name)
        if spec.keyset is None:
            raise InvalidReportRequest(f"the {name} report is not streamed; use export()")
        if not isinstance(filters, Filters):
            filters = parse_filters(filters or {}, allowed=spec.filters)
        self.spec, self.actor = spec, actor
        sequence, head_hash = audit.chain_position()
        self.report = Report(name=spec.name, title=spec.title, description=spec.description,
                             columns=list(spec.columns), rows=[], filters=filters,
                             generated_at=now or timezone.now(), chain_sequence=sequence, chain_hash=head_hash,
                             notes=spec.keyset.notes(filters))
        self.body_sha256: str | None = None
        self.event_sequence: int | None = None
        self.rows = 0

    @property
    def filename(self) -> str:
        return f"keyvault-{self.spec.name}-at-{self.report.chain_sequence}.csv"

    def __iter__(self):
        digest = hashlib.sha256()
        out = io.StringIO()
        writer = _csv_preamble(out, self.report, generated_by=self.actor.name, rows_line=None)
        columns = [column.key for column in self.report.columns]
        objects = self.spec.keyset.queryset(self.report.filters, self.report.chain_sequence)
        for obj in objects.iterator(chunk_size=STREAM_CHUNK_ROWS):
            row = self.spec.keyset.row(obj)
            writer.writerow([_csv_value(row.get(key)) for key in columns])
            self.rows += 1
            if self.rows % STREAM_CHUNK_ROWS == 0:
                yield self._take(out, digest)
        out.write(f"# rows: {self.rows}\n")
        yield self._take(out, digest)
        self.body_sha256 = digest.hexdigest()
        event = events.report_exported(self.spec.name, actor=self.actor, fmt="csv",
                                       filters=self.report.filters.as_dict(), rows=self.rows, truncated=False,
                                       chain_sequence=self.report.chain_sequence,
                                       chain_hash=self.report.chain_hash, body_sha256=self.body_sha256)
        self.event_sequence = event.sequence
        yield _seal(b"", "csv", digest=self.body_sha256, sequence=event.sequence, report=self.spec.name)

    @staticmethod
    def _take(out: io.StringIO, digest) -> bytes:
        chunk = out.getvalue().encode("utf-8")
        out.seek(0)
        out.truncate()
        digest.update(chunk)
        return chunk


def stream_csv(name: str, filters: Filters | Mapping | None = None, *, actor: Actor,
               now: datetime | None = None) -> StreamedExport:
    """Report ``name`` (one with a :class:`Keyset`) as a sealed CSV produced while it is read.

    :raises InvalidReportRequest: an unknown report, a bad filter, or a report that is not paged.
    """
    return StreamedExport(name, filters, actor=actor, now=now)


# -- verifying an export -------------------------------------------------------------------


@dataclass(frozen=True)
class ExportCheck:
    """A verified export: its body hash and the audit event that recorded it."""

    body_sha256: str
    event: AuditEvent

    def __str__(self) -> str:
        details = self.event.details
        return (
            f"OK: export body sha256 {self.body_sha256} matches audit event #{self.event.sequence} "
            f"({details.get('report')} report, {details.get('format')}, {details.get('rows')} rows, "
            f"by {self.event.actor} at {self.event.timestamp:%Y-%m-%d %H:%M:%S} UTC, "
            f"produced at chain #{details.get('chain_sequence')})"
        )


def _split(data: bytes) -> tuple[bytes, str, int | None]:
    """The body and the hash/event the file claims."""
    stripped = data.lstrip()
    if stripped.startswith(b"{"):
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ExportNotVerified("not valid JSON") from None
        seal = document.pop("export", None) if isinstance(document, dict) else None
        if not isinstance(seal, dict) or not isinstance(seal.get("body_sha256"), str):
            raise ExportNotVerified("no export seal in the JSON document")
        try:
            body = canonical_json(document)
        except (TypeError, ValueError):
            raise ExportNotVerified("the JSON document cannot be canonicalised") from None
        sequence = seal.get("audit_event")
        return body, seal["body_sha256"], sequence if isinstance(sequence, int) else None
    trimmed = data.rstrip(b"\r\n")
    cut = trimmed.rfind(b"\n") + 1
    last = trimmed[cut:].decode("ascii", errors="replace")
    match = TRAILER.search(last)
    if match is None:
        raise ExportNotVerified("no keyvault-export trailer on the last line (was the file edited or cut short?)")
    return data[:cut], match["sha"], int(match["seq"])


def verify_export(data: bytes) -> ExportCheck:
    """Recompute the export's body hash and find the ``audit.exported`` event that recorded it.

    :raises ExportNotVerified: the body does not match the seal, or no intact audit event records it.
    """
    body, claimed, sequence = _split(data)
    actual = hashlib.sha256(body).hexdigest()
    if actual != claimed:
        raise ExportNotVerified(f"body sha256 is {actual}, the file's seal says {claimed}: the file was changed")
    exports = AuditEvent.objects.filter(action=audit.Action.AUDIT_EXPORTED)
    event = exports.filter(sequence=sequence).first() if sequence is not None else None
    if event is None or event.details.get("body_sha256") != actual:
        # The seal's event number may have been edited: look the hash up instead.
        event = next((e for e in exports.order_by("-sequence").iterator() if e.details.get("body_sha256") == actual),
                     None)
    if event is None:
        raise ExportNotVerified(f"no audit.exported event records body sha256 {actual}")
    if audit.event_hash(event) != event.hash:
        raise ExportNotVerified(f"audit event #{event.sequence} does not match its own hash (edited)")
    return ExportCheck(body_sha256=actual, event=event)
