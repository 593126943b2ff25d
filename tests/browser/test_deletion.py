"""Deleting a KEK in a real browser: the impact before, the home page's pending-deletion panel after, and cancel.

Screenshots of both pages at 1280 and 1920 px go to artifacts/browser/<test>/.
"""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from keyvault.audit import Actor
from keyvault.keys import services
from keyvault.models import AuditEvent, KeyEncryptionKey
from rotation.models import RotationRun
from tests.rotation.conftest import seed_data_keys

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

WIDTHS = (1280, 1920)


def overflows(page, selector: str) -> bool:
    """Whether the element is wider than the space it has (content cut off or a horizontal scrollbar)."""
    return page.locator(selector).evaluate(
        "el => el.scrollWidth > el.clientWidth + 1 || el.getBoundingClientRect().right > window.innerWidth + 1"
    )


def shoot_at_widths(page, shots, label: str, selector: str) -> None:
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 1000})
        expect(page.locator(selector)).to_be_visible()
        assert not overflows(page, selector), f"{selector} overflows at {width} px"
        shots(page, f"{label}-{width}")


@pytest.fixture
def ledger():
    """ledger: 3 data keys on v1, 5 on v2 (primary), and a rotation run waiting for approval."""
    actor = Actor.system("tests")
    kek = services.create_kek(name="ledger", actor=actor, description="general ledger exports")
    seed_data_keys(kek, 3)
    services.rotate_kek_version(kek, actor=actor, reason="setup")
    seed_data_keys(kek, 5)
    run = RotationRun.objects.create(kek=kek, state=RotationRun.State.PENDING_APPROVAL, initiator="user:operator",
                                     reason="quarterly")
    return kek, run


def test_schedule_deletion_shows_the_impact_then_the_home_page_panel_cancels_it(login_as, shots, ledger):
    kek, run = ledger
    admin = login_as("administrator")

    # when an administrator opens the schedule-deletion page of a key in use
    admin.goto(f"/keyvault/keyencryptionkey/{kek.pk}/schedule-deletion/")

    # then it says what would break: data keys per version, fields, secrets, active runs, and that cancel leaves it disabled
    impact = admin.locator("#kv-deletion-impact")
    expect(impact.locator("#kv-impact-summary")).to_contain_text("8 data keys")
    expect(impact.locator("#kv-impact-versions tbody tr")).to_have_text([
        "v1 Enabled 3", "v2 (primary) Enabled 5"], use_inner_text=True)
    expect(impact.locator("#kv-impact-fields")).to_contain_text("No encrypted field uses this key.")
    expect(impact.locator("#kv-impact-secrets")).to_contain_text("none depend on it")
    expect(impact.locator("#kv-impact-runs tbody")).to_contain_text(f"#{run.pk}")
    expect(impact.locator("#kv-impact-runs tbody")).to_contain_text("Pending approval")
    expect(impact.locator("#kv-impact-cancel")).to_contain_text("leaves the key disabled")
    shoot_at_widths(admin, shots, "impact", "#kv-deletion-impact")

    # when they schedule it for 7 days
    admin.fill("#id_waiting_days", "7")
    admin.fill("#id_confirm_name", "ledger")
    admin.click("input[type=submit][value='Schedule deletion']")
    expect(admin.locator(".messagelist")).to_contain_text("Scheduled ledger for deletion")

    # then the home page shows it prominently with the days left and a cancel link
    admin.goto("/")
    panel = admin.locator("#kv-panel-pending-deletion")
    expect(panel.locator("h2")).to_have_text("1 key pending deletion")
    row = panel.locator("tr[data-kek=ledger]")
    expect(row.locator(".kv-days-left")).to_have_text("7 days")
    expect(row).to_contain_text("8")  # data keys lost
    expect(panel).to_contain_text("leaves it disabled")
    shoot_at_widths(admin, shots, "home-pending", "#kv-panel-pending-deletion")

    # when they follow the cancel link and confirm
    row.locator("a.kv-cancel-deletion").click()
    expect(admin.locator("h1")).to_have_text("Cancel deletion of key-encryption key")
    expect(admin.locator(".kv-intro")).to_contain_text("stays disabled")
    admin.click("input[type=submit][value='Cancel deletion']")

    # then the service cancelled it (audited), the key is disabled as with AWS, and the panel is gone
    expect(admin.locator(".messagelist")).to_contain_text("The key stays disabled until you enable it.")
    kek.refresh_from_db()
    assert (kek.state, kek.deletion_date) == (KeyEncryptionKey.State.DISABLED, None)
    cancelled = AuditEvent.objects.filter(action=AuditEvent.Action.KEK_DELETION_CANCELLED).get()
    assert cancelled.actor == "user:administrator"
    admin.goto("/")
    expect(admin.locator("#kv-dashboard")).to_be_visible()
    expect(admin.locator("#kv-panel-pending-deletion")).to_have_count(0)


def test_auditor_sees_the_panel_without_a_cancel_link_and_empty_keys_say_no_data_keys(login_as, shots):
    actor = Actor.system("tests")
    empty = services.create_kek(name="archive", actor=actor)
    services.schedule_kek_deletion(empty, actor=actor, waiting_days=30)
    services.create_kek(name="fresh", actor=actor)

    auditor = login_as("auditor")

    panel = auditor.locator("#kv-panel-pending-deletion")
    expect(panel.locator("tr[data-kek=archive] .kv-days-left")).to_have_text("30 days")
    expect(panel.locator("a.kv-cancel-deletion")).to_have_count(0)
    expect(panel).to_contain_text("ask a Key administrator to cancel")
    expect(auditor.locator("#kv-chart-coverage")).to_contain_text("no data keys")
    expect(auditor.locator("#kv-coverage-empty")).to_contain_text("fresh")
    shoot_at_widths(auditor, shots, "home-auditor", "#kv-panel-pending-deletion")
