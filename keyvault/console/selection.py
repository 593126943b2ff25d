"""Export rows picked on a console list (a bulk action) as a sealed, audited report file.

The rows become a ``reports.Report`` named ``selection-<model>`` and go through
``reports.export``: the same CSV/JSON format, the same ``audit.exported`` event written
before the bytes are handed out, the same seal that ``manage.py audit verify-export``
checks. Only metadata leaves: names, states, ids, fingerprints, audit fields; never key
bytes. The console action (``keyvault.console.admin``) and ``manage.py export_selection``
both call :func:`export_selection`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC

from django.db import models
from django.utils import timezone

from keyvault import audit
from keyvault.audit import Actor
from keyvault.console import reports
from keyvault.models import AuditEvent, DataKey, KeyEncryptionKey
from rotation.models import RotationRun

#: Rows one selection may hold (a page of a list is at most a few hundred).
MAX_SELECTION = 10_000


def _utc(value) -> str | None:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value else None


@dataclass(frozen=True)
class SelectionSpec:
    """What one model's selection export holds: its columns, each read from a row."""

    model: type[models.Model]
    columns: tuple[tuple[str, str, Callable], ...]
    related: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"selection-{self.model._meta.model_name}"


SELECTIONS: dict[str, SelectionSpec] = {
    spec.model._meta.model_name: spec
    for spec in (
        SelectionSpec(KeyEncryptionKey, (
            ("name", "Name", lambda row: row.name), ("state", "State", lambda row: row.state),
            ("provider", "Provider", lambda row: row.provider),
            ("provider_key_id", "Provider key id", lambda row: row.provider_key_id),
            ("last_rotated_at", "Last rotated (UTC)", lambda row: _utc(row.last_rotated_at)),
            ("created_at", "Created (UTC)", lambda row: _utc(row.created_at)),
        )),
        SelectionSpec(DataKey, (
            ("id", "Id", lambda row: row.pk), ("kek", "KEK", lambda row: row.kek.name),
            ("kek_version", "KEK version", lambda row: row.kek_version),
            ("fingerprint", "Wrapped key fingerprint", lambda row: row.fingerprint),
            ("owner_ref", "Owner", lambda row: row.owner_ref), ("purpose", "Purpose", lambda row: row.purpose),
            ("created_at", "Created (UTC)", lambda row: _utc(row.created_at)),
        ), related=("kek",)),
        SelectionSpec(AuditEvent, (
            ("sequence", "Sequence", lambda row: row.sequence), ("timestamp", "Time (UTC)", lambda row: _utc(row.timestamp)),
            ("actor", "Actor", lambda row: row.actor), ("action", "Action", lambda row: row.action),
            ("target", "Target", lambda row: f"{row.target_type}:{row.target_id}" if row.target_type else ""),
            ("outcome", "Outcome", lambda row: row.outcome), ("request_id", "Request id", lambda row: row.request_id),
            ("hash", "Hash", lambda row: row.hash),
        )),
        SelectionSpec(RotationRun, (
            ("id", "Run", lambda row: row.pk), ("target", "Target", lambda row: row.target_label),
            ("kind", "Kind", lambda row: row.kind), ("state", "State", lambda row: row.state),
            ("initiator", "Started by", lambda row: row.initiator), ("reason", "Reason", lambda row: row.reason),
            ("created_at", "Requested (UTC)", lambda row: _utc(row.created_at)),
            ("finished_at", "Finished (UTC)", lambda row: _utc(row.finished_at)),
        ), related=("kek", "secret")),
    )
}


def get_selection(model_name: str) -> SelectionSpec:
    try:
        return SELECTIONS[model_name]
    except KeyError:
        raise reports.InvalidReportRequest(
            f"no selection export for {model_name[:40]!r} (choose from {', '.join(SELECTIONS)})") from None


def build_selection(model_name: str, pks: Iterable) -> reports.Report:
    """The chosen rows of ``model_name`` as a report, in primary-key order, stamped with the chain position.

    :raises InvalidReportRequest: an unknown model, no rows (or none that exist), or more than
        :data:`MAX_SELECTION`.
    """
    spec = get_selection(model_name)
    keys = list(dict.fromkeys(pks))
    if not keys:
        raise reports.InvalidReportRequest("select at least one row to export")
    if len(keys) > MAX_SELECTION:
        raise reports.InvalidReportRequest(f"at most {MAX_SELECTION:,} rows can be exported at once")
    sequence, head_hash = audit.chain_position()
    rows = spec.model._default_manager.filter(pk__in=keys).select_related(*spec.related).order_by("pk")
    body = [{key: read(row) for key, _, read in spec.columns} for row in rows]
    if not body:
        raise reports.InvalidReportRequest("none of the selected rows exist")
    title = f"Selected {spec.model._meta.verbose_name_plural}"
    return reports.Report(
        name=spec.name, title=title, description=f"{len(body)} {spec.model._meta.verbose_name_plural} chosen on the "
        "console list.", columns=[reports.Column(key, label) for key, label, _ in spec.columns], rows=body,
        filters=reports.Filters(), generated_at=timezone.now(), chain_sequence=sequence, chain_hash=head_hash,
        notes=[f"selection of {len(body)} row{'s' if len(body) != 1 else ''} by primary key"],
    )


def export_selection(model_name: str, pks: Iterable, *, actor: Actor, fmt: str = "csv") -> reports.Export:
    """Build the selection and export it (audited, sealed) like any report."""
    return reports.export(build_selection(model_name, pks), fmt=fmt, actor=actor)
