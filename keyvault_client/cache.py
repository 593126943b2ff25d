"""A local cache of unwrapped data keys, with the limits of Keyvault's server-side ``DataKeyCache``.

An entry is one data key's plaintext, keyed by (data key id, canonical encryption context):
the same id asked for under another context is a miss and goes to the server, which checks
that context, so the cache never lets a caller skip the context check it would otherwise
face. Each entry lives at most ``max_age`` seconds and serves at most ``max_uses`` lookups;
at most ``max_entries`` are kept (least recently used out first). An entry leaving the cache
for any of these reasons has its bytes overwritten with zeros before it is dropped.

The defaults are those of ``keyvault.kms.cache.DataKeyCache`` (300 s, 2**20 uses per key,
1,000 entries).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

DEFAULT_MAX_AGE = 300.0
DEFAULT_MAX_USES = 2**20
DEFAULT_MAX_ENTRIES = 1000


def canonical_context(context: Mapping[str, str] | None) -> str:
    """One spelling per context: sorted keys, no whitespace, so {a, b} and {b, a} are the same entry."""
    return json.dumps(dict(context or {}), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(eq=False)
class _Entry:
    key: bytearray = field(repr=False)
    expires_at: float
    uses: int = 0

    def wipe(self) -> None:
        self.key[:] = bytes(len(self.key))


class DataKeyCache:
    """Thread-safe, bounded cache of data-key plaintexts for :class:`~keyvault_client.KeyvaultClient`."""

    def __init__(self, *, max_entries: int = DEFAULT_MAX_ENTRIES, max_age: float = DEFAULT_MAX_AGE,
                 max_uses: int = DEFAULT_MAX_USES, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1 or max_uses < 1 or not max_age > 0:
            raise ValueError("max_entries, max_uses and max_age must be positive")
        self.max_entries, self.max_age, self.max_uses, self.clock = max_entries, float(max_age), max_uses, clock
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple[int, str], _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, data_key_id: int, context: Mapping[str, str] | None) -> bytes | None:
        """The cached plaintext (one use counted), or ``None``; an expired or used-up entry is wiped."""
        lookup = (int(data_key_id), canonical_context(context))
        with self._lock:
            entry = self._entries.get(lookup)
            if entry is not None and self.clock() < entry.expires_at and entry.uses < self.max_uses:
                entry.uses += 1
                self._entries.move_to_end(lookup)
                self.hits += 1
                return bytes(entry.key)
            if entry is not None:
                del self._entries[lookup]
            self.misses += 1
        if entry is not None:
            entry.wipe()
        return None

    def put(self, data_key_id: int, context: Mapping[str, str] | None, plaintext: bytes) -> None:
        """Remember ``plaintext`` for this id under exactly this context."""
        lookup = (int(data_key_id), canonical_context(context))
        evicted = []
        with self._lock:
            previous = self._entries.pop(lookup, None)
            if previous is not None:
                evicted.append(previous)
            self._entries[lookup] = _Entry(bytearray(plaintext), self.clock() + self.max_age)
            while len(self._entries) > self.max_entries:
                evicted.append(self._entries.popitem(last=False)[1])
        for entry in evicted:
            entry.wipe()

    def clear(self) -> None:
        """Drop and wipe every entry."""
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            entry.wipe()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (f"DataKeyCache(entries={len(self)}, max_entries={self.max_entries}, max_age={self.max_age:g}, "
                f"max_uses={self.max_uses}, hits={self.hits}, misses={self.misses})")
