"""One constructor per audit event: the only code outside the chain itself that calls ``audit.record``.

Each function names an event, takes its fields as keywords and builds the ``details``
the chain, the SIEM feed, the reports and the exports read. Those keys are a stored
format: a constructor may gain an optional field, but never rename or drop one.

A field whose default is :data:`OMITTED` is left out of the details when not given
(a ``None`` is a value, and is recorded). ``tests/keyvault/audit/test_events.py``
keeps every other module from calling ``audit.record`` directly.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

from keyvault import audit
from keyvault.audit import Action, Actor, Outcome

if TYPE_CHECKING:
    from keyvault.models.core import AuditEvent, DataKey, KeyEncryptionKey, ManagedSecret


class _Omitted(enum.Enum):
    OMITTED = "omitted"


#: The default of an optional field that is absent from the details unless given.
OMITTED = _Omitted.OMITTED
Omittable = Literal[_Omitted.OMITTED]

#: Every constructor, by the action it records (several events may share an action).
CONSTRUCTORS: dict[str, list[Callable[..., AuditEvent]]] = {}


def _emits(action: str) -> Callable[[Callable[..., AuditEvent]], Callable[..., AuditEvent]]:
    def register(constructor: Callable[..., AuditEvent]) -> Callable[..., AuditEvent]:
        CONSTRUCTORS.setdefault(action, []).append(constructor)
        return constructor

    return register


def _given(**fields: Any) -> dict:
    return {name: value for name, value in fields.items() if value is not OMITTED}


def _datakey(data_key: DataKey) -> tuple[str, Any]:
    return "datakey", data_key.pk


# -- KEKs and their versions (keyvault.keys.services) -------------------------------------------


# ``rotation_period_days`` and ``next_rotation_at`` below are in events from before issue 13, when a
# KEK kept its own schedule: the fields stay for their readers, but a KEK's schedule is its rotation
# policy's now, recorded by ``policy_changed``.
@_emits(Action.KEK_CREATED)
def kek_created(kek: KeyEncryptionKey, *, actor: Actor, provider: str, provider_key_id: str,
                rotation_period_days: int | Omittable = OMITTED) -> AuditEvent:
    """A KEK was created at its provider and registered with version 1 primary."""
    return audit.record(Action.KEK_CREATED, actor=actor, target=kek, details=_given(
        provider=provider, provider_key_id=provider_key_id, rotation_period_days=rotation_period_days))


@_emits(Action.KEK_UPDATED)
def kek_settings_changed(kek: KeyEncryptionKey, *, actor: Actor, description: str | Omittable = OMITTED,
                         rotation_period_days: int | Omittable = OMITTED,
                         max_encryptions_per_version: int | None | Omittable = OMITTED,
                         next_rotation_at: str | Omittable = OMITTED) -> AuditEvent:
    """A KEK's description or usage limit changed (only the changed ones)."""
    return audit.record(Action.KEK_UPDATED, actor=actor, target=kek, details=_given(
        description=description, rotation_period_days=rotation_period_days,
        max_encryptions_per_version=max_encryptions_per_version, next_rotation_at=next_rotation_at))


@_emits(Action.KEK_UPDATED)
def kek_primary_restored(kek: KeyEncryptionKey, *, actor: Actor, before: int | None, after: int, reason: str = "",
                         run_id: int | None = None) -> AuditEvent:
    """An earlier version of a KEK was made primary again (a rotation rolled back before retirement)."""
    details: dict[str, Any] = {"primary_version": {"before": before, "after": after}}
    return audit.record(Action.KEK_UPDATED, actor=actor, target=kek,
                        details=_with_reason_and_run(details, reason, run_id))


@_emits(Action.KEK_ENABLED)
def kek_enabled(kek: KeyEncryptionKey, *, actor: Actor) -> AuditEvent:
    """A disabled KEK was enabled."""
    return audit.record(Action.KEK_ENABLED, actor=actor, target=kek)


@_emits(Action.KEK_DISABLED)
def kek_disabled(kek: KeyEncryptionKey, *, actor: Actor, reason: str) -> AuditEvent:
    """A KEK was disabled: it refuses every crypto operation until enabled."""
    return audit.record(Action.KEK_DISABLED, actor=actor, target=kek, details={"reason": reason})


@_emits(Action.KEK_DELETION_SCHEDULED)
def kek_deletion_scheduled(kek: KeyEncryptionKey, *, actor: Actor, waiting_days: int, deletion_date: datetime,
                           data_keys: int) -> AuditEvent:
    """A KEK's destruction was scheduled after a waiting period."""
    return audit.record(Action.KEK_DELETION_SCHEDULED, actor=actor, target=kek,
                        details={"waiting_days": waiting_days, "deletion_date": deletion_date.isoformat(),
                                 "data_keys": data_keys})


@_emits(Action.KEK_DELETION_CANCELLED)
def kek_deletion_cancelled(kek: KeyEncryptionKey, *, actor: Actor) -> AuditEvent:
    """A scheduled KEK deletion was cancelled (the KEK stays disabled)."""
    return audit.record(Action.KEK_DELETION_CANCELLED, actor=actor, target=kek)


@_emits(Action.KEK_DESTROYED)
def kek_destroyed(kek: KeyEncryptionKey, *, actor: Actor, material: str) -> AuditEvent:
    """The deletion sweep destroyed a KEK whose deletion date had passed; ``material`` says what became of the key."""
    return audit.record(Action.KEK_DESTROYED, actor=actor, target=kek, details={"material": material})


@_emits(Action.KEK_ROTATED)
def kek_rotated(kek: KeyEncryptionKey, *, actor: Actor, new_version: int, previous_version: int | None,
                reason: str = "", run_id: int | None = None) -> AuditEvent:
    """A KEK got a new primary version at its provider (by hand or in a rotation run)."""
    details: dict[str, Any] = {"new_version": new_version, "previous_version": previous_version}
    return audit.record(Action.KEK_ROTATED, actor=actor, target=kek,
                        details=_with_reason_and_run(details, reason, run_id))


def _with_reason_and_run(details: dict, reason: str, run_id: int | None) -> dict:
    if reason:
        details["reason"] = reason
    if run_id is not None:
        details["run_id"] = run_id
    return details


@_emits(Action.VERSION_STATE_CHANGED)
def version_state_changed(kek: KeyEncryptionKey, *, actor: Actor, version: int, from_state: str, to_state: str,
                          enforced_by: str, data_keys_on_version: int, forced: bool, reason: str) -> AuditEvent:
    """One version of a KEK was enabled, disabled or destroyed (``enforced_by`` the provider or the inventory)."""
    return audit.record(Action.VERSION_STATE_CHANGED, actor=actor, target=kek,
                        details={"version": version, "from": from_state, "to": to_state, "enforced_by": enforced_by,
                                 "data_keys_on_version": data_keys_on_version, "forced": forced, "reason": reason})


# -- data keys and direct crypto (keyvault.keys) -----------------------------------------------


@_emits(Action.DATA_KEY_CREATED)
def data_key_created(data_key: DataKey, *, actor: Actor, kek: str, kek_version: int, key_spec: str, owner_ref: str,
                     context_keys: Sequence[str]) -> AuditEvent:
    """A data key was generated under a KEK and registered wrapped."""
    return audit.record(Action.DATA_KEY_CREATED, actor=actor, target=_datakey(data_key),
                        details={"kek": kek, "kek_version": kek_version, "key_spec": key_spec, "owner_ref": owner_ref,
                                 "context_keys": list(context_keys)})


@_emits(Action.DATA_KEY_UNWRAPPED)
def data_key_unwrapped(data_key: DataKey, *, actor: Actor, kek: str, kek_version: int) -> AuditEvent:
    """A data key's plaintext was handed to a caller."""
    return audit.record(Action.DATA_KEY_UNWRAPPED, actor=actor, target=_datakey(data_key),
                        details={"kek": kek, "kek_version": kek_version})


@_emits(Action.DATA_KEY_UNWRAPPED)
def data_key_unwrap_failed(data_key: DataKey, *, actor: Actor, error: str) -> AuditEvent:
    """Unwrapping a data key failed at the provider (``error`` is the exception's class name)."""
    return audit.record(Action.DATA_KEY_UNWRAPPED, actor=actor, target=_datakey(data_key), outcome=Outcome.FAILURE,
                        details={"error": error})


@_emits(Action.DATA_KEY_UNWRAPPED)
def data_keys_verified(*, actor: Actor, checked: int, ok: int, failed: int, skipped: int,
                       failures: Mapping[str, Mapping[str, int]]) -> AuditEvent:
    """``backup verify`` opened every data key of a restored instance and kept no plaintext (counts only)."""
    return audit.record(Action.DATA_KEY_UNWRAPPED, actor=actor, target=("backup", "verify"),
                        outcome=Outcome.FAILURE if failed else Outcome.SUCCESS,
                        details={"checked": checked, "ok": ok, "failed": failed, "skipped": skipped,
                                 "failures": {name: dict(counts) for name, counts in failures.items()}})


@_emits(Action.DATA_KEY_REWRAPPED)
def data_key_rewrapped(data_key: DataKey, *, actor: Actor, kek: str, from_version: int, to_version: int) -> AuditEvent:
    """One data key was re-wrapped under its KEK's primary version."""
    return audit.record(Action.DATA_KEY_REWRAPPED, actor=actor, target=_datakey(data_key),
                        details={"kek": kek, "from_version": from_version, "to_version": to_version})


@_emits(Action.DATA_KEY_DESTROYED)
def data_key_destroyed(data_key: DataKey, *, actor: Actor, kek: str, kek_version: int, owner_ref: str,
                       fingerprint: str, replaced_by: int, reason: str) -> AuditEvent:
    """A superseded data key's wrapped copy was deleted from the registry for good (its replacement named)."""
    return audit.record(Action.DATA_KEY_DESTROYED, actor=actor, target=_datakey(data_key),
                        details={"kek": kek, "kek_version": kek_version, "owner_ref": owner_ref,
                                 "fingerprint": fingerprint, "replaced_by": replaced_by, "reason": reason})


@_emits(Action.DATA_KEY_REWRAPPED)
def field_rewrapped(label: str, *, actor: Actor, rewrapped: int) -> AuditEvent:
    """An encrypted model field's values (``app.model.field``) were moved to their KEKs' primary versions."""
    return audit.record(Action.DATA_KEY_REWRAPPED, actor=actor, target=("field", label),
                        details={"field": label, "rewrapped": rewrapped})


@_emits(Action.CRYPTO_ENCRYPT)
def encrypted_with_kek(kek: KeyEncryptionKey, *, actor: Actor, version: int, size: int,
                       context_keys: Sequence[str]) -> AuditEvent:
    """An operator encrypted ``size`` bytes directly with a KEK (``kms encrypt``)."""
    return audit.record(Action.CRYPTO_ENCRYPT, actor=actor, target=kek,
                        details={"version": version, "bytes": size, "context_keys": list(context_keys)})


@_emits(Action.CRYPTO_DECRYPT)
def decrypted_with_kek(target: KeyEncryptionKey | tuple[str, str], *, actor: Actor, version: int,
                       size: int) -> AuditEvent:
    """An operator decrypted a direct KEK ciphertext (target: the KEK, or the provider key it names if unregistered)."""
    return audit.record(Action.CRYPTO_DECRYPT, actor=actor, target=target, details={"version": version, "bytes": size})


@_emits(Action.CRYPTO_DECRYPT)
def decrypt_failed(*, actor: Actor, provider: str, error: str) -> AuditEvent:
    """Decrypting a direct KEK ciphertext failed (``error`` is the exception's class name)."""
    return audit.record(Action.CRYPTO_DECRYPT, actor=actor, outcome=Outcome.FAILURE,
                        details={"provider": provider, "error": error})


@_emits(Action.CRYPTO_ENCRYPT)
def envelope_encrypted(kek: KeyEncryptionKey, *, actor: Actor, size: int, kek_version: int,
                       context_keys: Sequence[str]) -> AuditEvent:
    """An operator envelope-encrypted ``size`` bytes under a KEK (``kms envelope-encrypt``)."""
    return audit.record(Action.CRYPTO_ENCRYPT, actor=actor, target=kek,
                        details={"envelope": True, "bytes": size, "kek_version": kek_version,
                                 "context_keys": list(context_keys)})


@_emits(Action.CRYPTO_DECRYPT)
def envelope_decrypted(kek_name: str, *, actor: Actor, size: int) -> AuditEvent:
    """An operator opened an envelope blob (``kms envelope-decrypt``)."""
    return audit.record(Action.CRYPTO_DECRYPT, actor=actor, target=("keyencryptionkey", kek_name),
                        details={"envelope": True, "bytes": size})


@_emits(Action.CRYPTO_DECRYPT)
def envelope_decrypt_failed(*, actor: Actor, error: str) -> AuditEvent:
    """Opening an envelope blob failed (``error`` is the exception's class name)."""
    return audit.record(Action.CRYPTO_DECRYPT, actor=actor, outcome=Outcome.FAILURE,
                        details={"envelope": True, "error": error})


# -- the audit log itself (keyvault.audit.status, keyvault.console.reports) ---------------------


@_emits(Action.AUDIT_VERIFIED)
def chain_verified(result: audit.VerifyResult, *, actor: Actor, witness: str) -> AuditEvent:
    """A full walk of the chain finished, intact or not (console "Verify now", ``audit verify``)."""
    return audit.record(Action.AUDIT_VERIFIED, actor=actor, outcome=Outcome.SUCCESS if result.ok else Outcome.FAILURE,
                        details={"ok": result.ok, "events": result.events, "last_sequence": result.last_sequence,
                                 "checkpoints": result.checkpoints, "broken_at": result.broken_at,
                                 "reason": result.reason, "witness": witness})


@_emits(Action.AUDIT_EXPORTED)
def report_exported(report: str, *, actor: Actor, fmt: str, filters: Mapping[str, Any], rows: int, truncated: bool,
                    chain_sequence: int, chain_hash: str, body_sha256: str) -> AuditEvent:
    """A report was exported; recorded (sequenced at once: the file is sealed with its position) before it is handed out."""
    return audit.record(Action.AUDIT_EXPORTED, actor=actor, target=("report", report), sequenced=True, details={
        "report": report, "format": fmt, "filters": dict(filters), "rows": rows, "truncated": truncated,
        "chain_sequence": chain_sequence, "chain_hash": chain_hash, "body_sha256": body_sha256,
    })


# -- sign-in and refusals (keyvault.access.security) --------------------------------------------


@_emits(Action.ACCESS_DENIED)
def access_denied(*, actor: Actor, method: str, path: str) -> AuditEvent:
    """A signed-in user was answered 403 (permission denied) on a page."""
    return audit.record(Action.ACCESS_DENIED, actor=actor, target=("url", path[:255]), outcome=Outcome.DENIED,
                        details={"method": method[:10], "path": path[:500]})


@_emits(Action.ACCESS_DENIED)
def locked_out(username: str, *, actor: Actor, known_user: bool, failure_limit: int,
               cooloff_seconds: int) -> AuditEvent:
    """A sign-in was refused because the user or address is locked out (the first in its minute)."""
    return audit.record(Action.ACCESS_DENIED, actor=actor, target=("user", username), outcome=Outcome.DENIED,
                        details={"reason": "locked_out", "known_user": known_user, "failure_limit": failure_limit,
                                 "cooloff_seconds": cooloff_seconds})


@_emits(Action.LOGIN_FAILED)
def password_login_failed(username: str, *, actor: Actor, known_user: bool) -> AuditEvent:
    """A wrong username or password (the first from its address in its minute); unknown names come HMACed."""
    return audit.record(Action.LOGIN_FAILED, actor=actor, target=("user", username), outcome=Outcome.FAILURE,
                        details={"factor": "password", "known_user": known_user})


@_emits(Action.LOGIN_FAILED)
def second_factor_failed(username: str, *, actor: Actor, reason: str) -> AuditEvent:
    """A password-authenticated user gave a wrong or throttled second factor."""
    return audit.record(Action.LOGIN_FAILED, actor=actor, target=("user", username), outcome=Outcome.FAILURE,
                        details={"factor": "totp", "reason": reason})


def _failures_summarised(name: str, action: str, outcome: str, kind: str, summary: str,
                         target_type: str = "address") -> Callable[..., AuditEvent]:
    @_emits(action)
    def constructor(source: str, *, actor: Actor, window_start: datetime, window_seconds: int,
                    count: int) -> AuditEvent:
        return audit.record(action, actor=actor, target=(target_type, source), outcome=outcome,
                            details={"reason": f"{kind}_summary", "window_start": window_start.isoformat(),
                                     "window_seconds": window_seconds, "count": count, "recorded_individually": 1})

    constructor.__name__ = constructor.__qualname__ = name
    constructor.__doc__ = summary
    return constructor


login_failures_summarised = _failures_summarised(
    "login_failures_summarised", Action.LOGIN_FAILED, Outcome.FAILURE, "login_failed",
    "How many failed logins one address made in a finished window (the first was recorded on its own).")
lockouts_summarised = _failures_summarised(
    "lockouts_summarised", Action.ACCESS_DENIED, Outcome.DENIED, "locked_out",
    "How many locked-out sign-ins one address made in a finished window (the first was recorded on its own).")
api_unauthenticated_summarised = _failures_summarised(
    "api_unauthenticated_summarised", Action.API_DENIED, Outcome.DENIED, "api_unauthenticated",
    "How many API calls without a valid token one address made in a finished window (the first was recorded "
    "on its own).")
api_rate_limited_summarised = _failures_summarised(
    "api_rate_limited_summarised", Action.API_DENIED, Outcome.DENIED, "api_rate_limited",
    "How many calls of one API client were refused over its rate limit in a finished window (the first was "
    "recorded on its own).", target_type="apiclient")


# -- accounts, roles and second factors (keyvault.access.accounts) ------------------------------


class AccountEvent(Protocol):
    def __call__(self, target: tuple[str, str], *, actor: Actor, before: dict | None, after: dict | None,
                 changed: list[str] | Omittable = OMITTED) -> AuditEvent: ...


#: The account change events by action: the accounts recorder knows its changes by action.
ACCOUNT_EVENTS: dict[str, AccountEvent] = {}


def _account_event(name: str, action: str, summary: str) -> AccountEvent:
    @_emits(action)
    def constructor(target: tuple[str, str], *, actor: Actor, before: dict | None, after: dict | None,
                    changed: list[str] | Omittable = OMITTED) -> AuditEvent:
        return audit.record(action, actor=actor, target=target,
                            details=_given(changed=changed, before=before, after=after))

    constructor.__name__ = constructor.__qualname__ = name
    constructor.__doc__ = summary
    ACCOUNT_EVENTS[action] = constructor
    return constructor


user_created = _account_event("user_created", Action.USER_CREATED,
                              "A user account was created, with its first state in ``after``.")
user_changed = _account_event("user_changed", Action.USER_CHANGED,
                              "A user's flags, groups or permissions changed (``changed`` names them).")
user_password_changed = _account_event("user_password_changed", Action.USER_PASSWORD_CHANGED,
                                       "A user's password changed (HMACs of the hashes, never the hashes).")
user_deleted = _account_event("user_deleted", Action.USER_DELETED,
                              "A user account was deleted, with its last state in ``before``.")
group_created = _account_event("group_created", Action.GROUP_CREATED, "A group (role) was created.")
group_changed = _account_event("group_changed", Action.GROUP_CHANGED, "A group's name or permissions changed.")
group_deleted = _account_event("group_deleted", Action.GROUP_DELETED,
                               "A group was deleted, with its permissions and members.")
device_created = _account_event("device_created", Action.DEVICE_CREATED,
                                "A TOTP device was created for a user (not yet confirmed).")
device_confirmed = _account_event("device_confirmed", Action.DEVICE_CONFIRMED,
                                  "A user's TOTP device changed, e.g. was confirmed.")
device_deleted = _account_event("device_deleted", Action.DEVICE_DELETED, "A user's TOTP device was deleted.")
siem_consumer_created = _account_event("siem_consumer_created", Action.SIEM_CONSUMER_CREATED,
                                       "A SIEM consumer (feed token) was created.")
siem_consumer_changed = _account_event("siem_consumer_changed", Action.SIEM_CONSUMER_CHANGED,
                                       "A SIEM consumer was changed or deleted (token HMACed).")


@_emits(Action.USER_PREFERENCE_CHANGED)
def preference_changed(username: str, *, actor: Actor, setting: str, before: str, after: str) -> AuditEvent:
    """A console user's display preference (``setting``, e.g. ``time_zone``) changed from ``before`` to ``after``."""
    return audit.record(Action.USER_PREFERENCE_CHANGED, actor=actor, target=("user", username),
                        details={"setting": setting, "before": before, "after": after})


@_emits(Action.DEVICE_THROTTLE_RESET)
def device_throttle_reset(username: str, *, actor: Actor, device: str, failures_before: int) -> AuditEvent:
    """A user's TOTP device had its failure back-off cleared by an administrator."""
    return audit.record(Action.DEVICE_THROTTLE_RESET, actor=actor, target=("user", username),
                        details={"device": device, "before": {"failures": failures_before}, "after": {"failures": 0}})


# -- rotation runs (rotation.engine) ----------------------------------------------------------


@_emits(Action.POLICY_CHANGED)
def policy_changed(target: Any, *, actor: Actor, changes: Mapping[str, Any]) -> AuditEvent:
    """A KEK's or managed secret's rotation policy changed (values as text)."""
    return audit.record(Action.POLICY_CHANGED, actor=actor, target=target,
                        details={name: str(value) if value is not None else None for name, value in changes.items()})


@_emits(Action.POLICY_CHANGED)
def rate_limit_changed(provider: str, *, actor: Actor, before: int | None, after: int | None, source: str) -> AuditEvent:
    """Rotation's cap on calls per second at a provider changed (``None``: no cap; ``source``: where it now comes from)."""
    return audit.record(Action.POLICY_CHANGED, actor=actor, target=("kms_provider", provider),
                        details={"rate_limit": {"provider": provider, "cap": [before, after], "source": source}})


@_emits(Action.ROTATION_STARTED)
def rotation_started(target: Any, *, actor: Actor, run_id: int, kind: str, reason: str, incident_ref: str,
                     approvals_required: int | Omittable = OMITTED, destination: str | None | Omittable = OMITTED,
                     runbook: str | Omittable = OMITTED,
                     repointed_since_last_run: bool | Omittable = OMITTED) -> AuditEvent:
    """A rotation run was started; the optional fields are its driver's (``Driver.started_details``)."""
    return audit.record(Action.ROTATION_STARTED, actor=actor, target=target, details={
        "run_id": run_id, "kind": kind, "reason": reason, "incident_ref": incident_ref,
        **_given(approvals_required=approvals_required, destination=destination, runbook=runbook,
                 repointed_since_last_run=repointed_since_last_run),
    })


@_emits(Action.ROTATION_STATE)
def run_state_changed(target: Any, *, actor: Actor, run_id: int, from_state: str, to_state: str, note: str = "",
                      failed: bool = False) -> AuditEvent:
    """A rotation run moved from one state to another (outcome failure when it ``failed``)."""
    details: dict[str, Any] = {"run_id": run_id, "from": from_state, "to": to_state}
    if note:
        details["note"] = note[:500]
    return audit.record(Action.ROTATION_STATE, actor=actor, target=target,
                        outcome=Outcome.FAILURE if failed else Outcome.SUCCESS, details=details)


@_emits(Action.ROTATION_STEP)
def run_step_ticked(target: Any, *, actor: Actor, run_id: int, step: str, status: str) -> AuditEvent:
    """A runbook step of a run was marked done, skipped or failed (by the engine or a person)."""
    return audit.record(Action.ROTATION_STEP, actor=actor, target=target,
                        details={"run_id": run_id, "step": step, "status": status})


def _decision(name: str, action: str, summary: str) -> Callable[..., AuditEvent]:
    @_emits(action)
    def constructor(target: Any, *, actor: Actor, run_id: int, comment: str) -> AuditEvent:
        return audit.record(action, actor=actor, target=target, details={"run_id": run_id, "comment": comment})

    constructor.__name__ = constructor.__qualname__ = name
    constructor.__doc__ = summary
    return constructor


run_approved = _decision("run_approved", Action.ROTATION_APPROVED, "A person approved a run waiting for approval.")
run_rejected = _decision("run_rejected", Action.ROTATION_REJECTED,
                         "A person rejected a run waiting for approval (it is cancelled).")
run_break_glass = _decision("run_break_glass", Action.ROTATION_BREAK_GLASS,
                            "A member of the break-glass group bypassed a run's missing approvals.")


@_emits(Action.ROTATION_BATCH)
def batch_rewrapped(kek: KeyEncryptionKey, *, actor: Actor, run_id: int, first_id: int, last_id: int, rewrapped: int,
                 failed_ids: Sequence[int] = (), failed_errors: Sequence[str] = (),
                 throttled: bool | Omittable = OMITTED) -> AuditEvent:
    """A batch of a run's data keys was rewrapped (failure with ids and errors if some were not; throttled: cut short)."""
    details: dict[str, Any] = {"run_id": run_id, "first_id": first_id, "last_id": last_id, "rewrapped": rewrapped}
    if failed_ids:
        details["failed_ids"] = list(failed_ids)
        details["failed_errors"] = list(failed_errors)
    details.update(_given(throttled=throttled))
    return audit.record(Action.ROTATION_BATCH, actor=actor, target=kek,
                        outcome=Outcome.FAILURE if failed_ids else Outcome.SUCCESS, details=details)


# -- Keyvault's own secrets (keyvault.keys.master_key) -------------------------------------------


@_emits(Action.KMS_MASTER_KEY_REKEYED)
def local_master_key_rekeyed(keyring: str, *, actor: Actor, keys: int, new_key_file: str, generated: bool,
                             fingerprint: str, already: bool, development_key_file: str | None) -> AuditEvent:
    """The local provider's keyring was re-encrypted under a new master key (its fingerprint, never the key)."""
    return audit.record(Action.KMS_MASTER_KEY_REKEYED, actor=actor, target=("keyring", keyring), details={
        "keys": keys, "new_key_file": new_key_file, "generated": generated, "new_key_fingerprint": fingerprint,
        "already_rekeyed": already, "development_key_file": development_key_file})


# -- managed secrets (rotation.managed_secrets, the secret driver, executors) -------------------


def _secret(secret: ManagedSecret, event: str, *, actor: Actor, outcome: str = Outcome.SUCCESS,
            **details: Any) -> AuditEvent:
    return audit.record(Action.SECRET, actor=actor, target=secret, outcome=outcome,
                        details={"event": event, **details})


@_emits(Action.SECRET)
def secret_registered(secret: ManagedSecret, *, actor: Actor, secret_type: str, source: str, path: str,
                      owner: str) -> AuditEvent:
    """A managed secret was registered."""
    return _secret(secret, "registered", actor=actor, type=secret_type, source=source, path=path, owner=owner)


@_emits(Action.SECRET)
def secret_reference_refused(secret: ManagedSecret, *, actor: Actor, source: str, path: str, field: str,
                             error: str) -> AuditEvent:
    """A managed secret's source, path or a config reference pointed at Keyvault's own secrets, and was refused."""
    return _secret(secret, "own_secret_refused", actor=actor, outcome=Outcome.DENIED,
                   source=source, path=path, field=field, error=error[:500])


@_emits(Action.SECRET)
def secret_changed(secret: ManagedSecret, *, actor: Actor, changes: Mapping[str, Mapping[str, Any]],
                   repointed: bool) -> AuditEvent:
    """A managed secret was changed; ``repointed`` (source, path or config changed) makes its next run need approval."""
    return _secret(secret, "repointed" if repointed else "changed", actor=actor, changes=dict(changes),
                   next_run_needs_approval=repointed)


@_emits(Action.SECRET)
def secret_rotated(secret: ManagedSecret, *, actor: Actor, run_id: int, new_version: str,
                   retire_after: datetime) -> AuditEvent:
    """A managed secret's new credential was verified and made current; the old one retires after the grace period."""
    return _secret(secret, "rotated", actor=actor, run_id=run_id, new_version=new_version,
                   retire_after=retire_after.isoformat())


@_emits(Action.SECRET)
def secret_rotation_failed(secret: ManagedSecret, *, actor: Actor, run_id: int, error: str,
                           recovery: str) -> AuditEvent:
    """A managed secret's rotation run failed; ``recovery`` says what was left as it was."""
    return _secret(secret, "rotation_failed", actor=actor, outcome=Outcome.FAILURE, run_id=run_id, error=error[:500],
                   recovery=recovery[:500])


@_emits(Action.SECRET)
def secret_needs_attention(secret: ManagedSecret, *, actor: Actor, status: str,
                           reasons: Sequence[str]) -> AuditEvent:
    """The sweep flagged a managed secret (expiring, overdue, failed); at most once per flag interval."""
    return _secret(secret, "needs_attention", actor=actor, status=status, reasons=list(reasons))


@_emits(Action.SECRET)
def outbound_refused(secret: ManagedSecret, *, actor: Actor, run_id: int, endpoint: str, what: str) -> AuditEvent:
    """A rotation run's executor was refused an endpoint outside the outbound allowlist; nothing was sent."""
    return _secret(secret, "outbound_refused", actor=actor, outcome=Outcome.DENIED, run_id=run_id, endpoint=endpoint,
                   what=what)


# -- application clients of the API (keyvault.api.services) ------------------------------------


@_emits(Action.API_CLIENT_CREATED)
def api_client_created(client: Any, *, actor: Actor, owner: str, keks: Sequence[str], operations: Sequence[str],
                       context_keys: Sequence[str], networks: Sequence[str], expires_at: str | None,
                       token_prefix: str) -> AuditEvent:
    """An API client was created with its first token (only the token's prefix is recorded)."""
    return audit.record(Action.API_CLIENT_CREATED, actor=actor, target=("apiclient", client.name), details={
        "owner": owner, "keks": list(keks), "operations": list(operations), "context_keys": list(context_keys),
        "networks": list(networks), "expires_at": expires_at, "token_prefix": token_prefix})


@_emits(Action.API_CLIENT_CHANGED)
def api_token_rotated(client: Any, *, actor: Actor, token_prefix: str, previous_prefix: str | None,
                      previous_expires_at: str | None) -> AuditEvent:
    """An API client got a new token; the previous one works until ``previous_expires_at`` (the overlap)."""
    return audit.record(Action.API_CLIENT_CHANGED, actor=actor, target=("apiclient", client.name), details={
        "event": "token_rotated", "token_prefix": token_prefix, "previous_prefix": previous_prefix,
        "previous_expires_at": previous_expires_at})


@_emits(Action.API_CLIENT_CHANGED)
def api_tokens_revoked(client: Any, *, actor: Actor, token_prefixes: Sequence[str], reason: str) -> AuditEvent:
    """Some tokens of an API client were revoked (the client itself stays enabled)."""
    return audit.record(Action.API_CLIENT_CHANGED, actor=actor, target=("apiclient", client.name), details={
        "event": "tokens_revoked", "token_prefixes": list(token_prefixes), "reason": reason})


@_emits(Action.API_CLIENT_CHANGED)
def api_token_reinstated(client: Any, *, actor: Actor, token_prefix: str, expires_at: str | None,
                         reason: str) -> AuditEvent:
    """A token got back the expiry it had before a rotation that was undone (``None``: no expiry)."""
    return audit.record(Action.API_CLIENT_CHANGED, actor=actor, target=("apiclient", client.name), details={
        "event": "token_reinstated", "token_prefix": token_prefix, "expires_at": expires_at, "reason": reason})


@_emits(Action.API_CLIENT_CHANGED)
def api_client_revoked(client: Any, *, actor: Actor, reason: str, tokens_revoked: int) -> AuditEvent:
    """An API client was revoked: every token of it answers 401 from now on."""
    return audit.record(Action.API_CLIENT_CHANGED, actor=actor, target=("apiclient", client.name), details={
        "event": "revoked", "reason": reason, "tokens_revoked": tokens_revoked})


@_emits(Action.API_DENIED)
def api_call_refused(*, actor: Actor, operation: str, reason: str, kek: str | None = None,
                     data_key: int | None = None) -> AuditEvent:
    """An authenticated API client was refused an operation (``reason`` a stable code; no context values)."""
    return audit.record(Action.API_DENIED, actor=actor, target=("api", operation), outcome=Outcome.DENIED,
                        details={"operation": operation, "reason": reason, "kek": kek, "data_key": data_key})


@_emits(Action.API_DENIED)
def api_call_unauthenticated(*, actor: Actor, operation: str) -> AuditEvent:
    """An API call without a valid token (the first from its address in its minute; never the token sent)."""
    return audit.record(Action.API_DENIED, actor=actor, target=("address", actor.ip_address or "unknown"),
                        outcome=Outcome.DENIED, details={"operation": operation, "reason": "unauthenticated"})


@_emits(Action.API_DENIED)
def api_call_rate_limited(client_name: str, *, actor: Actor, operation: str, limit: int) -> AuditEvent:
    """An API client went over its rate limit (the first refusal of the client in its minute)."""
    return audit.record(Action.API_DENIED, actor=actor, target=("apiclient", client_name), outcome=Outcome.DENIED,
                        details={"operation": operation, "reason": "rate_limited", "limit_per_second": limit})


@_emits(Action.API_READ)
def api_metadata_read(*, actor: Actor, operation: str, kek: str | None = None,
                      data_key: int | None = None) -> AuditEvent:
    """An API client read metadata: a data key's (``describe``) or the list of its KEKs (never key material)."""
    target = ("datakey", data_key) if data_key is not None else ("api", operation)
    return audit.record(Action.API_READ, actor=actor, target=target,
                        details={"operation": operation, "kek": kek, "data_key": data_key})


@_emits(Action.DATA_KEY_REWRAPPED)
def envelope_rewrapped(kek_name: str, *, actor: Actor, to_version: int) -> AuditEvent:
    """An envelope blob's DEK was moved to its KEK's primary version (the blob is the caller's, not stored)."""
    return audit.record(Action.DATA_KEY_REWRAPPED, actor=actor, target=("keyencryptionkey", kek_name),
                        details={"envelope": True, "to_version": to_version})
