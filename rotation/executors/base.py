"""The executor contract: what the rotation engine asks of each secret type.

A secret run goes through the same states as a KEK run, minus the rewrap:

``queued`` → ``rotating`` (:meth:`Executor.precheck`, then :meth:`Executor.rotate`)
→ ``verifying`` (:meth:`Executor.verify`) → ``retiring`` (after the policy's grace
period, :meth:`Executor.retire`) → ``completed``.

Every phase must be idempotent: it records what it has done in ``ctx.state`` (the
run's ``executor_state``, never a secret value) and skips that part when called
again. A phase that needs a person raises :class:`WaitingForPerson`; the run stays
where it is until the manual step is ticked. Any other exception fails the run; the
engine then calls :meth:`Executor.on_failure`, which must leave the old credential
valid (it is never destroyed before retirement anyway).
"""

from __future__ import annotations

import abc
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from keyvault.secrets.base import SecretSource, SecretVersion
from keyvault.secrets.managed import OWN_COOKIE_KEYRING, ManagedSource, managed_source
from rotation.executors import executor_for
from rotation.exceptions import ConfigFieldError, ExecutorError, SecretConfigError, VerificationFailed
from rotation.executors.schema import ConfigSchema

log = logging.getLogger(__name__)
_MISSING = object()
__all__ = ["ConfigFieldError", "Context", "Executor", "ExecutorError", "SecretConfigError", "VerificationFailed",
           "WaitingForPerson", "fingerprint", "source_for", "source_named"]


class CredentialRetired(ExecutorError):
    """The previous credential was destroyed at retirement; rolling back to it would install one that cannot work."""


class WaitingForPerson(Exception):  # noqa: N818 - a pause, not an error
    """The run waits for a manual runbook step (or for a value a person provides)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def fingerprint(value: str | bytes) -> str:
    """A short SHA-256 fingerprint to recognise a high-entropy key or certificate in evidence (never for passwords)."""
    data = value.encode() if isinstance(value, str) else value
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


@dataclass
class Context:
    """What a phase sees: the run, its secret, ``now`` and the engine's helpers.

    ``tick_step(run, key, *, actor, evidence, status)`` and ``actor`` are lent by the
    engine's driver for managed secrets; executors never import the engine.
    """

    run: Any
    secret: Any
    now: datetime
    state: dict = field(default_factory=dict)
    tick_step: Callable[..., None] | None = None
    actor: Any = None
    _options: dict | None = field(default=None, repr=False)

    # -- configuration --------------------------------------------------------------
    @property
    def options(self) -> dict:
        """The secret's configuration checked against its type's schema, defaults filled in.

        A row saved under an older schema that no longer validates fails the phase here with
        the field named (``secret NAME: config field 'port': …``), before anything is changed.

        :raises ConfigFieldError:
        """
        if self._options is None:
            try:
                self._options = executor_for(self.secret.secret_type).options(self.secret.config)
            except ConfigFieldError as exc:
                raise exc.of_secret(self.secret.name) from None
        return self._options

    def config(self, key: str, default=_MISSING):
        value = self.options.get(key, default)
        if value is _MISSING or value in ("", None) and default is _MISSING:
            raise SecretConfigError(f"secret {self.secret.name}: configuration needs {key!r}")
        return value

    @property
    def grace(self) -> timedelta:
        if self.run.kind == "emergency":
            return timedelta(0)
        return self.run.policy.grace_period if self.run.policy_id else timedelta(days=7)

    # -- the secret source -----------------------------------------------------------
    def source(self, name: str | None = None) -> SecretSource:
        return source_for(self.secret) if name is None else source_named(name)

    def read(self, *, version: str | None = None) -> SecretVersion:
        return self.source().read(self.secret.path, version=version)

    def write(self, value: str) -> SecretVersion:
        return self.source().write(self.secret.path, value)

    def restore(self, version: str) -> SecretVersion:
        """Make an earlier version current again, by writing its value as a new version."""
        old = self.source().read(self.secret.path, version=version)
        return self.source().write(self.secret.path, old.value)

    # -- steps, persisted state, audit ---------------------------------------------------
    def tick(self, key: str, evidence: str = "", *, failed: bool = False, actor=None) -> None:
        """Mark a runbook step done (or failed), as the engine or as ``actor`` (a person's part)."""
        from rotation.models import RunStep

        self.tick_step(self.run, key, actor=actor or self.actor, evidence=evidence,
                       status=RunStep.Status.FAILED if failed else RunStep.Status.DONE)

    def step_done(self, key: str) -> bool:
        from rotation.models import RunStep

        return RunStep.objects.filter(run=self.run, key=key, status=RunStep.Status.DONE).exists()

    def require(self, key: str, message: str) -> None:
        """Stop here until a person ticks the manual step ``key``."""
        if not self.step_done(key):
            raise WaitingForPerson(key, message)

    def save(self) -> None:
        from rotation.models import RotationRun

        RotationRun.objects.filter(pk=self.run.pk).update(executor_state=self.state)
        self.run.executor_state = self.state


def source_for(secret) -> ManagedSource:
    """The source holding ``secret``'s own value.

    Keyvault's own cookie keyring (``HMD_SECRET_KEY_KEYRING``) is rotated as a cookie-signing
    secret, whose executor never sends a value anywhere; no other type may reach it.
    """
    allow = (OWN_COOKIE_KEYRING,) if secret.secret_type == "cookie_signing" else ()
    return source_named(secret.source, allow_own=allow)


def source_named(name: str, *, allow_own: tuple[str, ...] = ()) -> ManagedSource:
    """The configured secret source ``name`` as managed secrets use it: Keyvault's own secrets are out of reach.

    :raises SecretSourceConfigurationError: unknown or unconfigured source.
    """
    return managed_source(name, allow_own=allow_own)


class Executor(abc.ABC):
    """Rotation of one secret type. Subclasses declare their configuration in :attr:`schema`."""

    #: The type's configuration: checked at registration, before every run, and shown in the docs.
    schema: ConfigSchema = ConfigSchema()
    #: The policy a newly managed secret of this type gets: a rotation every ``rotation_period``;
    #: the old credential keeps working ``grace_period`` after the switch.
    rotation_period: timedelta = timedelta(days=90)
    grace_period: timedelta = timedelta(days=1)
    #: Rotated by the beat sweep when due (False: a person starts each run).
    auto_rotate: bool = True

    def policy_defaults(self) -> dict:
        """Fields of a new :class:`rotation.models.RotationPolicy` for a secret of this type."""
        return {"period": self.rotation_period, "grace_period": self.grace_period, "auto": self.auto_rotate}

    def options(self, config: dict) -> dict:
        """The configuration checked against :attr:`schema`, defaults filled in (no environment checks).

        An executor written before schemas (no ``schema``, its own :meth:`validate_config`) is
        checked by that instead, so it keeps working until it declares one
        (``tests/rotation/executors/test_schema.py`` fails until it does).

        :raises ConfigFieldError: a field is missing, unknown or has a bad value.
        """
        if type(self).schema is Executor.schema and type(self).validate_config is not Executor.validate_config:
            return self.validate_config(config)
        return self.schema.validate(config)

    def validate_config(self, config: dict) -> dict:
        """The configuration with defaults filled in, if the schema and the environment accept it.

        Subclasses add the checks that depend on the operator's environment (``HMD_OUTBOUND_ALLOWLIST``).

        :raises ConfigFieldError: a field is missing, unknown or has a bad value.
        :raises SecretConfigError: the environment refuses it.
        """
        return self.schema.validate(config)

    @abc.abstractmethod
    def precheck(self, ctx: Context) -> None:
        """Check the source, the target system and the current value before anything changes."""

    @abc.abstractmethod
    def rotate(self, ctx: Context) -> None:
        """Make the new credential and install it (the old one stays valid)."""

    @abc.abstractmethod
    def verify(self, ctx: Context) -> None:
        """Prove the new credential works, for real (a login, a handshake, a token request)."""

    @abc.abstractmethod
    def retire(self, ctx: Context) -> None:
        """After the grace period: stop the old credential from working."""

    def retire_delay(self, ctx: Context) -> timedelta:
        """How long after the switch the old credential retires: the policy's grace period (zero in an emergency)."""
        return ctx.grace

    def rollback(self, ctx: Context) -> str:
        """Before retirement: make the previous credential current again. Returns a note for the audit trail."""
        previous = ctx.state.get("previous_version")
        if not previous or not ctx.state.get("new_version"):
            return "nothing was installed; nothing to restore"
        restored = ctx.restore(previous)
        ctx.state["restored_version"] = restored.version
        ctx.state.pop("new_version", None)  # a resumed run rotates afresh
        ctx.tick("rollback.restore", f"version {previous} is current again (as version {restored.version})")
        return f"previous version {previous} restored"

    def on_failure(self, ctx: Context, exc: Exception) -> str:
        """After an error: put the source back where it was if the new value was installed but never verified."""
        if ctx.state.get("new_version") and not ctx.state.get("verified") and ctx.state.get("previous_version"):
            try:
                return self.rollback(ctx)
            except Exception as restore_exc:  # report both; the old credential itself was never touched
                log.exception("could not restore %s after a failed rotation", ctx.secret.name)
                return f"restoring the previous version failed too: {type(restore_exc).__name__}: {restore_exc}"
        return "the old credential was not changed"

    def before_manual_tick(self, run, key: str, *, now: datetime) -> None:
        """Refuse a manual tick that would break a rule (e.g. revoking before the overlap window ends).

        :raises ExecutorError:
        """

    def accept_value(self, ctx: Context, value: str, *, actor) -> None:
        """Store a value a person provides (types that cannot make their own). :raises ExecutorError:"""
        raise ExecutorError(f"{ctx.secret.get_secret_type_display()} rotation makes its own values")

    def inspect(self, value: str) -> dict:
        """Non-secret facts about a value for the secret's metadata (``expires_at`` as a datetime if known)."""
        return {}
