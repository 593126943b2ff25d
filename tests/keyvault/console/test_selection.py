"""Bulk "Export selected": chosen rows as a sealed CSV, recorded in the audit log, no key bytes; console and CLI."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.urls import reverse

from keyvault.audit import Actor
from keyvault.console import reports, selection
from keyvault.models import AuditEvent, DataKey
from tests.keyvault import build_world, make_role_user, use_temp_keyring

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(settings, tmp_path):
    use_temp_keyring(settings, tmp_path)
    return build_world()


def test_an_export_holds_the_chosen_rows_and_is_recorded(world):
    chosen = list(DataKey.objects.order_by("pk").values_list("pk", flat=True))[:1]
    result = selection.export_selection("datakey", chosen, actor=Actor.system("tests"))
    text = result.content.decode()
    key = DataKey.objects.get(pk=chosen[0])
    assert f'{key.pk},"alpha",{key.kek_version},"{key.fingerprint}",' in text
    assert result.rows == 1
    event = AuditEvent.objects.get(sequence=result.event_sequence)
    assert event.action == "audit.exported" and event.details["report"] == "selection-datakey"
    assert reports.verify_export(result.content).event.sequence == result.event_sequence
    for plaintext in world.plaintexts:
        assert plaintext.hex() not in text and bytes(key.wrapped_key).hex() not in text


@pytest.mark.parametrize("model, pks", [("datakey", []), ("user", [1]), ("datakey", [10**12]),
                                        ("datakey", range(selection.MAX_SELECTION + 1))])
def test_an_empty_unknown_or_huge_selection_is_refused_and_records_nothing(world, model, pks):
    before = AuditEvent.objects.count()
    with pytest.raises(reports.InvalidReportRequest):
        selection.export_selection(model, pks, actor=Actor.system("tests"))
    assert AuditEvent.objects.count() == before


def test_the_console_action_downloads_the_selection_for_who_may_export(world, client):
    keks = [world.alpha.pk, world.bravo.pk]
    client.force_login(make_role_user("auditor"))
    response = client.post(reverse("admin:keyvault_keyencryptionkey_changelist"),
                           {"action": "export_selected_csv", "_selected_action": keks})
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    body = response.content.decode()
    assert '\n"alpha","enabled","local",' in body and '\n"bravo","disabled","local",' in body
    assert "charlie" not in body
    assert AuditEvent.objects.filter(action="audit.exported", actor="user:auditor").count() == 1


def test_the_action_is_not_offered_to_who_may_not_export(world, client):
    client.force_login(make_role_user("operator"))
    page = client.get(reverse("admin:keyvault_datakey_changelist"))
    assert b"export_selected_csv" not in page.content
    response = client.post(reverse("admin:keyvault_datakey_changelist"),
                           {"action": "export_selected_csv", "_selected_action": [world.data_key.pk]})
    assert response.status_code == 200 and response["Content-Type"].startswith("text/html")  # the list again
    assert not AuditEvent.objects.filter(action="audit.exported").exists()


def test_the_command_exports_the_same_way(world, capsys, tmp_path):
    first, second = AuditEvent.objects.order_by("sequence")[:2]
    target = tmp_path / "events.csv"
    call_command("export_selection", "auditevent", str(first.pk), str(second.pk), "-o", str(target))
    content = target.read_bytes()
    assert f'\n{first.sequence},' in content.decode() and f'\n{second.sequence},' in content.decode()
    assert reports.verify_export(content).event.details["report"] == "selection-auditevent"


def test_the_run_list_exports_chosen_runs_like_the_other_lists(world, client, tmp_path):
    # given two rotation runs and an auditor on the run list
    from rotation import services as rotation

    chosen = rotation.start_run(kek=world.alpha, actor=Actor.system("tests"), reason="quarterly")
    other = rotation.start_run(kek=world.bravo, actor=Actor.system("tests"), reason="other") \
        if world.bravo.state == "enabled" else None
    client.force_login(make_role_user("auditor"))
    page = client.get(reverse("admin:rotation_rotationrun_changelist"))
    assert b'value="export_selected_csv"' in page.content

    # when one run is exported from the list
    response = client.post(reverse("admin:rotation_rotationrun_changelist"),
                           {"action": "export_selected_csv", "_selected_action": [chosen.pk]})

    # then the download is the sealed, audited selection of that run only
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    body = response.content.decode()
    assert f'\n{chosen.pk},"KEK alpha",' in body and '"quarterly"' in body
    assert other is None or f"\n{other.pk}," not in body
    event = AuditEvent.objects.get(sequence=int(response["X-Keyvault-Audit-Event"]))
    assert event.details["report"] == "selection-rotationrun" and event.actor == "user:auditor"
    assert reports.verify_export(response.content).event.sequence == event.sequence
    # and the command line gives the same rows
    target = tmp_path / "runs.csv"
    call_command("export_selection", "rotationrun", str(chosen.pk), "-o", str(target))
    assert f'\n{chosen.pk},"KEK alpha",' in target.read_text()
