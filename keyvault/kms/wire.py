"""The framing providers write in front of a backend's ciphertext, written and read in one place.

A backend's own ciphertext rarely says which key and version made it, and
``decrypt`` takes no key id, so the providers that need it put a small header in
front (layouts in ``keyvault/kms/README.md``, "Ciphertext framing"). Every
integer is big-endian and every variable-length field carries its length first.

Reading is strict and opaque: a frame that is short, has a field running past
its end, text that does not decode, or a value outside what the caller allows
raises :class:`InvalidCiphertext`, never ``IndexError``, ``struct.error`` or
``UnicodeDecodeError``. Writing raises ``ValueError`` for a value that does not
fit its field; providers validate names before they get here.

The layouts are fixed by ciphertexts already stored: ``tests/keyvault/kms/vectors/framing_v1.json``
holds known-answer vectors captured before this module existed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from struct import Struct

from .errors import InvalidCiphertext

#: The first byte of every framed ciphertext written today.
FORMAT_VERSION = 1

_U16 = Struct(">H")
_U32 = Struct(">I")
_LENGTH_PREFIX = {1: Struct(">B"), 2: _U16}

#: Bytes of a key header besides the key id: format, key id length, u32 version.
KEY_HEADER_FIXED = 2 + _U32.size


def as_frame(ciphertext: object) -> bytes:
    """Return ``ciphertext`` as ``bytes``; ``InvalidCiphertext`` for anything not bytes-like."""
    if type(ciphertext) is bytes:
        return ciphertext
    if not isinstance(ciphertext, (bytearray, memoryview)):
        raise InvalidCiphertext()
    return bytes(ciphertext)


# -- writing ---------------------------------------------------------------------


def u8(value: int) -> bytes:
    """One unsigned byte; ``ValueError`` outside 0..255."""
    return bytes((value,))


def u32(value: int) -> bytes:
    """A big-endian unsigned 32-bit integer; ``ValueError`` outside 0..2**32-1."""
    return value.to_bytes(4, "big")


def prefixed(data: bytes, width: int = 1) -> bytes:
    """``data`` after its length in ``width`` (1 or 2) big-endian bytes; ``ValueError`` if too long."""
    if len(data) >= 256**width:
        raise ValueError(f"{len(data)} bytes do not fit a {width}-byte length prefix")
    return _LENGTH_PREFIX[width].pack(len(data)) + data


# -- reading ---------------------------------------------------------------------


class FrameReader:
    """Reads a frame front to back; every failure is :class:`InvalidCiphertext`."""

    __slots__ = ("data", "offset")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    @property
    def remaining(self) -> int:
        """Bytes not read yet."""
        return len(self.data) - self.offset

    def take(self, length: int) -> bytes:
        """The next ``length`` bytes."""
        end = self.offset + length
        if end > len(self.data):
            raise InvalidCiphertext()
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def u8(self, *allowed: int) -> int:
        """The next byte; when ``allowed`` values are given, it must be one of them."""
        if self.offset >= len(self.data):
            raise InvalidCiphertext()
        value = self.data[self.offset]
        if allowed and value not in allowed:
            raise InvalidCiphertext()
        self.offset += 1
        return value

    def u16(self) -> int:
        """The next big-endian unsigned 16-bit integer."""
        return _U16.unpack(self.take(_U16.size))[0]

    def u32(self, minimum: int = 0) -> int:
        """The next big-endian unsigned 32-bit integer, at least ``minimum``."""
        (value,) = _U32.unpack(self.take(_U32.size))
        if value < minimum:
            raise InvalidCiphertext()
        return value

    def text(self, length: int, encoding: str) -> str:
        """The next ``length`` bytes, decoded."""
        try:
            return self.take(length).decode(encoding)
        except UnicodeDecodeError:
            raise InvalidCiphertext() from None

    def prefixed_text(self, width: int = 1, encoding: str = "utf-8", *, allow_empty: bool = False) -> str:
        """Text after its ``width``-byte length (written by :func:`prefixed`)."""
        length = self.u8() if width == 1 else self.u16()
        if length == 0 and not allow_empty:
            raise InvalidCiphertext()
        return self.text(length, encoding)

    def rest(self, min_length: int = 0) -> bytes:
        """Everything not read yet, at least ``min_length`` bytes of it."""
        if self.remaining < min_length:
            raise InvalidCiphertext()
        return self.take(self.remaining)


# -- the key header: local, pkcs11, gcp ----------------------------------------------
#
#     u8  format version (1)
#     u8  key id length L (1..255)
#     L   key id (UTF-8; ASCII for Cloud KMS)
#     u32 key version
#     ... the backend's ciphertext


@dataclass(frozen=True, slots=True)
class KeyHeader:
    """One provider's key header: what it encodes key ids in, and what its reader accepts.

    :param encoding: of the key id.
    :param key_id_pattern: the key id must ``match`` it (as ``re.match``: the
        pattern anchors its end itself).
    :param min_version: the smallest version a header may name.
    :param min_trailer: bytes the backend's part needs at least after the header.
    """

    encoding: str = "utf-8"
    key_id_pattern: re.Pattern[str] | None = None
    min_version: int = 0
    min_trailer: int = 0

    def pack(self, key_id: str, version: int) -> bytes:
        """The header naming ``key_id`` and ``version``.

        :raises ValueError: the key id is empty, over 255 bytes or not in the
            encoding; the version is outside 0..2**32-1.
        """
        key_bytes = key_id.encode(self.encoding)
        if not key_bytes:
            raise ValueError("a key header needs a key id")
        return u8(FORMAT_VERSION) + prefixed(key_bytes) + u32(version)

    def read(self, frame: bytes) -> tuple[str, int, int]:
        """Return ``(key_id, version, header_end)`` of a frame starting with this header.

        :raises InvalidCiphertext: for anything but a header this provider writes,
            followed by at least ``min_trailer`` bytes.
        """
        reader = FrameReader(frame)
        reader.u8(FORMAT_VERSION)
        key_id = reader.prefixed_text(1, self.encoding)
        version = reader.u32(self.min_version)
        pattern = self.key_id_pattern
        if reader.remaining < self.min_trailer or (pattern is not None and not pattern.match(key_id)):
            raise InvalidCiphertext()
        return key_id, version, reader.offset
