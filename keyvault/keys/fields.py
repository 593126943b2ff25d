"""Encrypted model fields: values stored as envelope blobs under a KEK from the inventory.

Each value is encrypted with the encryption context ``{"model": "app_label.model",
"field": "name"}``, so a blob copied into another column or model does not
decrypt. DEKs come from the process-wide cache (``keyvault.keys.envelopes``), so a
page of rows costs a handful of KMS calls, not one per value.

The ciphertext is randomised, so the database cannot compare values: every
lookup except ``isnull`` is refused with :class:`EncryptedFieldLookupError`.

After a KEK rotation, :func:`rewrap_field` (``manage.py rewrap_fields``) moves
every stored value's DEK to the primary version without touching the data
ciphertext; the rotation engine calls it too.
"""

from __future__ import annotations

import json

from django.conf import settings
from django.core.exceptions import FieldError
from django.db import models, transaction

from keyvault.keys import envelopes
from keyvault.kms.context import BoundContext
from keyvault.kms.envelope import read_header

REWRAP_BATCH_SIZE = 500


class EncryptedFieldLookupError(FieldError):
    """Encrypted fields cannot be filtered, ordered or compared in the database."""


class EncryptedFieldMixin:
    """Shared behaviour: encrypt on the way in, decrypt on the way out, refuse lookups."""

    #: Only ``isnull`` is meaningful on a randomised ciphertext.
    allowed_lookups = frozenset({"isnull"})

    def __init__(self, *args, kek: str | None = None, **kwargs):
        self.kek = kek
        kwargs.setdefault("editable", True)
        super().__init__(*args, **kwargs)

    def deconstruct(self):
        name, path, args, kwargs = super().deconstruct()
        if self.kek is not None:
            kwargs["kek"] = self.kek
        return name, path, args, kwargs

    def get_internal_type(self) -> str:
        return "BinaryField"

    def db_type(self, connection):
        return models.BinaryField().db_type(connection)

    def kek_name(self) -> str:
        return self.kek or settings.FIELD_ENCRYPTION_KEK

    def encryption_context(self) -> BoundContext:
        """``{"model": "app_label.model", "field": "name"}``, bound: encoded once for every value of the field."""
        memo = getattr(self, "_bound_context", None)
        if memo is None or memo[0] is not self.model or memo[1] != self.name:  # a copy on another model
            context = BoundContext({"model": self.model._meta.label_lower, "field": self.name})
            memo = self._bound_context = (self.model, self.name, context)
        return memo[2]

    def get_lookup(self, lookup_name):
        if lookup_name not in self.allowed_lookups:
            raise EncryptedFieldLookupError(
                f"{self.model._meta.label}.{self.name} is encrypted; it cannot be queried with "
                f"'{lookup_name}' (only isnull). Look rows up by another field."
            )
        return super().get_lookup(lookup_name)

    def get_transform(self, name):
        raise EncryptedFieldLookupError(f"{self.model._meta.label}.{self.name} is encrypted; transforms are refused")

    # -- conversions -------------------------------------------------------

    def to_bytes(self, value) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError

    def from_bytes(self, data: bytes):  # pragma: no cover - overridden
        raise NotImplementedError

    def get_db_prep_value(self, value, connection, prepared=False):
        if value is None:
            return None
        blob = envelopes.seal(self.kek_name(), self.to_bytes(value), encryption_context=self.encryption_context())
        return connection.Database.Binary(blob)

    def from_db_value(self, value, expression, connection):
        if value is None:
            return None
        plaintext = envelopes.open_blob(bytes(value), encryption_context=self.encryption_context())
        return self.from_bytes(plaintext)


class EncryptedTextField(EncryptedFieldMixin, models.TextField):
    """A text value stored envelope-encrypted."""

    def to_bytes(self, value) -> bytes:
        return str(value).encode("utf-8")

    def from_bytes(self, data: bytes) -> str:
        return data.decode("utf-8")

    def to_python(self, value):
        return value if value is None or isinstance(value, str) else str(value)


class EncryptedBinaryField(EncryptedFieldMixin, models.BinaryField):
    """A bytes value stored envelope-encrypted."""

    def to_bytes(self, value) -> bytes:
        return bytes(value)

    def from_bytes(self, data: bytes) -> bytes:
        return data


class EncryptedJSONField(EncryptedFieldMixin, models.JSONField):
    """A JSON value stored envelope-encrypted (keys and structure are hidden too)."""

    def to_bytes(self, value) -> bytes:
        return json.dumps(value, cls=self.encoder, sort_keys=True, separators=(",", ":")).encode("utf-8")

    def from_bytes(self, data: bytes):
        return json.loads(data, cls=self.decoder)

    def get_db_prep_save(self, value, connection):
        return self.get_db_prep_value(value, connection)

    def validate(self, value, model_instance):
        super(models.JSONField, self).validate(value, model_instance)

    def select_format(self, compiler, sql, params):
        return sql, params


def encrypted_fields(model) -> list[models.Field]:
    return [f for f in model._meta.concrete_fields if isinstance(f, EncryptedFieldMixin)]


def rewrap_field(model, field_name: str, *, batch_size: int = REWRAP_BATCH_SIZE) -> int:
    """Rewrap every stored value of ``model.field_name`` whose DEK is not on its KEK's primary version.

    Works in keyset-paginated batches, one transaction each, reading the raw
    blobs (nothing is decrypted into Python). Running it twice changes nothing
    the second time. Returns how many values were rewrapped.
    """
    field = model._meta.get_field(field_name)
    if not isinstance(field, EncryptedFieldMixin):
        raise FieldError(f"{model._meta.label}.{field_name} is not an encrypted field")
    context = field.encryption_context()
    table, column, pk_column = model._meta.db_table, field.column, model._meta.pk.column
    from django.db import connection

    quote = connection.ops.quote_name
    last_pk = None
    rewrapped = 0
    primaries = _primary_versions()
    while True:
        with transaction.atomic():
            where = f"WHERE {quote(column)} IS NOT NULL" + (f" AND {quote(pk_column)} > %s" if last_pk is not None else "")
            params = [last_pk] if last_pk is not None else []
            with connection.cursor() as cursor:
                cursor.execute(
                    f"SELECT {quote(pk_column)}, {quote(column)} FROM {quote(table)} {where} "
                    f"ORDER BY {quote(pk_column)} LIMIT %s",
                    [*params, batch_size],
                )
                rows = cursor.fetchall()
            if not rows:
                return rewrapped
            last_pk = rows[-1][0]
            updates = []
            for pk, blob in rows:
                blob = bytes(blob)
                header = read_header(blob)
                if primaries.get(header.kek_id, header.kek_version) != header.kek_version:
                    updates.append((pk, envelopes.rewrap_blob(blob, encryption_context=context)))
            if updates:
                with connection.cursor() as cursor:
                    cursor.executemany(
                        f"UPDATE {quote(table)} SET {quote(column)} = %s WHERE {quote(pk_column)} = %s",
                        [(connection.Database.Binary(b), pk) for pk, b in updates],
                    )
                rewrapped += len(updates)


def _primary_versions() -> dict[str, int]:
    from keyvault.models.core import KeyVersion

    return dict(KeyVersion.objects.filter(is_primary=True).values_list("kek__provider_key_id", "number"))
