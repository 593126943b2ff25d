"""Approval rules: never your own run, two approvals are two people, break-glass is audited."""

import pytest

from keyvault.audit import Actor
from keyvault.models import AuditEvent
from rotation import services
from rotation.exceptions import ApprovalRefused
from rotation.models import RotationRun, RunStep

pytestmark = pytest.mark.django_db
S = RotationRun.State


def start(kek, user, approvals):
    services.update_policy(kek, actor=Actor.system("tests"), approvals_required=approvals)
    return services.start_run(kek=kek, actor=Actor.user(user), user=user, reason="quarterly")


def decide(run, user, comment="looks right", **kwargs):
    return services.decide(run, user=user, actor=Actor.user(user), comment=comment, **kwargs)


def test_run_waits_for_approval(kek, operator):
    run = start(kek, operator, 1)

    assert run.state == S.PENDING_APPROVAL
    assert RunStep.objects.get(run=run, key="precheck.approvals").status == RunStep.Status.PENDING


def test_initiator_cannot_approve_own_run(kek, operator):
    run = start(kek, operator, 1)

    with pytest.raises(ApprovalRefused, match="initiator"):
        decide(run, operator)
    run.refresh_from_db()
    assert run.state == S.PENDING_APPROVAL and run.approvals.count() == 0


def test_one_approver_is_not_enough_when_two_are_required(kek, operator, approvers):
    adam, bella = approvers
    run = start(kek, operator, 2)

    decide(run, adam)
    run.refresh_from_db()
    assert run.state == S.PENDING_APPROVAL
    with pytest.raises(ApprovalRefused, match="already decided"):
        decide(run, adam, comment="again")

    decide(run, bella)
    run.refresh_from_db()
    assert run.state == S.QUEUED
    step = RunStep.objects.get(run=run, key="precheck.approvals")
    assert step.status == RunStep.Status.DONE and "adam" in step.evidence and "bella" in step.evidence


def test_comment_and_permission_are_required(kek, operator, make_user):
    run = start(kek, operator, 1)
    outsider = make_user("eve")

    with pytest.raises(ApprovalRefused, match="comment"):
        decide(run, make_user("carl", "Key operators"), comment="  ")
    with pytest.raises(ApprovalRefused, match="may not approve"):
        decide(run, outsider)


def test_rejection_cancels_the_run(kek, operator, approvers):
    run = start(kek, operator, 2)

    decide(run, approvers[0], decision="reject", comment="wrong window")

    run.refresh_from_db()
    assert run.state == S.CANCELLED
    assert AuditEvent.objects.filter(action="rotation.rejected").exists()


def test_break_glass_bypasses_with_reason_and_is_audited(kek, operator, make_user):
    run = start(kek, operator, 2)
    oncall = make_user("oscar", "Key administrators", "Break glass")
    plain_admin = make_user("pam", "Key administrators")

    with pytest.raises(ApprovalRefused, match="break-glass"):
        decide(run, plain_admin, break_glass=True, comment="urgent")
    decide(run, oncall, break_glass=True, comment="INC-9 approvers unreachable")

    run.refresh_from_db()
    assert run.state == S.QUEUED
    event = AuditEvent.objects.get(action="rotation.break_glass")
    assert event.actor == "user:oscar" and event.details["comment"] == "INC-9 approvers unreachable"
    assert RunStep.objects.get(run=run, key="precheck.approvals").evidence.startswith("break-glass:")


def test_break_glass_does_not_let_the_initiator_approve_their_own_run(kek, make_user):
    # given an on-call engineer in the break-glass group who starts the run
    oncall = make_user("olga", "Key administrators", "Break glass")
    run = start(kek, oncall, 1)

    # when they try to let it through with break-glass, then it is refused and nothing is recorded
    with pytest.raises(ApprovalRefused, match="initiator"):
        decide(run, oncall, break_glass=True, comment="INC-9 nobody else awake")
    run.refresh_from_db()
    assert run.state == S.PENDING_APPROVAL and run.approvals.count() == 0
    assert not AuditEvent.objects.filter(action="rotation.break_glass").exists()
