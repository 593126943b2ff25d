"""What a backend module hands the provider contract suite."""

from __future__ import annotations

import itertools
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
    :param key_prefix: names created by the suite start with this.
    """

    provider: KMSProvider
    broken_provider: Callable[[], KMSProvider]
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
