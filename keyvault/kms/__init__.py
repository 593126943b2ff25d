"""Keyvault's KMS layer: one provider contract, several backends, envelope encryption.

Nothing in this package imports Django; see ``README.md`` beside this file.
"""

from .base import (
    Capability,
    DataKey,
    DecryptResult,
    EncryptResult,
    HealthStatus,
    KeyInfo,
    KeyState,
    KeyVersionInfo,
    KMSProvider,
    RewrapItem,
    RewrapOutcome,
    VersionState,
)
from .cache import DataKeyCache
from .context import BoundContext, encode_context
from .envelope import EnvelopeEncryptor, EnvelopeHeader, read_header
from .errors import (
    AccessDenied,
    ConfigurationError,
    InvalidCiphertext,
    KeyDisabled,
    KeyNotFound,
    KMSError,
    ProviderUnavailable,
    StorageUnavailable,
    Throttled,
    UnsupportedOperation,
)
from .registry import get_provider, provider_names, reset_providers, set_config_loader

__all__ = [
    "AccessDenied",
    "BoundContext",
    "Capability",
    "ConfigurationError",
    "DataKey",
    "DataKeyCache",
    "DecryptResult",
    "EncryptResult",
    "EnvelopeEncryptor",
    "EnvelopeHeader",
    "HealthStatus",
    "InvalidCiphertext",
    "KMSError",
    "KMSProvider",
    "KeyDisabled",
    "KeyInfo",
    "KeyNotFound",
    "KeyState",
    "KeyVersionInfo",
    "ProviderUnavailable",
    "RewrapItem",
    "RewrapOutcome",
    "StorageUnavailable",
    "Throttled",
    "UnsupportedOperation",
    "VersionState",
    "encode_context",
    "get_provider",
    "provider_names",
    "read_header",
    "reset_providers",
    "set_config_loader",
]
