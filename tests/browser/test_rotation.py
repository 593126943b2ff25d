"""The rotation console in a real browser: start, approve, watch the run finish without a reload."""

from __future__ import annotations

import threading

import pytest
from django.db import connection
from playwright.sync_api import expect

from keyvault.audit import Actor
from keyvault.keys import services as key_services
from rotation import services
from rotation.models import RotationRun
from tests.rotation.conftest import seed_data_keys

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

DATA_KEYS = 600


def play_the_worker(run_id: int, errors: list) -> threading.Thread:
    """What a Celery worker does for the run, in a thread with its own database connection."""

    def work():
        try:
            services.drive(run_id)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=work, name=f"worker-{run_id}")
    thread.start()
    return thread


def test_operator_starts_a_rotation_a_second_user_approves_and_the_page_follows_it(login_as, shots, settings):
    settings.ROTATION_BATCH_SIZE = 50  # small batches: the page sees the counters move
    # given a KEK with data keys whose policy needs one approval
    kek = key_services.create_kek(name="payments", actor=Actor.system("bootstrap"))
    seed_data_keys(kek, DATA_KEYS)
    services.update_policy(kek, actor=Actor.system("bootstrap"), approvals_required=1)

    # when an operator presses Rotate now on the KEK's page
    operator = login_as("operator")
    operator.goto(f"/keyvault/keyencryptionkey/{kek.pk}/change/")
    expect(operator.locator("#kv-rotation .kv-policy-approvals")).to_have_text("1")
    operator.click(".object-tools >> text=Rotate now")
    expect(operator.locator("aside.kv-runbook")).to_contain_text("Runbook: Planned KEK rotation")
    operator.fill("#id_reason", "CHG-2001 quarterly rotation")
    shots(operator, "rotate-form")
    operator.click("input[type=submit][value='Rotate now']")

    # then they land on the run page, which waits for someone else's approval
    expect(operator.locator(".messagelist")).to_contain_text("waits for 1 approval")
    expect(operator.locator("#kv-run-state")).to_have_text("Pending approval")
    expect(operator.locator("#kv-decision-form")).to_have_count(0)
    expect(operator.locator("#kv-approvals")).to_contain_text("You started this run")
    shots(operator, "pending-approval")
    run = RotationRun.objects.get(kek=kek)
    assert run.state == RotationRun.State.PENDING_APPROVAL and kek.versions.count() == 1

    # when a second user (an administrator) approves it
    admin = login_as("administrator")
    admin.goto(f"/rotation/rotationrun/{run.pk}/change/")
    admin.check("#kv-decision-form input[value=approve]")
    admin.fill("#kv-decision-form textarea[name=comment]", "CAB-77 approved")
    shots(admin, "approve")
    admin.click("#kv-decision-form input[type=submit]")
    expect(admin.locator(".messagelist")).to_contain_text("it is now queued")
    expect(admin.locator("#kv-approvals")).to_contain_text("CAB-77 approved")
    shots(admin, "approved")

    # and the worker runs it while the operator's page stays open (no reload)
    operator.evaluate("window.__kvNoReload = true")
    errors: list = []
    worker = play_the_worker(run.pk, errors)
    try:
        expect(operator.locator("#kv-run-state")).not_to_have_text("Pending approval", timeout=15_000)
        expect(operator.locator("#kv-progress-bar")).to_have_attribute("value", "100", timeout=30_000)
    finally:
        worker.join(timeout=60)
    assert not errors, errors
    expect(operator.locator("#kv-progress-percent")).to_have_text("100")
    expect(operator.locator("[data-field=rewrapped]")).to_have_text(str(DATA_KEYS))
    expect(operator.locator("#kv-run-state")).to_have_text("Done, retirement pending")
    for step in ("rotate", "rewrap", "verify.sample", "verify.coverage"):
        expect(operator.locator(f"li[data-step='{step}']")).to_have_attribute("data-status", "done")
    expect(operator.locator("li[data-step='verify.sample'] .kv-step-status")).to_have_text("Done")
    expect(operator.locator("li[data-step='retire']")).to_have_attribute("data-status", "pending")  # grace period
    assert operator.evaluate("window.__kvNoReload") is True  # the same document: nothing reloaded it
    shots(operator, "rewrapped")

    run.refresh_from_db()
    assert (run.state, run.rewrapped, run.total_deks) == (RotationRun.State.RETIRING, DATA_KEYS, DATA_KEYS)
    assert kek.versions.get(is_primary=True).number == 2
    assert not kek.data_keys.filter(kek_version=1).exists()
