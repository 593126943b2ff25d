"""Managed secrets under rotation: registering one, reading its facts, changing or re-pointing it.

Runs of a secret go through the engine (``rotation.engine``) like any other; its type's
executor (``rotation/executors/``) does the work. Everything here is audited in the chain
as ``secret`` events; configuration values that look secret are HMACed there.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.db import transaction

from keyvault import audit
from keyvault.audit import Actor, events
from keyvault.exceptions import KeyvaultError
from keyvault.models import ManagedSecret
from keyvault.secrets import OwnSecretRefused
from keyvault.secrets.base import SecretSourceError
from rotation.engine.drivers.secret import check_secret_config, executor_of, secret_due_at
from rotation.engine.policies import ensure_policy, update_policy
from rotation.exceptions import RotationError
from rotation.executors.base import SecretConfigError, source_for, source_named
from rotation.models import RotationPolicy, RotationRun

log = logging.getLogger(__name__)
S = RotationRun.State


def ensure_secret_policy(secret: ManagedSecret) -> RotationPolicy:
    """The secret's policy, created with its type's defaults if it has none."""
    return ensure_policy(secret)


def update_secret_policy(secret: ManagedSecret, *, actor: Actor, **changes) -> RotationPolicy:
    """Change a managed secret's rotation policy (same fields as a KEK's)."""
    return update_policy(secret, actor=actor, **changes)


def register_secret(
    *, name: str, secret_type: str, source: str, path: str, actor: Actor, owner: str = "", description: str = "",
    config: dict | None = None, warn_before: timedelta | None = None, inspect: bool = True,
) -> ManagedSecret:
    """Put a secret under management: validate its config, read what can be read, give it a policy.

    :raises django.core.exceptions.ValidationError: bad name or config (secret-looking keys are refused).
    :raises ConfigFieldError: unknown source, or a config field missing, unknown or bad (the type's schema).
    :raises SecretConfigError: an endpoint outside ``HMD_OUTBOUND_ALLOWLIST``, or a path to Keyvault's own secrets.
    """
    secret = ManagedSecret(name=name, secret_type=secret_type, source=source, path=path, owner=owner,
                           description=description, config=config or {}, warn_before=warn_before)
    secret.full_clean()
    check_secret_config(secret)
    check_secret_references(secret, actor=actor)
    with transaction.atomic():
        secret.save()
        ensure_secret_policy(secret)
        events.secret_registered(secret, actor=actor, secret_type=secret_type, source=source, path=path, owner=owner)
    if inspect:
        try:
            refresh_secret(secret, actor=actor)
        except (SecretSourceError, KeyvaultError) as exc:
            log.warning("registered %s but could not read it yet: %s", name, exc)
    return secret


def refresh_secret(secret: ManagedSecret, *, actor: Actor) -> ManagedSecret:
    """Read the current value from its source and record non-secret facts (TLS: subject, SANs, expiry)."""
    value = source_for(secret).read(secret.path)
    facts = executor_of(secret).inspect(value.value)
    expires_at = facts.pop("expires_at", None)
    facts["version"] = value.version
    ManagedSecret.objects.filter(pk=secret.pk).update(metadata=facts, expires_at=expires_at or secret.expires_at)
    secret.refresh_from_db()
    policy = ensure_secret_policy(secret)
    RotationPolicy.objects.filter(pk=policy.pk).update(next_due_at=secret_due_at(secret, policy))
    return secret


#: Fields of a managed secret a console user may change (name and type are fixed at registration).
SECRET_FIELDS = ("source", "path", "config", "owner", "description", "warn_before")
#: Fields that decide where the value is read from and where executors send it: changing one re-points the secret.
POINTER_FIELDS = ("source", "path", "config")


def invalid_secret_configs() -> list[tuple[ManagedSecret, SecretConfigError]]:
    """Managed secrets whose stored configuration no longer passes :func:`check_secret_config` (a data check).

    Rows saved before a schema became stricter stay in the database; this lists them with the
    problem, so they are fixed (``manage.py secret change``) before their next run fails on it.
    """
    found = []
    for secret in ManagedSecret.objects.order_by("name"):
        try:
            check_secret_config(secret)
        except SecretConfigError as exc:
            found.append((secret, exc))
    return found


def check_secret_references(secret: ManagedSecret, *, actor: Actor | None = None) -> None:
    """Refuse a source/path, or a ``{"source", "path"}`` reference in the config, that leads to Keyvault's own secrets.

    With ``actor``, a refusal is also audited (``secret`` / ``own_secret_refused``, outcome denied):
    pointing a secret at Keyvault's own is what an attacker with a console account would try.

    :raises SecretConfigError: one line naming the variable it would reach, never a value.
    """
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
            events.secret_reference_refused(secret, actor=actor, source=secret.source, path=secret.path, field=what,
                                            error=str(error))
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
        events.secret_changed(locked, actor=actor, repointed=repointed,
                              changes={name: {"before": _audited_value(name, before[name]),
                                              "after": _audited_value(name, value)} for name, value in changed.items()})
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
    unknown = set(changed) - set(SECRET_FIELDS)
    if unknown:
        raise ValueError(f"managed secret fields that cannot be changed: {sorted(unknown)}")
    for name, value in changed.items():
        setattr(secret, name, value)
    secret.full_clean()
    repointed = bool(set(changed) & set(POINTER_FIELDS))
    if repointed:
        busy = (RotationRun.objects.filter(secret=secret, state__in=(*RotationRun.ACTIVE_STATES, S.FAILED))
                .order_by("-pk").first())
        if busy is not None:
            raise RotationError(f"secret {secret.name} has run #{busy.pk} ({busy.get_state_display().lower()}); "
                                "complete, cancel or roll it back before changing its source, path or configuration")
        check_secret_config(secret)
        check_secret_references(secret, actor=actor)
    return repointed
