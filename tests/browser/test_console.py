"""The console in a real browser: the role workflows end to end."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from keyvault.models import AuditEvent, KeyEncryptionKey, KeyVersion
from rotation import services
from rotation.models import RotationRun

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_administrator_creates_a_key_and_an_operator_rotates_it(login_as, shots):
    # given an administrator (operators may not create keys)
    admin = login_as("administrator")
    admin.click("text=Key-encryption keys")
    admin.click("a.addlink[href$='keyencryptionkey/add/']")
    expect(admin.locator("h1")).to_have_text("Create key-encryption key")
    admin.fill("#id_name", "payments")
    admin.fill("#id_description", "card numbers in the payments database")
    admin.fill("#id_rotation_period_days", "90")
    shots(admin, "create-form")

    # when they create a key
    admin.click("input[type=submit][value='Create key']")

    # then its page shows version 1 as primary
    expect(admin.locator(".messagelist")).to_contain_text("Created payments at provider local; v1 is primary.")
    expect(admin.locator("#kv-coverage")).to_contain_text("v1 (primary)")
    shots(admin, "created")
    admin.click(".breadcrumbs >> text=Key-encryption keys")
    row = admin.locator("#result_list tbody tr")
    expect(row.locator("th")).to_have_text("payments")
    expect(row.locator("td.field-state_display")).to_have_text("Enabled")
    expect(row.locator("td.field-primary_version")).to_have_text("v1")
    expect(row.locator("td.field-data_key_count")).to_have_text("0")
    shots(admin, "key-list")

    # given an operator on the same key
    operator = login_as("operator")
    operator.goto("/keyvault/keyencryptionkey/")
    expect(operator.locator("a.addlink")).to_have_count(0)
    operator.click("#result_list >> text=payments")
    expect(operator.locator(".object-tools a")).to_have_text(["Rotate now", "Audit events", "History"])

    # when the operator rotates it (a rotation run; here the test plays the worker)
    operator.click("text=Rotate now")
    operator.fill("#id_reason", "CHG-1234 quarterly rotation")
    shots(operator, "rotate-form")
    operator.click("input[type=submit][value='Rotate now']")
    expect(operator.locator(".messagelist")).to_contain_text("Started run #")
    kek = KeyEncryptionKey.objects.get(name="payments")
    run = RotationRun.objects.get(kek=kek)
    assert run.initiator == "user:operator" and run.reason == "CHG-1234 quarterly rotation"
    services.drive(run.pk)

    # then the key's page shows v2 as the new primary, and the audit log has the events
    operator.goto(f"/keyvault/keyencryptionkey/{kek.pk}/change/")
    expect(operator.locator("#kv-coverage .kv-version-row").first).to_contain_text("v2 (primary)")
    expect(operator.locator("#kv-coverage .kv-version-row")).to_have_count(2)
    shots(operator, "rotated")
    operator.click(".object-tools >> text=Audit events")
    expect(operator.locator("#kv-chain-status")).to_contain_text("Audit chain verified to #")
    rows = operator.locator("#result_list tbody tr")
    expect(rows.last).to_contain_text("user:administrator")
    expect(rows.last).to_contain_text("KEK created")
    expect(operator.locator("#result_list tbody tr", has_text="Rotation run started")).to_contain_text("user:operator")
    expect(operator.locator("#result_list tbody tr", has_text="KEK rotated")).to_contain_text("system:rotation-engine")
    shots(operator, "audit-log")
    operator.locator("#result_list tbody tr", has_text="Rotation run started").locator("th a").click()
    expect(operator.locator(".field-details_display pre")).to_contain_text('"reason": "CHG-1234 quarterly rotation"')
    shots(operator, "audit-event")

    assert list(KeyVersion.objects.filter(kek=kek, is_primary=True).values_list("number", flat=True)) == [2]
    actions = list(AuditEvent.objects.exclude(action__startswith="user.").order_by("sequence")
                   .values_list("action", "actor"))
    assert actions[0] == ("kek.created", "user:administrator")
    assert ("rotation.started", "user:operator") in actions
    assert ("kek.rotated", "system:rotation-engine") in actions


def test_auditor_reads_the_audit_log_but_cannot_rotate(login_as, shots, live_server):
    # given a key with some history
    from keyvault.audit import Actor
    from keyvault.keys import services

    kek = services.create_kek(name="ledger", actor=Actor.system("bootstrap"))
    data_key, plain = services.create_data_key(kek, actor=Actor.system("app"), encryption_context={"tenant": "7"},
                                               owner_ref="ledger.entry.memo")
    plain.wipe()
    services.rotate_kek_version(kek, actor=Actor.system("rotation-sweep"))
    auditor = login_as("auditor")

    # when the auditor opens the audit log, then they see the events (and their account's) and the chain status
    auditor.click("text=Audit events")
    expect(auditor.locator("#kv-chain-status")).to_contain_text("Audit chain verified to #4")
    expect(auditor.locator("#result_list tbody tr")).to_have_count(4)
    shots(auditor, "audit-log")

    # and may run a full verification, which is itself audited
    auditor.click("#kv-chain-status input[type=submit]")
    expect(auditor.locator(".messagelist")).to_contain_text("Full verification: OK: audit chain intact, 4 events")
    expect(auditor.locator("#kv-chain-status")).to_contain_text("Last full verification")
    shots(auditor, "verified")

    # and sees data keys only by fingerprint
    auditor.click("#nav-sidebar >> text=Data keys")
    expect(auditor.locator("#result_list tbody tr")).to_contain_text([data_key.fingerprint])
    shots(auditor, "data-keys")

    # when they open the key, then there is no action button
    auditor.goto("/keyvault/keyencryptionkey/")
    auditor.click("text=ledger")
    expect(auditor.locator("#kv-coverage")).to_contain_text("0.0% of 1 data key is wrapped by the primary version v2")
    expect(auditor.locator(".object-tools a")).to_have_text(["Audit events", "History"])
    expect(auditor.locator("input[name=_save]")).to_have_count(0)
    shots(auditor, "key-read-only")

    # and the rotate URL itself answers 403
    response = auditor.goto(f"/keyvault/keyencryptionkey/{kek.pk}/rotate/")
    assert response.status == 403
    expect(auditor.locator("body")).to_contain_text(re.compile("403 Forbidden"))
    shots(auditor, "rotate-forbidden")
    assert KeyVersion.objects.filter(kek=kek).count() == 2
    assert plain.plaintext == bytearray(32)  # wiped; nothing above could have shown it
    assert AuditEvent.objects.filter(action="audit.verified", actor="user:auditor").count() == 1


def test_schedule_deletion_asks_for_the_key_name(login_as, shots):
    from keyvault.audit import Actor
    from keyvault.keys import services

    kek = services.create_kek(name="old-reports", actor=Actor.system("bootstrap"))
    admin = login_as("administrator")
    admin.goto(f"/keyvault/keyencryptionkey/{kek.pk}/change/")
    admin.click("#kv-kek-menu summary")  # destructive actions wait in the "More actions" menu
    admin.click(".object-tools >> text=Schedule deletion")
    admin.fill("#id_waiting_days", "7")
    admin.fill("#id_confirm_name", "old-report")
    admin.click("input[type=submit][value='Schedule deletion']")
    expect(admin.locator(".errorlist")).to_contain_text("type old-reports exactly")
    shots(admin, "mismatch")

    admin.fill("#id_confirm_name", "old-reports")
    admin.click("input[type=submit][value='Schedule deletion']")

    expect(admin.locator(".messagelist")).to_contain_text("Scheduled old-reports for deletion on")
    expect(admin.locator("div.field-state_display")).to_contain_text("Pending deletion")
    expect(admin.locator(".object-tools a").first).to_have_text("Cancel deletion")
    shots(admin, "scheduled")
    kek.refresh_from_db()
    assert kek.state == KeyEncryptionKey.State.PENDING_DELETION


def test_the_runbook_panel_wraps_long_commands_instead_of_cutting_them_off(login_as, shots):
    from keyvault.audit import Actor
    from keyvault.keys import services as key_services

    # given the emergency rotation form, whose runbook shows a long command
    kek = key_services.create_kek(name="payments", actor=Actor.system("bootstrap"))
    admin = login_as("administrator")
    admin.goto(f"/keyvault/keyencryptionkey/{kek.pk}/change/")
    admin.click("#kv-kek-menu summary")
    admin.click(".object-tools >> text=Emergency rotate")
    panel = admin.locator("aside.kv-runbook")
    expect(panel).to_contain_text("Runbook: Emergency KEK rotation")
    shots(admin, "emergency-runbook")

    # then every command block fits the panel: nothing hidden past its right edge
    blocks = panel.locator("pre")
    assert blocks.count() >= 1
    for index in range(blocks.count()):
        block = blocks.nth(index)
        assert "manage.py" in block.inner_text()
        overflow = block.evaluate("el => [el.scrollWidth, el.clientWidth, el.getBoundingClientRect().right]")
        panel_right = panel.evaluate("el => el.getBoundingClientRect().right")
        assert overflow[0] <= overflow[1] and overflow[2] <= panel_right + 1, f"runbook command cut off: {overflow}"
