"""The run page in a real browser: it follows a run to the end without a reload, then rolls it back.

Also: a retiring run reads as done with a pending step (two of them side by side in the
run list), a failed run shows its error instead of a bar, and the runbook panel collapses
and copies its commands. Screenshots at 1280 and 1920 px go to artifacts/browser/<test>/.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from playwright.sync_api import expect

from keyvault.access import accounts
from keyvault.audit import Actor
from keyvault.keys import services as key_services
from rotation import services
from rotation.models import RotationRun
from tests.browser.test_rotation import play_the_worker
from tests.keyvault import ROLE_GROUPS, make_role_user
from tests.rotation.conftest import seed_data_keys

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

S = RotationRun.State
SYSTEM = Actor.system("tests")
DATA_KEYS = 400
WIDTHS = (1280, 1920)


def shoot_widths(page, shots, label: str) -> None:
    """A screenshot at each width; at each, nothing may stick out past the right edge."""
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        overflow = page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert overflow[0] <= overflow[1], f"{label} overflows horizontally at {width} px: {overflow}"
        shots(page, f"{label}-{width}")
    page.set_viewport_size({"width": 1440, "height": 900})


def second_approver():
    return accounts.create_user(username="oscar", actor=SYSTEM, groups=[ROLE_GROUPS["operator"]])


def test_the_run_page_follows_a_run_to_the_end_without_reloading_and_rolls_it_back(login_as, shots, settings):
    settings.ROTATION_BATCH_SIZE = 40  # small batches: the page sees the counters move
    # given a KEK with data keys whose policy needs one approval, and a run an operator started
    kek = key_services.create_kek(name="payments", actor=SYSTEM)
    seed_data_keys(kek, DATA_KEYS)
    services.update_policy(kek, actor=SYSTEM, approvals_required=1)
    operator_user = make_role_user("operator")
    run = services.start_run(kek=kek, actor=Actor.user(operator_user), user=operator_user, reason="CHG-16")

    # when an administrator opens its page (and never reloads it)
    admin = login_as("administrator")
    admin.goto(f"/rotation/rotationrun/{run.pk}/change/")
    admin.evaluate("window.__kvNoReload = true")
    expect(admin.locator("#kv-run-state")).to_have_text("Pending approval")
    expect(admin.locator("[data-run-action=cancel]")).to_be_visible()
    expect(admin.locator("[data-run-action=rollback]")).to_be_hidden()
    expect(admin.locator("#kv-progress-line")).to_be_hidden()  # no "0 of 0" before anything is counted
    expect(admin.locator("#kv-no-approvals")).to_be_visible()
    shoot_widths(admin, shots, "pending-approval")

    # and someone else approves it elsewhere, then a worker runs it
    approver = second_approver()
    services.decide(run, user=approver, actor=Actor.user(approver), comment="CAB-16 approved")
    expect(admin.locator("#kv-approvals-table")).to_contain_text("CAB-16 approved", timeout=15_000)
    expect(admin.locator("[data-field=approvals_summary]")).to_have_text("1 of 1 required")
    expect(admin.locator("#kv-no-approvals")).to_be_hidden()
    expect(admin.locator("#kv-timeline-list")).to_contain_text("Pending approval → Queued")
    expect(admin.locator("#kv-decision-form")).to_be_hidden()
    errors: list = []
    worker = play_the_worker(run.pk, errors)
    try:
        expect(admin.locator("#kv-run-state")).to_have_text("Done, retirement pending", timeout=60_000)
    finally:
        worker.join(timeout=90)
    assert not errors, errors

    # then every part of the page has followed: state, counters, timeline, checklist, actions
    run.refresh_from_db()
    retires = f"{run.retire_after:%Y-%m-%d %H:%M} UTC"
    expect(admin.locator("#kv-run-summary")).to_have_text(f"Rewrapped and verified; old version v1 retires on {retires}.")
    expect(admin.locator("[data-field=rewrapped]")).to_have_text(str(DATA_KEYS))
    expect(admin.locator("#kv-progress-bar")).to_have_attribute("value", "100")
    expect(admin.locator("#kv-timeline-list")).to_contain_text("Verifying → Retiring old versions")
    expect(admin.locator("li[data-step='verify.coverage']")).to_have_attribute("data-status", "done")
    expect(admin.locator("li[data-step='retire']")).to_have_attribute("data-status", "pending")
    expect(admin.locator("[data-run-action=rollback]")).to_be_visible()
    expect(admin.locator("[data-run-action=cancel]")).to_be_hidden()
    expect(admin.locator("[data-run-action=resume]")).to_be_hidden()
    assert admin.evaluate("window.__kvNoReload") is True  # the same document all along
    shoot_widths(admin, shots, "retiring")

    # when they press Roll back, which appeared without a reload
    admin.click("[data-run-action=rollback] a")
    admin.fill("textarea[name=reason], input[name=reason]", "INC-16 application errors")
    admin.click("input[type=submit][value='Roll back']")

    # then the run is rolled back and its page offers nothing more
    expect(admin.locator("#kv-run-state")).to_have_text("Rolled back")
    expect(admin.locator("#kv-run-summary")).to_contain_text("Rolled back")
    expect(admin.locator("li[data-run-action]")).to_have_count(0)
    shoot_widths(admin, shots, "rolled-back")
    run.refresh_from_db()
    assert run.state == S.ROLLED_BACK
    assert kek.versions.get(is_primary=True).number == 1


def test_two_retiring_runs_and_a_failed_run_read_clearly(login_as, shots):
    # given two KEKs whose rotations wait out different grace periods, and one whose run failed
    payments = key_services.create_kek(name="payments", actor=SYSTEM)
    ledger = key_services.create_kek(name="ledger", actor=SYSTEM)
    broken = key_services.create_kek(name="broken", actor=SYSTEM)
    seed_data_keys(payments, 30)
    seed_data_keys(ledger, 12)
    retiring = []
    for kek, days in ((payments, 7), (ledger, 3)):
        services.update_policy(kek, actor=SYSTEM, grace_period=timedelta(days=days))
        retiring.append(services.drive(services.start_run(kek=kek, actor=SYSTEM).pk))
    failed = services.start_run(kek=broken, actor=SYSTEM)
    key_services.disable_kek(broken, actor=SYSTEM, reason="provider outage drill")
    failed = services.drive(failed.pk)
    assert [run.state for run in retiring] == [S.RETIRING, S.RETIRING] and failed.state == S.FAILED

    # when an administrator opens the run list
    admin = login_as("administrator")
    admin.goto("/rotation/rotationrun/")

    # then each retiring run reads as done with its own retirement date, the failed one as failed
    rows = admin.locator("#result_list tbody tr")
    expect(rows).to_have_count(3)
    for run in retiring:
        row = rows.filter(has_text=run.kek.name)
        expect(row).to_contain_text("Done, retirement pending")
        expect(row).to_contain_text(f"Rewrapped and verified; old version v1 retires on {run.retire_after:%Y-%m-%d %H:%M} UTC.")
        expect(row.locator("progress")).to_have_count(0)
    expect(rows.filter(has_text="broken")).to_contain_text("is disabled")
    shoot_widths(admin, shots, "run-list")

    # and the failed run's page shows the failure and its error, no bar and no "0 of 0"
    admin.goto(f"/rotation/rotationrun/{failed.pk}/change/")
    expect(admin.locator("#kv-run-state")).to_have_text("Failed")
    expect(admin.locator("#kv-run-summary")).to_contain_text("KEK 'broken' is disabled")
    expect(admin.locator("#kv-progress-line")).to_be_hidden()
    expect(admin.locator("#kv-progress-counts")).to_be_hidden()
    for action, visible in (("resume", True), ("cancel", True), ("rollback", True)):
        expect(admin.locator(f"[data-run-action={action}]")).to_be_visible(visible=visible)
    shoot_widths(admin, shots, "failed")


def test_the_runbook_panel_renders_once_collapses_and_copies_commands(login_as, shots):
    kek = key_services.create_kek(name="payments", actor=SYSTEM)
    run = services.start_run(kek=kek, actor=SYSTEM)
    admin = login_as("administrator")
    admin.context.grant_permissions(["clipboard-read", "clipboard-write"])
    admin.goto(f"/rotation/rotationrun/{run.pk}/change/")

    # the runbook is there once, in the panel, its checklist items with code, not backticks
    panel = admin.locator("details#kv-runbook")
    expect(panel.locator("summary")).to_have_text("Runbook: Planned KEK rotation")
    expect(admin.get_by_text("Runbook: Planned KEK rotation")).to_have_count(1)
    expect(panel.locator("li[data-step='precheck.provider'] code")).to_have_text("python manage.py kms health --all")
    assert "`" not in panel.inner_text()
    shoot_widths(admin, shots, "runbook-open")

    # a command copies with one click
    block = panel.locator("pre", has_text="rotation status RUN_ID")
    block.locator("button.kv-copy").click()
    expect(block.locator("button.kv-copy")).to_have_text("Copied")
    assert admin.evaluate("navigator.clipboard.readText()").strip() == "python manage.py rotation status RUN_ID"
    inline = panel.locator("li[data-step='precheck.provider'] button.kv-copy")
    inline.click()
    assert admin.evaluate("navigator.clipboard.readText()") == "python manage.py kms health --all"

    # collapsed, the panel gives its room to the run
    width_open = admin.locator("#kv-run").evaluate("el => el.getBoundingClientRect().width")
    panel.locator("summary").click()
    expect(panel.locator(".kv-runbook-body")).to_be_hidden()
    width_closed = admin.locator("#kv-run").evaluate("el => el.getBoundingClientRect().width")
    assert width_closed > width_open + 200, (width_open, width_closed)
    shoot_widths(admin, shots, "runbook-collapsed")
    admin.reload()  # the choice is remembered
    expect(admin.locator("details#kv-runbook .kv-runbook-body")).to_be_hidden()
