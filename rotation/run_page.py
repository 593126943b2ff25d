"""How a run reads on its page and in lists: status, progress JSON, timeline, events and runbook sections.

Kept apart from ``rotation.admin_views`` (the views and their controls), which re-exports these
names; ``static/rotation/run.js`` draws ``run_progress`` as the run moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

from keyvault.models import AuditEvent
from rotation import runbooks, services
from rotation.models import RotationRun, RunStep

S = RotationRun.State

#: Audit actions that make up a run's state timeline (batches and step ticks are listed with the events).
TIMELINE_ACTIONS = (
    AuditEvent.Action.ROTATION_STARTED, AuditEvent.Action.ROTATION_STATE, AuditEvent.Action.ROTATION_APPROVED,
    AuditEvent.Action.ROTATION_REJECTED, AuditEvent.Action.ROTATION_BREAK_GLASS,
)
#: States a run never leaves: its page offers no controls at all.
TERMINAL_STATES = frozenset(services.TERMINAL)
#: How many of a run's audit events the run page lists (newest); the audit log has them all.
RUN_EVENTS_SHOWN = 100


def run_runbook(run: RotationRun) -> runbooks.Runbook | None:
    if run.secret_id:
        return runbooks.for_run(f"secret-{run.secret.secret_type}", run.kind)
    return runbooks.for_run("kek", run.kind)


def _audit_target(run: RotationRun) -> tuple[str, str] | None:
    """(target_type, target_id) of the run's events in the audit log."""
    if run.kek_id:
        return "keyencryptionkey", run.kek.name
    if run.secret_id:
        return "managedsecret", run.secret.name
    return None


def runbook_section_html(runbook: runbooks.Runbook | None, section: str) -> SafeString:
    """One section of a runbook as HTML (the rollback section beside cancel / roll back / resume)."""
    if runbook is None or section not in runbook.sections:
        return mark_safe("")  # noqa: S308 - empty
    title = runbooks.SECTION_TITLES[section]
    body = runbooks.render_markdown(runbooks._untag(runbook.sections[section]))
    return format_html('<h2 class="kv-runbook-title">{}: {}</h2>{}', title, runbook.title, body)


def available_run_actions(run: RotationRun) -> frozenset[str]:
    """Which controls apply to the run in its current state (permissions are checked separately).

    The engine's transition table decides (``rotation.engine.states.people_actions``), so the page
    never offers a move the services would refuse.
    """
    return services.run_actions(run)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def when(value: datetime | None) -> str:
    """A moment as the run page shows it: minutes, in UTC, the zone written out."""
    return f"{value.astimezone(UTC):%Y-%m-%d %H:%M} UTC" if value else "—"


#: How each state reads at a glance: the badge's phase (its colour) and label.
PHASES = {
    S.PENDING_APPROVAL: "waiting", S.QUEUED: "waiting", S.ROTATING: "working", S.REWRAPPING: "working",
    S.VERIFYING: "working", S.RETIRING: "done_pending", S.COMPLETED: "done", S.FAILED: "failed",
    S.CANCELLED: "stopped", S.ROLLED_BACK: "stopped",
}
BADGES = {S.RETIRING: "Done, retirement pending"}


@dataclass(frozen=True)
class RunStatus:
    """A run's state in words: the badge, one sentence, and whether data-key counters mean anything."""

    phase: str
    badge: str
    summary: str
    show_bar: bool
    show_counts: bool


def run_status(run: RotationRun) -> RunStatus:
    """How the run page and the run list describe a run (one place, so both read the same)."""
    rewraps = bool(run.kek_id)
    old = f"v{run.previous_version}" if run.previous_version else ""
    thing = (f"old version {old}" if old else "old version") if rewraps else "old value"
    if run.state == S.PENDING_APPROVAL:
        required = run.policy.approvals_required if run.policy else 0
        summary = f"Waiting for approval ({approvals_summary(required, run.approvals.all())})."
    elif run.state == S.QUEUED:
        summary = "Queued; a worker picks it up shortly."
    elif run.state == S.ROTATING:
        summary = "Creating the new version at the provider." if rewraps else "Rotating the secret."
    elif run.state == S.REWRAPPING:
        summary = f"Rewrapping data keys: {run.rewrapped:,} of {run.total_deks:,}."
    elif run.state == S.VERIFYING:
        summary = "Verifying the new version."
    elif run.state == S.RETIRING:
        done = ("Rewrapped and verified" if run.total_deks else "Rotated and verified; no data keys to rewrap"
                ) if rewraps else "Rotated and verified"
        retires = f"retires on {when(run.retire_after)}" if run.retire_after else "retires when the grace period ends"
        summary = f"{done}; {thing} {retires}."
    elif run.state == S.COMPLETED:
        summary = f"Completed; {thing} retired {when(run.finished_at)}."
    elif run.state == S.FAILED:
        summary = f"Failed {when(run.finished_at)}: {run.last_error or 'no error recorded'}"
    elif run.state == S.ROLLED_BACK:
        summary = f"Rolled back {when(run.finished_at)}; nothing was retired."
    else:
        summary = f"Cancelled {when(run.finished_at)}."
    stopped = run.state in (S.FAILED, S.CANCELLED, S.ROLLED_BACK)
    show_counts = rewraps and run.total_deks > 0
    return RunStatus(
        phase=PHASES[run.state], badge=BADGES.get(run.state, S(run.state).label), summary=summary,
        show_bar=show_counts and not stopped, show_counts=show_counts,
    )


def approvals_summary(required: int, approvals) -> str:
    """What the Approvals heading says: "none required" rather than "0 of 0", else how many of how many."""
    given = sum(1 for approval in approvals if approval.decision == "approve")
    if required == 0:
        return f"none required, {given} given" if given else "none required"
    return f"{given} of {required} required"


def run_progress(run: RotationRun, *, now: datetime | None = None) -> dict:
    """Everything the run page shows that can change (what ``progress.json`` returns to ``run.js``)."""
    now = now or timezone.now()
    rate = None
    if run.rewrap_started_at and run.rewrapped:
        # While rewrapping the clock runs; afterwards the last batch's heartbeat ends the rewrap.
        end = now if run.state == S.REWRAPPING else (run.heartbeat_at or run.finished_at or now)
        elapsed = (end - run.rewrap_started_at).total_seconds()
        rate = round(run.rewrapped / elapsed, 1) if elapsed > 0 else None
    eta = math.ceil(run.remaining / rate) if rate and run.state == S.REWRAPPING else None
    steps = [
        {
            "key": step.key, "section": step.section, "title": step.title, "automatic": step.automatic,
            "status": step.status, "status_label": RunStep.Status(step.status).label, "done_by": step.done_by,
            "done_at": _iso(step.done_at), "evidence": step.evidence,
        }
        for step in run.steps.order_by("order")
    ]
    status = run_status(run)
    approvals = list(run.approvals.select_related("approver").order_by("created_at"))
    return {
        "id": run.pk,
        "kek": run.kek.name if run.kek_id else None,
        "kind": run.kind,
        "state": run.state,
        "state_label": S(run.state).label,
        "phase": status.phase,
        "badge": status.badge,
        "summary": status.summary,
        "show_bar": status.show_bar,
        "show_counts": status.show_counts,
        "active": run.is_active,
        "total": run.total_deks,
        "rewrapped": run.rewrapped,
        "failed": run.failed_deks,
        "remaining": run.remaining,
        "percent": run.percent,
        "rate": rate,
        "eta_seconds": eta,
        "previous_version": run.previous_version,
        "target_version": run.target_version,
        "retire_after": _iso(run.retire_after),
        "retire_after_label": when(run.retire_after) if run.retire_after else None,
        "paused_reason": run.paused_reason,
        "last_error": run.last_error,
        "rate_limits": [{**limit.as_dict(), "text": limit.describe()} for limit in services.rate_limits_for_run(run)],
        "partitions": services.partition_overview(run.pk, now=now).as_dict(),
        "actions": sorted(available_run_actions(run)),
        "approvals_required": run.policy.approvals_required if run.policy else 0,
        "approvals_summary": approvals_summary(run.policy.approvals_required if run.policy else 0, approvals),
        "approvals": [
            {"who": approval.approver.get_username() if approval.approver_id else "—",
             "decision": approval.get_decision_display(), "comment": approval.comment,
             "break_glass": approval.break_glass, "at": _iso(approval.created_at), "when": when(approval.created_at)}
            for approval in approvals
        ],
        "timeline": [
            {"at": _iso(entry.event.timestamp), "when": when(entry.event.timestamp), "label": entry.label,
             "actor": entry.event.actor}
            for entry in run_timeline(run)
        ],
        "steps": steps,
        "updated_at": now.isoformat(),
    }


def run_events(run: RotationRun):
    """The run's audit events: its target's events (audit_target_seq index) whose details name the run."""
    target = _audit_target(run)
    if target is None:
        return AuditEvent.objects.none()
    return AuditEvent.objects.filter(target_type=target[0], target_id=target[1], details__run_id=run.pk).order_by("sequence")


@dataclass(frozen=True)
class TimelineEntry:
    event: AuditEvent
    label: str


def run_timeline(run: RotationRun) -> list[TimelineEntry]:
    entries = []
    for event in run_events(run).filter(action__in=TIMELINE_ACTIONS):
        details = event.details or {}
        if event.action == AuditEvent.Action.ROTATION_STATE:
            label = f"{S(details['from']).label} → {S(details['to']).label}"
            if details.get("note"):
                label += f" ({details['note']})"
        elif event.action == AuditEvent.Action.ROTATION_STARTED:
            label = f"Started ({RotationRun.Kind(details.get('kind', run.kind)).label.lower()})"
        else:
            label = f"{AuditEvent.Action(event.action).label}: {details.get('comment', '')}".rstrip(": ")
        entries.append(TimelineEntry(event, label))
    return entries


@dataclass(frozen=True)
class RunbookSection:
    """One section of the run's runbook: its live checklist items, then its other Markdown."""

    key: str
    title: str
    steps: list[RunStep]
    guidance: SafeString


def runbook_sections(run: RotationRun, runbook: runbooks.Runbook | None) -> list[RunbookSection]:
    """The runbook rendered once: each section's steps (with their status) and its guidance."""
    steps = list(run.steps.order_by("order"))
    for step in steps:
        step.title_html = runbooks.render_inline(step.title)
    sections = []
    for key, title in runbooks.SECTION_TITLES.items():
        own = [step for step in steps if step.section == key]
        guidance = runbooks.render_markdown(runbook.guidance(key)) if runbook and key in runbook.sections else ""
        if own or guidance:
            sections.append(RunbookSection(key, title, own, mark_safe(guidance)))  # noqa: S308 - rendered above
    return sections
