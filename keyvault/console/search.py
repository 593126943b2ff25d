"""Global search: one term, looked up in KEKs, data keys, rotation runs, managed secrets and audit request ids.

Read-only. Every lookup is exact or a prefix/substring on a small table, or hits an
index, so a search stays fast with millions of data keys and audit events:

* KEKs: name contains the term, or provider key id equals it;
* data keys: by id (a number), or by wrapped-key fingerprint as the console shows it (16 hex
  digits) or its first digits (at least :data:`MIN_FINGERPRINT_PREFIX`), through the indexed
  ``DataKey.fingerprint`` column the key services keep with the wrapped key;
* rotation runs: by id (a number or ``#12``), or incident reference equal to the term;
* managed secrets: name contains the term;
* audit events: request id equal to the term.

Each kind is searched only if ``user`` may view it (``user=None``: the command line,
which sees everything). The console page and ``manage.py search`` both call :func:`search`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from django.urls import reverse

from keyvault.exceptions import InvalidSearch
from keyvault.models import AuditEvent, DataKey, KeyEncryptionKey, ManagedSecret
from rotation.models import RotationRun

#: Hits shown per kind.
LIMIT = 20
MAX_TERM = 200
#: Fewer hex digits match too many data keys to be a useful search (a number is also an id).
MIN_FINGERPRINT_PREFIX = 6
FINGERPRINT = re.compile(r"^[0-9a-f]{%d,16}$" % MIN_FINGERPRINT_PREFIX)
NUMBER = re.compile(r"^[0-9]{1,18}$")


@dataclass(frozen=True)
class Hit:
    kind: str
    label: str
    detail: str
    url: str


@dataclass
class SearchResults:
    term: str
    sections: dict[str, list[Hit]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(len(hits) for hits in self.sections.values())

    def rows(self) -> list[Hit]:
        return [hit for hits in self.sections.values() for hit in hits]


def _may(user, permission: str) -> bool:
    return user is None or user.has_perm(permission)


def _number(term: str) -> int | None:
    digits = term[1:] if term.startswith("#") else term
    return int(digits) if NUMBER.match(digits) else None


def _keks(term: str) -> list[Hit]:
    rows = (KeyEncryptionKey.objects.filter(name__icontains=term) | KeyEncryptionKey.objects.filter(
        provider_key_id=term)).order_by("name")[:LIMIT]
    return [Hit("KEK", row.name, f"{row.provider} · {row.get_state_display()}",
                reverse("admin:keyvault_keyencryptionkey_change", args=[row.pk])) for row in rows]


def _data_key_hit(row: DataKey) -> Hit:
    return Hit("Data key", f"data key #{row.pk}", f"KEK {row.kek.name} v{row.kek_version} · fingerprint {row.fingerprint}",
               reverse("admin:keyvault_datakey_change", args=[row.pk]))


def _data_keys(term: str) -> list[Hit]:
    """By id and, for a run of hex digits, by fingerprint or its prefix (a number may be both)."""
    rows: dict[int, DataKey] = {}
    number = _number(term)
    if number is not None:
        rows.update((row.pk, row) for row in DataKey.objects.select_related("kek").filter(pk=number))
    prefix = term.lower()
    if FINGERPRINT.match(prefix):
        # startswith: a LIKE 'prefix%' the pattern index on PostgreSQL serves; a whole fingerprint is its own prefix.
        by_fingerprint = DataKey.objects.select_related("kek").filter(fingerprint__startswith=prefix)
        rows.update((row.pk, row) for row in by_fingerprint.order_by("fingerprint", "id")[:LIMIT])
    return [_data_key_hit(row) for row in list(rows.values())[:LIMIT]]


def _runs(term: str) -> list[Hit]:
    number = _number(term)
    rows = RotationRun.objects.filter(pk=number) if number is not None else RotationRun.objects.filter(
        incident_ref=term)
    return [Hit("Rotation run", f"run #{row.pk}", f"{row.target_label} · {row.get_state_display()}",
                reverse("admin:rotation_rotationrun_change", args=[row.pk]))
            for row in rows.select_related("kek", "secret").order_by("-pk")[:LIMIT]]


def _secrets(term: str) -> list[Hit]:
    rows = ManagedSecret.objects.filter(name__icontains=term).order_by("name")[:LIMIT]
    return [Hit("Managed secret", row.name, row.get_secret_type_display(),
                reverse("admin:keyvault_managedsecret_change", args=[row.pk])) for row in rows]


def _audit(term: str) -> list[Hit]:
    rows = AuditEvent.objects.filter(request_id=term).order_by("-sequence")[:LIMIT]
    return [Hit("Audit event", f"#{row.sequence} {row.get_action_display()}", f"{row.actor} · request {row.request_id}",
                reverse("admin:keyvault_auditevent_change", args=[row.pk])) for row in rows]


def search(term: str, *, user=None) -> SearchResults:
    """Everything ``term`` names that ``user`` may see, by kind, at most :data:`LIMIT` hits per kind.

    :raises InvalidSearch: when the term is empty or longer than :data:`MAX_TERM` characters.
    """
    term = (term or "").strip()
    if not term:
        raise InvalidSearch("Type something to search for.")
    if len(term) > MAX_TERM:
        raise InvalidSearch(f"A search term has at most {MAX_TERM} characters.")
    results = SearchResults(term=term)
    lookups = (
        ("Key-encryption keys", "keyvault.view_keyencryptionkey", lambda: _keks(term)),
        ("Data keys", "keyvault.view_datakey", lambda: _data_keys(term)),
        ("Rotation runs", "rotation.view_rotationrun", lambda: _runs(term)),
        ("Managed secrets", "keyvault.view_managedsecret", lambda: _secrets(term)),
        ("Audit events by request id", "keyvault.view_auditevent", lambda: _audit(term)),
    )
    for title, permission, lookup in lookups:
        if _may(user, permission):
            results.sections[title] = lookup()
    return results
