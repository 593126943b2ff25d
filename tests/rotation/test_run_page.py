"""The run page reads at a glance: state in words, only the valid actions, the runbook once.

Given runs in every state, when a console user opens the run page, its JSON progress
endpoint or the run list, then the actions offered are exactly those the engine's state
table allows, a retiring run reads as done with one pending step, a failed run shows its
error instead of a bar, and the runbook is rendered once with its code formatted.
"""

from __future__ import annotations

import re
from datetime import UTC, timedelta

import pytest
from django.utils.html import escape

from keyvault.audit import Actor
from keyvault.keys import services as key_services
from rotation import runbooks, services
from rotation.admin_views import run_progress, run_status
from rotation.engine import states
from rotation.models import RotationRun
from tests.rotation.conftest import seed_data_keys
from tests.rotation.test_admin import client_for, staff_user, url

pytestmark = pytest.mark.django_db

S = RotationRun.State
SYSTEM = Actor.system("tests")

#: What a person may do in each state, written out by hand: the derivation must agree.
EXPECTED_KEK_ACTIONS = {
    S.PENDING_APPROVAL: {"approve", "cancel"},
    S.QUEUED: {"cancel"},
    S.ROTATING: set(),
    S.REWRAPPING: {"rollback"},
    S.VERIFYING: {"rollback"},
    S.RETIRING: {"rollback"},
    S.FAILED: {"resume", "rollback", "cancel"},
    S.COMPLETED: set(),
    S.CANCELLED: set(),
    S.ROLLED_BACK: set(),
}


@pytest.fixture
def administrator():
    from keyvault.access.roles import KEY_ADMINISTRATORS

    return client_for(staff_user("adam", KEY_ADMINISTRATORS))


def run_in_state(kek, state: str, **fields) -> RotationRun:
    """A run of ``kek`` put straight into ``state`` (the page only reads it)."""
    return RotationRun.objects.create(kek=kek, policy=services.ensure_policy(kek), state=state,
                                      initiator="system:tests", **fields)


def visible_controls(html: str) -> set[str]:
    """The run controls the page shows (those not rendered ``hidden``)."""
    items = re.findall(r'<li data-run-action="(\w+)"( hidden)?>', html)
    return {slug for slug, hidden in items if not hidden}


@pytest.mark.parametrize("state", list(S))
def test_the_actions_come_from_the_engines_state_table(state):
    assert states.people_actions(state, rewraps=True) == EXPECTED_KEK_ACTIONS[state]
    if state in states.SECRET_TRANSITIONS:  # a secret run never rewraps; waiting on a person it can roll back
        secret_expected = EXPECTED_KEK_ACTIONS[state] | ({"rollback"} if state == S.ROTATING else set())
        assert states.people_actions(state, rewraps=False) == secret_expected
    # every action offered is a move the table allows
    targets = {"approve": S.QUEUED, "resume": S.QUEUED, "cancel": S.CANCELLED, "rollback": S.ROLLED_BACK}
    for action in states.people_actions(state, rewraps=True):
        assert targets[action] in states.TRANSITIONS[state]


@pytest.mark.parametrize("state", list(S))
def test_the_run_page_offers_only_the_actions_valid_in_its_state(administrator, kek, state):
    run = run_in_state(kek, state)

    html = administrator.get(url("rotation_rotationrun_change", run.pk)).content.decode()
    progress = administrator.get(url("rotation_rotationrun_progress", run.pk)).json()

    offered = EXPECTED_KEK_ACTIONS[state] - {"approve"}
    assert visible_controls(html) == offered
    assert set(progress["actions"]) == EXPECTED_KEK_ACTIONS[state]
    if state in services.TERMINAL:
        assert "<li data-run-action=" not in html  # a finished run has no controls at all, hidden or not


def test_a_retiring_run_reads_as_done_with_one_pending_step(administrator, kek):
    seed_data_keys(kek, 3)
    run = services.drive(services.start_run(kek=kek, actor=SYSTEM).pk)
    assert run.state == S.RETIRING
    retires = f"{run.retire_after.astimezone(UTC):%Y-%m-%d %H:%M} UTC"

    html = administrator.get(url("rotation_rotationrun_change", run.pk)).content.decode()

    sentence = f"Rewrapped and verified; old version v1 retires on {retires}."
    assert sentence in html
    assert re.search(r'id="kv-run-state"[^>]*>Done, retirement pending<', html)
    assert 'id="kv-progress-line">' in html  # the bar shows: 3 of 3
    assert visible_controls(html) == {"rollback"}
    assert run_status(run).phase == "done_pending"


def test_two_retiring_runs_read_clearly_side_by_side_in_the_run_list(administrator, system_actor):
    first = key_services.create_kek(name="payments", actor=system_actor)
    second = key_services.create_kek(name="ledger", actor=system_actor)
    seed_data_keys(first, 2)
    dates = {}
    for kek, days in ((first, 7), (second, 3)):
        services.update_policy(kek, actor=SYSTEM, grace_period=timedelta(days=days))
        run = services.drive(services.start_run(kek=kek, actor=SYSTEM).pk)
        dates[kek.name] = f"{run.retire_after.astimezone(UTC):%Y-%m-%d %H:%M} UTC"

    html = administrator.get(url("rotation_rotationrun_changelist")).content.decode()

    assert f"Rewrapped and verified; old version v1 retires on {dates['payments']}." in html
    assert f"Rotated and verified; no data keys to rewrap; old version v1 retires on {dates['ledger']}." in html
    assert html.count("Done, retirement pending") == 2
    assert "<progress" not in html  # nothing is in progress: no bars


def test_a_failed_run_shows_its_error_not_a_full_bar_and_zero_of_zero(administrator, kek):
    run = services.start_run(kek=kek, actor=SYSTEM)
    key_services.disable_kek(kek, actor=SYSTEM, reason="test")
    run = services.drive(run.pk)
    assert run.state == S.FAILED and run.total_deks == 0

    html = administrator.get(url("rotation_rotationrun_change", run.pk)).content.decode()
    progress = run_progress(run)

    assert re.search(r'id="kv-run-state"[^>]*>Failed<', html)
    assert escape(f"Failed {run.finished_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC: {run.last_error}") in html
    assert 'data-field="last_error" hidden></p>' in html  # in the status sentence, not repeated below it
    assert 'id="kv-progress-line" hidden' in html and 'id="kv-progress-counts" hidden' in html
    assert (progress["show_bar"], progress["show_counts"], progress["phase"]) == (False, False, "failed")
    assert visible_controls(html) == {"cancel", "rollback", "resume"}
    # a run that needs no approvals says so, not "0 of 0"
    assert progress["approvals_summary"] == "none required"
    assert re.search(r'data-field="approvals_summary">none required<', html) and "0 of 0" not in html


def test_a_run_that_failed_midway_keeps_its_counts_but_no_bar(kek):
    run = run_in_state(kek, S.FAILED, total_deks=600, rewrapped=250, last_error="provider unavailable")

    status = run_status(run)

    assert (status.show_bar, status.show_counts) == (False, True)
    assert status.summary.endswith("provider unavailable")


def test_progress_json_carries_the_timeline_and_the_approvals(kek, users_for_approval):
    operator, approver = users_for_approval
    services.update_policy(kek, actor=SYSTEM, approvals_required=1)
    run = services.start_run(kek=kek, actor=Actor.user(operator), user=operator)

    before = client_for(approver).get(url("rotation_rotationrun_progress", run.pk)).json()
    services.decide(run, user=approver, actor=Actor.user(approver), comment="CAB-9 ok")
    after = client_for(approver).get(url("rotation_rotationrun_progress", run.pk)).json()

    assert before["approvals"] == [] and before["actions"] == ["approve", "cancel"]
    assert [(a["who"], a["decision"], a["comment"]) for a in after["approvals"]] == [("oscar", "Approve", "CAB-9 ok")]
    assert after["approvals_required"] == 1 and after["actions"] == ["cancel"]
    assert (before["approvals_summary"], after["approvals_summary"]) == ("0 of 1 required", "1 of 1 required")
    labels = [entry["label"] for entry in after["timeline"]]
    assert labels[0].startswith("Started") and "Pending approval → Queued" in labels
    assert all(entry["when"].endswith(" UTC") for entry in after["timeline"])


@pytest.fixture
def users_for_approval():
    from keyvault.access.roles import KEY_OPERATORS

    return staff_user("olivia", KEY_OPERATORS), staff_user("oscar", KEY_OPERATORS)


def test_the_runbook_is_rendered_once_with_code_formatted(administrator, kek):
    run = services.start_run(kek=kek, actor=SYSTEM)  # its checklist steps come from the runbook

    html = administrator.get(url("rotation_rotationrun_change", run.pk)).content.decode()

    assert html.count("Runbook: Planned KEK rotation") == 1
    assert html.count("The owners of the data protected by this KEK know") == 1  # checklist item, once
    assert html.count("python manage.py kms health --all") == 1
    assert "<code>python manage.py kms health --all</code>" in html
    assert "`" not in re.search(r'<details class="kv-runbook-panel".*?</details>', html, re.S).group(0)
    assert "python manage.py rotation status RUN_ID" in html  # the section's guidance, a code block
    assert html.count('<details class="kv-runbook-panel"') == 1 and "<aside" not in html


def test_render_inline_formats_code_and_guidance_drops_the_tagged_items():
    assert runbooks.render_inline("Run `manage.py kms health` **now**") == (
        "Run <code>manage.py kms health</code> <strong>now</strong>")
    runbook = runbooks.get("kek-rotation")
    guidance = runbook.guidance("steps")
    assert "[auto:" not in guidance and "python manage.py rotation status RUN_ID" in guidance
    assert runbook.guidance("rollback").startswith("- Until the old versions are retired")
