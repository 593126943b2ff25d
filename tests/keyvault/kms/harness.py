"""What a backend module hands the provider contract suite."""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from keyvault.kms import KMSProvider


@dataclass
class Harness:
    """A provider connected to a running backend, plus what the suite needs around it.

    :param provider: a ready provider against the running backend.
    :param broken_provider: builds a provider of the same kind whose backend cannot be
        reached or read (server stopped, wrong port, unreadable keyring, ...).
    :param name_version: rewrites a ciphertext so that its (unauthenticated) header names
        another version of the same key: how a forger would try versions.
    :param key_prefix: names created by the suite start with this.
    :param broken_is_down: ``broken_provider`` stands for a backend that is down (a closed port:
        ``ProviderUnavailable``) rather than one that is misconfigured (``ConfigurationError``).
    """

    provider: KMSProvider
    broken_provider: Callable[[], KMSProvider]
    name_version: Callable[[bytes, int], bytes]
    broken_is_down: bool = True
    key_prefix: str = field(default_factory=lambda: f"contract-{uuid.uuid4().hex[:8]}")
    _counter: itertools.count = field(default_factory=itertools.count)

    def new_key_id(self) -> str:
        """Return a fresh key name that does not exist yet at the backend."""
        return f"{self.key_prefix}-{next(self._counter)}"

    def new_key(self) -> str:
        """Create a fresh key and return its id."""
        key_id = self.new_key_id()
        self.provider.create_key(key_id, description="contract suite")
        return key_id


# -- forging a version number, one per ciphertext layout --------------------------------


def version_after_key_id(ciphertext: bytes, version: int) -> bytes:
    """local, pkcs11, gcp: ``format ‖ u8 L ‖ key id (L) ‖ u32 version ‖ …``."""
    at = 2 + ciphertext[1]
    return ciphertext[:at] + version.to_bytes(4, "big") + ciphertext[at + 4 :]


def vault_version(ciphertext: bytes, version: int) -> bytes:
    """vault: ``format ‖ u8 L ‖ key name ‖ "vault:v<N>:…"``."""
    return re.sub(rb"vault:v\d+:", f"vault:v{version}:".encode(), ciphertext, count=1)


def aws_version(ciphertext: bytes, version: int) -> bytes:
    """aws: ``format ‖ payload ‖ u16 ‖ reference ‖ u16 ‖ key ARN ‖ u32 version ‖ AWS blob``."""
    at = 2
    for _ in range(2):  # the reference, then the key ARN
        at += 2 + int.from_bytes(ciphertext[at : at + 2], "big")
    return ciphertext[:at] + version.to_bytes(4, "big") + ciphertext[at + 4 :]
