"""The ``keyvault`` app's models, one import path for all of them (app label, tables and migrations unchanged).

``core`` holds the key inventory, the audit log and the managed secrets; ``totp``
the second factors, whose encrypted field sits above the key models (see its
docstring). Code below the console (envelopes, fields, audit) imports
``keyvault.models.core`` directly so that it never depends on this package.
"""

from keyvault.models.core import (
    AppendOnlyQuerySet,
    AuditChainHead,
    AuditChainHeadQuerySet,
    AuditCheckpoint,
    AuditCheckpointQuerySet,
    AuditEvent,
    AuditPendingEvent,
    AuditQuerySet,
    AuditVerification,
    DataKey,
    KeyEncryptionKey,
    KeyVersion,
    ManagedSecret,
    SiemConsumer,
    wrapped_key_fingerprint,
)
from keyvault.models.api import ApiClient, ApiToken
from keyvault.models.preferences import DEFAULT_TIME_ZONE, ConsolePreference
from keyvault.models.totp import DEVICE_GRACE_FAILURES, DEVICE_MAX_BACKOFF_SECONDS, TOTPDevice, new_totp_key

__all__ = [
    "ApiClient",
    "ApiToken",
    "DEFAULT_TIME_ZONE",
    "ConsolePreference",
    "DEVICE_GRACE_FAILURES",
    "DEVICE_MAX_BACKOFF_SECONDS",
    "AppendOnlyQuerySet",
    "AuditChainHead",
    "AuditChainHeadQuerySet",
    "AuditCheckpoint",
    "AuditCheckpointQuerySet",
    "AuditEvent",
    "AuditPendingEvent",
    "AuditQuerySet",
    "AuditVerification",
    "DataKey",
    "KeyEncryptionKey",
    "KeyVersion",
    "ManagedSecret",
    "SiemConsumer",
    "TOTPDevice",
    "new_totp_key",
    "wrapped_key_fingerprint",
]
