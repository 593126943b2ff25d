"""Data keys store their wrapped-key fingerprint, indexed, so the global search finds them at volume.

Until now the fingerprint was computed when shown, and a search by fingerprint hashed every
data key. Existing rows are filled in batches of ids, each batch its own transaction (the
migration is not atomic), so a large table is never locked or rewritten in one go; the index
is built after the fill rather than updated row by row.
"""

import hashlib

from django.db import migrations, models, transaction

BATCH = 20_000
FINGERPRINT_LENGTH = 16


def _fill_postgresql(schema_editor, table: str, low: int, high: int) -> None:
    schema_editor.execute(
        f"UPDATE {table} SET fingerprint = substr(encode(sha256(wrapped_key), 'hex'), 1, %s) "
        "WHERE id >= %s AND id < %s AND fingerprint = ''",
        [FINGERPRINT_LENGTH, low, high],
    )


def _fill_elsewhere(DataKey, low: int, high: int) -> None:
    rows = DataKey.objects.filter(id__gte=low, id__lt=high, fingerprint="").only("id", "wrapped_key")
    for row in rows:
        row.fingerprint = hashlib.sha256(bytes(row.wrapped_key)).hexdigest()[:FINGERPRINT_LENGTH]
    DataKey.objects.bulk_update(rows, ["fingerprint"], batch_size=1000)


def fill_fingerprints(apps, schema_editor):
    DataKey = apps.get_model("keyvault", "DataKey")
    bounds = DataKey.objects.aggregate(low=models.Min("id"), high=models.Max("id"))
    if bounds["low"] is None:
        return
    on_postgresql = schema_editor.connection.vendor == "postgresql"
    table = DataKey._meta.db_table
    for low in range(bounds["low"], bounds["high"] + 1, BATCH):
        with transaction.atomic(using=schema_editor.connection.alias):
            if on_postgresql:
                _fill_postgresql(schema_editor, table, low, low + BATCH)
            else:
                _fill_elsewhere(DataKey, low, low + BATCH)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("keyvault", "0018_api_client_rate_limit_bound"),
    ]

    operations = [
        migrations.AddField(
            model_name="datakey",
            name="fingerprint",
            field=models.CharField(
                blank=True, default="", editable=False, max_length=16, verbose_name="wrapped key fingerprint",
                help_text="The first 16 hex digits of SHA-256 over the wrapped key: it changes when the key is "
                          "rewrapped.",
            ),
        ),
        migrations.RunPython(fill_fingerprints, migrations.RunPython.noop, elidable=True),
        migrations.AddIndex(
            model_name="datakey",
            index=models.Index(fields=["fingerprint"], name="datakey_fingerprint", opclasses=["varchar_pattern_ops"]),
        ),
    ]
