"""The managed-secret driver: the same runs, steps, approvals and audit as a KEK, the work done by executors.

Each secret type has an executor (``rotation/executors/``) with its phases, its
configuration and its policy defaults; this driver runs them through the states
``queued → rotating → verifying → retiring → completed`` (no rewrap), pausing while a
person has a step to do and leaving the old credential valid on any failure.
"""

from __future__ import annotations

import logging
from datetime import datetime

from django.db import InterfaceError, OperationalError, transaction
from django.utils import timezone

from keyvault import audit
from keyvault.audit import Action, Actor, events
from keyvault.kms import ProviderUnavailable
from keyvault.models import ManagedSecret
from keyvault.ops import notify
from keyvault.secrets.base import SecretSourceUnavailable
from rotation.engine.drivers.base import Driver
from rotation.exceptions import ApprovalRefused, ConfigFieldError, RotationError
from rotation.executors import executor_for
from keyvault.secrets.registry import source_names
from rotation.executors.base import Context, Executor, WaitingForPerson
from rotation.models import RotationPolicy, RotationRun, RunStep

log = logging.getLogger(__name__)
S = RotationRun.State


# -- what the secret services share with the driver ---------------------------------------


def notify_secret(secret: ManagedSecret, subject: str, body: str, *, severity: str = "warning", **data) -> None:
    notify.notify(notify.Notice(
        subject=f"[Keyvault] {subject}", body=body, severity=severity, target=f"secret:{secret.name}",
        owner=secret.owner, data={"secret": secret.name, "type": secret.secret_type, **data},
    ))


def secret_due_at(secret: ManagedSecret, policy: RotationPolicy) -> datetime:
    """Next rotation: a period after the last one, or ``warn_before`` ahead of expiry, whichever is sooner."""
    anchor = secret.last_rotated_at or secret.created_at or timezone.now()
    due = anchor + policy.period
    if secret.expires_at:
        due = min(due, secret.expires_at - secret.effective_warn_before)
    return due


def repointed_event(secret: ManagedSecret):
    """The latest ``repointed`` audit event of ``secret`` since its last run started, or None.

    The audit chain is the record of the re-pointing: its newest event decides whether the
    next run needs a second person (see ``rotation.services.update_secret``).
    """
    last_started = (RotationRun.objects.filter(secret=secret, started_at__isnull=False)
                    .order_by("-started_at").values_list("started_at", flat=True).first())
    filters = dict(action=Action.SECRET, target_type=ManagedSecret._meta.model_name, target_id=secret.name,
                   details__event="repointed")
    if last_started is not None:
        filters["timestamp__gt"] = last_started
    return audit.newest_event(**filters)  # with group commit, a just-committed one may be in the outbox still


def executor_of(secret: ManagedSecret) -> Executor:
    return executor_for(secret.secret_type)


def check_secret_config(secret: ManagedSecret, *, allowlist: bool = True) -> dict:
    """The secret's source is configured and its type's schema and executor accept its config; returns the options.

    :param allowlist: also check its endpoints against ``HMD_OUTBOUND_ALLOWLIST`` (the executor's own check);
        a run checks them before each connection instead, where a refusal is audited as a failed step.
    :raises ConfigFieldError: names the field (``source``, or the config key).
    :raises SecretConfigError: the executor refuses it (``HMD_OUTBOUND_ALLOWLIST``).
    """
    configured = source_names()
    if secret.source not in configured:
        raise ConfigFieldError("source", f"secret source {secret.source!r} is not configured "
                                         f"(configured: {', '.join(configured) or 'none'}; each is configured by its "
                                         "HMD_* variables)", in_config=False)
    executor = executor_for(secret.secret_type)
    return executor.validate_config(secret.config) if allowlist else executor.options(secret.config)


class ManagedSecretRotation(Driver):
    """A managed secret of any type; its executor does the work of each phase."""

    target_kind = "secret"
    rewraps = False
    transient = (ProviderUnavailable, SecretSourceUnavailable, OperationalError, InterfaceError)

    # -- starting ------------------------------------------------------------------------
    def check_start(self, secret: ManagedSecret, *, kind: str, destination) -> None:
        if kind == RotationRun.Kind.MIGRATE or destination is not None:
            raise RotationError("managed secrets are rotated, not migrated between KEKs")
        # A row saved under an older schema is refused here, by field (the allowlist is checked at each connection).
        try:
            check_secret_config(secret, allowlist=False)
        except ConfigFieldError as exc:
            raise exc.of_secret(secret.name) from None

    def runbook_name(self, secret: ManagedSecret) -> str:
        return f"secret-{secret.secret_type}"

    def label(self, secret: ManagedSecret) -> str:
        return secret.get_secret_type_display()

    def policy_defaults(self, secret: ManagedSecret) -> dict:
        """The executor's defaults for its type; the first due date from the secret's age and expiry."""
        defaults = executor_of(secret).policy_defaults()
        defaults["next_due_at"] = secret_due_at(secret, RotationPolicy(period=defaults["period"]))
        return defaults

    def lock(self, secret: ManagedSecret) -> None:
        """``update_secret`` holds this lock while it re-points: a run starts before it, or sees its event."""
        ManagedSecret.objects.select_for_update().filter(pk=secret.pk).first()

    def needs_approval(self, secret: ManagedSecret, policy: RotationPolicy) -> bool:
        return policy.approvals_required > 0 or repointed_event(secret) is not None

    def approvals_required(self, run: RotationRun) -> int:
        """At least one for a secret re-pointed since its last run."""
        required = super().approvals_required(run)
        if run.started_at is None and repointed_event(run.secret) is not None:
            required = max(required, 1)
        return required

    def check_approver(self, run: RotationRun, user) -> None:
        """Whoever re-pointed the secret cannot approve the run that would use the new pointer."""
        repointed = repointed_event(run.secret) if run.started_at is None else None
        if repointed is not None and repointed.actor == Actor.user(user).name:
            raise ApprovalRefused(f"{user.get_username()} re-pointed secret {run.secret.name}; "
                                  "someone else must approve its next run")

    def started_details(self, run: RotationRun, *, runbook, destination) -> dict:
        return {"approvals_required": self.approvals_required(run), "runbook": runbook.slug,
                "repointed_since_last_run": repointed_event(run.secret) is not None}

    def reschedule(self, secret: ManagedSecret, policy: RotationPolicy, changes: dict) -> None:
        policy.next_due_at = secret_due_at(secret, policy)

    # -- people ----------------------------------------------------------------------------
    def before_manual_tick(self, run: RotationRun, key: str, *, now: datetime) -> RotationRun:
        run = self.hooks.locked(run.pk)
        executor_of(run.secret).before_manual_tick(run, key, now=now)
        return run

    def after_manual_tick(self, run: RotationRun) -> None:
        if run.state in (S.ROTATING, S.VERIFYING, S.RETIRING):
            self.hooks.dispatch("execute_run", run.pk)  # the run may have been waiting for this step

    def accept_value(self, run: RotationRun, value: str, *, actor: Actor) -> None:
        if run.state != S.ROTATING:
            super().accept_value(run, value, actor=actor)
        ctx = self.context(run, timezone.now())
        executor_of(run.secret).accept_value(ctx, value, actor=actor)
        ctx.save()
        self.hooks.dispatch("execute_run", run.pk)

    # -- working -------------------------------------------------------------------------
    def context(self, run: RotationRun, now: datetime) -> Context:
        return Context(run=run, secret=run.secret, now=now, state=dict(run.executor_state or {}),
                       tick_step=self.hooks.tick, actor=self.hooks.actor)

    def move(self, run: RotationRun, new_state: str, **fields) -> RotationRun:
        return self.hooks.transition(run, new_state, actor=self.hooks.actor, **fields)

    def advance(self, run: RotationRun, now: datetime) -> str:
        """Advance through as many phases as it can now (idempotent, resumable)."""
        run_id = run.pk
        if run.state not in (S.QUEUED, S.ROTATING, S.VERIFYING, S.RETIRING):
            return run.state
        executor = executor_of(run.secret)
        ctx = self.context(run, now)
        try:
            ctx.options  # noqa: B018 - a configuration that no longer validates fails the run here, by field
            if run.state == S.QUEUED:
                run, started = self.start(run_id, now)
                if not started:
                    return run.state
                ctx.run = run
                if not ctx.state.get("prechecked"):
                    executor.precheck(ctx)
                    ctx.state["prechecked"] = True
                    ctx.save()
            if run.state == S.ROTATING:
                executor.rotate(ctx)
                ctx.save()
                with transaction.atomic():
                    run = self.move(self.hooks.locked(run_id), S.VERIFYING, heartbeat_at=now, paused_reason="")
                ctx.run = run
            if run.state == S.VERIFYING:
                executor.verify(ctx)
                ctx.state["verified"] = True
                ctx.save()
                run = self.switch(run_id, ctx, now)
                ctx.run = run
            if run.state == S.RETIRING:
                if run.retire_after and run.retire_after > now:
                    return run.state
                executor.retire(ctx)
                ctx.save()
                with transaction.atomic():
                    run = self.move(self.hooks.locked(run_id), S.COMPLETED, paused_reason="")
                    ManagedSecret.objects.filter(pk=run.secret_id).update(status=ManagedSecret.Status.ACTIVE)
            return run.state
        except WaitingForPerson as waiting:
            self.wait(run, ctx, waiting, now)
            return run.state
        except self.transient:
            ctx.save()
            raise  # the task retries with backoff
        except Exception as exc:  # the run fails visibly; the executor makes sure the old credential still works
            log.exception("rotation run #%s of secret %s failed", run_id, run.secret.name)
            ctx.save()
            note = executor.on_failure(ctx, exc)
            ctx.save()
            return self.fail(run_id, exc, note)

    def start(self, run_id: int, now: datetime) -> tuple[RotationRun, bool]:
        """Queued → rotating, once; returns the run and whether this call moved it."""
        chain = audit.verify_chain()  # before the lock: recording an event locks the chain head
        with transaction.atomic():
            run = self.hooks.locked(run_id)
            if run.state != S.QUEUED:
                return run, False
            self.move(run, S.ROTATING, started_at=now, heartbeat_at=now)
            ManagedSecret.objects.filter(pk=run.secret_id).update(status=ManagedSecret.Status.ROTATING)
            self.hooks.tick(run, "precheck.audit", actor=self.hooks.actor, evidence=str(chain),
                            status=RunStep.Status.DONE if chain.ok else RunStep.Status.FAILED)
        return run, True

    def wait(self, run: RotationRun, ctx: Context, waiting: WaitingForPerson, now: datetime) -> None:
        """A person has a step to do: say so on the run, and tell the owner once per step."""
        ctx.save()
        reason = f"waiting for a person: {waiting}"
        RotationRun.objects.filter(pk=run.pk).update(paused_reason=reason[:255], heartbeat_at=now)
        if ctx.state.get("announced_wait") != waiting.key:
            ctx.state["announced_wait"] = waiting.key
            ctx.save()
            notify_secret(run.secret, f"Rotation of {run.secret.name} needs you", f"Run #{run.pk}: {waiting}",
                          severity="info", run_id=run.pk, step=waiting.key)

    def switch(self, run_id: int, ctx: Context, now: datetime) -> RotationRun:
        """The new credential is live and verified: record it, schedule the next rotation and the retirement."""
        with transaction.atomic():
            run = self.hooks.locked(run_id)
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
                RotationPolicy.objects.filter(pk=run.policy_id).update(next_due_at=secret_due_at(secret, run.policy))
            retire_after = now + executor_of(secret).retire_delay(ctx)
            self.move(run, S.RETIRING, retire_after=retire_after, paused_reason="")
            events.secret_rotated(secret, actor=self.hooks.actor, run_id=run.pk,
                                  new_version=str(ctx.state.get("new_version") or ""), retire_after=retire_after)
        return run

    def fail(self, run_id: int, exc: Exception, note: str = "the old credential was not changed") -> str:
        message = f"{type(exc).__name__}: {exc}"
        with transaction.atomic():
            run = self.hooks.locked(run_id)
            if not self.hooks.allows(run.state, S.FAILED):
                return run.state
            self.move(run, S.FAILED, note=f"{message} — {note}", last_error=f"{message} ({note})")
            ManagedSecret.objects.filter(pk=run.secret_id).update(status=ManagedSecret.Status.FAILED)
            events.secret_rotation_failed(run.secret, actor=self.hooks.actor, run_id=run.pk, error=message,
                                          recovery=note)
        notify_secret(run.secret, f"Rotation of {run.secret.name} failed",
                      f"Run #{run.pk} failed: {message}\n{note}\nThe previous credential is still valid.",
                      severity="error", run_id=run.pk)
        return S.FAILED

    def rollback(self, run: RotationRun, reason: str) -> str:
        ctx = self.context(run, timezone.now())
        note = executor_of(run.secret).rollback(ctx)
        ctx.save()
        ManagedSecret.objects.filter(pk=run.secret_id).update(status=ManagedSecret.Status.ACTIVE)
        return f"{reason} ({note})".strip() if reason else note
