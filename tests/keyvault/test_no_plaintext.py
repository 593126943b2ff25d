"""No plaintext key material anywhere: database, logs, console pages.

A full scenario (KEKs, data keys through the services, encrypted model fields,
a rotation run driven to the end) runs with every log record captured at DEBUG.
Then every console page a superuser can open is fetched. The secrets are
collected from the inside (test only): each DEK plaintext the services returned,
each DEK the field cache holds, each KEK version's material read from the local
keyring, and the local master key. Each is searched for as raw bytes, hex and
base64 in a dump of the database (``pg_dump`` on PostgreSQL, every row of every
table on SQLite), in the log text and in the HTML: 0 hits.
"""

from __future__ import annotations

import base64
import logging
import subprocess

import pytest
from django.conf import settings
from django.contrib import admin
from django.db import connection
from django.urls import NoReverseMatch, reverse

from keyvault.console.admin_views import kek_actions
from keyvault.keys import envelopes, services
from keyvault.kms import get_provider
from keyvault.kms.local import decode_master_key
from keyvault.models import KeyEncryptionKey
from rotation import services as rotation
from rotation.models import RotationRun
from tests.fieldapp.models import Customer

pytestmark = pytest.mark.django_db(transaction=True)  # committed rows, so pg_dump sees them


def forms_of(secret: bytes) -> set[str]:
    """Every text form a leaked key would take: hex (both cases), base64 (standard, URL-safe, unpadded)
    and base32 (how authenticator apps read a TOTP secret)."""
    std = base64.b64encode(secret).decode()
    url = base64.urlsafe_b64encode(secret).decode()
    b32 = base64.b32encode(secret).decode()
    return {secret.hex(), secret.hex().upper(), std, url, std.rstrip("="), url.rstrip("="), b32, b32.rstrip("=")}


def hits(secrets: dict[str, bytes], haystack: str | bytes, where: str) -> list[str]:
    found = []
    for label, secret in secrets.items():
        if isinstance(haystack, bytes):
            needles = [secret, *(form.encode() for form in forms_of(secret))]
        else:
            needles = forms_of(secret)
        found += [f"{label} in {where}" for needle in needles if needle in haystack]
    return found


def database_dump() -> list[tuple[str, str | bytes]]:
    if connection.vendor == "postgresql":
        db = connection.settings_dict
        command = ["pg_dump", "--data-only", "--no-owner", "-h", db["HOST"] or "127.0.0.1",
                   "-p", str(db["PORT"] or 5432), "-U", db["USER"] or "postgres", db["NAME"]]
        done = subprocess.run(command, capture_output=True, timeout=60, check=True)
        return [("pg_dump", done.stdout)]
    rows = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names(cursor):
            cursor.execute(f'SELECT * FROM "{table}"')  # noqa: S608 - names from introspection
            for row in cursor.fetchall():
                for value in row:
                    if isinstance(value, (bytes, memoryview)):
                        rows.append((table, bytes(value)))
                    elif value is not None:
                        rows.append((table, str(value)))
    return rows


def console_pages(client) -> dict[str, str]:
    """Every page a superuser can open: index, app indexes, each changelist and change page, action forms."""
    urls = {reverse("admin:index")}
    for model, model_admin in admin.site._registry.items():
        info = (model._meta.app_label, model._meta.model_name)
        urls.add(reverse("admin:app_list", args=[info[0]]))
        urls.add(reverse("admin:%s_%s_changelist" % info))
        for pk in model_admin.get_queryset(_Request()).values_list("pk", flat=True)[:5]:
            urls.add(reverse("admin:%s_%s_change" % info, args=[pk]))
            urls.add(reverse("admin:%s_%s_history" % info, args=[pk]))
    for kek in KeyEncryptionKey.objects.all():
        for action in kek_actions():
            urls.add(reverse(f"admin:{action.url_name}", args=[kek.pk]))
        for version in kek.versions.all():
            urls.add(reverse("admin:keyvault_keyencryptionkey_retire_version", args=[kek.pk, version.number]))
    for name in ("admin:keyvault_auditevent_verify", "keyvault_providers"):
        try:
            urls.add(reverse(name))
        except NoReverseMatch:
            pass
    pages = {}
    for url in sorted(urls):
        response = client.get(url)
        assert response.status_code in (200, 302, 403), f"{url}: {response.status_code}"
        pages[url] = response.content.decode()
    assert len(pages) > 20
    return pages


class _Request:
    """Just enough request for ``get_queryset`` of our model admins."""

    class user:  # noqa: N801
        is_superuser = True
        is_active = True
        is_staff = True

        @staticmethod
        def has_perm(*args, **kwargs):
            return True

    GET: dict = {}


def test_no_plaintext_key_material_in_database_logs_or_pages(admin_client, system_actor, caplog):
    caplog.set_level(logging.DEBUG)
    envelopes.forget()
    secrets: dict[str, bytes] = {}

    # given KEKs, data keys from the services, encrypted fields and a completed rotation
    default = services.create_kek(name=settings.FIELD_ENCRYPTION_KEK, actor=system_actor)
    payments = services.create_kek(name="payments", actor=system_actor, description="card data")
    for i in range(3):
        _, plain = services.create_data_key(payments, actor=system_actor, encryption_context={"table": "card"},
                                            purpose="card fields", owner_ref=f"card.{i}")
        with plain:
            secrets[f"DEK card.{i}"] = bytes(plain.plaintext)
    for i in range(3):
        Customer.objects.create(name=f"c{i}", national_id=f"ID-{i}", photo=b"\x00\x01" * 8, profile={"n": i})
    cache = envelopes.data_key_cache()
    for number, entry in enumerate([*cache._encrypt.values(), *cache._decrypt.values()]):
        secrets[f"field DEK {number}"] = bytes(entry.key)
    with rotation.inline_dispatch():
        runs = [rotation.start_run(kek=kek, actor=system_actor, reason="no-plaintext scenario")
                for kek in (payments, default)]
    for run in runs:
        finished = rotation.drive(run.pk)
        assert finished.state not in (RotationRun.State.FAILED, RotationRun.State.PENDING_APPROVAL), finished.state
    assert [c.national_id for c in Customer.objects.order_by("name")] == ["ID-0", "ID-1", "ID-2"]

    # and TOTP devices, one enrolled and one pending (issue 12 #9: the secrets were a plain hex column)
    from django.contrib.auth.models import User

    from keyvault.access import accounts

    for name, confirmed in (("totp-confirmed", True), ("totp-pending", False)):
        device = accounts.create_device(User.objects.create_user(name), actor=system_actor, confirmed=confirmed)
        secrets[f"TOTP secret of {name}"] = device.bin_key

    # and the KEK material and master key, read from the local keyring (test only)
    provider = get_provider("local")
    for key_id, key in provider._read_keyring()["keys"].items():
        for number, record in key["versions"].items():
            secrets[f"KEK {key_id} v{number}"] = base64.b64decode(record["material"])
    secrets["local master key"] = decode_master_key(settings.LOCAL_KMS_MASTER_KEY)
    assert len([label for label in secrets if label.startswith("KEK")]) >= 4  # both KEKs rotated
    assert any(label.startswith("field DEK") for label in secrets)

    # when every console page is fetched
    pages = console_pages(admin_client)

    # then no secret appears in the database, the logs or any page
    found = []
    for where, value in database_dump():
        found += hits(secrets, value, f"table {where}")
    found += hits(secrets, caplog.text, "logs")
    for url, html in pages.items():
        found += hits(secrets, html, f"page {url}")
    assert found == []
    # (the scan itself works: a secret planted in a page is found)
    assert hits({"probe": secrets["DEK card.0"]}, secrets["DEK card.0"].hex(), "probe") == ["probe in probe"]
    totp = secrets["TOTP secret of totp-confirmed"]
    assert hits({"probe": totp}, base64.b32encode(totp).decode(), "probe") == ["probe in probe"]
