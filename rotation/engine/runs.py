"""Runs: start, approve or reject, cancel, roll back, resume, and execute one phase.

The same rules hold for every driver: one blocking run per target (the database refuses
a second, :class:`RunAlreadyActive`), approvals by people other than the initiator, every
state change through the driver's transition table and audited.
"""

from __future__ import annotations

import contextlib
from datetime import datetime

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from keyvault.audit import Actor, events
from rotation import runbooks
from rotation.engine import leases, rewrap, states
from rotation.engine.dispatch import dispatcher
from rotation.engine.policies import ensure_policy
from rotation.engine.wiring import driver_for, driver_for_target, transition
from rotation.exceptions import ApprovalRefused, InvalidRunTransition, RotationError, RunAlreadyActive, RunNotPermitted
from rotation.models import Approval, RotationRun, RunStep

Run = RotationRun
S = RotationRun.State

#: Permissions a console or CLI user needs to start a run, by target kind.
RUN_PERMISSIONS = {"kek": ("keyvault.rotate_keyencryptionkey", "rotation.add_rotationrun"),
                   "secret": ("keyvault.rotate_managedsecret",)}


def require_run_permission(user, *, target: str, kind: str) -> None:
    """Refuse a console or CLI user who may not start a run of this kind on this type of target.

    The console checks the same permissions before it calls :func:`start_run`; checking
    them here too keeps every caller (``rotation start --user``) under the same rule:
    an emergency run (no grace period) needs ``rotation.emergency_rotationrun`` whatever
    it rotates. ``user=None`` is the engine, beat or an operator at the shell.

    :raises RunNotPermitted:
    """
    if user is None:
        return
    needed = list(RUN_PERMISSIONS[target])
    if kind == Run.Kind.EMERGENCY:
        needed.append("rotation.emergency_rotationrun")
    elif kind == Run.Kind.MIGRATE:
        needed.append("keyvault.change_state_keyencryptionkey")
    missing = [permission for permission in needed if not user.has_perm(permission)]
    if missing:
        raise RunNotPermitted(f"{user.get_username()} may not start {Run.Kind(kind).label.lower()} runs "
                              f"of a {'KEK' if target == 'kek' else 'managed secret'} (needs {', '.join(missing)})")


def start_run(
    *,
    kek=None,
    secret=None,
    actor: Actor,
    kind: str = Run.Kind.ON_DEMAND,
    user=None,
    reason: str = "",
    incident_ref: str = "",
    destination=None,
) -> RotationRun:
    """Request a rotation (or migration) of ``kek``, or a rotation of a managed ``secret``.

    The run waits for approvals if its policy requires them, else it is queued and
    a worker picks it up. Concurrent requests for the same target produce one run:
    the database refuses a second active run (:class:`RunAlreadyActive`).
    """
    kind = Run.Kind(kind)
    if (kek is None) == (secret is None):
        raise RotationError("a run rotates exactly one target: a KEK or a managed secret")
    target = kek if secret is None else secret
    driver = driver_for_target(target, kind=kind)
    require_run_permission(user, target=driver.target_kind, kind=kind)
    if kind == Run.Kind.EMERGENCY and not incident_ref.strip():
        raise RotationError("an emergency rotation needs an incident or ticket reference")
    driver.check_start(target, kind=kind, destination=destination)
    runbook = runbooks.for_run(driver.runbook_name(target), kind)
    if runbook is None:
        raise RotationError(f"no runbook for {kind.label.lower()} rotation of {driver.label(target)}")
    try:
        with transaction.atomic():
            driver.lock(target)
            policy = ensure_policy(target)
            needs_approval = driver.needs_approval(target, policy)
            run = RotationRun.objects.create(
                **driver.run_fields(target, destination), policy=policy, kind=kind,
                state=S.PENDING_APPROVAL if needs_approval else S.QUEUED,
                initiated_by=user, initiator=actor.name, reason=reason, incident_ref=incident_ref.strip(),
            )
            _create_steps(run, runbook)
            if not needs_approval:
                states.tick(run, "precheck.approvals", actor=Actor.system("engine"),
                            evidence="policy requires no approvals")
            events.rotation_started(target, actor=actor, run_id=run.pk, kind=kind.value, reason=reason,
                                    incident_ref=incident_ref,
                                    **driver.started_details(run, runbook=runbook, destination=destination))
            if not needs_approval:
                enqueue_run(run)
    except IntegrityError:
        existing = RotationRun.objects.filter(**{driver.target_kind: target}, state__in=Run.BLOCKING_STATES).first()
        if existing is None:
            raise
        raise RunAlreadyActive(existing) from None
    return run


def _create_steps(run: RotationRun, runbook) -> None:
    if runbook is None:
        return
    RunStep.objects.bulk_create(
        RunStep(run=run, section=step.section, key=step.key, title=step.text, automatic=step.automatic, order=i)
        for i, step in enumerate(runbook.steps)
    )


def approvals_required(run: RotationRun) -> int:
    """Approvals ``run`` needs: its policy's, and at least one for a secret re-pointed since its last run."""
    return driver_for(run).approvals_required(run)


def is_break_glass(user) -> bool:
    group = getattr(settings, "ROTATION_BREAK_GLASS_GROUP", "Break glass")
    return bool(group) and user.groups.filter(name=group).exists()


def decide(
    run: RotationRun, *, user, actor: Actor, comment: str, decision: str = Approval.Decision.APPROVE,
    break_glass: bool = False,
) -> RotationRun:
    """Record an approval or rejection.

    Rules: the initiator never approves their own run; each person decides once, so
    two approvals are two people; a comment is required. A member of the break-glass
    group may bypass missing approvals with ``break_glass=True`` and a reason, which
    is audited as such.
    """
    decision = Approval.Decision(decision)
    if not comment or not comment.strip():
        raise ApprovalRefused("a comment is required")
    if not user.has_perm("rotation.approve_rotationrun"):
        raise ApprovalRefused(f"{user.get_username()} may not approve rotation runs")
    with transaction.atomic():
        run = states.locked_run(run.pk)
        driver = driver_for(run)
        if run.state != S.PENDING_APPROVAL:
            raise ApprovalRefused(f"run #{run.pk} is {run.get_state_display().lower()}, not waiting for approval")
        if run.initiated_by_id == user.pk or run.initiator == actor.name:
            raise ApprovalRefused("the initiator of a run cannot approve it")
        if run.approvals.filter(approver=user).exists():
            raise ApprovalRefused(f"{user.get_username()} has already decided on run #{run.pk}")
        driver.check_approver(run, user)
        if break_glass and not is_break_glass(user):
            raise ApprovalRefused(f"{user.get_username()} is not in the break-glass group")
        Approval.objects.create(run=run, approver=user, decision=decision, comment=comment.strip(), break_glass=break_glass)
        if decision == Approval.Decision.REJECT:
            events.run_rejected(run.target, actor=actor, run_id=run.pk, comment=comment)
            return transition(run, S.CANCELLED, actor=actor, note=f"rejected: {comment}")
        decided = events.run_break_glass if break_glass else events.run_approved
        decided(run.target, actor=actor, run_id=run.pk, comment=comment)
        approvals = run.approvals.filter(decision=Approval.Decision.APPROVE).count()
        if break_glass or approvals >= driver.approvals_required(run):
            names = ", ".join(a.approver.get_username() for a in run.approvals.select_related("approver"))
            states.tick(run, "precheck.approvals", actor=actor,
                        evidence=("break-glass: " + comment) if break_glass else f"approved by {names}")
            transition(run, S.QUEUED, actor=actor)
            enqueue_run(run)
    return run


def cancel(run: RotationRun, *, actor: Actor, reason: str = "") -> RotationRun:
    """Cancel a run that has not started rotating (or one that failed)."""
    with transaction.atomic():
        run = states.locked_run(run.pk)
        if "cancel" not in states.people_actions(run.state, rewraps=driver_for(run).rewraps):
            raise InvalidRunTransition(
                f"run #{run.pk} is {run.get_state_display().lower()}; roll it back instead of cancelling"
            )
        return transition(run, S.CANCELLED, actor=actor, note=reason)


def rollback(run: RotationRun, *, actor: Actor, reason: str = "") -> RotationRun:
    """Stop a run before retirement and undo its switch (the driver says how).

    A KEK's previous version becomes primary again and both stay enabled, so data keys
    already rewrapped keep opening. Where the provider always encrypts with its newest
    version (AWS KMS, Vault Transit) the new version stays primary at the provider; the
    run still stops and nothing is retired. A secret's previous value is made current again.
    """
    with transaction.atomic():
        run = states.locked_run(run.pk)
        driver = driver_for(run)
        if not driver.hooks.allows(run.state, S.ROLLED_BACK):
            raise InvalidRunTransition(f"run #{run.pk} is {run.get_state_display().lower()}; it cannot be rolled back")
        note = driver.rollback(run, reason)
        return transition(run, S.ROLLED_BACK, actor=actor, note=note)


def resume(run: RotationRun, *, actor: Actor) -> RotationRun:
    """Requeue a failed run; it continues from what the database says is left."""
    with transaction.atomic():
        run = states.locked_run(run.pk)
        run = transition(run, S.QUEUED, actor=actor, last_error="", failed_deks=0, paused_reason="")
        enqueue_run(run)
    return run


# -- people's part of a run ----------------------------------------------------------------


def tick_manual_step(run: RotationRun, key: str, *, actor: Actor, evidence: str = "") -> RunStep:
    """A person confirms a manual runbook step."""
    with transaction.atomic():
        step = RunStep.objects.select_for_update().get(run=run, key=key)
        if step.automatic:
            raise RotationError(f"step {key!r} is ticked by the engine, not by hand")
        driver = driver_for(run)
        run = driver.before_manual_tick(run, key, now=timezone.now())
        states.tick(run, key, actor=actor, evidence=evidence)
        step.refresh_from_db()
        driver.after_manual_tick(run)
    return step


def provide_secret_value(run: RotationRun, value: str, *, actor: Actor) -> RotationRun:
    """A person hands over a new secret value the run cannot make itself (e.g. an OAuth client secret).

    The value goes straight to the secret's source; only its new version id is kept.
    """
    if not value or not value.strip():
        raise RotationError("the new secret value is empty")
    with transaction.atomic():
        run = states.locked_run(run.pk)
        driver_for(run).accept_value(run, value.strip(), actor=actor)
    return run


# -- execution ---------------------------------------------------------------------------


def enqueue_run(run: RotationRun) -> None:
    options = {"priority": 0} if run.kind == Run.Kind.EMERGENCY else {}
    dispatcher("execute_run", run.pk, **options)


def execute_run(run_id: int, *, now: datetime | None = None) -> str:
    """Advance a run by one phase (or as many as its driver can) and hand the next to a worker.

    Safe to call any number of times: each phase checks where the run is first.
    Returns the new state.
    """
    now = now or timezone.now()
    run = RotationRun.objects.select_related("kek", "destination_kek", "secret", "policy").get(pk=run_id)
    return driver_for(run).advance(run, now)


def rewrap_partition(run_id: int, partition_id: int, *, task_id: str | None = None,
                     batch_size: int | None = None) -> int:
    """Rewrap one leased partition of the run (see :mod:`rotation.engine.rewrap`).

    The lease is held in the name of the Celery task ``task_id`` (its retries get it back),
    or of this process when called directly.
    """
    run = RotationRun.objects.get(pk=run_id)
    return rewrap.rewrap_partition(run_id, partition_id, driver=driver_for(run), owner=_lease_owner(task_id),
                                   batch_size=batch_size)


def _lease_owner(task_id: str | None) -> str:
    return leases.task_owner(task_id) if task_id else leases.process_owner()


def rewrap_batch(run: RotationRun, *, after: int, hi: int, batch_size: int) -> tuple[int, int]:
    """Rewrap one batch of the run in one transaction; returns (rows handled, last id seen)."""
    return rewrap.rewrap_batch(run, driver=driver_for(run), after=after, hi=hi, batch_size=batch_size)


def fan_out(run: RotationRun) -> int:
    """Send what is left of the run to workers, in id ranges."""
    return rewrap.fan_out(run, driver_for(run))


def mark_paused(run_id: int, reason: str, *, retry_at: datetime | None = None, partition_id: int | None = None,
                task_id: str | None = None) -> None:
    """Record why a run is waiting (provider or database down) and when its task tries again.

    The sweep leaves the run alone until then, and a partition's lease is kept past the
    retry, so nothing else sends the same work meanwhile.
    """
    RotationRun.objects.filter(pk=run_id).update(paused_reason=reason[:255], last_error=reason, next_attempt_at=retry_at)
    if partition_id is not None and retry_at is not None:
        leases.postpone(partition_id, _lease_owner(task_id), until=retry_at)


def note_pause(run_id: int, reason: str, *, at: datetime) -> None:
    """A pause a task could not record when it happened (the database was down), recorded now.

    The run's last error keeps it, with its time; the run shows as paused only if it is
    still working and nothing moved since (otherwise the pause is over).
    """
    text = f"{reason} (at {at:%Y-%m-%d %H:%M:%S} UTC)"
    RotationRun.objects.filter(pk=run_id).update(last_error=text)
    RotationRun.objects.filter(Q(heartbeat_at__isnull=True) | Q(heartbeat_at__lt=at), pk=run_id,
                               state__in=states.WORKING).update(paused_reason=text[:255])


# -- synchronous driving (tests, the CLI's --inline, and benchmarks) ------------------------


def inline_dispatch() -> contextlib.AbstractContextManager[None]:
    """Within this block nothing is sent to Celery (use :func:`drive` to do the work here)."""
    return dispatcher.inline()


def drive(run_id: int, *, now: datetime | None = None, max_phases: int = 1000) -> RotationRun:
    """Run every phase in this process until the run is done or waiting (approval, grace period).

    Dispatches that would go to Celery run inline instead, in order.
    """
    handlers = {"execute_run": lambda *args: execute_run(*args, now=now), "rewrap_partition": rewrap_partition}
    dispatcher.drive(("execute_run", (run_id,)), handlers, max_tasks=max_phases)
    return RotationRun.objects.get(pk=run_id)
