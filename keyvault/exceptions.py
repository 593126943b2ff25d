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


class DataKeyNotSuperseded(KeyvaultError):
    """A data key cannot be destroyed: no newer data key of its owner opens in its place."""


class AuditWriteRefused(KeyvaultError):
    """Audit events are append-only: they cannot be changed or deleted."""


class AuditWitnessUnavailable(KeyvaultError):
    """An audit witness (file, URL, bucket) cannot be read or written, or holds lines that are not checkpoints."""


class AuditVerificationTooSoon(KeyvaultError):
    """A full verification of the audit chain ran moments ago; try again later."""

    def __init__(self, message: str, *, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class InvalidSearch(KeyvaultError):
    """The search term is empty or too long."""


class InvalidPreference(KeyvaultError):
    """A console preference names a value Keyvault does not know (e.g. an unknown time zone)."""


class ApiAuthenticationFailed(KeyvaultError):
    """No, unknown, expired or revoked API token, or a revoked or expired client (401; one error for all)."""


class ApiForbidden(KeyvaultError):
    """The API client may not do this: operation, context or source address not allowed (403)."""

    def __init__(self, message: str, *, code: str):
        super().__init__(message)
        self.code = code


class ApiBadRequest(KeyvaultError):
    """A request item the API cannot take as given, e.g. an encryption context that is not a string map (400)."""

    def __init__(self, message: str, *, code: str):
        super().__init__(message)
        self.code = code


class ApiNotFound(KeyvaultError):
    """No such KEK or data key *for this client*: foreign ones answer the same (404)."""


class ApiRateLimited(KeyvaultError):
    """The API client went over its rate limit (429)."""

    def __init__(self, message: str, *, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class PayloadTooLarge(KeyvaultError):
    """A request or one item of it is larger than the API takes (413)."""
