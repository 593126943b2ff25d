"""Canonical encoding of an encryption context.

An encryption context is a mapping of non-secret strings bound to a ciphertext
as additional authenticated data. Decrypt needs the exact same pairs (case
sensitive); only their order may differ, so the encoding sorts by key.

Layout: ``u32 count`` then, per pair sorted by key, ``u32 len(key) ‖ key ‖
u32 len(value) ‖ value`` (UTF-8, big-endian lengths). Length prefixes make the
encoding injective: ``{"a": "bc"}`` and ``{"ab": "c"}`` never collide.
"""

from __future__ import annotations

from collections.abc import Mapping
from struct import Struct

_U32 = Struct(">I")
EMPTY_CONTEXT = _U32.pack(0)
MAX_CONTEXT_BYTES = 64 * 1024  # Cloud KMS's AAD limit; keeps every backend usable.


def encode_context(context: Mapping[str, str] | None) -> bytes:
    """Return the canonical bytes of ``context`` (``None`` and ``{}`` are the same).

    :raises TypeError: a key or value is not a ``str``.
    :raises ValueError: the encoding exceeds :data:`MAX_CONTEXT_BYTES`.
    """
    if not context:
        return EMPTY_CONTEXT
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


def normalise_context(context: Mapping[str, str] | None) -> dict[str, str]:
    """Return ``context`` as a plain dict, validated like :func:`encode_context`."""
    encode_context(context)
    return dict(context or {})
