"""Canonical encoding of an encryption context, and a context that is encoded once.

An encryption context is a mapping of non-secret strings bound to a ciphertext
as additional authenticated data. Decrypt needs the exact same pairs (case
sensitive); only their order may differ, so the encoding sorts by key.

Layout: ``u32 count`` then, per pair sorted by key, ``u32 len(key) ‖ key ‖
u32 len(value) ‖ value`` (UTF-8, big-endian lengths). Length prefixes make the
encoding injective: ``{"a": "bc"}`` and ``{"ab": "c"}`` never collide.

Encoding a two-pair context costs about a microsecond, as much as the AES-GCM
call it protects, and a plain mapping is encoded afresh on every call (it may
have changed since). A context used more than once (a field's, a tenant's) is
better built once as a :class:`BoundContext`: an immutable, hashable mapping
holding its encoding, which every provider and the envelope take as it stands.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from struct import Struct

_U32 = Struct(">I")
EMPTY_CONTEXT = _U32.pack(0)
MAX_CONTEXT_BYTES = 64 * 1024  # Cloud KMS's AAD limit; keeps every backend usable.


def _encode_pairs(context: Mapping[str, str]) -> bytes:
    parts = [_U32.pack(len(context))]
    for key in sorted(context):
        value = context[key]
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("encryption context keys and values must be str")
        key_bytes = key.encode("utf-8")
        value_bytes = value.encode("utf-8")
        parts += (_U32.pack(len(key_bytes)), key_bytes, _U32.pack(len(value_bytes)), value_bytes)
    encoded = b"".join(parts)
    if len(encoded) > MAX_CONTEXT_BYTES:
        raise ValueError(f"encryption context is larger than {MAX_CONTEXT_BYTES} bytes")
    return encoded


class BoundContext(Mapping):
    """An encryption context fixed at construction, with its canonical encoding computed once.

    Accepted wherever a context mapping is (it *is* a ``Mapping[str, str]``):
    ``BoundContext({"tenant": "acme"})`` seals and opens exactly what the dict
    does, byte for byte. It cannot change, hashes by its encoding and equals any
    mapping with the same pairs. It is not a ``dict``: ``json.dumps`` wants
    ``dict(context)``.

    :raises TypeError: a key or value is not a ``str``.
    :raises ValueError: the encoding exceeds :data:`MAX_CONTEXT_BYTES`.
    """

    __slots__ = ("_pairs", "encoded")

    def __init__(self, pairs: Mapping[str, str] | None = None, /) -> None:
        if pairs is None:
            own = {}
        elif type(pairs) is dict or isinstance(pairs, Mapping):
            own = dict(pairs)
        else:
            raise TypeError("an encryption context must be a mapping of str to str")
        encoded = _encode_pairs(own) if own else EMPTY_CONTEXT
        object.__setattr__(self, "_pairs", own)
        #: the canonical bytes (:func:`encode_context`); ``EMPTY_CONTEXT`` itself when empty.
        object.__setattr__(self, "encoded", encoded)

    def __getitem__(self, key: str) -> str:
        return self._pairs[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def __contains__(self, key: object) -> bool:
        return key in self._pairs

    def keys(self):
        return self._pairs.keys()

    def items(self):
        return self._pairs.items()

    def values(self):
        return self._pairs.values()

    def __eq__(self, other: object) -> bool:
        if type(other) is BoundContext:
            return self.encoded == other.encoded
        if isinstance(other, Mapping):
            return self._pairs == dict(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.encoded)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a BoundContext cannot change; build a new one")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("a BoundContext cannot change; build a new one")

    def __reduce__(self):
        return (BoundContext, (self._pairs,))

    def __repr__(self) -> str:
        return f"BoundContext({self._pairs!r})"


#: The empty context, bound (what ``None`` and ``{}`` mean).
EMPTY_BOUND = BoundContext()


def bind_context(context: Mapping[str, str] | None) -> BoundContext:
    """``context`` as a :class:`BoundContext`: itself if it is one, else bound (encoded) now.

    :raises TypeError, ValueError: as :func:`encode_context`.
    """
    if type(context) is BoundContext:
        return context
    return BoundContext(context) if context else EMPTY_BOUND


def encode_context(context: Mapping[str, str] | None) -> bytes:
    """Return the canonical bytes of ``context`` (``None`` and ``{}`` are the same).

    A :class:`BoundContext` costs an attribute read; any other mapping is encoded now.

    :raises TypeError: a key or value is not a ``str``.
    :raises ValueError: the encoding exceeds :data:`MAX_CONTEXT_BYTES`.
    """
    if type(context) is BoundContext:
        return context.encoded
    if not context:
        return EMPTY_CONTEXT
    return _encode_pairs(context)


def normalise_context(context: Mapping[str, str] | None) -> dict[str, str]:
    """Return ``context`` as a plain dict, validated like :func:`encode_context`."""
    encode_context(context)
    return dict(context or {})
