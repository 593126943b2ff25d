"""The rotation engine: policies, the beat sweep, runs and their state machine, bulk rewrap.

Celery tasks (``rotation/tasks.py``), admin views and the ``rotation`` command are
thin callers of these functions. Progress lives in the database, never in task
memory: "what is left" is always "data keys of this KEK on a version below the
run's target", so a killed worker's run resumes where it stopped and a batch run
twice changes nothing the second time.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, InterfaceError, OperationalError, connection, transaction
from django.db.models import F, Q
from django.db.models.functions import Greatest
from django.utils import timezone

from keyvault import audit
from keyvault import services as key_services
from keyvault.audit import Action, Actor, Outcome
from keyvault.exceptions import KeyvaultError
from keyvault.fields import encrypted_fields, rewrap_field
from keyvault.kms import Capability, KMSError, ProviderUnavailable
from keyvault.models import DataKey, KeyEncryptionKey, KeyVersion, ManagedSecret
from keyvault.secrets.base import SecretSourceError, SecretSourceUnavailable
from rotation import runbooks
from rotation.exceptions import ApprovalRefused, InvalidRunTransition, RotationError, RunAlreadyActive, RunNotPermitted
from rotation.models import Approval, RotationPolicy, RotationRun, RunStep, format_period

log = logging.getLogger(__name__)

Run = RotationRun
S = RotationRun.State


TRANSITIONS: dict[str, set[str]] = {
    S.PENDING_APPROVAL: {S.QUEUED, S.CANCELLED},
    S.QUEUED: {S.ROTATING, S.REWRAPPING, S.CANCELLED, S.FAILED},
    S.ROTATING: {S.REWRAPPING, S.FAILED},
    S.REWRAPPING: {S.VERIFYING, S.FAILED, S.ROLLED_BACK},
    S.VERIFYING: {S.RETIRING, S.REWRAPPING, S.FAILED, S.ROLLED_BACK},
    S.RETIRING: {S.COMPLETED, S.FAILED, S.ROLLED_BACK},
    S.FAILED: {S.QUEUED, S.ROLLED_BACK, S.CANCELLED},
    S.COMPLETED: set(),
    S.CANCELLED: set(),
    S.ROLLED_BACK: set(),
}
TERMINAL = {S.COMPLETED, S.CANCELLED, S.ROLLED_BACK}
#: Secret runs have no rewrap: rotating → verifying directly; a run waiting for a person can be rolled back.
SECRET_TRANSITIONS: dict[str, set[str]] = {
    S.PENDING_APPROVAL: {S.QUEUED, S.CANCELLED},
    S.QUEUED: {S.ROTATING, S.CANCELLED, S.FAILED},
    S.ROTATING: {S.VERIFYING, S.FAILED, S.ROLLED_BACK},
    S.VERIFYING: {S.RETIRING, S.FAILED, S.ROLLED_BACK},
    S.RETIRING: {S.COMPLETED, S.FAILED, S.ROLLED_BACK},
    S.FAILED: {S.QUEUED, S.ROLLED_BACK, S.CANCELLED},
    S.COMPLETED: set(),
    S.CANCELLED: set(),
    S.ROLLED_BACK: set(),
}


def transitions_for(run: RotationRun) -> dict[str, set[str]]:
    return SECRET_TRANSITIONS if run.secret_id else TRANSITIONS


def setting(name: str, default):
    return getattr(settings, name, default)


# -- policies --------------------------------------------------------------------


def ensure_policy(kek: KeyEncryptionKey) -> RotationPolicy:
    """The KEK's policy, created from the KEK's own period and usage limit if it has none."""
    policy = RotationPolicy.objects.filter(kek=kek).first()
    if policy is not None:
        return policy
    policy, _ = RotationPolicy.objects.get_or_create(
        kek=kek,
        defaults={
            "period": timedelta(days=kek.rotation_period_days),
            "usage_threshold": kek.max_encryptions_per_version,
            "next_due_at": kek.next_rotation_at or timezone.now() + timedelta(days=kek.rotation_period_days),
        },
    )
    return policy


POLICY_FIELDS = (
    "period", "usage_threshold", "window_weekdays", "window_start", "window_end", "auto",
    "approvals_required", "grace_period",
)


def update_policy(kek: KeyEncryptionKey, *, actor: Actor, **changes) -> RotationPolicy:
    """Change a KEK's rotation policy; the KEK's period and next due date follow it."""
    unknown = set(changes) - set(POLICY_FIELDS)
    if unknown:
        raise ValueError(f"unknown policy fields: {sorted(unknown)}")
    with transaction.atomic():
        policy = ensure_policy(kek)
        policy = RotationPolicy.objects.select_for_update().get(pk=policy.pk)
        for name, value in changes.items():
            setattr(policy, name, value)
        policy.full_clean(exclude=["kek"])
        if "period" in changes:
            anchor = kek.last_rotated_at or kek.created_at
            policy.next_due_at = anchor + policy.period
        policy.save()
        # The KEK keeps a whole-day period for display; the policy's exact period schedules.
        key_services.update_kek_settings(
            kek, actor=actor, rotation_period_days=max(1, math.ceil(policy.period / timedelta(days=1))),
            max_encryptions_per_version=policy.usage_threshold,
        )
        KeyEncryptionKey.objects.filter(pk=kek.pk).update(next_rotation_at=policy.next_due_at)
        audit.record(Action.POLICY_CHANGED, actor=actor, target=kek,
                     details={k: str(v) if v is not None else None for k, v in changes.items()})
    return policy


# -- state machine ---------------------------------------------------------------


def _transition(run: RotationRun, new_state: str, *, actor: Actor, note: str = "", **fields) -> RotationRun:
    """Move a locked run to ``new_state`` (the one place transitions are checked) and audit it."""
    if new_state not in transitions_for(run)[run.state]:
        raise InvalidRunTransition(
            f"run #{run.pk} is {run.get_state_display().lower()}; it cannot become {S(new_state).label.lower()}"
        )
    previous = run.state
    run.state = new_state
    for name, value in fields.items():
        setattr(run, name, value)
    if new_state in TERMINAL or new_state == S.FAILED:
        run.finished_at = timezone.now()
    run.save()
    details = {"run_id": run.pk, "from": previous, "to": new_state}
    if note:
        details["note"] = note[:500]
    audit.record(Action.ROTATION_STATE, actor=actor, target=run.target,
                 outcome=Outcome.FAILURE if new_state == S.FAILED else Outcome.SUCCESS, details=details)
    return run


def _locked_run(run_id: int) -> RotationRun:
    return RotationRun.objects.select_for_update(of=("self",)).select_related("kek", "secret", "policy").get(pk=run_id)


def tick(run: RotationRun, key: str, *, actor: Actor, evidence: str = "", status: str = RunStep.Status.DONE) -> None:
    """Mark a runbook step of the run done (or skipped/failed), recording who, when and evidence."""
    updated = RunStep.objects.filter(run=run, key=key).exclude(status=status).update(
        status=status, done_by=actor.name, done_at=timezone.now(), evidence=evidence[:4000]
    )
    if updated:
        audit.record(Action.ROTATION_STEP, actor=actor, target=run.target,
                     details={"run_id": run.pk, "step": key, "status": status})


def tick_manual_step(run: RotationRun, key: str, *, actor: Actor, evidence: str = "") -> RunStep:
    """A person confirms a manual runbook step."""
    with transaction.atomic():
        step = RunStep.objects.select_for_update().get(run=run, key=key)
        if step.automatic:
            raise RotationError(f"step {key!r} is ticked by the engine, not by hand")
        if run.secret_id:
            run = _locked_run(run.pk)
            _secret_executor(run).before_manual_tick(run, key, now=timezone.now())
        tick(run, key, actor=actor, evidence=evidence)
        step.refresh_from_db()
        if run.secret_id and run.state in (S.ROTATING, S.VERIFYING, S.RETIRING):
            dispatch("execute_run", run.pk)  # the run may have been waiting for this step
    return step


# -- starting, approving, stopping -------------------------------------------------


def start_run(
    *,
    kek: KeyEncryptionKey | None = None,
    secret: ManagedSecret | None = None,
    actor: Actor,
    kind: str = Run.Kind.ON_DEMAND,
    user=None,
    reason: str = "",
    incident_ref: str = "",
    destination: KeyEncryptionKey | None = None,
) -> RotationRun:
    """Request a rotation (or migration) of ``kek``.

    The run waits for approvals if its policy requires them, else it is queued and
    a worker picks it up. Concurrent requests for the same KEK produce one run:
    the database refuses a second active run (:class:`RunAlreadyActive`).
    Give ``secret`` instead of ``kek`` to rotate a managed secret.
    """
    kind = Run.Kind(kind)
    if (kek is None) == (secret is None):
        raise RotationError("a run rotates exactly one target: a KEK or a managed secret")
    if secret is not None:
        return _start_secret_run(secret=secret, actor=actor, kind=kind, user=user, reason=reason,
                                 incident_ref=incident_ref, destination=destination)
    require_run_permission(user, target="kek", kind=kind)
    if kind == Run.Kind.EMERGENCY and not incident_ref.strip():
        raise RotationError("an emergency rotation needs an incident or ticket reference")
    if kind == Run.Kind.MIGRATE:
        if destination is None or destination.pk == kek.pk:
            raise RotationError("a migration needs a destination KEK other than the source")
        key_services.require_usable(destination)
    elif destination is not None:
        raise RotationError("only migration runs take a destination KEK")
    key_services.require_usable(kek)
    runbook = runbooks.for_run("kek", kind)
    try:
        with transaction.atomic():
            policy = ensure_policy(kek)
            needs_approval = policy.approvals_required > 0
            run = RotationRun.objects.create(
                kek=kek, destination_kek=destination, policy=policy, kind=kind,
                state=S.PENDING_APPROVAL if needs_approval else S.QUEUED,
                initiated_by=user, initiator=actor.name, reason=reason, incident_ref=incident_ref.strip(),
            )
            _create_steps(run, runbook)
            if not needs_approval:
                tick(run, "precheck.approvals", actor=Actor.system("engine"), evidence="policy requires no approvals")
            audit.record(Action.ROTATION_STARTED, actor=actor, target=kek,
                         details={"run_id": run.pk, "kind": kind.value, "reason": reason, "incident_ref": incident_ref,
                                  "approvals_required": policy.approvals_required,
                                  "destination": destination.name if destination else None})
            if not needs_approval:
                enqueue_run(run)
    except IntegrityError:
        existing = RotationRun.objects.filter(kek=kek, state__in=Run.BLOCKING_STATES).first()
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


def is_break_glass(user) -> bool:
    group = setting("ROTATION_BREAK_GLASS_GROUP", "Break glass")
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
        run = _locked_run(run.pk)
        if run.state != S.PENDING_APPROVAL:
            raise ApprovalRefused(f"run #{run.pk} is {run.get_state_display().lower()}, not waiting for approval")
        if run.initiated_by_id == user.pk or run.initiator == actor.name:
            raise ApprovalRefused("the initiator of a run cannot approve it")
        if run.approvals.filter(approver=user).exists():
            raise ApprovalRefused(f"{user.get_username()} has already decided on run #{run.pk}")
        repointed = repointed_event(run.secret) if run.secret_id and run.started_at is None else None
        if repointed is not None and repointed.actor == Actor.user(user).name:
            raise ApprovalRefused(f"{user.get_username()} re-pointed secret {run.secret.name}; "
                                  "someone else must approve its next run")
        if break_glass and not is_break_glass(user):
            raise ApprovalRefused(f"{user.get_username()} is not in the break-glass group")
        Approval.objects.create(run=run, approver=user, decision=decision, comment=comment.strip(), break_glass=break_glass)
        if decision == Approval.Decision.REJECT:
            audit.record(Action.ROTATION_REJECTED, actor=actor, target=run.target, details={"run_id": run.pk, "comment": comment})
            return _transition(run, S.CANCELLED, actor=actor, note=f"rejected: {comment}")
        action = Action.ROTATION_BREAK_GLASS if break_glass else Action.ROTATION_APPROVED
        audit.record(action, actor=actor, target=run.target, details={"run_id": run.pk, "comment": comment})
        approvals = run.approvals.filter(decision=Approval.Decision.APPROVE).count()
        if break_glass or approvals >= approvals_required(run):
            names = ", ".join(a.approver.get_username() for a in run.approvals.select_related("approver"))
            tick(run, "precheck.approvals", actor=actor,
                 evidence=("break-glass: " + comment) if break_glass else f"approved by {names}")
            _transition(run, S.QUEUED, actor=actor)
            enqueue_run(run)
    return run


def cancel(run: RotationRun, *, actor: Actor, reason: str = "") -> RotationRun:
    """Cancel a run that has not started rotating (or one that failed)."""
    with transaction.atomic():
        run = _locked_run(run.pk)
        if run.state not in (S.PENDING_APPROVAL, S.QUEUED, S.FAILED):
            raise InvalidRunTransition(
                f"run #{run.pk} is {run.get_state_display().lower()}; roll it back instead of cancelling"
            )
        return _transition(run, S.CANCELLED, actor=actor, note=reason)


def rollback(run: RotationRun, *, actor: Actor, reason: str = "") -> RotationRun:
    """Stop a run before retirement and make the previous version primary again.

    Both versions stay enabled, so data keys already rewrapped keep opening. Where
    the provider always encrypts with its newest version (AWS KMS, Vault Transit)
    the new version stays primary at the provider; the run still stops and
    nothing is retired.
    """
    with transaction.atomic():
        run = _locked_run(run.pk)
        if S.ROLLED_BACK not in transitions_for(run)[run.state]:
            raise InvalidRunTransition(f"run #{run.pk} is {run.get_state_display().lower()}; it cannot be rolled back")
        if run.secret_id:
            note = _rollback_secret(run, reason)
            return _transition(run, S.ROLLED_BACK, actor=actor, note=note)
        newer = RotationRun.objects.filter(kek=run.kek, target_version__gt=run.target_version or 0).exclude(pk=run.pk)
        if run.kek_id and run.target_version and newer.exists():
            raise InvalidRunTransition(f"run #{run.pk} was followed by a newer rotation of {run.kek.name}; roll that one back")
        note = reason
        if run.kind != Run.Kind.MIGRATE and run.previous_version and run.target_version:
            kek = run.kek
            provider = key_services.provider_for(kek)
            if provider.supports(Capability.SET_PRIMARY):
                provider.set_primary_version(kek.provider_key_id, run.previous_version)
                kek.versions.filter(is_primary=True).update(is_primary=False)
                kek.versions.filter(number=run.previous_version).update(is_primary=True)
                note = f"{reason} (v{run.previous_version} is primary again)".strip()
            else:
                note = f"{reason} (provider {provider.name} keeps v{run.target_version} as primary; both versions stay enabled)".strip()
        return _transition(run, S.ROLLED_BACK, actor=actor, note=note)


def resume(run: RotationRun, *, actor: Actor) -> RotationRun:
    """Requeue a failed run; it continues from what the database says is left."""
    with transaction.atomic():
        run = _locked_run(run.pk)
        run = _transition(run, S.QUEUED, actor=actor, last_error="", failed_deks=0, paused_reason="")
        enqueue_run(run)
    return run


# -- execution -----------------------------------------------------------------------

#: How runs are handed to workers; tests and ``drive`` swap it for inline execution.
_dispatcher: Callable[[str, tuple, dict], None] | None = None


def _celery_dispatch(name: str, args: tuple, options: dict) -> None:
    from rotation import tasks

    getattr(tasks, name).apply_async(args=args, **options)


def dispatch(name: str, *args, **options) -> None:
    """Send a task once the current transaction commits (inline mode: queue it at once)."""
    if _dispatcher is not None:
        _dispatcher(name, args, options)
        return
    transaction.on_commit(lambda: _celery_dispatch(name, args, options))


def enqueue_run(run: RotationRun) -> None:
    options = {"priority": 0} if run.kind == Run.Kind.EMERGENCY else {}
    dispatch("execute_run", run.pk, **options)


ENGINE = Actor.system("rotation-engine")


def execute_run(run_id: int, *, now: datetime | None = None) -> str:
    """Advance a run by one phase and hand the next phase to a worker. Returns the new state.

    Safe to call any number of times: each phase checks where the run is first.
    """
    now = now or timezone.now()
    run = RotationRun.objects.select_related("kek").get(pk=run_id)
    if run.secret_id:
        return _execute_secret_run(run_id, now)
    handler = {
        S.QUEUED: _phase_start,
        S.ROTATING: _phase_start,
        S.REWRAPPING: _phase_rewrap,
        S.VERIFYING: _phase_verify,
        S.RETIRING: _phase_retire,
    }.get(run.state)
    if handler is None:
        return run.state
    try:
        return handler(run_id, now)
    except (ProviderUnavailable, OperationalError, InterfaceError):
        raise  # transient: the task retries with backoff, the run stays where it is
    except Exception as exc:  # anything else fails the run visibly, old versions still enabled
        log.exception("rotation run #%s failed", run_id)
        return _fail(run_id, exc)


def _fail(run_id: int, exc: Exception) -> str:
    with transaction.atomic():
        run = _locked_run(run_id)
        if S.FAILED not in transitions_for(run)[run.state]:
            return run.state
        message = f"{type(exc).__name__}: {exc}"
        _transition(run, S.FAILED, actor=ENGINE, note=message, last_error=message)
        return run.state


def _phase_start(run_id: int, now: datetime) -> str:
    run = RotationRun.objects.select_related("kek", "destination_kek").get(pk=run_id)
    kek = run.kek
    providers = {key_services.provider_for(kek)}
    if run.destination_kek_id:
        providers.add(key_services.provider_for(run.destination_kek))
    for provider in providers:
        status = provider.health_check()
        if not status.healthy:
            raise ProviderUnavailable(f"{provider.name}: {status.detail}")
    # Walk the chain before taking any lock: recording an event locks the chain head, and a
    # long walk inside that transaction would stall every audited operation meanwhile.
    chain = audit.verify_chain() if RotationRun.objects.filter(pk=run_id, state=S.QUEUED).exists() else None
    with transaction.atomic():
        run = _locked_run(run_id)
        if run.state == S.QUEUED and chain is not None:
            _transition(run, S.ROTATING, actor=ENGINE, started_at=now)
            tick(run, "precheck.provider", actor=ENGINE, evidence="; ".join(
                f"{p.name}: healthy" for p in providers))
            tick(run, "precheck.audit", actor=ENGINE, evidence=str(chain),
                 status=RunStep.Status.DONE if chain.ok else RunStep.Status.FAILED)
    # A second transaction: the provider call below must not run while this one holds the
    # chain-head lock its audit events took (AWS may take seconds to list a rotation).
    with transaction.atomic():
        run = _locked_run(run_id)
        if run.state != S.ROTATING:
            return run.state
        if run.kind == Run.Kind.MIGRATE:
            target = run.destination_kek.versions.get(is_primary=True).number
            run.target_version = target
        elif run.target_version is None:
            previous = kek.versions.get(is_primary=True).number
            version = key_services.rotate_kek_version(kek, actor=ENGINE, reason=f"rotation run #{run.pk}", run_id=run.pk)
            run.previous_version, run.target_version = previous, version.number
            if run.policy_id:
                next_due = now + run.policy.period
                RotationPolicy.objects.filter(pk=run.policy_id).update(next_due_at=next_due)
                KeyEncryptionKey.objects.filter(pk=kek.pk).update(next_rotation_at=next_due)
            tick(run, "rotate", actor=ENGINE, evidence=f"v{version.number} is primary (was v{previous})")
        total = _remaining_query(run).count()
        _transition(run, S.REWRAPPING, actor=ENGINE, total_deks=total, rewrapped=0, rewrap_started_at=now,
                    heartbeat_at=now)
        fan_out(run)
    return S.REWRAPPING


def _remaining_query(run: RotationRun):
    if run.kind == Run.Kind.MIGRATE:
        return DataKey.objects.filter(kek_id=run.kek_id)
    return DataKey.objects.filter(kek_id=run.kek_id, kek_version__lt=run.target_version)


def fan_out(run: RotationRun) -> int:
    """Split what is left into id ranges, one task each, so more workers finish sooner."""
    bounds = _remaining_query(run).order_by().values_list("id", flat=True)
    low = bounds.order_by("id").first()
    if low is None:
        dispatch("execute_run", run.pk)
        return 0
    high = bounds.order_by("-id").first() + 1
    partitions = max(1, min(setting("ROTATION_PARTITIONS", 4), high - low))
    step = -(-(high - low) // partitions)
    ranges = list(range(low, high, step))
    # A new round replaces the count: partitions of a dead worker never report back.
    RotationRun.objects.filter(pk=run.pk).update(partitions_outstanding=len(ranges))
    for lo in ranges:
        dispatch("rewrap_partition", run.pk, lo, min(lo + step, high), priority=0 if run.kind == Run.Kind.EMERGENCY else None)
    return partitions


def rewrap_partition(run_id: int, lo: int, hi: int, *, batch_size: int | None = None) -> int:
    """Rewrap every remaining data key of the run with ``lo <= id < hi``, batch by batch.

    Afterwards, if nothing is left anywhere, the run moves on to verification.
    """
    # Data keys rewrapped per transaction (HMD_ROTATION_BATCH_SIZE): one short transaction and one audit event each.
    batch_size = batch_size or settings.ROTATION_BATCH_SIZE
    done = 0
    after = lo - 1
    while True:
        run = RotationRun.objects.select_related("kek", "destination_kek").get(pk=run_id)
        if run.state != S.REWRAPPING:
            return done  # cancelled, rolled back or finished meanwhile
        count, after = rewrap_batch(run, after=after, hi=hi, batch_size=batch_size)
        done += count
        if count == 0:
            break
    RotationRun.objects.filter(pk=run_id).update(partitions_outstanding=Greatest(F("partitions_outstanding") - 1, 0))
    _finish_rewrap_if_done(run_id)
    return done


def rewrap_batch(run: RotationRun, *, after: int, hi: int, batch_size: int) -> tuple[int, int]:
    """Rewrap one batch in one transaction; returns (rows handled, last id seen).

    Rows another worker holds are skipped (``SKIP LOCKED``); rows that moved to the
    target already no longer match. A data key the provider cannot open is counted
    as failed and left on its old version (nothing is ever made unreadable).
    """
    source = key_services.provider_for(run.kek)
    destination_kek = run.destination_kek if run.kind == Run.Kind.MIGRATE else run.kek
    destination = key_services.provider_for(destination_kek)
    now = timezone.now()
    with transaction.atomic():
        rows = list(
            _remaining_query(run).filter(id__gt=after, id__lt=hi).order_by("id")
            .select_for_update(skip_locked=True)
            .values_list("id", "wrapped_key", "encryption_context")[:batch_size]
        )
        if not rows:
            return 0, hi
        updates, failures = [], []
        for pk, wrapped, context in rows:
            try:
                if run.kind == Run.Kind.MIGRATE:
                    result = _migrate_one(source, destination, destination_kek, bytes(wrapped), context)
                else:
                    result = source.rewrap(bytes(wrapped), encryption_context=context, key_id=run.kek.provider_key_id)
            except ProviderUnavailable:
                raise
            except KMSError as exc:
                failures.append((pk, type(exc).__name__))
                continue
            updates.append((pk, result.ciphertext, result.key_version, context))
        if updates:
            _verify_sample(destination, destination_kek, updates)
            _bulk_write(updates, now, kek_id=destination_kek.pk)
        RotationRun.objects.filter(pk=run.pk).update(
            rewrapped=F("rewrapped") + len(updates), failed_deks=F("failed_deks") + len(failures),
            heartbeat_at=now, paused_reason="",
        )
        details = {"run_id": run.pk, "first_id": rows[0][0], "last_id": rows[-1][0], "rewrapped": len(updates)}
        if failures:
            details["failed_ids"] = [pk for pk, _ in failures[:20]]
            details["failed_errors"] = sorted({name for _, name in failures})
        audit.record(Action.ROTATION_BATCH, actor=ENGINE, target=run.kek,
                     outcome=Outcome.FAILURE if failures else Outcome.SUCCESS, details=details)
    return len(rows), rows[-1][0]


def _migrate_one(source, destination, destination_kek, wrapped: bytes, context):
    opened = source.decrypt(wrapped, encryption_context=context)
    plaintext = bytearray(opened.plaintext)
    try:
        return destination.encrypt(destination_kek.provider_key_id, bytes(plaintext), encryption_context=context)
    finally:
        plaintext[:] = bytes(len(plaintext))


def _verify_sample(provider, kek, updates) -> None:
    """Open one freshly rewrapped key through the provider before the batch commits."""
    pk, ciphertext, version, context = random.choice(updates)
    opened = provider.decrypt(ciphertext, encryption_context=context)
    if opened.key_version != version or opened.key_id != kek.provider_key_id:
        raise RotationError(f"verification of data key #{pk} failed: provider reports another key or version")


def _bulk_write(updates, now, *, kek_id: int) -> None:
    """One UPDATE for the batch (PostgreSQL: ``UPDATE … FROM (VALUES …)``), never a save() per row."""
    table = DataKey._meta.db_table
    if connection.vendor == "postgresql":
        values = ", ".join(["(%s::bigint, %s::bytea, %s::integer)"] * len(updates))
        params = [p for pk, blob, version, _ in updates for p in (pk, blob, version)]
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {table} AS d SET wrapped_key = v.w, kek_version = v.ver, kek_id = %s, last_rewrapped_at = %s "
                f"FROM (VALUES {values}) AS v(id, w, ver) WHERE d.id = v.id",
                [kek_id, now, *params],
            )
    else:
        with connection.cursor() as cursor:
            cursor.executemany(
                f"UPDATE {table} SET wrapped_key = %s, kek_version = %s, kek_id = %s, last_rewrapped_at = %s WHERE id = %s",
                [(blob, version, kek_id, now, pk) for pk, blob, version, _ in updates],
            )


def _finish_rewrap_if_done(run_id: int) -> str:
    with transaction.atomic():
        run = _locked_run(run_id)
        if run.state != S.REWRAPPING:
            return run.state
        remaining = _remaining_query(run).count()
        if remaining == 0:
            tick(run, "rewrap", actor=ENGINE, evidence=f"{run.rewrapped} data keys rewrapped")
            _transition(run, S.VERIFYING, actor=ENGINE)
            dispatch("execute_run", run.pk)
        elif run.failed_deks and remaining <= run.failed_deks:
            message = (f"{remaining} data key(s) could not be rewrapped (see the run's audit events); "
                       "the old version stays enabled")
            tick(run, "rewrap", actor=ENGINE, evidence=message, status=RunStep.Status.FAILED)
            _transition(run, S.FAILED, actor=ENGINE, note=message, last_error=message)
        elif run.partitions_outstanding <= 0:
            # Every partition of this round is done, yet keys remain (skipped while another
            # worker held them): another round picks them up.
            fan_out(run)
    return run.state


def _phase_rewrap(run_id: int, now: datetime) -> str:
    """Re-dispatch the rewrap (after a restart, or for stragglers another worker skipped)."""
    run = RotationRun.objects.get(pk=run_id)
    if _remaining_query(run).exists():
        fan_out(run)
        return run.state
    return _finish_rewrap_if_done(run_id)


def _phase_verify(run_id: int, now: datetime) -> str:
    run = RotationRun.objects.select_related("kek", "destination_kek", "policy").get(pk=run_id)
    if run.kind != Run.Kind.MIGRATE:
        fields = rewrap_encrypted_fields_of(run.kek)
        tick(run, "rewrap.fields", actor=ENGINE, evidence=fields or "no encrypted fields use this KEK")
    remaining = _remaining_query(run).count()
    if remaining:
        with transaction.atomic():
            _transition(_locked_run(run_id), S.REWRAPPING, actor=ENGINE, note=f"{remaining} data keys still to rewrap")
        fan_out(run)
        return S.REWRAPPING
    target_kek = run.destination_kek if run.kind == Run.Kind.MIGRATE else run.kek
    sample = list(DataKey.objects.filter(kek=target_kek).order_by("?").values_list("wrapped_key", "encryption_context", "kek_version")[:20])
    provider = key_services.provider_for(target_kek)
    for wrapped, context, version in sample:
        opened = provider.decrypt(bytes(wrapped), encryption_context=context)
        if opened.key_version != version:
            raise RotationError("verification failed: a data key opened under another version than recorded")
    coverage = key_services.version_coverage(target_kek)
    emergency = run.kind == Run.Kind.EMERGENCY
    grace = timedelta(0) if emergency or run.kind == Run.Kind.MIGRATE else run.policy.grace_period if run.policy else timedelta(days=7)
    with transaction.atomic():
        run = _locked_run(run_id)
        if run.state != S.VERIFYING:
            return run.state
        tick(run, "verify.sample", actor=ENGINE, evidence=f"{len(sample)} random data keys decrypted after the run")
        tick(run, "verify.coverage", actor=ENGINE, evidence=f"coverage by version: {coverage}")
        _transition(run, S.RETIRING, actor=ENGINE, retire_after=now + grace)
        if not grace:
            dispatch("execute_run", run.pk)
    return S.RETIRING


def rewrap_encrypted_fields_of(kek: KeyEncryptionKey) -> str:
    """Rewrap every encrypted model field value (all models); returns a summary for the evidence."""
    from django.apps import apps

    parts = []
    for model in apps.get_models():
        for field in encrypted_fields(model):
            count = rewrap_field(model, field.name)
            if count:
                parts.append(f"{model._meta.label_lower}.{field.name}: {count}")
    return ", ".join(parts)


def _phase_retire(run_id: int, now: datetime) -> str:
    with transaction.atomic():
        run = _locked_run(run_id)
        if run.state != S.RETIRING or (run.retire_after and run.retire_after > now):
            return run.state
        kek = run.kek
        if run.kind == Run.Kind.MIGRATE:
            evidence = f"all data keys moved to KEK {run.destination_kek.name}; source KEK left enabled for rollback"
        else:
            retired = []
            for version in kek.versions.filter(number__lt=run.target_version, state=KeyVersion.State.ENABLED):
                # set_version_state refuses unless coverage of the old version is zero.
                key_services.set_version_state(kek, version.number, KeyVersion.State.DISABLED, actor=ENGINE,
                                               reason=f"retired by rotation run #{run.pk}")
                retired.append(f"v{version.number}")
            evidence = f"disabled {', '.join(retired) or 'nothing (no enabled older versions)'}"
        tick(run, "retire", actor=ENGINE, evidence=evidence)
        _transition(run, S.COMPLETED, actor=ENGINE)
    return S.COMPLETED


def mark_paused(run_id: int, reason: str) -> None:
    """Record why a run is waiting (provider down); the task retries with backoff."""
    RotationRun.objects.filter(pk=run_id).update(paused_reason=reason[:255], last_error=reason)


# -- the beat sweep --------------------------------------------------------------------


def dispatch_due_rotations(*, now: datetime | None = None) -> list[RotationRun]:
    """The one periodic job: start due runs, resume stalled ones, retire, destroy due KEKs."""
    now = now or timezone.now()
    started = []
    for kek in KeyEncryptionKey.objects.filter(state=KeyEncryptionKey.State.ENABLED, rotation_policy__isnull=True):
        ensure_policy(kek)
    for policy in due_policies(now):
        try:
            started.append(start_run(kek=policy.kek, actor=Actor.system("beat"), kind=Run.Kind.PLANNED,
                                     reason=_due_reason(policy, now)))
        except RunAlreadyActive:
            continue
        except KeyvaultError as exc:
            log.warning("could not start planned rotation of %s: %s", policy.kek.name, exc)
    started.extend(start_due_secret_rotations(now=now))
    resume_stalled_runs(now=now)
    for run in RotationRun.objects.filter(state=S.RETIRING, retire_after__lte=now):
        dispatch("execute_run", run.pk)
    key_services.destroy_due_keks(now=now, actor=Actor.system("beat"))
    return started


def due_policies(now: datetime) -> list[RotationPolicy]:
    """Automatic policies of enabled KEKs that are due by date or usage and inside their window."""
    candidates = (
        RotationPolicy.objects.select_related("kek")
        .filter(auto=True, kek__state=KeyEncryptionKey.State.ENABLED)
        .exclude(kek__rotation_runs__state__in=Run.BLOCKING_STATES)
    )
    due = []
    for policy in candidates.filter(Q(next_due_at__lte=now) | Q(usage_threshold__isnull=False)):
        if not policy.in_window(now):
            continue
        if (policy.next_due_at and policy.next_due_at <= now) or _over_usage(policy):
            due.append(policy)
    return due


def _over_usage(policy: RotationPolicy) -> bool:
    if not policy.usage_threshold:
        return False
    try:
        key_services.refresh_kek(policy.kek)
    except KMSError as exc:
        log.warning("could not read usage of %s: %s", policy.kek.name, exc)
        return False
    primary = policy.kek.versions.filter(is_primary=True).first()
    return bool(primary and primary.encrypt_count >= policy.usage_threshold)


def _due_reason(policy: RotationPolicy, now: datetime) -> str:
    if policy.next_due_at and policy.next_due_at <= now:
        return f"scheduled: due {policy.next_due_at:%Y-%m-%d %H:%M} UTC (every {format_period(policy.period)})"
    return f"usage: primary version passed {policy.usage_threshold} encryptions"


def resume_stalled_runs(*, now: datetime) -> list[int]:
    """Re-dispatch working runs with no progress for ``ROTATION_STALL_SECONDS`` (a killed worker)."""
    stall = timedelta(seconds=setting("ROTATION_STALL_SECONDS", 300))
    stalled = RotationRun.objects.filter(
        state__in=[S.QUEUED, S.ROTATING, S.REWRAPPING, S.VERIFYING]
    ).filter(Q(heartbeat_at__lt=now - stall) | Q(heartbeat_at__isnull=True, created_at__lt=now - stall))
    ids = []
    for run in stalled:
        RotationRun.objects.filter(pk=run.pk).update(heartbeat_at=now)
        dispatch("execute_run", run.pk)
        ids.append(run.pk)
    return ids


# -- synchronous driving (tests, the CLI's --inline, and benchmarks) ------------------------


@contextlib.contextmanager
def inline_dispatch():
    """Within this block nothing is sent to Celery (use :func:`drive` to do the work here)."""
    global _dispatcher
    previous = _dispatcher
    _dispatcher = lambda name, args, options: None  # noqa: E731
    try:
        yield
    finally:
        _dispatcher = previous


def drive(run_id: int, *, now: datetime | None = None, max_phases: int = 1000) -> RotationRun:
    """Run every phase in this process until the run is done or waiting (approval, grace period).

    Dispatches that would go to Celery run inline instead, in order.
    """
    global _dispatcher
    queue: list[tuple[str, tuple]] = []
    previous = _dispatcher
    _dispatcher = lambda name, args, options: queue.append((name, args))  # noqa: E731
    try:
        queue.append(("execute_run", (run_id,)))
        phases = 0
        while queue and phases < max_phases:
            name, args = queue.pop(0)
            if name == "execute_run":
                execute_run(*args, now=now)
            else:
                rewrap_partition(*args)
            phases += 1
    finally:
        _dispatcher = previous
    return RotationRun.objects.get(pk=run_id)


# -- managed secrets ---------------------------------------------------------------------
#
# A secret run uses the same run, step, approval and audit machinery as a KEK run; the
# work of each phase is done by the executor of the secret's type (rotation/executors/).

#: Default policy per secret type: (period, grace period). Grace is how long the old
#: credential keeps working after the switch (cookie keys: the session lifetime;
#: OAuth: the overlap window before the old secret is revoked at the IdP).
SECRET_POLICY_DEFAULTS: dict[str, tuple[timedelta, timedelta]] = {
    ManagedSecret.Type.COOKIE_SIGNING: (timedelta(days=90), timedelta(seconds=1209600)),
    ManagedSecret.Type.DATABASE_CREDENTIAL: (timedelta(days=30), timedelta(days=1)),
    ManagedSecret.Type.TLS_CERTIFICATE: (timedelta(days=60), timedelta(days=1)),
    ManagedSecret.Type.OAUTH_CLIENT_SECRET: (timedelta(days=180), timedelta(days=7)),
    ManagedSecret.Type.GENERIC: (timedelta(days=90), timedelta(days=1)),
}


def _secret_executor(run_or_secret):
    from rotation.executors import executor_for

    secret = run_or_secret.secret if isinstance(run_or_secret, RotationRun) else run_or_secret
    return executor_for(secret.secret_type)


def _secret_event(secret: ManagedSecret, event: str, *, actor: Actor, outcome: str = Outcome.SUCCESS, **details) -> None:
    audit.record(Action.SECRET, actor=actor, target=secret, outcome=outcome, details={"event": event, **details})


def _notify_secret(secret: ManagedSecret, subject: str, body: str, *, severity: str = "warning", **data) -> None:
    from keyvault import notify

    notify.notify(notify.Notice(
        subject=f"[Keyvault] {subject}", body=body, severity=severity, target=f"secret:{secret.name}",
        owner=secret.owner, data={"secret": secret.name, "type": secret.secret_type, **data},
    ))


def _secret_due_at(secret: ManagedSecret, policy: RotationPolicy) -> datetime:
    """Next rotation: a period after the last one, or ``warn_before`` ahead of expiry, whichever is sooner."""
    anchor = secret.last_rotated_at or secret.created_at or timezone.now()
    due = anchor + policy.period
    if secret.expires_at:
        due = min(due, secret.expires_at - secret.effective_warn_before)
    return due


def ensure_secret_policy(secret: ManagedSecret) -> RotationPolicy:
    """The secret's policy, created with its type's defaults if it has none."""
    policy = RotationPolicy.objects.filter(secret=secret).first()
    if policy is not None:
        return policy
    period, grace = SECRET_POLICY_DEFAULTS[secret.secret_type]
    if secret.secret_type == ManagedSecret.Type.COOKIE_SIGNING:
        grace = timedelta(seconds=setting("SESSION_COOKIE_AGE", 1209600))
    policy = RotationPolicy(secret=secret, period=period, grace_period=grace,
                            auto=secret.secret_type != ManagedSecret.Type.OAUTH_CLIENT_SECRET)
    policy.next_due_at = _secret_due_at(secret, policy)
    policy.save()
    return policy


def update_secret_policy(secret: ManagedSecret, *, actor: Actor, **changes) -> RotationPolicy:
    """Change a managed secret's rotation policy (same fields as a KEK's)."""
    unknown = set(changes) - set(POLICY_FIELDS)
    if unknown:
        raise ValueError(f"unknown policy fields: {sorted(unknown)}")
    with transaction.atomic():
        policy = RotationPolicy.objects.select_for_update().get(pk=ensure_secret_policy(secret).pk)
        for name, value in changes.items():
            setattr(policy, name, value)
        policy.full_clean(exclude=["kek", "secret"])
        policy.next_due_at = _secret_due_at(secret, policy)
        policy.save()
        audit.record(Action.POLICY_CHANGED, actor=actor, target=secret,
                     details={k: str(v) if v is not None else None for k, v in changes.items()})
    return policy


def register_secret(
    *, name: str, secret_type: str, source: str, path: str, actor: Actor, owner: str = "", description: str = "",
    config: dict | None = None, warn_before: timedelta | None = None, inspect: bool = True,
) -> ManagedSecret:
    """Put a secret under management: validate its config, read what can be read, give it a policy.

    :raises django.core.exceptions.ValidationError: bad name or config (secret-looking keys are refused).
    :raises ExecutorError: the executor needs more configuration.
    """
    from rotation.executors import executor_for

    secret = ManagedSecret(name=name, secret_type=secret_type, source=source, path=path, owner=owner,
                           description=description, config=config or {}, warn_before=warn_before)
    secret.full_clean()
    executor_for(secret_type).validate_config(secret.config)
    check_secret_references(secret, actor=actor)
    with transaction.atomic():
        secret.save()
        ensure_secret_policy(secret)
        _secret_event(secret, "registered", actor=actor, type=secret_type, source=source, path=path, owner=owner)
    if inspect:
        try:
            refresh_secret(secret, actor=actor)
        except (SecretSourceError, KeyvaultError) as exc:
            log.warning("registered %s but could not read it yet: %s", name, exc)
    return secret


def refresh_secret(secret: ManagedSecret, *, actor: Actor) -> ManagedSecret:
    """Read the current value from its source and record non-secret facts (TLS: subject, SANs, expiry)."""
    from rotation.executors.base import source_for

    value = source_for(secret).read(secret.path)
    facts = _secret_executor(secret).inspect(value.value)
    expires_at = facts.pop("expires_at", None)
    facts["version"] = value.version
    ManagedSecret.objects.filter(pk=secret.pk).update(metadata=facts, expires_at=expires_at or secret.expires_at)
    secret.refresh_from_db()
    policy = ensure_secret_policy(secret)
    RotationPolicy.objects.filter(pk=policy.pk).update(next_due_at=_secret_due_at(secret, policy))
    return secret


#: Fields of a managed secret a console user may change (name and type are fixed at registration).
SECRET_FIELDS = ("source", "path", "config", "owner", "description", "warn_before")
#: Fields that decide where the value is read from and where executors send it: changing one re-points the secret.
POINTER_FIELDS = ("source", "path", "config")


def check_secret_references(secret: ManagedSecret, *, actor: Actor | None = None) -> None:
    """Refuse a source/path, or a ``{"source", "path"}`` reference in the config, that leads to Keyvault's own secrets.

    With ``actor``, a refusal is also audited (``secret`` / ``own_secret_refused``, outcome denied):
    pointing a secret at Keyvault's own is what an attacker with a console account would try.

    :raises SecretConfigError: one line naming the variable it would reach, never a value.
    """
    from keyvault.secrets import OwnSecretRefused
    from rotation.executors.base import SecretConfigError, source_for, source_named

    what = "source"
    try:
        references = [(source_for(secret), secret.path, "path")]
        for key, ref in (secret.config or {}).items():
            if isinstance(ref, dict) and "source" in ref and "path" in ref:
                references.append((source_named(str(ref["source"])), str(ref["path"]), key))
        for source, path, what in references:
            source.check(path)
    except SecretSourceError as exc:
        error = SecretConfigError(f"{what}: {exc}" if what not in ("source", "path") else str(exc))
        if actor is not None and isinstance(exc, OwnSecretRefused):
            _secret_event(secret, "own_secret_refused", actor=actor, outcome=Outcome.DENIED,
                          source=secret.source, path=secret.path, field=what, error=str(error)[:500])
        raise error from None


def _audited_value(key: str, value):
    """A changed field's value as the audit trail keeps it: secret-looking configuration values are HMACed."""
    if isinstance(value, timedelta):
        return str(value)
    if key != "config" or not isinstance(value, dict):
        return value
    return _audited_config(value)


def _audited_config(value, key: str = ""):
    lowered = key.lower()
    if any(lowered == word or lowered.endswith("_" + word) for word in ManagedSecret.FORBIDDEN_CONFIG_KEYS):
        return audit.hmac_value(str(value))
    if isinstance(value, dict):
        return {str(k): _audited_config(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_audited_config(item, key) for item in value]
    if isinstance(value, str) and "password" in value.lower():
        return audit.hmac_value(value)  # e.g. a DSN with a password someone pasted in
    return value


def repointed_event(secret: ManagedSecret):
    """The latest ``repointed`` audit event of ``secret`` since its last run started, or None.

    The audit chain is the record of the re-pointing: its newest event decides whether the
    next run needs a second person (see :func:`update_secret`).
    """
    from keyvault.models import AuditEvent

    last_started = (RotationRun.objects.filter(secret=secret, started_at__isnull=False)
                    .order_by("-started_at").values_list("started_at", flat=True).first())
    events = AuditEvent.objects.filter(action=Action.SECRET, target_type=ManagedSecret._meta.model_name,
                                       target_id=secret.name, details__event="repointed")
    if last_started is not None:
        events = events.filter(timestamp__gt=last_started)
    return events.order_by("-sequence").first()


def approvals_required(run: RotationRun) -> int:
    """Approvals ``run`` needs: its policy's, and at least one for a secret re-pointed since its last run."""
    required = run.policy.approvals_required if run.policy_id else 0
    if run.secret_id and run.started_at is None and repointed_event(run.secret) is not None:
        required = max(required, 1)
    return required


def update_secret(secret: ManagedSecret, *, actor: Actor, **changes) -> ManagedSecret:
    """Change a managed secret (:data:`SECRET_FIELDS`), audited in the chain with before and after values.

    Re-pointing — a new ``source``, ``path`` or ``config`` (which names endpoints and
    references) — is the change that could turn a rotation into a way to send a credential
    elsewhere, so it gets the same control as rotating, by two people:

    * it is refused while the secret has an active or resumable (failed) run, which would
      carry on with the new pointer without a new approval;
    * the new pointer is checked as at registration (executor configuration, the outbound
      allowlist, never one of Keyvault's own secrets);
    * it is audited as ``repointed`` with before/after, and the secret's next run then
      needs at least one approval (its policy's count if higher) from someone who is
      neither its initiator nor the person who re-pointed it (:func:`decide`).

    A change request approved before it takes effect would need its own model and pages;
    gating the next run gives the same two-person guarantee for what matters — nothing
    is read or sent through the new pointer until a second person agrees — and the
    re-pointing itself is visible in the chain and the SIEM feed the moment it happens.

    :raises ValueError: unknown field. :raises ValidationError: bad values.
    :raises SecretConfigError: the executor refuses the configuration or the path is Keyvault's own.
    :raises RotationError: a run is active or failed.
    """
    check_secret_change(secret, actor=actor, **changes)  # audits a refused pointer, outside the rollback below
    with transaction.atomic():
        locked = ManagedSecret.objects.select_for_update().get(pk=secret.pk)
        changed = {name: value for name, value in changes.items() if getattr(locked, name) != value}
        if not changed:
            return locked
        before = {name: getattr(locked, name) for name in changed}
        repointed = _apply_secret_change(locked, changed)
        locked.save()
        _secret_event(locked, "repointed" if repointed else "changed", actor=actor,
                      changes={name: {"before": _audited_value(name, before[name]),
                                      "after": _audited_value(name, value)} for name, value in changed.items()},
                      next_run_needs_approval=repointed)
    secret.refresh_from_db()
    return locked


def check_secret_change(secret: ManagedSecret, *, actor: Actor | None = None, **changes) -> None:
    """Everything :func:`update_secret` would refuse, without saving (for forms). Same errors.

    With ``actor``, a pointer at Keyvault's own secrets is audited as refused (:func:`check_secret_references`).
    """
    copy = ManagedSecret.objects.get(pk=secret.pk)
    _apply_secret_change(copy, {name: value for name, value in changes.items() if getattr(copy, name) != value},
                         actor=actor)


def _apply_secret_change(secret: ManagedSecret, changed: dict, *, actor: Actor | None = None) -> bool:
    """Set the changed fields on ``secret`` and check them; returns whether it is re-pointed."""
    from rotation.executors import executor_for

    unknown = set(changed) - set(SECRET_FIELDS)
    if unknown:
        raise ValueError(f"managed secret fields that cannot be changed: {sorted(unknown)}")
    for name, value in changed.items():
        setattr(secret, name, value)
    secret.full_clean()
    repointed = bool(set(changed) & set(POINTER_FIELDS))
    if repointed:
        busy = (RotationRun.objects.filter(secret=secret, state__in=(*Run.ACTIVE_STATES, S.FAILED))
                .order_by("-pk").first())
        if busy is not None:
            raise RotationError(f"secret {secret.name} has run #{busy.pk} ({busy.get_state_display().lower()}); "
                                "complete, cancel or roll it back before changing its source, path or configuration")
        executor_for(secret.secret_type).validate_config(secret.config)
        check_secret_references(secret, actor=actor)
    return repointed


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
    needed = {"kek": ["keyvault.rotate_keyencryptionkey", "rotation.add_rotationrun"],
              "secret": ["keyvault.rotate_managedsecret"]}[target]
    if kind == Run.Kind.EMERGENCY:
        needed.append("rotation.emergency_rotationrun")
    elif kind == Run.Kind.MIGRATE:
        needed.append("keyvault.change_state_keyencryptionkey")
    missing = [permission for permission in needed if not user.has_perm(permission)]
    if missing:
        raise RunNotPermitted(f"{user.get_username()} may not start {Run.Kind(kind).label.lower()} runs "
                              f"of a {'KEK' if target == 'kek' else 'managed secret'} (needs {', '.join(missing)})")


def _start_secret_run(*, secret, actor, kind, user, reason, incident_ref, destination) -> RotationRun:
    require_run_permission(user, target="secret", kind=kind)
    if kind == Run.Kind.MIGRATE or destination is not None:
        raise RotationError("managed secrets are rotated, not migrated between KEKs")
    if kind == Run.Kind.EMERGENCY and not incident_ref.strip():
        raise RotationError("an emergency rotation needs an incident or ticket reference")
    runbook = runbooks.for_run(f"secret-{secret.secret_type}", kind)
    if runbook is None:
        raise RotationError(f"no runbook for {kind.label.lower()} rotation of {secret.get_secret_type_display()}")
    try:
        with transaction.atomic():
            # update_secret holds this lock while it re-points: a run starts before it, or sees its event.
            ManagedSecret.objects.select_for_update().filter(pk=secret.pk).first()
            policy = ensure_secret_policy(secret)
            repointed = repointed_event(secret) is not None
            needs_approval = policy.approvals_required > 0 or repointed
            run = RotationRun.objects.create(
                secret=secret, policy=policy, kind=kind, state=S.PENDING_APPROVAL if needs_approval else S.QUEUED,
                initiated_by=user, initiator=actor.name, reason=reason, incident_ref=incident_ref.strip(),
            )
            _create_steps(run, runbook)
            if not needs_approval:
                tick(run, "precheck.approvals", actor=Actor.system("engine"), evidence="policy requires no approvals")
            audit.record(Action.ROTATION_STARTED, actor=actor, target=secret,
                         details={"run_id": run.pk, "kind": kind.value, "reason": reason, "incident_ref": incident_ref,
                                  "approvals_required": approvals_required(run), "runbook": runbook.slug,
                                  "repointed_since_last_run": repointed})
            if not needs_approval:
                enqueue_run(run)
    except IntegrityError:
        existing = RotationRun.objects.filter(secret=secret, state__in=Run.BLOCKING_STATES).first()
        if existing is None:
            raise
        raise RunAlreadyActive(existing) from None
    return run


def _execute_secret_run(run_id: int, now: datetime) -> str:
    """Advance a secret run through as many phases as it can now (idempotent, resumable)."""
    from rotation.executors.base import Context, WaitingForPerson

    run = RotationRun.objects.select_related("secret", "policy").get(pk=run_id)
    if run.state not in (S.QUEUED, S.ROTATING, S.VERIFYING, S.RETIRING):
        return run.state
    executor = _secret_executor(run)
    ctx = Context(run=run, secret=run.secret, now=now, state=dict(run.executor_state or {}))
    try:
        if run.state == S.QUEUED:
            chain = audit.verify_chain()  # before the lock: see _phase_start
            with transaction.atomic():
                run = _locked_run(run_id)
                if run.state != S.QUEUED:
                    return run.state
                _transition(run, S.ROTATING, actor=ENGINE, started_at=now, heartbeat_at=now)
                ManagedSecret.objects.filter(pk=run.secret_id).update(status=ManagedSecret.Status.ROTATING)
                tick(run, "precheck.audit", actor=ENGINE, evidence=str(chain),
                     status=RunStep.Status.DONE if chain.ok else RunStep.Status.FAILED)
            ctx.run = run
            if not ctx.state.get("prechecked"):
                executor.precheck(ctx)
                ctx.state["prechecked"] = True
                ctx.save()
        if run.state == S.ROTATING:
            executor.rotate(ctx)
            ctx.save()
            with transaction.atomic():
                run = _locked_run(run_id)
                _transition(run, S.VERIFYING, actor=ENGINE, heartbeat_at=now, paused_reason="")
            ctx.run = run
        if run.state == S.VERIFYING:
            executor.verify(ctx)
            ctx.state["verified"] = True
            ctx.save()
            run = _finish_secret_switch(run_id, ctx, now)
            ctx.run = run
        if run.state == S.RETIRING:
            if run.retire_after and run.retire_after > now:
                return run.state
            executor.retire(ctx)
            ctx.save()
            with transaction.atomic():
                run = _locked_run(run_id)
                _transition(run, S.COMPLETED, actor=ENGINE, paused_reason="")
                ManagedSecret.objects.filter(pk=run.secret_id).update(status=ManagedSecret.Status.ACTIVE)
        return run.state
    except WaitingForPerson as waiting:
        ctx.save()
        reason = f"waiting for a person: {waiting}"
        RotationRun.objects.filter(pk=run_id).update(paused_reason=reason[:255], heartbeat_at=now)
        if ctx.state.get("announced_wait") != waiting.key:
            ctx.state["announced_wait"] = waiting.key
            ctx.save()
            _notify_secret(run.secret, f"Rotation of {run.secret.name} needs you", f"Run #{run.pk}: {waiting}",
                           severity="info", run_id=run.pk, step=waiting.key)
        return run.state
    except (ProviderUnavailable, SecretSourceUnavailable, OperationalError, InterfaceError):
        ctx.save()
        raise  # transient: the task retries with backoff
    except Exception as exc:  # the run fails visibly; the executor makes sure the old credential still works
        log.exception("rotation run #%s of secret %s failed", run_id, run.secret.name)
        ctx.save()
        note = executor.on_failure(ctx, exc)
        ctx.save()
        return _fail_secret_run(run_id, exc, note)


def _finish_secret_switch(run_id: int, ctx, now: datetime) -> RotationRun:
    """The new credential is live and verified: record it, schedule the next rotation and the retirement."""
    with transaction.atomic():
        run = _locked_run(run_id)
        if run.state != S.VERIFYING:
            return run
        secret = ManagedSecret.objects.select_for_update().get(pk=run.secret_id)
        facts = dict(ctx.state.get("facts") or {})
        expires_at = facts.pop("expires_at", None)
        secret.last_rotated_at = now
        secret.status = ManagedSecret.Status.ROTATING
        if facts:
            secret.metadata = facts
        if expires_at:
            secret.expires_at = datetime.fromisoformat(expires_at)
        secret.save(update_fields=["last_rotated_at", "status", "metadata", "expires_at", "updated_at"])
        if run.policy_id:
            RotationPolicy.objects.filter(pk=run.policy_id).update(next_due_at=_secret_due_at(secret, run.policy))
        _transition(run, S.RETIRING, actor=ENGINE, retire_after=now + ctx.grace, paused_reason="")
        _secret_event(secret, "rotated", actor=ENGINE, run_id=run.pk,
                      new_version=str(ctx.state.get("new_version") or ""), retire_after=(now + ctx.grace).isoformat())
    return run


def _fail_secret_run(run_id: int, exc: Exception, note: str) -> str:
    message = f"{type(exc).__name__}: {exc}"
    with transaction.atomic():
        run = _locked_run(run_id)
        if S.FAILED not in SECRET_TRANSITIONS[run.state]:
            return run.state
        _transition(run, S.FAILED, actor=ENGINE, note=f"{message} — {note}", last_error=f"{message} ({note})")
        ManagedSecret.objects.filter(pk=run.secret_id).update(status=ManagedSecret.Status.FAILED)
        _secret_event(run.secret, "rotation_failed", actor=ENGINE, outcome=Outcome.FAILURE, run_id=run.pk,
                      error=message[:500], recovery=note[:500])
    _notify_secret(run.secret, f"Rotation of {run.secret.name} failed",
                   f"Run #{run.pk} failed: {message}\n{note}\nThe previous credential is still valid.",
                   severity="error", run_id=run.pk)
    return S.FAILED


def _rollback_secret(run: RotationRun, reason: str) -> str:
    from rotation.executors.base import Context

    ctx = Context(run=run, secret=run.secret, now=timezone.now(), state=dict(run.executor_state or {}))
    note = _secret_executor(run).rollback(ctx)
    ctx.save()
    ManagedSecret.objects.filter(pk=run.secret_id).update(status=ManagedSecret.Status.ACTIVE)
    return f"{reason} ({note})".strip() if reason else note


def provide_secret_value(run: RotationRun, value: str, *, actor: Actor) -> RotationRun:
    """A person hands over a new secret value the run cannot make itself (e.g. an OAuth client secret).

    The value goes straight to the secret's source; only its new version id is kept.
    """
    from rotation.executors.base import Context

    if not value or not value.strip():
        raise RotationError("the new secret value is empty")
    with transaction.atomic():
        run = _locked_run(run.pk)
        if not run.secret_id or run.state != S.ROTATING:
            raise InvalidRunTransition(f"run #{run.pk} is not waiting for a new secret value")
        ctx = Context(run=run, secret=run.secret, now=timezone.now(), state=dict(run.executor_state or {}))
        _secret_executor(run).accept_value(ctx, value.strip(), actor=actor)
        ctx.save()
        dispatch("execute_run", run.pk)
    return run


# -- expiry and overdue reminders --------------------------------------------------------


def secrets_needing_attention(now: datetime | None = None) -> list[tuple[ManagedSecret, list[str]]]:
    """Secrets that are expired, expiring within their warning window, overdue for rotation, or failed."""
    now = now or timezone.now()
    found = []
    for secret in ManagedSecret.objects.select_related("rotation_policy").order_by("name"):
        reasons = []
        if secret.expires_at and secret.expires_at <= now:
            reasons.append(f"expired {secret.expires_at:%Y-%m-%d %H:%M} UTC")
        elif secret.expires_at and secret.expires_at - secret.effective_warn_before <= now:
            reasons.append(f"expires {secret.expires_at:%Y-%m-%d %H:%M} UTC (in {(secret.expires_at - now).days} days)")
        policy = getattr(secret, "rotation_policy", None)
        if policy and policy.next_due_at and policy.next_due_at <= now:
            reasons.append(f"rotation overdue since {policy.next_due_at:%Y-%m-%d %H:%M} UTC")
        if secret.status == ManagedSecret.Status.FAILED:
            reasons.append("last rotation failed")
        if reasons:
            found.append((secret, reasons))
    return found


def _attention_status(secret: ManagedSecret, now: datetime) -> str:
    if secret.status in (ManagedSecret.Status.FAILED, ManagedSecret.Status.ROTATING):
        return secret.status
    if secret.expires_at and secret.expires_at <= now:
        return ManagedSecret.Status.EXPIRED
    if secret.expires_at and secret.expires_at - secret.effective_warn_before <= now:
        return ManagedSecret.Status.EXPIRING
    policy = getattr(secret, "rotation_policy", None)
    if policy and policy.next_due_at and policy.next_due_at <= now:
        return ManagedSecret.Status.OVERDUE
    return ManagedSecret.Status.ACTIVE


def flag_expiring_secrets(*, now: datetime | None = None) -> list[ManagedSecret]:
    """The daily check: set each secret's status, and audit and notify those needing attention.

    Each secret is reported at most once per day, so running it twice is harmless.
    """
    now = now or timezone.now()
    flagged = []
    attention = dict((secret.pk, reasons) for secret, reasons in secrets_needing_attention(now))
    for secret in ManagedSecret.objects.select_related("rotation_policy"):
        status = _attention_status(secret, now)
        if status != secret.status:
            ManagedSecret.objects.filter(pk=secret.pk).update(status=status)
        reasons = attention.get(secret.pk)
        if not reasons or (secret.last_flagged_at and secret.last_flagged_at > now - timedelta(hours=20)):
            continue
        with transaction.atomic():
            ManagedSecret.objects.filter(pk=secret.pk).update(last_flagged_at=now)
            _secret_event(secret, "needs_attention", actor=Actor.system("beat"), outcome=Outcome.SUCCESS,
                          status=status, reasons=reasons)
        _notify_secret(secret, f"{secret.name}: {'; '.join(reasons)}",
                       f"Managed secret {secret.name} ({secret.get_secret_type_display()}, owner "
                       f"{secret.owner or 'unassigned'}) needs attention: {'; '.join(reasons)}.",
                       severity="error" if status in ("expired", "failed") else "warning", reasons=reasons)
        flagged.append(secret)
    return flagged


def start_due_secret_rotations(*, now: datetime) -> list[RotationRun]:
    """Planned runs for automatic secret policies that are due and inside their window."""
    started = []
    candidates = (RotationPolicy.objects.select_related("secret")
                  .filter(auto=True, secret__isnull=False, next_due_at__lte=now)
                  .exclude(secret__rotation_runs__state__in=Run.BLOCKING_STATES))
    for policy in candidates:
        if not policy.in_window(now):
            continue
        try:
            started.append(start_run(secret=policy.secret, actor=Actor.system("beat"), kind=Run.Kind.PLANNED,
                                     reason=_due_reason(policy, now)))
        except RunAlreadyActive:
            continue
        except KeyvaultError as exc:
            log.warning("could not start planned rotation of secret %s: %s", policy.secret.name, exc)
    return started
