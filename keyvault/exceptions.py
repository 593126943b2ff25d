"""Errors raised by Keyvault's services (the KMS layer has its own, in ``keyvault.kms.errors``)."""

from keyvault.kms.errors import KeyDisabled


class KeyvaultError(Exception):
    """Root of the errors Keyvault's services raise."""


class InvalidStateTransition(KeyvaultError):
    """The requested lifecycle change is not allowed from the object's current state."""


class KeyNotUsable(KeyvaultError, KeyDisabled):
    """The KEK is disabled, pending deletion or destroyed, so it refuses crypto."""


class CoverageIncomplete(KeyvaultError):
    """A key version still protects data keys, so it cannot be retired yet."""


class AuditChainBroken(KeyvaultError):
    """The audit chain failed verification."""


class AuditWriteRefused(KeyvaultError):
    """Audit events are append-only: they cannot be changed or deleted."""
