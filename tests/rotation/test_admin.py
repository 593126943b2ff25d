"""The rotation console: starting runs from a KEK's page, the run page, approvals, steps, policies.

Given KEKs and data keys made through the services, when role users press the console's
buttons, then runs change only through ``rotation.services`` (each change audited),
refusals become form errors and the progress endpoint reports what the engine did.
"""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import Group
from django.core.cache import cache
from django.test import Client
from django.urls import reverse

from keyvault.audit import Actor
from keyvault.console import admin_views as key_views
from keyvault.keys import services as key_services
from keyvault.models import AuditEvent, KeyVersion
from rotation import services
from rotation.run_page import run_timeline
from rotation.models import Approval, RotationPolicy, RotationRun, RunStep
from tests.rotation.conftest import seed_data_keys
from tests.rotation.executors.conftest import file_source  # noqa: F401 - fixture

pytestmark = pytest.mark.django_db

S = RotationRun.State
SYSTEM = Actor.system("tests")


@pytest.fixture(autouse=True)
def _fresh_cache():
    cache.clear()


def url(name: str, *args) -> str:
    return reverse(f"admin:{name}", args=args)


def client_for(user, *, csrf: bool = False) -> Client:
    client = Client(enforce_csrf_checks=csrf)
    client.force_login(user)
    return client


def staff_user(username: str, group: str):
    """A console user (staff, not a superuser) in one role group."""
    from django.contrib.auth.models import User

    user = User.objects.create_user(username, is_staff=True)
    user.groups.add(Group.objects.get(name=group))
    return user


@pytest.fixture
def users():
    from keyvault.access.roles import AUDITORS, KEY_ADMINISTRATORS, KEY_OPERATORS

    return {
        "operator": staff_user("olivia", KEY_OPERATORS),
        "operator2": staff_user("oscar", KEY_OPERATORS),
        "administrator": staff_user("adam", KEY_ADMINISTRATORS),
        "auditor": staff_user("audrey", AUDITORS),
    }


@pytest.fixture
def clients(users):
    return {role: client_for(user) for role, user in users.items()}


def needs_approvals(kek, count: int) -> None:
    services.update_policy(kek, actor=SYSTEM, approvals_required=count)


def start_from_console(client, kek, reason="CHG-7") -> RotationRun:
    response = client.post(url("keyvault_keyencryptionkey_rotate", kek.pk), {"reason": reason})
    assert response.status_code == 302, response.content[:500]
    run = RotationRun.objects.get(kek=kek, state__in=RotationRun.ACTIVE_STATES)
    assert response["Location"] == url("rotation_rotationrun_change", run.pk)
    return run


def form_errors(response) -> str:
    form = response.context["form"]
    return " ".join(str(error) for errors in form.errors.values() for error in errors)


def actions(kek=None) -> list[str]:
    query = AuditEvent.objects.order_by("sequence")
    if kek is not None:
        query = query.filter(target_id=kek.name)
    return list(query.values_list("action", flat=True))


# -- runbook panels ------------------------------------------------------------------


@pytest.mark.parametrize("action", sorted(key_views.ACTION_RUNBOOKS))
def test_every_console_action_has_a_runbook_with_steps_and_rollback(action):
    runbook = key_views.runbook_for(action)

    assert runbook is not None, action
    assert {"steps", "verification", "rollback"} <= set(runbook.sections)
    html = runbook.html()
    assert "<h3>Rollback</h3>" in html and "<h3>Verification</h3>" in html


def test_unknown_action_has_no_runbook():
    assert key_views.runbook_for("make-coffee") is None


@pytest.mark.parametrize(("name", "title"), [
    ("keyvault_keyencryptionkey_rotate", "Planned KEK rotation"),
    ("keyvault_keyencryptionkey_emergency_rotate", "Emergency KEK rotation"),
    ("keyvault_keyencryptionkey_migrate", "Migrate data keys to a KEK on another provider"),
    ("keyvault_keyencryptionkey_disable", "Disable or enable a key-encryption key"),
    ("keyvault_keyencryptionkey_schedule_deletion", "Schedule or cancel deletion"),
])
def test_kek_action_pages_show_their_runbook_beside_the_form(clients, kek, name, title):
    response = clients["administrator"].get(url(name, kek.pk))

    assert response.status_code == 200
    aside = re.search(r'<aside class="kv-runbook".*?</aside>', response.content.decode(), re.S).group(0)
    assert f"Runbook: {title}" in aside
    assert "Rollback" in aside and "Verification" in aside


# -- the KEK page --------------------------------------------------------------------


def test_kek_page_shows_the_policy_with_nist_warnings_and_an_edit_link_for_admins(clients, kek):
    services.update_policy(kek, actor=SYSTEM, period=timedelta(days=1000), approvals_required=2)

    admin_html = clients["administrator"].get(url("keyvault_keyencryptionkey_change", kek.pk)).content.decode()
    operator_html = clients["operator"].get(url("keyvault_keyencryptionkey_change", kek.pk)).content.decode()

    policy = RotationPolicy.objects.get(kek=kek)
    assert 'id="kv-rotation"' in admin_html and "1000d" in admin_html
    assert "exceeds the ~2-year originator-usage period" in admin_html
    assert url("rotation_rotationpolicy_change", policy.pk) in admin_html
    assert "exceeds the ~2-year" in operator_html
    assert url("rotation_rotationpolicy_change", policy.pk) not in operator_html


def test_kek_page_shows_the_schedule_once_from_the_policy(clients, kek):
    policy = services.update_policy(kek, actor=SYSTEM, period=timedelta(hours=12))

    html = clients["administrator"].get(url("keyvault_keyencryptionkey_change", kek.pk)).content.decode()

    assert re.search(r'class="kv-policy-period">12h\b', html)
    assert html.count("Next due") == 1 and html.count("Period") == 1
    assert "Rotation period" not in html and "Next rotation" not in html  # the KEK keeps no copy of it
    assert policy.next_due_at == kek.created_at + timedelta(hours=12)


def test_kek_page_links_the_active_run(clients, kek):
    run = services.start_run(kek=kek, actor=SYSTEM)

    html = clients["auditor"].get(url("keyvault_keyencryptionkey_change", kek.pk)).content.decode()

    assert f'Active run: <a href="{url("rotation_rotationrun_change", run.pk)}">#{run.pk}' in html


# -- starting runs -------------------------------------------------------------------


def test_operator_starts_a_run_that_waits_for_approval(clients, users, kek):
    needs_approvals(kek, 1)

    run = start_from_console(clients["operator"], kek)

    assert (run.kind, run.state, run.initiated_by, run.reason) == ("on_demand", S.PENDING_APPROVAL,
                                                                     users["operator"], "CHG-7")
    assert kek.versions.count() == 1  # nothing rotates before the approval
    page = clients["operator"].get(url("rotation_rotationrun_change", run.pk))
    html = page.content.decode()
    assert "Pending approval" in html and "it waits for 1 approval" in " ".join(str(m) for m in page.context["messages"])
    assert 'id="kv-decision-form"' not in html  # the initiator gets no decision form
    assert "You started this run, so someone else must approve it." in html
    started = AuditEvent.objects.get(action="rotation.started")
    assert started.actor == "user:olivia" and started.details["run_id"] == run.pk


def test_a_second_rotation_while_one_is_active_is_a_form_error(clients, kek):
    needs_approvals(kek, 1)
    first = start_from_console(clients["operator"], kek)

    response = clients["operator2"].post(url("keyvault_keyencryptionkey_rotate", kek.pk), {"reason": ""})

    assert response.status_code == 200
    assert f"already has an active run (#{first.pk}" in form_errors(response)
    assert RotationRun.objects.count() == 1


def test_operators_may_not_start_emergency_rotations_or_migrations(clients, kek):
    for name in ("keyvault_keyencryptionkey_emergency_rotate", "keyvault_keyencryptionkey_migrate"):
        assert clients["operator"].get(url(name, kek.pk)).status_code == 403
        assert clients["operator"].post(url(name, kek.pk), {"incident_ref": "INC-1"}).status_code == 403
    assert not RotationRun.objects.exists()


@pytest.mark.parametrize("name", ["keyvault_keyencryptionkey_rotate", "keyvault_keyencryptionkey_emergency_rotate",
                                  "keyvault_keyencryptionkey_migrate"])
def test_auditors_start_nothing(clients, kek, name):
    assert clients["auditor"].get(url(name, kek.pk)).status_code == 403
    assert clients["auditor"].post(url(name, kek.pk), {"incident_ref": "INC-1", "reason": "x"}).status_code == 403
    assert not RotationRun.objects.exists()


def test_emergency_rotation_needs_an_incident_reference(clients, kek):
    target = url("keyvault_keyencryptionkey_emergency_rotate", kek.pk)

    missing = clients["administrator"].post(target, {"incident_ref": "   ", "reason": "keyring copied"})
    assert missing.status_code == 200 and "incident" in form_errors(missing).lower()
    assert not RotationRun.objects.exists()

    done = clients["administrator"].post(target, {"incident_ref": "INC-99", "reason": "keyring copied"})

    run = RotationRun.objects.get(kek=kek)
    assert done.status_code == 302 and done["Location"] == url("rotation_rotationrun_change", run.pk)
    assert (run.kind, run.incident_ref, run.state) == ("emergency", "INC-99", S.QUEUED)


def test_administrator_migrates_to_another_kek(clients, kek):
    destination = key_services.create_kek(name="cloud", actor=SYSTEM)
    seed_data_keys(kek, 5)
    form = clients["administrator"].get(url("keyvault_keyencryptionkey_migrate", kek.pk)).context["form"]
    assert [choice.name for choice in form.fields["destination"].queryset] == ["cloud"]  # never the source

    response = clients["administrator"].post(url("keyvault_keyencryptionkey_migrate", kek.pk),
                                             {"destination": destination.pk, "reason": "to the cloud"})

    run = RotationRun.objects.get(kek=kek)
    assert response.status_code == 302 and (run.kind, run.destination_kek) == ("migrate", destination)
    services.drive(run.pk)
    assert destination.data_keys.count() == 5 and kek.data_keys.count() == 0


# -- approvals ------------------------------------------------------------------------


def test_self_approval_is_refused_in_the_console(clients, kek):
    needs_approvals(kek, 1)
    run = start_from_console(clients["operator"], kek)

    response = clients["operator"].post(url("rotation_rotationrun_approve", run.pk),
                                        {"decision": "approve", "comment": "me, myself"})

    assert response.status_code == 200
    assert "the initiator of a run cannot approve it" in form_errors(response)
    run.refresh_from_db()
    assert run.state == S.PENDING_APPROVAL and not run.approvals.exists()
    assert "rotation.approved" not in actions(kek)


def test_another_operator_approves_and_the_run_is_queued(clients, kek):
    needs_approvals(kek, 1)
    run = start_from_console(clients["operator"], kek)
    page = clients["operator2"].get(url("rotation_rotationrun_change", run.pk)).content.decode()
    assert 'id="kv-decision-form"' in page and 'name="break_glass"' not in page

    empty = clients["operator2"].post(url("rotation_rotationrun_approve", run.pk), {"decision": "approve",
                                                                                   "comment": "  "})
    assert empty.status_code == 200 and "comment is required" in form_errors(empty).lower()

    response = clients["operator2"].post(url("rotation_rotationrun_approve", run.pk),
                                         {"decision": "approve", "comment": "CAB approved"})

    assert response.status_code == 302 and response["Location"] == url("rotation_rotationrun_change", run.pk)
    run.refresh_from_db()
    assert run.state == S.QUEUED
    approval = Approval.objects.get(run=run)
    assert (approval.approver.username, approval.comment, approval.break_glass) == ("oscar", "CAB approved", False)
    approved = AuditEvent.objects.get(action="rotation.approved")
    assert approved.actor == "user:oscar" and approved.details == {"run_id": run.pk, "comment": "CAB approved"}
    html = clients["auditor"].get(url("rotation_rotationrun_change", run.pk)).content.decode()
    assert "CAB approved" in html and "Pending approval → Queued" in html


def test_a_rejection_cancels_the_run(clients, kek):
    needs_approvals(kek, 2)
    run = start_from_console(clients["operator"], kek)

    clients["administrator"].post(url("rotation_rotationrun_approve", run.pk),
                                  {"decision": "reject", "comment": "change freeze"})

    run.refresh_from_db()
    assert run.state == S.CANCELLED
    assert "rotation.rejected" in actions(kek)


def test_break_glass_is_offered_only_to_the_break_glass_group(clients, users, kek):
    needs_approvals(kek, 2)
    run = start_from_console(clients["operator"], kek)
    admin = users["administrator"]
    without = clients["administrator"].get(url("rotation_rotationrun_change", run.pk)).content.decode()
    assert 'name="break_glass"' not in without
    # a forged break-glass field from someone outside the group is ignored (the field does not exist for them)
    clients["operator2"].post(url("rotation_rotationrun_approve", run.pk),
                              {"decision": "approve", "comment": "ok", "break_glass": "on"})
    run.refresh_from_db()
    assert run.state == S.PENDING_APPROVAL and not Approval.objects.get(run=run).break_glass

    admin.groups.add(Group.objects.get_or_create(name="Break glass")[0])
    page = clients["administrator"].get(url("rotation_rotationrun_change", run.pk)).content.decode()
    assert 'name="break_glass"' in page
    clients["administrator"].post(url("rotation_rotationrun_approve", run.pk),
                                  {"decision": "approve", "comment": "INC-5 cannot wait", "break_glass": "on"})

    run.refresh_from_db()
    assert run.state == S.QUEUED
    assert "rotation.break_glass" in actions(kek)


# -- cancel, roll back, resume --------------------------------------------------------


def test_operators_cannot_cancel_roll_back_or_resume(clients, kek):
    needs_approvals(kek, 1)
    run = start_from_console(clients["operator"], kek)

    for control in ("cancel", "rollback", "resume"):
        assert clients["operator"].get(url(f"rotation_rotationrun_{control}", run.pk)).status_code == 403
        assert clients["operator"].post(url(f"rotation_rotationrun_{control}", run.pk)).status_code == 403
    run.refresh_from_db()
    assert run.state == S.PENDING_APPROVAL
    html = clients["operator"].get(url("rotation_rotationrun_change", run.pk)).content.decode()
    assert "Cancel run" not in html


def test_administrator_cancels_a_waiting_run_after_reading_the_rollback_section(clients, kek):
    needs_approvals(kek, 1)
    run = start_from_console(clients["operator"], kek)
    confirm = clients["administrator"].get(url("rotation_rotationrun_cancel", run.pk))
    aside = re.search(r'<aside class="kv-runbook".*?</aside>', confirm.content.decode(), re.S).group(0)
    assert "Rollback: Planned KEK rotation" in aside and "rotation rollback RUN_ID" in aside

    response = clients["administrator"].post(url("rotation_rotationrun_cancel", run.pk), {"reason": "not today"})

    assert response.status_code == 302
    run.refresh_from_db()
    assert run.state == S.CANCELLED
    last = AuditEvent.objects.filter(action="rotation.state_changed").latest("sequence")
    assert last.actor == "user:adam" and last.details["to"] == "cancelled" and last.details["note"] == "not today"


def test_rolling_back_a_run_makes_the_previous_version_primary(clients, kek):
    seed_data_keys(kek, 3)
    run = services.drive(services.start_run(kek=kek, actor=SYSTEM).pk)
    assert run.state == S.RETIRING and kek.versions.get(is_primary=True).number == 2

    response = clients["administrator"].post(url("rotation_rotationrun_rollback", run.pk), {"reason": "app errors"})

    assert response.status_code == 302
    run.refresh_from_db()
    assert run.state == S.ROLLED_BACK
    assert kek.versions.get(is_primary=True).number == 1
    assert set(kek.versions.values_list("state", flat=True)) == {KeyVersion.State.ENABLED}


def test_cancelling_a_running_run_is_a_form_error_not_a_500(clients, kek):
    run = services.drive(services.start_run(kek=kek, actor=SYSTEM).pk)

    response = clients["administrator"].post(url("rotation_rotationrun_cancel", run.pk), {"reason": ""})

    assert response.status_code == 200
    assert "roll it back instead of cancelling" in form_errors(response)
    assert "cannot be cancelled now" in response.content.decode()


def test_resuming_a_failed_run(clients, kek):
    run = services.start_run(kek=kek, actor=SYSTEM)
    key_services.disable_kek(kek, actor=SYSTEM, reason="test")
    run = services.drive(run.pk)
    assert run.state == S.FAILED
    page = clients["administrator"].get(url("rotation_rotationrun_change", run.pk)).content.decode()
    assert "Resume run" in page and "is disabled" in page  # last error shown

    key_services.enable_kek(kek, actor=SYSTEM)
    response = clients["administrator"].post(url("rotation_rotationrun_resume", run.pk), {"reason": ""})

    assert response.status_code == 302
    run.refresh_from_db()
    assert run.state == S.QUEUED and run.last_error == ""
    assert services.drive(run.pk).state == S.RETIRING


# -- manual steps ---------------------------------------------------------------------


def test_operator_marks_a_manual_step_done_with_evidence(clients, kek):
    needs_approvals(kek, 1)
    run = start_from_console(clients["operator"], kek)
    html = clients["operator"].get(url("rotation_rotationrun_change", run.pk)).content.decode()
    tick = url("rotation_rotationrun_tick", run.pk, "precheck.owners")
    assert f'action="{tick}"' in html
    assert url("rotation_rotationrun_tick", run.pk, "precheck.provider") not in html  # automatic: no button

    response = clients["operator2"].post(tick, {"evidence": "mailed payments-team@"})

    assert response.status_code == 302
    step = RunStep.objects.get(run=run, key="precheck.owners")
    assert (step.status, step.done_by, step.evidence) == ("done", "user:oscar", "mailed payments-team@")
    assert step.done_at is not None
    ticked = AuditEvent.objects.get(action="rotation.step_ticked")
    assert ticked.details == {"run_id": run.pk, "step": "precheck.owners", "status": "done"}


def test_ticking_an_automatic_step_by_hand_is_refused(clients, kek):
    run = services.start_run(kek=kek, actor=SYSTEM)

    response = clients["operator"].post(url("rotation_rotationrun_tick", run.pk, "verify.coverage"), {"evidence": "x"})

    assert response.status_code == 200
    assert "ticked by the engine" in form_errors(response)
    assert RunStep.objects.get(run=run, key="verify.coverage").status == "pending"


def test_auditors_tick_nothing(clients, kek):
    run = services.start_run(kek=kek, actor=SYSTEM)

    assert clients["auditor"].post(url("rotation_rotationrun_tick", run.pk, "precheck.owners"),
                                   {"evidence": "x"}).status_code == 403
    assert RunStep.objects.get(run=run, key="precheck.owners").status == "pending"


# -- progress -------------------------------------------------------------------------


def test_progress_json_before_and_after_the_worker(clients, kek):
    seed_data_keys(kek, 40)
    run = start_from_console(clients["operator"], kek)
    endpoint = url("rotation_rotationrun_progress", run.pk)

    before = clients["auditor"].get(endpoint)

    assert before.status_code == 200 and before["Content-Type"] == "application/json"
    data = before.json()
    assert set(data) >= {"id", "state", "total", "rewrapped", "failed", "remaining", "percent", "rate", "eta_seconds",
                         "paused_reason", "last_error", "steps", "actions", "active"}
    assert (data["state"], data["percent"], data["rewrapped"], data["active"]) == ("queued", 0.0, 0, True)
    assert {step["key"]: step["status"] for step in data["steps"]}["precheck.approvals"] == "done"

    services.drive(run.pk)
    after = clients["auditor"].get(endpoint).json()

    assert (after["state"], after["total"], after["rewrapped"], after["remaining"]) == ("retiring", 40, 40, 0)
    assert after["percent"] == 100.0 and after["failed"] == 0
    assert after["rate"] is None or after["rate"] > 0
    assert after["eta_seconds"] is None  # nothing left to rewrap
    assert (after["previous_version"], after["target_version"]) == (1, 2)
    statuses = {step["key"]: step for step in after["steps"]}
    for key in ("precheck.provider", "rotate", "rewrap", "verify.sample", "verify.coverage"):
        assert statuses[key]["status"] == "done", key
        assert statuses[key]["done_by"] == "system:rotation-engine"
    assert statuses["retire"]["status"] == "pending"  # the grace period runs
    assert after["actions"] == ["rollback"]


def test_timeline_comes_from_the_runs_audit_events(clients, kek):
    seed_data_keys(kek, 3)
    run = services.drive(services.start_run(kek=kek, actor=SYSTEM).pk)
    # another KEK's run must not leak into this timeline
    other = key_services.create_kek(name="other", actor=SYSTEM)
    services.drive(services.start_run(kek=other, actor=SYSTEM).pk)

    labels = [entry.label for entry in run_timeline(run)]

    assert labels == ["Started (on demand)", "Queued → Rotating", "Rotating → Rewrapping", "Rewrapping → Verifying",
                      "Verifying → Retiring old versions"]
    html = clients["auditor"].get(url("rotation_rotationrun_change", run.pk)).content.decode()
    assert "Rewrapping → Verifying" in html and "Rotation batch rewrapped" in html


def test_run_page_and_progress_of_an_unknown_run_are_404(clients):
    for name in ("rotation_rotationrun_change", "rotation_rotationrun_progress", "rotation_rotationrun_approve",
                 "rotation_rotationrun_cancel"):
        assert clients["administrator"].get(url(name, 424242)).status_code == 404, name
    assert clients["administrator"].get("/rotation/rotationrun/not-a-number/progress.json").status_code == 404


def test_unknown_step_is_404(clients, kek):
    run = services.start_run(kek=kek, actor=SYSTEM)

    assert clients["operator"].post(url("rotation_rotationrun_tick", run.pk, "no.such.step"),
                                    {"evidence": "x"}).status_code == 404


# -- the run list -----------------------------------------------------------------------


def test_run_list_filters_by_state_and_kind(clients, kek):
    other = key_services.create_kek(name="other", actor=SYSTEM)
    services.start_run(kek=kek, actor=SYSTEM)
    services.start_run(kek=other, actor=SYSTEM, kind="emergency", incident_ref="INC-2")

    everything = clients["auditor"].get(url("rotation_rotationrun_changelist"))
    emergencies = clients["auditor"].get(url("rotation_rotationrun_changelist"), {"kind__exact": "emergency"})
    by_kek = clients["auditor"].get(url("rotation_rotationrun_changelist"), {"kek__id__exact": kek.pk})

    assert len(everything.context["cl"].result_list) == 2
    assert [run.kek.name for run in emergencies.context["cl"].result_list] == ["other"]
    assert [run.kek.name for run in by_kek.context["cl"].result_list] == ["payments"]
    assert 'name="_save"' not in everything.content.decode()


# -- policies ------------------------------------------------------------------------


def policy_post(**changes) -> dict:
    data = {"period": "90d", "grace_period": "7d", "approvals_required": "1", "auto": "on", "usage_threshold": "",
            "window_weekdays": "", "window_start": "", "window_end": ""}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def test_policy_list_shows_period_due_approvals_and_warnings(clients, kek):
    services.update_policy(kek, actor=SYSTEM, period=timedelta(days=900))

    response = clients["auditor"].get(url("rotation_rotationpolicy_changelist"))

    html = response.content.decode()
    assert response.status_code == 200 and "KEK payments" in html and "900d" in html
    assert "exceeds the ~2-year" in html


@pytest.mark.parametrize(("text", "expected"), [("90d", timedelta(days=90)), ("12h", timedelta(hours=12)),
                                                 ("5m", timedelta(minutes=5)), ("P30D", timedelta(days=30))])
def test_policy_period_is_saved_through_the_service(clients, kek, text, expected):
    policy = services.ensure_policy(kek)

    response = clients["administrator"].post(url("rotation_rotationpolicy_change", policy.pk), policy_post(period=text))

    assert response.status_code == 302, response.context and response.context["adminform"].form.errors
    policy.refresh_from_db()
    kek.refresh_from_db()
    assert (policy.period, policy.approvals_required) == (expected, 1)
    assert policy.next_due_at == kek.created_at + expected
    changed = AuditEvent.objects.filter(action="rotation.policy_changed").latest("sequence")
    assert changed.actor == "user:adam" and changed.details["period"] == str(expected)


def test_a_managed_secrets_policy_is_saved_through_its_service(clients, file_source):  # noqa: F811
    # given: a managed secret, whose policy the policy list shows beside the KEKs'
    file_source.write("x/api", "v1")
    secret = services.register_secret(name="api", secret_type="generic", source="file", path="x/api",
                                      config={"length": 32}, actor=SYSTEM)
    policy = services.ensure_secret_policy(secret)

    # when: an administrator requires two approvals for it
    response = clients["administrator"].post(url("rotation_rotationpolicy_change", policy.pk),
                                             policy_post(approvals_required="2"))

    # then: saved (not a 500), and audited against the secret
    assert response.status_code == 302, response.context and response.context["adminform"].form.errors
    policy.refresh_from_db()
    assert policy.approvals_required == 2
    changed = AuditEvent.objects.filter(action="rotation.policy_changed").latest("sequence")
    assert (changed.actor, changed.target_id, changed.details["approvals_required"]) == ("user:adam", "api", "2")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("period", "ninety days", "Not a duration"),
    ("period", "30s", "At least 1m"),
    ("grace_period", "-1", "At least 0s"),
    ("approvals_required", "3", "Select a valid choice"),
    ("window_weekdays", "1,9", "Weekdays are 1"),
])
def test_bad_policy_input_is_a_form_error_not_a_500(clients, kek, field, value, message):
    policy = services.ensure_policy(kek)
    before = RotationPolicy.objects.values().get(pk=policy.pk)

    response = clients["administrator"].post(url("rotation_rotationpolicy_change", policy.pk),
                                             policy_post(**{field: value}))

    assert response.status_code == 200
    assert message in str(response.context["adminform"].form.errors)
    assert RotationPolicy.objects.values().get(pk=policy.pk) == before
    assert not AuditEvent.objects.filter(action="rotation.policy_changed", actor="user:adam").exists()


def test_policy_page_is_read_only_for_operators_and_has_its_runbook(clients, kek):
    policy = services.ensure_policy(kek)

    operator = clients["operator"].get(url("rotation_rotationpolicy_change", policy.pk)).content.decode()
    admin = clients["administrator"].get(url("rotation_rotationpolicy_change", policy.pk)).content.decode()

    assert 'name="period"' not in operator and 'name="period"' in admin and 'value="365d"' in admin
    assert "Runbook: Change a rotation policy" in admin


# -- CSRF ----------------------------------------------------------------------------


def csrf_cases(kek, users):
    """(url, data, state check) for every POST of the rotation console."""
    needs_approvals(kek, 1)
    pending = services.start_run(kek=kek, actor=Actor.user(users["operator"]), user=users["operator"])
    other = key_services.create_kek(name="other", actor=SYSTEM)
    dest = key_services.create_kek(name="dest", actor=SYSTEM)
    source = key_services.create_kek(name="source", actor=SYSTEM)
    retiring = services.drive(services.start_run(kek=other, actor=SYSTEM).pk)
    policy = services.ensure_policy(kek)
    return [
        (url("keyvault_keyencryptionkey_emergency_rotate", dest.pk), {"incident_ref": "INC-1"}),
        (url("keyvault_keyencryptionkey_migrate", source.pk), {"destination": str(dest.pk)}),
        (url("rotation_rotationrun_approve", pending.pk), {"decision": "approve", "comment": "ok"}),
        (url("rotation_rotationrun_tick", pending.pk, "precheck.owners"), {"evidence": "told them"}),
        (url("rotation_rotationrun_rollback", retiring.pk), {"reason": "csrf"}),
        (url("rotation_rotationpolicy_change", policy.pk), policy_post(period="30d")),
    ]


def snapshot():
    return (
        list(RotationRun.objects.order_by("pk").values_list("pk", "state")),
        list(RunStep.objects.order_by("pk").values_list("status", flat=True)),
        list(RotationPolicy.objects.order_by("pk").values_list("period", flat=True)),
        Approval.objects.count(),
    )


def test_every_rotation_post_needs_the_csrf_token(kek, users):
    cases = csrf_cases(kek, users)
    client = client_for(users["administrator"], csrf=True)
    client.get(url("rotation_rotationrun_changelist"))  # any admin page sets the cookie

    for target, data in cases:
        before = snapshot()
        assert client.post(target, data).status_code == 403, target
        assert snapshot() == before, target

    for target, data in cases:
        before = snapshot()
        accepted = client.post(target, {**data, "csrfmiddlewaretoken": client.cookies["csrftoken"].value})
        assert accepted.status_code == 302, target
        assert snapshot() != before, target


def test_cancel_and_resume_need_the_csrf_token(kek, users):
    run = services.start_run(kek=kek, actor=SYSTEM)
    client = client_for(users["administrator"], csrf=True)

    assert client.post(url("rotation_rotationrun_cancel", run.pk), {"reason": "x"}).status_code == 403
    run.refresh_from_db()
    assert run.state == S.QUEUED
    client.get(url("rotation_rotationrun_cancel", run.pk))
    ok = client.post(url("rotation_rotationrun_cancel", run.pk),
                     {"reason": "x", "csrfmiddlewaretoken": client.cookies["csrftoken"].value})
    assert ok.status_code == 302
    run.refresh_from_db()
    assert run.state == S.CANCELLED


# -- the page stays free of key material -------------------------------------------------


def test_run_page_and_progress_show_no_key_material(clients, kek):
    import base64

    keys = seed_data_keys(kek, 5)
    run = services.drive(services.start_run(kek=kek, actor=SYSTEM).pk)
    wrapped = {base64.b64encode(bytes(k.wrapped_key)).decode()[:40] for k in keys} | {
        bytes(k.wrapped_key).hex()[:40] for k in keys}

    for page in (url("rotation_rotationrun_change", run.pk), url("rotation_rotationrun_progress", run.pk)):
        text = clients["administrator"].get(page).content.decode()
        assert not [w for w in wrapped if w in text], page
