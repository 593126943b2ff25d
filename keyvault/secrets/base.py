"""The secret-source contract: where managed secrets (and Keyvault's own) live.

A source stores named secrets as text, each with versions. One module per
backend implements :class:`SecretSource` (env, files, Vault KV v2, AWS Secrets
Manager, GCP Secret Manager, Kubernetes). Like the KMS layer, nothing here
imports Django; the registry is configured from settings by the Django app.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: Separates a path from the field inside a structured secret: ``app/db#password``.
FIELD_SEPARATOR = "#"


class SecretSourceError(Exception):
    """Root of the errors secret sources raise."""


class SecretNotFound(SecretSourceError):
    """No secret (or no such version) at that path."""


class SecretSourceUnavailable(SecretSourceError):
    """The backend could not be reached; the call may be retried."""

    retryable = True


class SecretAccessDenied(SecretSourceError):
    """The backend refused our credentials or policy."""


class SecretSourceConfigurationError(SecretSourceError):
    """The source is misconfigured, or its SDK is missing (the message names the package)."""


class ReadOnlySource(SecretSourceError):
    """This source cannot write (e.g. environment variables)."""


class SecretConflict(SecretSourceError):
    """Someone else changed the secret between our read and our write; read again and retry."""


class CurrentVersionError(SecretSourceError, ValueError):
    """The current version cannot be deleted; write a new version first."""


class InvalidSecretValue(SecretSourceError, ValueError):
    """A value to store is not a non-empty string (the message never echoes it)."""


class InvalidSecretReference(SecretSourceConfigurationError):
    """A secret reference (``vault:secret/app#key``, ``file:/path``…) cannot be parsed."""


@dataclass(frozen=True, slots=True)
class SecretVersion:
    """One stored version of a secret. ``value`` never appears in a repr."""

    path: str
    version: str
    value: str = field(repr=False)
    created_at: datetime | None = None
    current: bool = True


@dataclass(frozen=True, slots=True)
class SecretVersionInfo:
    """A version's metadata, without its value."""

    version: str
    created_at: datetime | None
    current: bool
    state: str = "enabled"


class SecretSource(abc.ABC):
    """A backend holding secrets by path, with versions."""

    #: Registry name, as used in settings (``HMD_SECRET_SOURCE`` / ``secret_ref`` prefixes).
    name: str = ""
    #: Whether :meth:`write` and :meth:`delete_version` work.
    writable: bool = True

    @abc.abstractmethod
    def read(self, path: str, *, version: str | None = None) -> SecretVersion:
        """Return the current (or the given) version of the secret at ``path``.

        :raises SecretNotFound, SecretSourceUnavailable, SecretAccessDenied:
        """

    @abc.abstractmethod
    def write(self, path: str, value: str) -> SecretVersion:
        """Store ``value`` as the new current version; older versions are kept.

        :raises ReadOnlySource, SecretSourceUnavailable, SecretAccessDenied:
        """

    @abc.abstractmethod
    def list_versions(self, path: str) -> list[SecretVersionInfo]:
        """All versions, oldest first. :raises SecretNotFound:"""

    @abc.abstractmethod
    def delete_version(self, path: str, version: str) -> None:
        """Remove (or destroy) one non-current version. :raises SecretNotFound, ReadOnlySource:"""

    def health_check(self) -> tuple[bool, str]:
        """``(healthy, detail)``; never raises."""
        return True, "no check implemented"

    @classmethod
    def from_config(cls, options: dict[str, Any]) -> SecretSource:
        """Build from this source's entry in ``settings.SECRET_SOURCES`` (``HMD_*`` variables).

        :raises SecretSourceConfigurationError: bad options or missing SDK.
        """
        try:
            return cls(**options)
        except TypeError as exc:
            raise SecretSourceConfigurationError(f"secret source {cls.name!r}: {exc}") from None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def split_field(path: str, default: str | None = None) -> tuple[str, str | None]:
    """Split ``"app/db#password"`` into ``("app/db", "password")``; no ``#`` gives ``default``."""
    base, sep, name = path.partition(FIELD_SEPARATOR)
    return base, (name if sep and name else default)


def require_path(path: object) -> str:
    """Return ``path`` if it is a non-empty string without control characters.

    :raises SecretNotFound: it is not (a bad name can never be found).
    """
    if not isinstance(path, str) or not path.strip() or any(ord(c) < 32 for c in path):
        raise SecretNotFound("secret path must be a non-empty string without control characters")
    return path


def require_value(value: object) -> str:
    """Return ``value`` if it is a non-empty ``str``. The message never echoes it.

    :raises InvalidSecretValue: it is not.
    """
    if not isinstance(value, str) or value == "":
        raise InvalidSecretValue("a secret value must be a non-empty string")
    return value
