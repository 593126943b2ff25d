"""Errors raised by the rotation engine's services."""

from __future__ import annotations

from keyvault.exceptions import KeyvaultError


class RotationError(KeyvaultError):
    """Root of the rotation engine's errors."""


class InvalidRunTransition(RotationError):
    """The run cannot move to that state from where it is."""


class RunAlreadyActive(RotationError):
    """The target already has an active run; only one at a time."""

    def __init__(self, run):
        super().__init__(f"{run.target_label} already has an active run (#{run.pk}, {run.get_state_display().lower()})")
        self.run = run


class ApprovalRefused(RotationError):
    """The approval breaks a rule (self-approval, same person twice, no permission, no reason)."""


class RunNotPermitted(RotationError):
    """The user lacks a permission this kind of run needs (an emergency rotation, for one)."""


class ExecutorError(RotationError):
    """A step of a secret rotation failed; the old credential stays valid."""


class SecretConfigError(ExecutorError):
    """The managed secret's configuration is missing something its executor needs."""


class ConfigFieldError(SecretConfigError):
    """One field of a managed secret's configuration is missing, unknown or has a bad value (``field`` names it).

    ``in_config`` is False for a field of the secret itself (its ``source``), True for a configuration key.
    """

    def __init__(self, field: str, problem: str, *, in_config: bool = True):
        super().__init__(f"{'config field' if in_config else 'field'} {field!r}: {problem}")
        self.field, self.problem, self.in_config = field, problem, in_config

    def of_secret(self, name: str) -> ConfigFieldError:
        """The same refusal of a stored secret's field, naming the secret and how to fix it."""
        return ConfigFieldError(self.field, f"{self.problem} (secret {name}; fix it with manage.py secret change {name})",
                                in_config=self.in_config)


class VerificationFailed(ExecutorError):
    """The new credential did not work when tried for real."""
