"""The one exception tree of the KMS layer.

Every provider raises only these. Callers can rely on two facts: every failure
to open a ciphertext is the same opaque :class:`InvalidCiphertext`, and only
:class:`ProviderUnavailable` is worth retrying.
"""


class KMSError(Exception):
    """Root of every error the KMS layer raises."""

    retryable = False


class ConfigurationError(KMSError):
    """The provider is misconfigured or its SDK is not installed."""


class KeyNotFound(KMSError):
    """The named key (or key version) does not exist at the provider."""


class KeyDisabled(KMSError):
    """The key or key version exists but may not be used for this operation."""


class InvalidCiphertext(KMSError):
    """The ciphertext could not be opened.

    Deliberately says nothing about why: malformed, truncated, tampered, wrong
    encryption context and unknown key or version all look the same, so an
    attacker learns nothing from which check failed.
    """

    def __init__(self, message: str = "ciphertext could not be decrypted") -> None:
        super().__init__(message)


class ProviderUnavailable(KMSError):
    """The backend could not be reached or is overloaded; the call may be retried."""

    retryable = True


class Throttled(ProviderUnavailable):
    """The backend refused the call for its request quota (AWS ``ThrottlingException``,
    Cloud KMS ``RESOURCE_EXHAUSTED``, HTTP 429); back off before retrying.

    :param retry_after: seconds the backend asked the caller to wait, when it said.
    """

    def __init__(self, message: str = "request quota exceeded", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AccessDenied(KMSError):
    """The backend refused the caller's credentials or policy."""


class UnsupportedOperation(KMSError):
    """The backend cannot do this at all (see ``KMSProvider.supports``)."""


class StorageUnavailable(ProviderUnavailable):
    """The provider's own storage refused a write: the volume is full or read-only, or access is denied.

    Nothing was changed. Worth retrying once an operator has freed space or fixed the mount
    or permissions. The message names the path and the system's reason; ``path`` and
    ``errno`` carry them for programs.
    """

    def __init__(self, message: str, *, path: str | None = None, errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno
