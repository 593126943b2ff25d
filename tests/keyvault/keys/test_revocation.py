"""What "disable the compromised version" really does per provider, and that Keyvault says so.

AWS KMS (moto's real HTTP server, through boto3) cannot disable one backing-key version:
Keyvault then refuses the version in its inventory only, and the key still decrypts with it
at AWS. The CLI, the console and an emergency run must say that and point at the real
revocation (a migrate run to a new key, then disabling the old key), which is followed
here to the end. The local provider refuses a disabled version itself, and says nothing more.
"""

from __future__ import annotations

import copy
import io
import uuid

import boto3
import pytest
from django.core.management import call_command
from django.test import Client, override_settings
from django.urls import reverse

from keyvault.exceptions import KeyNotUsable
from keyvault.keys import services
from keyvault.kms import InvalidCiphertext, get_provider
from keyvault.models import AuditEvent, DataKey, KeyEncryptionKey
from rotation.models import RotationRun
from tests.keyvault import make_role_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def aws(settings, moto_server):
    """The ``aws`` provider entry pointed at the session's moto server; yields a boto3 KMS client."""
    kms = copy.deepcopy(settings.KMS)
    kms["providers"]["aws"] = {"region": moto_server.region, "endpoint_url": moto_server.endpoint_url,
                               "connect_timeout": 2.0, "read_timeout": 5.0, "max_attempts": 2}
    with override_settings(KMS=kms):
        yield boto3.client("kms", region_name=moto_server.region, endpoint_url=moto_server.endpoint_url)


def run_cli(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def test_disabling_a_version_on_aws_says_aws_still_decrypts_and_points_at_the_migration(aws, system_actor):
    # given: an AWS KEK that sealed a payload under v1, then rotated to v2
    name = unique("orders")
    run_cli("kms", "create-key", name, "--provider", "aws")
    kek = KeyEncryptionKey.objects.get(name=name)
    sealed = services.encrypt_with_kek(kek, b"order 1042", actor=system_actor)
    assert sealed.version == 1
    run_cli("kms", "rotate-key", name)

    # when: v1 is disabled from the CLI
    out, err = run_cli("kms", "set-version-state", name, "1", "disabled", "--reason", "INC-7 keyring leak")

    # then: the output says it holds in Keyvault only, that AWS KMS still decrypts, and how to revoke there
    assert f"v1 of {name} is now disabled in Keyvault only" in out
    assert "AWS KMS cannot disable one key version" in err and "AWS KMS still decrypts" in err
    assert f"rotation start --kek {name} --kind migrate --destination NEW" in err
    assert f"kms disable-key {name}" in err and f"kms schedule-key-deletion {name}" in err
    event = AuditEvent.objects.filter(action="version.state_changed").latest("sequence")
    assert event.details["enforced_by"] == "inventory"

    # and it is true: Keyvault refuses the v1 ciphertext, AWS KMS itself still opens it
    with pytest.raises(KeyNotUsable, match="retired"):
        services.decrypt_with_kek_ciphertext(sealed.ciphertext, actor=system_actor, provider_name="aws")
    assert get_provider("aws").decrypt(sealed.ciphertext).plaintext == b"order 1042"


def test_disabling_a_version_on_the_local_provider_is_enforced_there_and_warns_of_nothing(system_actor):
    # given: a local KEK that sealed a payload under v1, then rotated
    run_cli("kms", "create-key", "ledger")
    kek = KeyEncryptionKey.objects.get(name="ledger")
    sealed = services.encrypt_with_kek(kek, b"ledger line", actor=system_actor)
    run_cli("kms", "rotate-key", "ledger")

    # when: v1 is disabled
    out, err = run_cli("kms", "set-version-state", "ledger", "1", "disabled", "--reason", "drill")

    # then: the provider refuses it itself; nothing to warn about
    assert "v1 of ledger is now disabled at provider local" in out and err == ""
    with pytest.raises(InvalidCiphertext):
        get_provider("local").decrypt(sealed.ciphertext)


def test_destroying_a_version_from_the_cli_needs_the_key_name_again(system_actor):
    run_cli("kms", "create-key", "ledger")
    run_cli("kms", "rotate-key", "ledger")

    with pytest.raises(Exception, match="--confirm ledger"):
        run_cli("kms", "set-version-state", "ledger", "1", "destroyed")
    assert KeyEncryptionKey.objects.get(name="ledger").versions.get(number=1).state == "enabled"

    out, _ = run_cli("kms", "set-version-state", "ledger", "1", "destroyed", "--confirm", "ledger")
    assert "v1 of ledger is now destroyed at provider local" in out


def test_an_emergency_run_on_aws_warns_then_a_migration_and_disable_key_revoke_at_aws(aws, system_actor):
    # given: an AWS KEK wrapping two data keys
    old, new = unique("payments"), unique("payments-next")
    run_cli("kms", "create-key", old, "--provider", "aws")
    for owner in ("billing.invoice", "billing.refund"):
        run_cli("kms", "generate-data-key", "--key", old, "--owner", owner, "--context", "tenant=acme")
    kek = KeyEncryptionKey.objects.get(name=old)
    wrapped_v1 = bytes(DataKey.objects.filter(kek=kek).first().wrapped_key)

    # when: an emergency rotation runs to the end
    out, err = run_cli("rotation", "start", "--kek", old, "--kind", "emergency", "--incident", "INC-9",
                       "--reason", "role credentials leaked", "--inline", "--wait", "--id-only")

    # then: it says, at the start and at the end, that AWS still decrypts the old material
    run = RotationRun.objects.get(pk=int(out.split()[0]))
    assert run.state == RotationRun.State.COMPLETED
    assert err.count("AWS KMS still decrypts") == 2 and "--kind migrate" in err
    retire = run.steps.get(key="retire")
    assert "in Keyvault only (v1)" in retire.evidence and "--kind migrate" in retire.evidence
    assert get_provider("aws").decrypt(wrapped_v1, encryption_context={"tenant": "acme"}).plaintext

    # when: the revocation the warning names is done: a migration to a new key, then the old key disabled
    run_cli("kms", "create-key", new, "--provider", "aws")
    run_cli("rotation", "start", "--kek", old, "--kind", "migrate", "--destination", new,
            "--reason", "revoke the leaked key", "--inline", "--wait")
    out, _ = run_cli("kms", "disable-key", old, "--reason", "INC-9")

    # then: the data keys live on the new key, and AWS KMS itself reports the old key Disabled
    assert f"disabled {old}" in out
    assert DataKey.objects.filter(kek__name=new).count() == 2 and not DataKey.objects.filter(kek=kek).exists()
    assert aws.describe_key(KeyId=f"alias/{old}")["KeyMetadata"]["KeyState"] == "Disabled"


def test_the_console_warns_when_a_version_is_disabled_in_keyvault_only(aws, system_actor):
    # given: an AWS KEK rotated to v2
    name = unique("console")
    run_cli("kms", "create-key", name, "--provider", "aws")
    run_cli("kms", "rotate-key", name)
    kek = KeyEncryptionKey.objects.get(name=name)

    # when: v1 is disabled on the retire-version page
    url = reverse("admin:keyvault_keyencryptionkey_retire_version", args=[kek.pk, 1])
    client = Client()
    client.force_login(make_role_user("administrator"))
    response = client.post(url, {"state": "disabled", "reason": "INC-11", "confirm_name": name}, follow=True)

    # then: the page says so, and points at the migration
    text = response.content.decode()
    assert response.status_code == 200
    assert "disabled in Keyvault only" in text and "AWS KMS still decrypts" in text and "--kind migrate" in text


def test_the_console_emergency_rotate_on_aws_warns_that_it_does_not_revoke(aws, system_actor):
    # given: an AWS KEK
    name = unique("console-emergency")
    run_cli("kms", "create-key", name, "--provider", "aws")
    kek = KeyEncryptionKey.objects.get(name=name)
    client = Client()
    client.force_login(make_role_user("administrator"))

    # when: an emergency rotation is started from its page
    url = reverse("admin:keyvault_keyencryptionkey_emergency_rotate", args=[kek.pk])
    response = client.post(url, {"reason": "role credentials leaked", "incident_ref": "INC-12"}, follow=True)

    # then: the run started, and the page says AWS still decrypts and names the migration
    text = response.content.decode()
    assert RotationRun.objects.filter(kek=kek, kind="emergency").exists()
    assert "This emergency run rotates and rewraps, but AWS KMS cannot disable one key version" in text
    assert "--kind migrate" in text
