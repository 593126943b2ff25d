"""Re-keying the local provider's keyring: a new master key for ``HMD_LOCAL_KMS_MASTER_KEY``.

``manage.py kms rekey-local`` calls :func:`rekey_local_keyring`. The cryptography and the
atomic swap are the provider's (:meth:`keyvault.kms.local.LocalKMSProvider.rekey`); this
service decides where the new key comes from, keeps it on disk before the keyring depends
on it, switches a development instance over, and records the audit event.

Order, and what a crash at each point leaves (``docs/ops/keyvault-secrets.md``):

1. the new key is in a file (given, or generated 0600 into ``HMD_DATA_DIR`` and fsynced) —
   the keyring is untouched, the old key opens it;
2. the keyring is swapped under its lock (temp file, fsync, read back, rename) — before the
   rename the old key opens it, after it only the new key in that file does;
3. on a development instance (key generated into ``HMD_DATA_DIR``) that file is replaced
   with the new key, so the instance keeps working; elsewhere the operator switches the
   configuration. A run stopped between 2 and 3 is finished by running again with
   ``--new-master-key-file`` naming the file of step 1.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from django.conf import settings

from keyvault.audit import Actor, events
from keyvault.config import is_set
from keyvault.kms import ConfigurationError, get_provider
from keyvault.kms.local import (
    DEVELOPMENT_MASTER_KEY_FILE,
    LocalKMSProvider,
    read_master_key_file,
    write_master_key_file,
)

MASTER_KEY_VARIABLE = "HMD_LOCAL_KMS_MASTER_KEY"


@dataclass(frozen=True)
class RekeyOutcome:
    """What :func:`rekey_local_keyring` did."""

    keys: int
    #: the file holding the new master key (the operator's, or one generated into HMD_DATA_DIR).
    new_key_file: Path
    generated: bool
    #: the keyring was already sealed under the new key (a re-keying finished after its swap).
    already: bool
    #: the development key file now holding the new key, or None when the key is configured.
    development_key_file: Path | None
    fingerprint: str


def uses_development_key() -> bool:
    """Whether the master key is the one generated into HMD_DATA_DIR (development, nothing configured)."""
    return settings.DEBUG and not (is_set(MASTER_KEY_VARIABLE) or is_set(MASTER_KEY_VARIABLE + "_REF"))


def key_fingerprint(key: bytes) -> str:
    """A short SHA-256 fingerprint of a 256-bit random key, to tell keys apart in the audit log."""
    return "sha256:" + hashlib.sha256(key).hexdigest()[:16]


def local_provider() -> LocalKMSProvider:
    """The configured local provider, unwrapped from its metrics proxy.

    :raises ConfigurationError: the local provider is not configured here.
    """
    if not settings.LOCAL_KMS_MASTER_KEY:
        raise ConfigurationError("the local provider is not configured here (no HMD_LOCAL_KMS_MASTER_KEY)")
    provider = get_provider("local")
    provider = getattr(provider, "wrapped", provider)
    if not isinstance(provider, LocalKMSProvider):
        raise ConfigurationError("the 'local' provider is not Keyvault's local keyring provider")
    return provider


def rekey_local_keyring(*, actor: Actor, new_key_file: str | Path | None = None,
                        now: datetime | None = None) -> RekeyOutcome:
    """Re-encrypt the local keyring under a new master key, atomically (see the module docstring).

    :param new_key_file: a file (0600) holding the new key, base64; ``None`` generates one
        into ``HMD_DATA_DIR/local_kms_master_key.<UTC time>``.
    :raises ConfigurationError: the file is missing, unreadable, readable by others or holds
        no valid key; the new key is the current one; no key opens the keyring.
    :raises StorageUnavailable: the keyring's folder refused the write; nothing changed.
    """
    provider = local_provider()
    if new_key_file is not None:
        path = Path(new_key_file)
        key = read_master_key_file(path)
        if path.stat().st_mode & 0o077:
            raise ConfigurationError(f"master key file {path} is readable by others; chmod 600 it first")
        generated = False
    else:
        now = now or datetime.now(UTC)
        path = Path(settings.DATA_DIR) / f"{DEVELOPMENT_MASTER_KEY_FILE}.{now:%Y%m%dT%H%M%SZ}"
        key = secrets.token_bytes(32)
        write_master_key_file(path, key)
        generated = True
    try:
        result = provider.rekey(key)
    except ConfigurationError:
        if generated:  # refused before anything changed: the generated key was never used
            path.unlink(missing_ok=True)
        raise
    development_file = None
    if uses_development_key():
        development_file = Path(settings.DATA_DIR) / DEVELOPMENT_MASTER_KEY_FILE
        write_master_key_file(development_file, key, replace=True)
    fingerprint = key_fingerprint(key)
    events.local_master_key_rekeyed(
        str(provider.path), actor=actor, keys=result.keys, new_key_file=str(path), generated=generated,
        fingerprint=fingerprint, already=result.already,
        development_key_file=str(development_file) if development_file else None,
    )
    return RekeyOutcome(keys=result.keys, new_key_file=path, generated=generated, already=result.already,
                        development_key_file=development_file, fingerprint=fingerprint)
