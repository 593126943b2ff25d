"""KEK drivers: rotation (a new primary version, then rewrap) and provider migration (rewrap onto another KEK).

Both rewrap data keys through the engine's partitions and batches (``rotation.engine.rewrap``);
they differ in what "left to rewrap" means, how one data key moves, and what retirement does.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.apps import apps
from django.db import InterfaceError, OperationalError, transaction

from keyvault import audit
from keyvault.keys import services as key_services
from keyvault.keys.fields import encrypted_fields, rewrap_field
from keyvault.kms import Capability, ProviderUnavailable, RewrapItem, RewrapOutcome
from keyvault.kms.bulk import DEFAULT_CONCURRENCY, migrate_many
from keyvault.models import DataKey, KeyEncryptionKey, KeyVersion
from rotation.engine.drivers.base import Driver
from rotation.exceptions import InvalidRunTransition, RotationError
from rotation.models import DEFAULT_PERIOD, RotationPolicy, RotationRun, RunStep

log = logging.getLogger(__name__)
S = RotationRun.State
Kind = RotationRun.Kind

#: Data keys opened at random after a run, to prove the target version really opens them.
VERIFY_SAMPLE_SIZE = 20
def rewrap_encrypted_fields() -> str:
    """Rewrap every encrypted model field value (all models); returns a summary for the evidence."""
    parts = []
    for model in apps.get_models():
        for field in encrypted_fields(model):
            count = rewrap_field(model, field.name)
            if count:
                parts.append(f"{model._meta.label_lower}.{field.name}: {count}")
    return ", ".join(parts)


class KekRotation(Driver):
    """A new primary version at the provider; every data key rewrapped to it; older versions disabled."""

    target_kind = "kek"
    rewraps = True
    transient = (ProviderUnavailable, OperationalError, InterfaceError)

    # -- starting ------------------------------------------------------------------------
    def check_start(self, kek: KeyEncryptionKey, *, kind: str, destination) -> None:
        if destination is not None:
            raise RotationError("only migration runs take a destination KEK")
        key_services.require_usable(kek)

    def runbook_name(self, kek: KeyEncryptionKey) -> str:
        return "kek"

    def label(self, kek: KeyEncryptionKey) -> str:
        return f"KEK {kek.name}"

    def policy_defaults(self, kek: KeyEncryptionKey) -> dict:
        """A year from the KEK's last rotation (or its creation); its usage limit as the usage trigger."""
        return {"period": DEFAULT_PERIOD, "usage_threshold": kek.max_encryptions_per_version,
                "next_due_at": (kek.last_rotated_at or kek.created_at) + DEFAULT_PERIOD}

    def run_fields(self, kek: KeyEncryptionKey, destination) -> dict:
        return {"kek": kek, "destination_kek": destination}

    def started_details(self, run: RotationRun, *, runbook, destination) -> dict:
        return {"approvals_required": run.policy.approvals_required,
                "destination": destination.name if destination else None}

    def reschedule(self, kek: KeyEncryptionKey, policy: RotationPolicy, changes: dict) -> None:
        """A new period counts from the KEK's last rotation."""
        if "period" in changes:
            policy.next_due_at = (kek.last_rotated_at or kek.created_at) + policy.period

    def policy_saved(self, kek: KeyEncryptionKey, policy: RotationPolicy, *, actor) -> None:
        """The KEK's usage limit follows the policy's usage threshold (the schedule is the policy's alone)."""
        key_services.update_kek_settings(kek, actor=actor, max_encryptions_per_version=policy.usage_threshold)

    # -- what is rewrapped, and how ----------------------------------------------------------
    def remaining(self, run: RotationRun):
        """Data keys still to rewrap: those of the KEK below the run's target version."""
        return DataKey.objects.filter(kek_id=run.kek_id, kek_version__lt=run.target_version)

    def destination_kek(self, run: RotationRun) -> KeyEncryptionKey:
        return run.kek

    def rewrap_many(self, run: RotationRun, source, destination, items: list[RewrapItem]) -> list[RewrapOutcome]:
        """Each item rewrapped to its own key's primary version, in one call the provider may batch (aligned).

        No ``key_id``: a ciphertext of another key found among this KEK's rows comes back
        under that other key, and the engine refuses it, instead of quietly adopting it.
        """
        return source.rewrap_many(items)

    def operation_costs(self, run: RotationRun, source, destination) -> dict[str, int]:
        """Provider calls one data key costs, by provider name (what the rate limit charges).

        A native rewrap is one call; elsewhere it is a decrypt and an encrypt (Cloud KMS
        has no re-encrypt), both counted against the same quota.
        """
        return {source.name: 1 if source.supports(Capability.NATIVE_REWRAP) else 2}

    # -- working -------------------------------------------------------------------------
    def advance(self, run: RotationRun, now: datetime) -> str:
        phase = {
            S.QUEUED: self.start,
            S.ROTATING: self.start,
            S.REWRAPPING: self.rewrap,
            S.VERIFYING: self.verify,
            S.RETIRING: self.retire,
        }.get(run.state)
        if phase is None:
            return run.state
        try:
            return phase(run.pk, now)
        except self.transient:
            raise  # the task retries with backoff, the run stays where it is
        except Exception as exc:  # anything else fails the run visibly, old versions still enabled
            log.exception("rotation run #%s failed", run.pk)
            return self.fail(run.pk, exc)

    def fail(self, run_id: int, exc: Exception) -> str:
        hooks = self.hooks
        with transaction.atomic():
            run = hooks.locked(run_id)
            if not hooks.allows(run.state, S.FAILED):
                return run.state
            message = f"{type(exc).__name__}: {exc}"
            self.move(run, S.FAILED, note=message, last_error=message)
            return run.state

    def move(self, run: RotationRun, new_state: str, **fields) -> RotationRun:
        return self.hooks.transition(run, new_state, actor=self.hooks.actor, **fields)

    def step(self, run: RotationRun, key: str, evidence: str, *, failed: bool = False) -> None:
        self.hooks.tick(run, key, actor=self.hooks.actor, evidence=evidence,
                        status=RunStep.Status.FAILED if failed else RunStep.Status.DONE)

    def providers(self, run: RotationRun) -> set:
        return {key_services.provider_for(run.kek)}

    def start(self, run_id: int, now: datetime) -> str:
        run = RotationRun.objects.select_related("kek", "destination_kek", "policy").get(pk=run_id)
        providers = self.providers(run)
        for provider in providers:
            status = provider.health_check()
            if not status.healthy:
                raise ProviderUnavailable(f"{provider.name}: {status.detail}")
        # Walk the chain before taking any lock: recording an event locks the chain head, and a
        # long walk inside that transaction would stall every audited operation meanwhile.
        chain = audit.verify_chain() if RotationRun.objects.filter(pk=run_id, state=S.QUEUED).exists() else None
        with transaction.atomic():
            run = self.hooks.locked(run_id)
            if run.state == S.QUEUED and chain is not None:
                self.move(run, S.ROTATING, started_at=now)
                self.step(run, "precheck.provider", "; ".join(f"{p.name}: healthy" for p in providers))
                self.step(run, "precheck.audit", str(chain), failed=not chain.ok)
        # A second transaction: the provider call below must not run while this one holds the
        # chain-head lock its audit events took (AWS may take seconds to list a rotation).
        with transaction.atomic():
            run = self.hooks.locked(run_id)
            if run.state != S.ROTATING:
                return run.state
            self.switch(run, now)
            total = self.remaining(run).count()
            self.move(run, S.REWRAPPING, total_deks=total, rewrapped=0, rewrap_started_at=now, heartbeat_at=now)
            self.hooks.fan_out(run, self)
        return S.REWRAPPING

    def switch(self, run: RotationRun, now: datetime) -> None:
        """Make the new primary version (once: a resumed run keeps the version it made)."""
        if run.target_version is not None:
            return
        kek = run.kek
        previous = kek.versions.get(is_primary=True).number
        if run.policy_id:  # the schedule restarts from this rotation
            RotationPolicy.objects.filter(pk=run.policy_id).update(next_due_at=now + run.policy.period)
        version = key_services.rotate_kek_version(kek, actor=self.hooks.actor, reason=f"rotation run #{run.pk}",
                                                  run_id=run.pk)
        run.previous_version, run.target_version = previous, version.number
        self.step(run, "rotate", f"v{version.number} is primary (was v{previous})")

    def rewrap(self, run_id: int, now: datetime) -> str:
        """Re-dispatch the rewrap (after a restart, or for stragglers another worker skipped)."""
        run = RotationRun.objects.get(pk=run_id)
        if self.remaining(run).exists():
            self.hooks.fan_out(run, self)
            return run.state
        return self.hooks.finish_rewrap(run_id, self)

    def rewrap_fields(self, run: RotationRun) -> None:
        fields = rewrap_encrypted_fields()
        self.step(run, "rewrap.fields", fields or "no encrypted fields use this KEK")

    def grace(self, run: RotationRun) -> timedelta:
        if run.kind == Kind.EMERGENCY:
            return timedelta(0)
        return run.policy.grace_period if run.policy else timedelta(days=7)

    def verify(self, run_id: int, now: datetime) -> str:
        run = RotationRun.objects.select_related("kek", "destination_kek", "policy").get(pk=run_id)
        self.rewrap_fields(run)
        remaining = self.remaining(run).count()
        if remaining:
            with transaction.atomic():
                self.move(self.hooks.locked(run_id), S.REWRAPPING, note=f"{remaining} data keys still to rewrap")
            self.hooks.fan_out(run, self)
            return S.REWRAPPING
        target_kek = self.destination_kek(run)
        sample = list(DataKey.objects.filter(kek=target_kek).order_by("?")
                      .values_list("wrapped_key", "encryption_context", "kek_version")[:VERIFY_SAMPLE_SIZE])
        provider = key_services.provider_for(target_kek)
        for wrapped, context, version in sample:
            opened = provider.decrypt(bytes(wrapped), encryption_context=context)
            if opened.key_version != version:
                raise RotationError("verification failed: a data key opened under another version than recorded")
        coverage = key_services.version_coverage(target_kek)
        grace = self.grace(run)
        with transaction.atomic():
            run = self.hooks.locked(run_id)
            if run.state != S.VERIFYING:
                return run.state
            self.step(run, "verify.sample", f"{len(sample)} random data keys decrypted after the run")
            self.step(run, "verify.coverage", f"coverage by version: {coverage}")
            self.move(run, S.RETIRING, retire_after=now + grace)
            if not grace:
                self.hooks.dispatch("execute_run", run.pk)
        return S.RETIRING

    def retire(self, run_id: int, now: datetime) -> str:
        with transaction.atomic():
            run = self.hooks.locked(run_id)
            if run.state != S.RETIRING or (run.retire_after and run.retire_after > now):
                return run.state
            self.step(run, "retire", self.retire_old(run))
            self.move(run, S.COMPLETED)
        return S.COMPLETED

    def retire_old(self, run: RotationRun) -> str:
        """Disable the versions below the target (the key services refuse one that still wraps data keys).

        Where the provider cannot disable a version (AWS KMS) the note says so, and how to revoke it there.
        """
        kek = run.kek
        retired, inventory_only = [], []
        for version in kek.versions.filter(number__lt=run.target_version, state=KeyVersion.State.ENABLED):
            changed = key_services.set_version_state(kek, version.number, KeyVersion.State.DISABLED,
                                                     actor=self.hooks.actor, reason=f"retired by rotation run #{run.pk}")
            retired.append(f"v{version.number}")
            if changed.enforced_by != "provider":
                inventory_only.append(f"v{version.number}")
        note = f"disabled {', '.join(retired) or 'nothing (no enabled older versions)'}"
        if inventory_only:
            gap = key_services.revocation_gap(kek) or f"provider {kek.provider} still accepts them"
            note += f" in Keyvault only ({', '.join(inventory_only)}). {gap}"
        return note

    def refuse_if_followed(self, run: RotationRun) -> None:
        """Only the newest run of a KEK can be rolled back. :raises InvalidRunTransition:"""
        newer = RotationRun.objects.filter(kek=run.kek, target_version__gt=run.target_version or 0).exclude(pk=run.pk)
        if run.target_version and newer.exists():
            raise InvalidRunTransition(f"run #{run.pk} was followed by a newer rotation of {run.kek.name}; roll that one back")

    def rollback(self, run: RotationRun, reason: str) -> str:
        """Make the previous version primary again where the provider allows it; both stay enabled."""
        self.refuse_if_followed(run)
        if not (run.previous_version and run.target_version):
            return reason
        provider = key_services.provider_for(run.kek)
        if not provider.supports(Capability.SET_PRIMARY):
            return f"{reason} (provider {provider.name} keeps v{run.target_version} as primary; both versions stay enabled)".strip()
        key_services.restore_primary_version(run.kek, run.previous_version, actor=self.hooks.actor,
                                             reason=f"rotation run #{run.pk} rolled back", run_id=run.pk)
        return f"{reason} (v{run.previous_version} is primary again)".strip()


class ProviderMigration(KekRotation):
    """Every data key of a KEK decrypted by its provider and encrypted under another KEK (another provider)."""

    def check_start(self, kek: KeyEncryptionKey, *, kind: str, destination) -> None:
        if destination is None or destination.pk == kek.pk:
            raise RotationError("a migration needs a destination KEK other than the source")
        key_services.require_usable(destination)
        key_services.require_usable(kek)

    def remaining(self, run: RotationRun):
        """Every data key still on the source KEK."""
        return DataKey.objects.filter(kek_id=run.kek_id)

    def destination_kek(self, run: RotationRun) -> KeyEncryptionKey:
        return run.destination_kek

    def rewrap_many(self, run: RotationRun, source, destination, items: list[RewrapItem]) -> list[RewrapOutcome]:
        return migrate_many(source, destination, items, destination_key_id=run.destination_kek.provider_key_id,
                            concurrency=DEFAULT_CONCURRENCY)

    def operation_costs(self, run: RotationRun, source, destination) -> dict[str, int]:
        """A decrypt at the source and an encrypt at the destination per data key."""
        if source.name == destination.name:
            return {source.name: 2}
        return {source.name: 1, destination.name: 1}

    def providers(self, run: RotationRun) -> set:
        return {key_services.provider_for(run.kek), key_services.provider_for(run.destination_kek)}

    def switch(self, run: RotationRun, now: datetime) -> None:
        """Nothing is made: the target is the destination KEK's primary version."""
        run.target_version = run.destination_kek.versions.get(is_primary=True).number

    def rewrap_fields(self, run: RotationRun) -> None:
        """Encrypted fields follow their own KEK's rotation, not a migration of data keys."""

    def grace(self, run: RotationRun) -> timedelta:
        return timedelta(0)

    def retire_old(self, run: RotationRun) -> str:
        return f"all data keys moved to KEK {run.destination_kek.name}; source KEK left enabled for rollback"

    def rollback(self, run: RotationRun, reason: str) -> str:
        """The source KEK was never changed; the run just stops."""
        self.refuse_if_followed(run)
        return reason
