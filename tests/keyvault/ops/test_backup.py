"""``backup verify`` in process: every data key opened and tallied per KEK version, failures typed, nothing kept.

The whole drill (pg_dump, destroy, restore into a fresh database and folder) is in
``test_backup_drill.py``; here each outcome is produced directly on the test database.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings

from keyvault.audit import Action
from keyvault.keys import services
from keyvault.kms import get_provider, reset_providers
from keyvault.models import AuditEvent, DataKey
from keyvault.ops import backup
from tests.servers.openbao import running_openbao

pytestmark = pytest.mark.django_db


@pytest.fixture
def payments(system_actor):
    return services.create_kek(name="payments", actor=system_actor)


def data_keys(kek, actor, count: int) -> list[tuple[int, bytes]]:
    """``count`` data keys under ``kek``: their ids and plaintexts (to show that none is ever reported)."""
    made = []
    for number in range(count):
        row, plain = services.create_data_key(kek, actor=actor, encryption_context={"tenant": str(number)})
        with plain:
            made.append((row.pk, bytes(plain.plaintext)))
    return made


def keyring_path(settings) -> Path:
    return Path(settings.KMS["providers"]["local"]["keyring_path"])


def test_every_data_key_opens_in_batches_and_nothing_plain_is_reported(payments, system_actor):
    # given five data keys
    made = data_keys(payments, system_actor, 5)
    seen = []

    # when the restore is verified two rows at a time
    report = backup.verify_restore(actor=system_actor, batch_size=2, progress=lambda done, total: seen.append((done, total)))

    # then all opened, counted under payments v1, batch by batch, and the chain verified
    assert report.ok
    assert (report.checked, report.opened, report.failed, report.skipped) == (5, 5, 0, 0)
    assert report.tallies[("payments", 1)].ok == 5
    assert seen == [(2, 5), (4, 5), (5, 5)]
    assert report.audit.ok
    # and neither the report nor the audit event holds a plaintext key
    text = json.dumps(report.as_dict()) + "\n".join(report.lines())
    for _, plaintext in made:
        assert plaintext.hex() not in text and base64.b64encode(plaintext).decode() not in text
    event = AuditEvent.objects.filter(action=Action.DATA_KEY_UNWRAPPED, target_type="backup").get()
    assert event.details == {"checked": 5, "ok": 5, "failed": 0, "skipped": 0, "failures": {}}


def test_a_keyring_older_than_the_database_is_reported_as_a_missing_version(payments, system_actor, settings):
    # given a keyring copied before a rotation, and data keys wrapped under v2 after it
    data_keys(payments, system_actor, 2)
    old_keyring = keyring_path(settings).read_bytes()
    services.rotate_kek_version(payments, actor=system_actor)
    newer = [pk for pk, _ in data_keys(payments, system_actor, 3)]
    # when the old keyring is put back (a restore of the keyring from the older backup)
    keyring_path(settings).write_bytes(old_keyring)
    reset_providers()

    report = backup.verify_restore(actor=system_actor)

    # then v1 opens, and each v2 data key is named as missing from the keyring
    assert not report.ok
    assert report.tallies[("payments", 1)].ok == 2
    v2 = report.tallies[("payments", 2)]
    assert v2.ok == 0 and v2.failed == {backup.Failure.VERSION_MISSING: 3}
    assert sorted(v2.named["version_missing"]) == sorted(newer)
    assert [(f.version, f.reason) for f in report.findings] == [(2, backup.Failure.VERSION_MISSING)]
    assert any("keyring older than database" in line for line in report.lines())


def test_a_data_key_under_another_context_is_a_wrong_context_failure(payments, system_actor):
    [(pk, _), _] = data_keys(payments, system_actor, 2)
    DataKey.objects.filter(pk=pk).update(encryption_context={"tenant": "someone else"})

    report = backup.verify_restore(actor=system_actor)

    tally = report.tallies[("payments", 1)]
    assert (tally.ok, tally.failed, tally.named) == (1, {backup.Failure.WRONG_CONTEXT: 1}, {"wrong_context": [pk]})
    assert report.findings == []  # the keyring has the version: it is this data key that does not open


def test_the_data_keys_of_a_disabled_kek_are_skipped_and_said_so(payments, system_actor):
    data_keys(payments, system_actor, 2)
    services.disable_kek(payments, actor=system_actor, reason="not in use")

    report = backup.verify_restore(actor=system_actor)

    assert report.ok and report.skipped == 2 and report.checked == 0
    assert "2 skipped (kek not enabled in the restored inventory)" in "\n".join(report.lines())


def test_a_key_missing_from_the_keyring_fails_every_data_key_of_it(payments, system_actor, settings):
    data_keys(payments, system_actor, 2)
    keyring_path(settings).unlink()  # a keyring restored from before the KEK existed (here: none at all)
    reset_providers()

    report = backup.verify_restore(actor=system_actor)

    assert report.tallies[("payments", 1)].failed == {backup.Failure.KEY_MISSING: 2}
    assert [f.reason for f in report.findings] == [backup.Failure.KEY_MISSING]


def test_the_command_prints_json_and_exits_non_zero_on_a_failure(payments, system_actor, capsys):
    [(pk, _)] = data_keys(payments, system_actor, 1)
    call_command("backup", "verify", "--json", "--quiet")
    assert json.loads(capsys.readouterr().out)["data_keys"]["ok"] == 1

    DataKey.objects.filter(pk=pk).update(encryption_context={})
    with pytest.raises(CommandError, match=r"restore NOT verified: 1 data key\(s\) failed"):
        call_command("backup", "verify", "--json", "--quiet")
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["versions"][0]["failed_data_keys"] == {"wrong_context": [pk]}


def test_only_the_named_keks_are_checked(payments, system_actor):
    other = services.create_kek(name="billing", actor=system_actor)
    data_keys(payments, system_actor, 1)
    data_keys(other, system_actor, 2)

    report = backup.verify_restore(actor=system_actor, kek_names=["billing"])

    assert list(report.tallies) == [("billing", 1)] and report.checked == 2


# -- remote providers: real servers -----------------------------------------------------------


@pytest.fixture
def aws(settings, moto_server):
    """The ``aws`` provider on the session's moto server (many requests in flight per batch)."""
    kms = copy.deepcopy(settings.KMS)
    kms["providers"]["aws"] = {"region": moto_server.region, "endpoint_url": moto_server.endpoint_url,
                               "connect_timeout": 2.0, "read_timeout": 5.0, "max_attempts": 2}
    with override_settings(KMS=kms):
        yield


@pytest.fixture
def frozen_vault(settings) -> Iterator[Callable[[], None]]:
    """The ``vault`` provider on a private OpenBao; calling the fixture's value freezes the server (SIGSTOP)."""
    with running_openbao() as server:
        server.enable_secrets_engine("transit", "transit")
        kms = copy.deepcopy(settings.KMS)
        kms["providers"]["vault"] = {"addr": server.addr, "token": server.root_token, "mount": "transit",
                                     "timeout": 1.0}
        try:
            with override_settings(KMS=kms):
                yield lambda: os.kill(server.process.pid, signal.SIGSTOP)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)


def test_data_keys_at_aws_are_opened_many_at_a_time(aws, system_actor):
    kek = services.create_kek(name=f"orders-{uuid.uuid4().hex[:6]}", actor=system_actor, provider_name="aws")
    assert get_provider("aws").concurrency > 1
    data_keys(kek, system_actor, 20)

    report = backup.verify_restore(actor=system_actor, batch_size=8)

    assert report.ok, list(report.lines())
    assert report.tallies[(kek.name, 1)].ok == 20 and report.findings == []


def test_a_provider_that_does_not_answer_is_reported_for_each_of_its_data_keys(frozen_vault, payments, system_actor):
    # given data keys at a Vault server and at the local keyring; then the Vault server stops answering
    kek = services.create_kek(name="ledger", actor=system_actor, provider_name="vault")
    at_vault = [pk for pk, _ in data_keys(kek, system_actor, 3)]
    data_keys(payments, system_actor, 1)
    frozen_vault()

    report = backup.verify_restore(actor=system_actor)

    # then the Vault data keys are named as provider_unavailable, the local ones open, and the restore fails
    assert not report.ok
    ledger = report.tallies[("ledger", 1)]
    assert ledger.failed == {backup.Failure.PROVIDER_UNAVAILABLE: 3}
    assert sorted(ledger.named["provider_unavailable"]) == sorted(at_vault)
    assert report.tallies[("payments", 1)].ok == 1
    [finding] = report.findings
    assert finding.kek == "ledger" and finding.reason is backup.Failure.PROVIDER_UNAVAILABLE
    assert "ProviderUnavailable" in finding.detail


def test_what_the_provider_lacks_of_a_disabled_kek_is_a_warning(payments, system_actor, settings):
    # given a disabled KEK whose key is not in the restored keyring
    data_keys(payments, system_actor, 1)
    services.disable_kek(payments, actor=system_actor)
    keyring_path(settings).unlink()
    reset_providers()

    report = backup.verify_restore(actor=system_actor)

    # then its data key is skipped, the missing key is said, and nothing fails
    assert report.ok and report.skipped == 1
    [finding] = report.findings
    assert finding.reason is None and finding.detail.startswith("KEK disabled: provider 'local' has no key")
