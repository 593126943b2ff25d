"""Local provider: AES-256-GCM keys in a keyring file encrypted under a master key.

For development and single-host use. The KEKs live on the same disk as the
data they protect, guarded only by the master key in ``HMD_LOCAL_KMS_MASTER_KEY``;
use a real KMS (AWS, Cloud KMS, Vault Transit, an HSM) in production.

Ciphertext layout (all integers big-endian)::

    u8  format version (1)
    u8  key id length L (1..255)
    L   key id, UTF-8
    u32 key version
    12  nonce (random per encryption)
    N   AES-GCM ciphertext ‖ 16-byte tag

The AAD is everything before the nonce followed by the canonical encryption
context, so no header byte and no context pair can change undetected.

The keyring file is written atomically (temp file, fsync, rename, fsync of the
directory) with mode 0600 under an exclusive ``flock`` on a sibling lock file,
so a web process and several workers can share it. Each version counts its
encryptions (NIST SP 800-38D allows at most 2^32 random-nonce encryptions per
key); to keep the hot path off the disk a process reserves counts in blocks,
so the stored count is an upper bound of the encryptions really made.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
import re
import secrets
import tempfile
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from struct import Struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .base import (
    Capability,
    DataKey,
    DecryptResult,
    EncryptionContext,
    EncryptResult,
    HealthStatus,
    KeyInfo,
    KeyState,
    KeyVersionInfo,
    KMSProvider,
    VersionState,
)
from .context import encode_context
from .errors import ConfigurationError, InvalidCiphertext, KeyDisabled, KeyNotFound, UnsupportedOperation

FORMAT_VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
DEFAULT_MAX_ENCRYPTIONS = 2**30
DEFAULT_RESERVATION_BLOCK = 4096

_VERSION = Struct(">I")
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,254}$")
_KEYRING_MAGIC = b"KVKR\x01"
_KEYRING_AAD = b"keyvault local keyring v1"
_MIN_CIPHERTEXT = 2 + 1 + _VERSION.size + NONCE_BYTES + TAG_BYTES


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def decode_master_key(encoded: str | bytes) -> bytes:
    """Decode a base64 master key and check it is 32 bytes.

    :raises ConfigurationError: not base64, or not 32 bytes.
    """
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError("HMD_LOCAL_KMS_MASTER_KEY must be 32 random bytes, base64-encoded") from None
    if len(key) != 32:
        raise ConfigurationError("HMD_LOCAL_KMS_MASTER_KEY must be 32 random bytes, base64-encoded")
    return key


def generate_master_key() -> str:
    """Return a new random master key, base64-encoded."""
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")


@dataclass(slots=True)
class _Reservation:
    """Encryptions this process may still make with one version before asking the file."""

    pid: int
    remaining: int


class LocalKMSProvider(KMSProvider):
    """AES-256-GCM KEKs kept in a local, master-key-encrypted keyring file."""

    name = "local"
    capabilities = frozenset(
        {
            Capability.DISABLE_VERSION,
            Capability.DESTROY_VERSION,
            Capability.DISABLE_KEY,
            Capability.ENCRYPT_COUNT,
            Capability.DESTROY_KEY,
        }
    )

    def __init__(
        self,
        keyring_path: str | os.PathLike,
        master_key: bytes | str,
        *,
        max_encryptions_per_version: int = DEFAULT_MAX_ENCRYPTIONS,
        reservation_block: int = DEFAULT_RESERVATION_BLOCK,
    ) -> None:
        if isinstance(master_key, str):
            master_key = decode_master_key(master_key)
        if len(master_key) != 32:
            raise ConfigurationError("the local KMS master key must be 32 bytes")
        if max_encryptions_per_version < 1 or reservation_block < 1:
            raise ConfigurationError("encryption limits must be positive")
        self.path = Path(keyring_path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._master = AESGCM(master_key)
        self.max_encryptions = max_encryptions_per_version
        self.reservation_block = reservation_block
        self._mutex = threading.RLock()
        self._keyring: dict = {"keys": {}}
        self._signature: tuple | None = None
        self._ciphers: dict[tuple[str, int], AESGCM] = {}
        self._reservations: dict[tuple[str, int], _Reservation] = {}

    @classmethod
    def from_config(cls, options: dict) -> LocalKMSProvider:
        """Build from the ``local`` entry of the provider settings."""
        try:
            return cls(
                options["keyring_path"],
                options["master_key"],
                max_encryptions_per_version=int(options.get("max_encryptions_per_version", DEFAULT_MAX_ENCRYPTIONS)),
                reservation_block=int(options.get("reservation_block", DEFAULT_RESERVATION_BLOCK)),
            )
        except KeyError as missing:
            raise ConfigurationError(f"local KMS provider needs the {missing.args[0]!r} option") from None

    # -- keyring file --------------------------------------------------

    def _file_signature(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read_keyring(self) -> dict:
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            return {"keys": {}}
        except OSError as exc:
            raise ConfigurationError(f"local keyring {self.path} is unreadable: {exc.strerror}") from None
        if not blob.startswith(_KEYRING_MAGIC) or len(blob) < len(_KEYRING_MAGIC) + NONCE_BYTES + TAG_BYTES:
            raise ConfigurationError(f"local keyring {self.path} is not a Keyvault keyring")
        nonce = blob[len(_KEYRING_MAGIC) : len(_KEYRING_MAGIC) + NONCE_BYTES]
        try:
            data = self._master.decrypt(nonce, blob[len(_KEYRING_MAGIC) + NONCE_BYTES :], _KEYRING_AAD)
        except InvalidTag:
            raise ConfigurationError(
                f"local keyring {self.path} cannot be opened with this master key (wrong HMD_LOCAL_KMS_MASTER_KEY?)"
            ) from None
        return json.loads(data)

    def _write_keyring(self, keyring: dict) -> None:
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._master.encrypt(nonce, json.dumps(keyring, sort_keys=True).encode(), _KEYRING_AAD)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(_KEYRING_MAGIC + nonce + sealed)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _current(self) -> dict:
        """Return the keyring, reloading it when another process changed the file."""
        signature = self._file_signature()
        if signature != self._signature:
            with self._mutex:
                self._keyring = self._read_keyring()
                self._signature = signature
        return self._keyring

    def _mutate(self, change):
        """Apply ``change(keyring)`` under the file lock and persist it atomically."""
        with self._mutex:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
                keyring = self._read_keyring()
                result = change(keyring)
                self._write_keyring(keyring)
                self._keyring = keyring
                self._signature = self._file_signature()
                return result
            finally:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
                os.close(lock_fd)

    # -- lookups -------------------------------------------------------

    @staticmethod
    def _key(keyring: dict, key_id: str) -> dict:
        try:
            return keyring["keys"][key_id]
        except KeyError:
            raise KeyNotFound(f"local key {key_id!r} does not exist") from None

    @staticmethod
    def _version(key: dict, key_id: str, version: int) -> dict:
        try:
            return key["versions"][str(version)]
        except KeyError:
            raise KeyNotFound(f"local key {key_id!r} has no version {version}") from None

    def _cipher(self, key_id: str, version: int, record: dict) -> AESGCM:
        cipher = self._ciphers.get((key_id, version))
        if cipher is None:
            cipher = AESGCM(base64.b64decode(record["material"]))
            self._ciphers[(key_id, version)] = cipher
        return cipher

    @staticmethod
    def _info(key_id: str, key: dict) -> KeyInfo:
        versions = tuple(
            KeyVersionInfo(
                version=int(number),
                state=VersionState(record["state"]),
                created_at=datetime.fromisoformat(record["created_at"]),
                encrypt_count=record["encrypt_count"],
            )
            for number, record in sorted(key["versions"].items(), key=lambda item: int(item[0]))
        )
        return KeyInfo(
            key_id=key_id,
            state=KeyState(key["state"]),
            primary_version=key["primary"],
            versions=versions,
            created_at=datetime.fromisoformat(key["created_at"]),
            description=key.get("description", ""),
        )

    @staticmethod
    def _new_version_record() -> dict:
        return {
            "material": base64.b64encode(secrets.token_bytes(32)).decode("ascii"),
            "state": VersionState.ENABLED.value,
            "created_at": _now().isoformat(),
            "encrypt_count": 0,
        }

    # -- key lifecycle -------------------------------------------------

    def create_key(self, key_id: str, *, description: str = "") -> KeyInfo:
        if not isinstance(key_id, str) or not _KEY_ID.match(key_id):
            raise ConfigurationError(
                f"invalid local key id {key_id!r}: 1-255 characters of letters, digits and _ . : / -"
            )

        def change(keyring: dict) -> KeyInfo:
            if key_id in keyring["keys"]:
                raise ConfigurationError(f"local key {key_id!r} already exists")
            key = {
                "state": KeyState.ENABLED.value,
                "description": description,
                "created_at": _now().isoformat(),
                "primary": 1,
                "versions": {"1": self._new_version_record()},
            }
            keyring["keys"][key_id] = key
            return self._info(key_id, key)

        return self._mutate(change)

    def describe_key(self, key_id: str) -> KeyInfo:
        return self._info(key_id, self._key(self._current(), key_id))

    def rotate_key(self, key_id: str) -> KeyVersionInfo:
        def change(keyring: dict) -> KeyVersionInfo:
            key = self._key(keyring, key_id)
            self._require_usable_key(key, key_id)
            number = max(int(n) for n in key["versions"]) + 1
            key["versions"][str(number)] = self._new_version_record()
            key["primary"] = number
            return self._info(key_id, key).version(number)

        return self._mutate(change)

    def set_key_version_state(self, key_id: str, version: int, state: VersionState) -> KeyVersionInfo:
        state = VersionState(state)
        if state is VersionState.DESTROY_SCHEDULED:
            raise UnsupportedOperation("local provider destroys versions at once; use DESTROYED")

        def change(keyring: dict) -> KeyVersionInfo:
            key = self._key(keyring, key_id)
            record = self._version(key, key_id, version)
            if version == key["primary"] and state is not VersionState.ENABLED:
                raise KeyDisabled(f"version {version} of {key_id!r} is primary; rotate before retiring it")
            if record["state"] == VersionState.DESTROYED and state is not VersionState.DESTROYED:
                raise KeyDisabled(f"version {version} of {key_id!r} is destroyed and cannot come back")
            record["state"] = state.value
            if state is VersionState.DESTROYED:
                record["material"] = None
                self._ciphers.pop((key_id, version), None)
            return self._info(key_id, key).version(version)

        return self._mutate(change)

    def set_key_state(self, key_id: str, state: KeyState) -> KeyInfo:
        state = KeyState(state)
        if state is KeyState.DESTROYED:
            raise UnsupportedOperation("use destroy_key to destroy a key")

        def change(keyring: dict) -> KeyInfo:
            key = self._key(keyring, key_id)
            if key["state"] == KeyState.DESTROYED:
                raise KeyDisabled(f"local key {key_id!r} is destroyed")
            key["state"] = state.value
            return self._info(key_id, key)

        return self._mutate(change)

    def destroy_key(self, key_id: str) -> None:
        def change(keyring: dict) -> None:
            key = self._key(keyring, key_id)
            key["state"] = KeyState.DESTROYED.value
            for number, record in key["versions"].items():
                record["state"] = VersionState.DESTROYED.value
                record["material"] = None
                self._ciphers.pop((key_id, int(number)), None)

        self._mutate(change)

    # -- cryptography --------------------------------------------------

    @staticmethod
    def _require_usable_key(key: dict, key_id: str) -> None:
        if key["state"] != KeyState.ENABLED:
            raise KeyDisabled(f"local key {key_id!r} is {key['state'].replace('_', ' ')}")

    def _reserve_encryption(self, key_id: str, version: int) -> None:
        """Count one encryption, going to the keyring file only once per block."""
        slot = (key_id, version)
        reservation = self._reservations.get(slot)
        pid = os.getpid()
        if reservation is not None and reservation.pid == pid and reservation.remaining > 0:
            reservation.remaining -= 1
            return

        def change(keyring: dict) -> int:
            record = self._version(self._key(keyring, key_id), key_id, version)
            available = self.max_encryptions - record["encrypt_count"]
            if available <= 0:
                raise KeyDisabled(
                    f"version {version} of {key_id!r} reached its limit of {self.max_encryptions} encryptions; rotate the key"
                )
            granted = min(self.reservation_block, available)
            record["encrypt_count"] += granted
            return granted

        with self._mutex:
            granted = self._mutate(change)
            self._reservations[slot] = _Reservation(pid=pid, remaining=granted - 1)

    def _primary(self, key_id: str) -> tuple[int, AESGCM]:
        key = self._key(self._current(), key_id)
        self._require_usable_key(key, key_id)
        version = key["primary"]
        record = key["versions"][str(version)]
        if record["state"] != VersionState.ENABLED:
            raise KeyDisabled(f"primary version {version} of {key_id!r} is {record['state']}")
        return version, self._cipher(key_id, version, record)

    @staticmethod
    def _header(key_id: str, version: int) -> bytes:
        key_bytes = key_id.encode("utf-8")
        return bytes((FORMAT_VERSION, len(key_bytes))) + key_bytes + _VERSION.pack(version)

    def encrypt(
        self, key_id: str, plaintext: bytes, *, encryption_context: EncryptionContext | None = None
    ) -> EncryptResult:
        version, cipher = self._primary(key_id)
        self._reserve_encryption(key_id, version)
        header = self._header(key_id, version)
        nonce = os.urandom(NONCE_BYTES)
        sealed = cipher.encrypt(nonce, plaintext, header + encode_context(encryption_context))
        return EncryptResult(ciphertext=header + nonce + sealed, key_id=key_id, key_version=version)

    def decrypt(self, ciphertext: bytes, *, encryption_context: EncryptionContext | None = None) -> DecryptResult:
        if type(ciphertext) is not bytes:
            ciphertext = self._as_bytes(ciphertext)
        key_id, version, header_end = self._parse_header(ciphertext)
        key = self._current()["keys"].get(key_id)
        record = key["versions"].get(str(version)) if key else None
        if record is None:
            raise InvalidCiphertext()
        if record["material"] is None:
            raise KeyDisabled(f"version {version} of {key_id!r} is destroyed")
        aad = ciphertext[:header_end] + encode_context(encryption_context)
        nonce = ciphertext[header_end : header_end + NONCE_BYTES]
        try:
            plaintext = self._cipher(key_id, version, record).decrypt(nonce, ciphertext[header_end + NONCE_BYTES :], aad)
        except InvalidTag:
            raise InvalidCiphertext() from None
        # Only an authentic ciphertext learns that its key or version is switched off.
        if key["state"] != KeyState.ENABLED:
            raise KeyDisabled(f"local key {key_id!r} is {key['state'].replace('_', ' ')}")
        if record["state"] != VersionState.ENABLED:
            raise KeyDisabled(f"version {version} of {key_id!r} is {record['state']}")
        return DecryptResult(plaintext=plaintext, key_id=key_id, key_version=version)

    @staticmethod
    def _as_bytes(ciphertext: object) -> bytes:
        if not isinstance(ciphertext, (bytes, bytearray, memoryview)):
            raise InvalidCiphertext()
        return bytes(ciphertext)

    @staticmethod
    def _parse_header(ciphertext: bytes) -> tuple[str, int, int]:
        if len(ciphertext) < _MIN_CIPHERTEXT or ciphertext[0] != FORMAT_VERSION:
            raise InvalidCiphertext()
        key_len = ciphertext[1]
        header_end = 2 + key_len + _VERSION.size
        if key_len == 0 or len(ciphertext) < header_end + NONCE_BYTES + TAG_BYTES:
            raise InvalidCiphertext()
        try:
            key_id = ciphertext[2 : 2 + key_len].decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidCiphertext() from None
        (version,) = _VERSION.unpack_from(ciphertext, 2 + key_len)
        return key_id, version, header_end

    def generate_data_key(
        self,
        key_id: str,
        *,
        encryption_context: EncryptionContext | None = None,
        key_spec: str = "AES_256",
    ) -> DataKey:
        plaintext = bytearray(os.urandom(self.key_length(key_spec)))
        wrapped = self.encrypt(key_id, plaintext, encryption_context=encryption_context)
        return DataKey(plaintext=plaintext, ciphertext=wrapped.ciphertext, key_id=key_id, key_version=wrapped.key_version)

    def health_check(self) -> HealthStatus:
        def probe() -> str:
            keyring = self._read_keyring()
            if not self.path.exists():
                return f"keyring {self.path} not created yet (no keys)"
            return f"keyring {self.path} opened, {len(keyring['keys'])} key(s)"

        return self.timed_health(probe)
