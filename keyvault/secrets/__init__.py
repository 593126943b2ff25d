"""Secret sources: where managed secrets, and Keyvault's own, are stored.

Public API::

    from keyvault.secrets import get_source, SecretNotFound
    source = get_source("vault")          # configured from settings.SECRET_SOURCES
    current = source.read("payments/db#password")
    source.write("payments/db#password", new_value)

One module per backend behind :class:`SecretSource`: ``env`` (read-only),
``file``, ``vault`` (KV v2), ``aws`` (Secrets Manager), ``gcp`` (Secret
Manager), ``k8s`` (Kubernetes Secrets API). SDKs are imported lazily; a missing
one is a :class:`SecretSourceConfigurationError` naming the package.

Managed secrets use the sources only through :func:`managed_source`, which never
reaches Keyvault's own secrets (:mod:`keyvault.secrets.managed`).
"""

from .base import (
    FIELD_SEPARATOR,
    CurrentVersionError,
    InvalidSecretReference,
    InvalidSecretValue,
    ReadOnlySource,
    SecretAccessDenied,
    SecretConflict,
    SecretNotFound,
    SecretSource,
    SecretSourceConfigurationError,
    SecretSourceError,
    SecretSourceUnavailable,
    SecretVersion,
    SecretVersionInfo,
    split_field,
)
from .managed import MANAGED_ENV_PREFIX, OwnSecretRefused, managed_source
from .registry import (
    BUILTIN_SOURCES,
    build_source,
    default_source_name,
    get_source,
    load_source_class,
    reset_sources,
    set_config_loader,
    source_names,
)

__all__ = [
    "BUILTIN_SOURCES",
    "FIELD_SEPARATOR",
    "CurrentVersionError",
    "InvalidSecretReference",
    "InvalidSecretValue",
    "MANAGED_ENV_PREFIX",
    "OwnSecretRefused",
    "ReadOnlySource",
    "SecretAccessDenied",
    "SecretConflict",
    "SecretNotFound",
    "SecretSource",
    "SecretSourceConfigurationError",
    "SecretSourceError",
    "SecretSourceUnavailable",
    "SecretVersion",
    "SecretVersionInfo",
    "build_source",
    "default_source_name",
    "get_source",
    "load_source_class",
    "managed_source",
    "reset_sources",
    "set_config_loader",
    "source_names",
    "split_field",
]
