"""What deleting a KEK would break: the impact the schedule-deletion page and ``kms schedule-key-deletion --dry-run`` show.

Read-only. Four things depend on a KEK:

* **data keys** registered under it, per version (``version_coverage``): once the KEK is
  destroyed none of them opens again;
* **encrypted model fields** (``keyvault.keys.fields``): values whose envelope header names
  the KEK. Each field is scanned by its raw blobs, reading headers only (nothing is
  decrypted); a field configured to seal *new* values under the KEK is listed even while
  it holds none, since its next write would fail once the KEK refuses cryptography;
* **managed secrets**: their values stay in their own secret sources and no managed secret
  is sealed under a KEK, so this list is empty by construction; it is kept so the page
  says so rather than leaving the reader to guess. Keyvault's own TOTP secrets *are*
  sealed under the field KEK and show up as the encrypted field ``keyvault.totpdevice.key``;
* **active rotation runs** of the KEK, or migrating into it. Rotation sits above the key
  services, so its model is looked up by name, never imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.apps import apps
from django.db import connection

from keyvault.keys.fields import encrypted_fields
from keyvault.keys.services import version_coverage
from keyvault.kms import InvalidCiphertext
from keyvault.kms.envelope import read_header
from keyvault.models import KeyEncryptionKey

#: Rows read per query while counting a field's values by the KEK their headers name.
SCAN_BATCH_SIZE = 1000


@dataclass(frozen=True)
class VersionImpact:
    number: int
    state: str
    primary: bool
    data_keys: int


@dataclass(frozen=True)
class FieldImpact:
    """One encrypted model field: how many stored values the KEK seals, and whether new values go to it."""

    label: str  # app_label.model.field
    values: int
    configured: bool  # the field seals new values under this KEK


@dataclass(frozen=True)
class RunImpact:
    run_id: int
    target: str
    kind: str
    state: str
    role: str  # "rotates this key" or "migrates into this key"


@dataclass(frozen=True)
class DeletionImpact:
    """Everything that stops working when ``kek`` is destroyed."""

    kek: str
    state: str
    versions: list[VersionImpact]
    fields: list[FieldImpact]
    runs: list[RunImpact]
    managed_secrets: list[str] = field(default_factory=list)

    @property
    def data_keys(self) -> int:
        return sum(version.data_keys for version in self.versions)

    @property
    def field_values(self) -> int:
        return sum(item.values for item in self.fields)

    @property
    def breaks_nothing(self) -> bool:
        return not (self.data_keys or self.fields or self.runs or self.managed_secrets)

    def as_dict(self) -> dict:
        return {
            "kek": self.kek,
            "state": self.state,
            "data_keys": self.data_keys,
            "versions": [vars(version) for version in self.versions],
            "encrypted_fields": [vars(item) for item in self.fields],
            "managed_secrets": list(self.managed_secrets),
            "active_runs": [vars(run) for run in self.runs],
        }


def _field_values_under(model, model_field, provider_key_id: str) -> int:
    """Stored values of ``model_field`` whose envelope header names ``provider_key_id`` (headers only)."""
    quote = connection.ops.quote_name
    table, column, pk = quote(model._meta.db_table), quote(model_field.column), quote(model._meta.pk.column)
    count, last = 0, None
    with connection.cursor() as cursor:
        while True:
            after = f" AND {pk} > %s" if last is not None else ""
            cursor.execute(f"SELECT {pk}, {column} FROM {table} WHERE {column} IS NOT NULL{after} "  # noqa: S608
                           f"ORDER BY {pk} LIMIT %s", [*([last] if last is not None else []), SCAN_BATCH_SIZE])
            rows = cursor.fetchall()
            if not rows:
                return count
            last = rows[-1][0]
            for _, blob in rows:
                try:
                    count += read_header(bytes(blob)).kek_id == provider_key_id
                except InvalidCiphertext:
                    continue  # not an envelope: nothing this KEK could open either


def field_impact(kek: KeyEncryptionKey) -> list[FieldImpact]:
    """Encrypted model fields with values sealed under ``kek``, or configured to seal new ones under it."""
    items = []
    for model in apps.get_models():
        for model_field in encrypted_fields(model):
            values = _field_values_under(model, model_field, kek.provider_key_id)
            configured = model_field.kek_name() == kek.name
            if values or configured:
                items.append(FieldImpact(label=f"{model._meta.label_lower}.{model_field.name}", values=values,
                                         configured=configured))
    return sorted(items, key=lambda item: item.label)


def active_runs(kek: KeyEncryptionKey) -> list[RunImpact]:
    """Runs not yet finished that rotate ``kek`` or migrate into it (none when rotation is not installed)."""
    if not apps.is_installed("rotation"):
        return []
    run_model = apps.get_model("rotation", "RotationRun")
    runs = run_model.objects.filter(state__in=run_model.ACTIVE_STATES).select_related("kek", "secret")
    items = []
    for run in (runs.filter(kek=kek) | runs.filter(destination_kek=kek)).order_by("pk"):
        role = "rotates this key" if run.kek_id == kek.pk else "migrates into this key"
        items.append(RunImpact(run_id=run.pk, target=run.target_label, kind=run.get_kind_display(),
                               state=run.get_state_display(), role=role))
    return items


def deletion_impact(kek: KeyEncryptionKey) -> DeletionImpact:
    """What destroying ``kek`` would break. Reads only; safe to call on every page view."""
    coverage = version_coverage(kek)
    versions = [VersionImpact(number=v.number, state=v.get_state_display(), primary=v.is_primary,
                              data_keys=coverage.get(v.number, 0)) for v in kek.versions.order_by("number")]
    return DeletionImpact(kek=kek.name, state=kek.get_state_display(), versions=versions, fields=field_impact(kek),
                          runs=active_runs(kek), managed_secrets=[])

