"""Local provider: AES-256-GCM KEKs in a keyring file encrypted under a master key.

For development and single-host use only: the KEKs sit on the same disk as the
data, guarded by ``HMD_LOCAL_KMS_MASTER_KEY`` alone. A ciphertext is the key
header of :mod:`keyvault.kms.wire` (:data:`HEADER`) ‖ 12-byte random nonce ‖
AES-GCM ciphertext ‖ 16-byte tag; the AAD is the header ‖ the canonical
encryption context.

Several processes share one keyring: changes are written atomically under a
``flock`` and announced through a change counter in the lock file that every
process maps into memory, so ``encrypt`` and ``decrypt`` notice them at the cost
of a memory read (and still ``stat`` the keyring once a second). Encryptions are
counted per version in reserved blocks; at ``max_encryptions_per_version`` the
version refuses to encrypt (:class:`KeyDisabled`). The hot paths inline that
check and the header lookup on purpose (``keyvault/kms/README.md``, "Performance").

Operator's guide: ``docs/ops/kms-providers.md``; file layouts: ``keyvault/kms/README.md``.
"""

from __future__ import annotations

import base64
import binascii
import errno
import fcntl
import itertools
import json
import mmap
import os
import re
import secrets
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .base import (
    KEY_SPECS,
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
    RewrapItem,
    RewrapOutcome,
    VersionState,
)
from .context import EMPTY_BOUND, BoundContext, bind_context, encode_context
from .errors import (
    ConfigurationError,
    InvalidCiphertext,
    KeyDisabled,
    KeyNotFound,
    KMSError,
    ProviderUnavailable,
    StorageUnavailable,
    UnsupportedOperation,
)
from .options import Option
from .wire import KEY_HEADER_FIXED, KeyHeader, as_frame

NONCE_BYTES = 12
TAG_BYTES = 16
DEFAULT_MAX_ENCRYPTIONS = 2**30
DEFAULT_RESERVATION_BLOCK = 4096
#: A process that uses up a block within RESERVATION_GROWTH_SECONDS asks for four times as many next time,
#: up to this: a busy process writes the keyring seldom, an idle one wastes little of the limit when it exits.
DEFAULT_MAX_RESERVATION_BLOCK = 65536
RESERVATION_GROWTH_SECONDS = 1.0

_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,254}$")
_KEYRING_MAGIC = b"KVKR\x01"
_KEYRING_AAD = b"keyvault local keyring v1"
_TRAILER_MIN = NONCE_BYTES + TAG_BYTES
#: The ciphertext header (keyvault/kms/wire.py): key id in UTF-8, then the nonce and the sealed data.
HEADER = KeyHeader(min_trailer=_TRAILER_MIN)
_GENERATION_SIZE = 8  # one unsigned 64-bit counter, native byte order
_monotonic = time.monotonic
#: Longest time a process trusts its copy of the keyring without ``stat``-ing the file.
RECHECK_SECONDS = 1.0


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


#: The file in HMD_DATA_DIR that holds the master key generated in development (HMD_DEBUG=true, no key set).
DEVELOPMENT_MASTER_KEY_FILE = "local_kms_master_key"


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


def read_master_key_file(path: str | os.PathLike) -> bytes:
    """The master key in ``path`` (base64, one trailing newline allowed), as 32 bytes.

    :raises ConfigurationError: the file is missing or unreadable, or holds no valid key.
    """
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not ASCII text"
        raise ConfigurationError(f"master key file {path} is unreadable: {reason}") from None
    try:
        return decode_master_key(text)
    except ConfigurationError:
        raise ConfigurationError(f"master key file {path} does not hold 32 random bytes, base64-encoded") from None


def write_master_key_file(path: str | os.PathLike, key: bytes, *, replace: bool = False) -> None:
    """Store ``key`` (base64, one line) in ``path``, mode 0600, durably: fsync of the file and its folder.

    A new file is created exclusively (an existing one is never overwritten); with
    ``replace=True`` the file is written beside ``path`` and renamed over it, so a reader
    sees the old key or the new one, never a part.

    :raises ConfigurationError: ``path`` exists (without ``replace``) or cannot be written.
    """
    path = Path(path)
    data = base64.b64encode(key) + b"\n"
    target = path
    try:
        if replace:
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
            target = Path(tmp)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigurationError(f"{path} exists already; choose a new file for the new master key") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot write master key file {path}: {exc.strerror}") from None
    try:
        _write_private(fd, data)
        if replace:
            os.replace(target, path)
        _fsync_folder(path.parent)
    except BaseException as exc:
        target.unlink(missing_ok=True)  # ours: made by mkstemp or created exclusively above
        if isinstance(exc, OSError):
            raise ConfigurationError(f"cannot write master key file {path}: {exc.strerror}") from None
        raise


def _write_private(fd: int, data: bytes) -> None:
    """Write ``data`` to the new file ``fd`` (made 0600 first), flush it to the disk and close it."""
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class RekeyResult:
    """What :meth:`LocalKMSProvider.rekey` did."""

    #: keys in the keyring (every version of each was carried over as it was).
    keys: int
    #: the keyring was sealed under the new key already (an earlier re-keying reached its rename).
    already: bool


def _fast_constructor(cls, fields: tuple[str, ...]):
    """Return ``build(*values)`` making a frozen slots dataclass without its ``__init__``.

    A frozen dataclass sets every field through ``object.__setattr__``, which
    costs more than the AES-GCM call on the hot path; setting the slots
    through their descriptors builds the very same object. Falls back to the
    class itself if it ever stops being a plain slots class with these fields.
    """
    descriptors = [getattr(cls, name, None) for name in fields]
    if (
        getattr(cls, "__slots__", None) != fields
        or hasattr(cls, "__post_init__")
        or any(type(descriptor).__name__ != "member_descriptor" for descriptor in descriptors)
        or len(fields) not in (3, 4)
    ):
        return cls
    new = object.__new__
    setters = [descriptor.__set__ for descriptor in descriptors]
    if len(fields) == 3:
        set_a, set_b, set_c = setters

        def build(a, b, c):
            instance = new(cls)
            set_a(instance, a)
            set_b(instance, b)
            set_c(instance, c)
            return instance

    else:
        set_a, set_b, set_c, set_d = setters

        def build(a, b, c, d):
            instance = new(cls)
            set_a(instance, a)
            set_b(instance, b)
            set_c(instance, c)
            set_d(instance, d)
            return instance

    return build


_encrypt_result = _fast_constructor(EncryptResult, ("ciphertext", "key_id", "key_version"))
_decrypt_result = _fast_constructor(DecryptResult, ("plaintext", "key_id", "key_version"))
_data_key = _fast_constructor(DataKey, ("plaintext", "ciphertext", "key_id", "key_version"))


class _Reservation:
    """Encryptions this process may still make with one version before asking the file."""

    __slots__ = ("granted", "block", "reserved_at", "next_index")

    def __init__(self, granted: int, block: int) -> None:
        self.granted = granted
        #: the block size asked for (``granted`` is less near the version's limit).
        self.block = block
        self.reserved_at = _monotonic()
        #: returns 0, 1, 2, ... ; one C call, so threads never get the same index.
        self.next_index = itertools.count().__next__

    def take(self) -> bool:
        """Count one encryption; ``False`` once the block is used up."""
        return self.next_index() < self.granted


def _open_nothing(nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
    """The opener of a version without usable material (destroyed, disabled or unknown)."""
    raise InvalidCiphertext()


def _open_then_refuse(open_sealed: Callable, refusal: str) -> Callable:
    """The opener of a version of a key that is switched off: authenticate, then refuse."""

    def refuse(nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
        # Only an authentic ciphertext learns that its key is switched off (never a version's state).
        open_sealed(nonce, sealed, aad)
        raise KeyDisabled(refusal)

    return refuse


# A forked child must not spend its parent's reserved counts (both would make
# the same encryptions count once) nor inherit a lock another thread held.
_live_providers: weakref.WeakSet = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for provider in list(_live_providers):
        provider._forget_process_state()


os.register_at_fork(after_in_child=_after_fork_in_child)


class LocalKMSProvider(KMSProvider):
    """AES-256-GCM KEKs kept in a local, master-key-encrypted keyring file."""

    name = "local"
    title = "the local keyring"
    # The keyring path (in HMD_DATA_DIR) and the master key (a secret) come from the project's settings.
    OPTIONS = (
        Option("max_encryptions_per_version", "HMD_LOCAL_KMS_MAX_ENCRYPTIONS", DEFAULT_MAX_ENCRYPTIONS, "int"),
    )
    capabilities = frozenset(
        {
            Capability.DISABLE_VERSION,
            Capability.DESTROY_VERSION,
            Capability.DISABLE_KEY,
            Capability.ENCRYPT_COUNT,
            Capability.DESTROY_KEY,
            Capability.SET_PRIMARY,
        }
    )

    def __init__(
        self,
        keyring_path: str | os.PathLike,
        master_key: bytes | str,
        *,
        max_encryptions_per_version: int = DEFAULT_MAX_ENCRYPTIONS,
        reservation_block: int = DEFAULT_RESERVATION_BLOCK,
        max_reservation_block: int = DEFAULT_MAX_RESERVATION_BLOCK,
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
        self._master_key = master_key  # only to refuse re-keying under the same key
        self.max_encryptions = max_encryptions_per_version
        self.reservation_block = reservation_block
        # Never more than 1/64 of the limit in one block, so several processes can share a small limit.
        self.max_reservation_block = max(reservation_block, min(max_reservation_block, max_encryptions_per_version // 64))
        self._mutex = threading.RLock()
        self._keyring: dict = {"keys": {}}
        self._signature: tuple | None = None
        self._ciphers: dict[tuple[str, int], AESGCM] = {}
        self._reservations: dict[tuple[str, int], _Reservation] = {}
        # Hot-path views of the keyring, rebuilt after every change:
        # key id -> (primary version, its AESGCM.encrypt, ciphertext header, reservation index, reservation size)
        self._encrypt_slots: dict[str, tuple[int, Callable, bytes, Callable[[], int], int]] = {}
        # ciphertext header -> (key id, version, opener(nonce, sealed, aad)); the opener is
        # AESGCM.decrypt itself for a usable version of an enabled key (see _decryption_slot)
        self._decrypt_slots: dict[bytes, tuple[str, int, Callable]] = {}
        # The lock file's change counter, mapped and read as one native u64 (see _open_generation).
        self._generation: memoryview | None = None
        self._seen_generation: int | None = None
        self._recheck_at = 0.0
        _live_providers.add(self)

    def _forget_process_state(self) -> None:
        """Called in a forked child: drop the parent's reservations and its lock."""
        self._mutex = threading.RLock()
        self._reservations = {}
        self._encrypt_slots = {}

    @classmethod
    def from_config(cls, options: dict) -> LocalKMSProvider:
        """Build from the ``local`` entry of the provider settings."""
        try:
            return cls(
                options["keyring_path"],
                options["master_key"],
                max_encryptions_per_version=int(options.get("max_encryptions_per_version", DEFAULT_MAX_ENCRYPTIONS)),
                reservation_block=int(options.get("reservation_block", DEFAULT_RESERVATION_BLOCK)),
                max_reservation_block=int(options.get("max_reservation_block", DEFAULT_MAX_RESERVATION_BLOCK)),
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
        blob = self._read_blob()
        return {"keys": {}} if blob is None else self._open_blob(blob, self._master)

    def _read_blob(self) -> bytes | None:
        """The keyring file's bytes, ``None`` if there is none yet."""
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigurationError(f"local keyring {self.path} is unreadable: {exc.strerror}") from None

    def _open_blob(self, blob: bytes, master: AESGCM) -> dict:
        """The keyring sealed in ``blob`` (magic ‖ nonce ‖ AES-GCM of the JSON), opened with ``master``."""
        if not blob.startswith(_KEYRING_MAGIC) or len(blob) < len(_KEYRING_MAGIC) + NONCE_BYTES + TAG_BYTES:
            raise ConfigurationError(f"local keyring {self.path} is not a Keyvault keyring")
        nonce = blob[len(_KEYRING_MAGIC) : len(_KEYRING_MAGIC) + NONCE_BYTES]
        try:
            data = master.decrypt(nonce, blob[len(_KEYRING_MAGIC) + NONCE_BYTES :], _KEYRING_AAD)
        except InvalidTag:
            raise ConfigurationError(
                f"local keyring {self.path} cannot be opened with this master key (wrong HMD_LOCAL_KMS_MASTER_KEY?)"
            ) from None
        return json.loads(data)

    @staticmethod
    def _seal(keyring: dict, master: AESGCM) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return _KEYRING_MAGIC + nonce + master.encrypt(nonce, json.dumps(keyring, sort_keys=True).encode(), _KEYRING_AAD)

    def _storage_error(self, exc: OSError, doing: str, outcome: str = "") -> StorageUnavailable:
        """``exc`` from the keyring's folder as a one-line typed error (the path and the system's reason)."""
        number = exc.errno
        reason = f"{os.strerror(number)} [{errno.errorcode.get(number, number)}]" if number else str(exc)
        return StorageUnavailable(
            f"cannot {doing} local keyring {self.path}: {reason}{outcome}", path=str(self.path), errno=number
        )

    def _write_keyring(self, keyring: dict) -> None:
        """Replace the keyring file atomically with ``keyring`` sealed under the master key."""
        self._replace_file(self._seal(keyring, self._master))

    def _replace_file(self, blob: bytes, check: Callable[[Path], None] | None = None) -> None:
        """Replace the keyring file atomically: temp file (0600), fsync, ``check(temp)``, rename, fsync of the folder.

        :raises StorageUnavailable: the folder refused (full, read-only, no access); the
            keyring file is then as it was, with no temp file left behind (so too when
            ``check`` raises).
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        except OSError as exc:
            raise self._storage_error(exc, "write", "; the keyring is unchanged") from exc
        try:
            _write_private(fd, blob)
            if check is not None:
                check(Path(tmp))
            os.replace(tmp, self.path)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise self._storage_error(exc, "write", "; the keyring is unchanged") from exc
            raise
        self._sync_folder()

    def _sync_folder(self) -> None:
        """fsync the keyring's folder, so that a rename survives a power cut."""
        try:
            _fsync_folder(self.path.parent)
        except OSError as exc:
            raise self._storage_error(
                exc, "sync the folder of", "; the new keyring is in place but may not survive a power cut"
            ) from exc

    def _open_generation(self) -> memoryview | None:
        """Map the lock file's 8-byte change counter; ``None`` if that is impossible here.

        On a volume this process may not write, the counter is mapped read-only: changes
        made by processes that can write are still seen at once.
        """
        try:
            fd, writable = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600), True
        except OSError:
            try:
                fd, writable = os.open(self.lock_path, os.O_RDONLY), False
            except OSError:
                return None
        try:
            if writable:
                # Allocated, not merely extended (a hole): storing into a hole through the map on a
                # full volume kills the process with SIGBUS. Never clears a counter already written.
                os.posix_fallocate(fd, 0, _GENERATION_SIZE)
                mapped = mmap.mmap(fd, _GENERATION_SIZE)
            elif os.fstat(fd).st_size >= _GENERATION_SIZE:
                mapped = mmap.mmap(fd, _GENERATION_SIZE, access=mmap.ACCESS_READ)
            else:
                return None
            # Read as memoryview[0]: an aligned 8-byte load, cheaper than slicing the map.
            return memoryview(mapped).cast("Q")
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)

    def _invalidate(self) -> None:
        """Forget every view derived from the keyring (new dicts: readers in flight keep theirs)."""
        self._encrypt_slots = {}
        self._decrypt_slots = {}
        self._ciphers = {}

    def _refresh(self) -> None:
        """Reload the keyring if any process changed it (see the module docstring)."""
        generation = self._generation
        if generation is not None and generation[0] == self._seen_generation and _monotonic() < self._recheck_at:
            return
        self._reload()

    def _reload(self) -> None:
        """The slow half of :meth:`_refresh`: compare the file, re-read it if it changed."""
        with self._mutex:
            if self._generation is None:
                self._generation = self._open_generation()
            generation = self._generation[0] if self._generation is not None else None
            signature = self._file_signature()
            if signature != self._signature:
                self._keyring = self._read_keyring()
                self._signature = signature
                self._invalidate()
            self._seen_generation = generation
            self._recheck_at = _monotonic() + RECHECK_SECONDS

    def _current(self) -> dict:
        """Return the keyring, reloading it when another process changed the file."""
        self._refresh()
        return self._keyring

    def _bump_generation(self) -> None:
        """Tell every process sharing the keyring that it changed (call under the file lock)."""
        if self._generation is None or self._generation.readonly:  # the volume may have become writable
            self._generation = self._open_generation()
        if self._generation is not None and not self._generation.readonly:
            self._generation[0] = (self._generation[0] + 1) % 2**64
            self._seen_generation = self._generation[0]

    def _lock_keyring(self) -> int:
        """Open the lock file and take its exclusive ``flock``; return the descriptor."""
        fd = None
        try:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fd
        except OSError as exc:
            if fd is not None:
                os.close(fd)
            raise self._storage_error(exc, "lock", f" (lock file {self.lock_path}); the keyring is unchanged") from exc

    def _mutate(self, change):
        """Apply ``change(keyring)`` under the file lock and persist it atomically.

        :raises StorageUnavailable: the keyring's folder refused the lock file or the write;
            nothing was changed.
        """
        with self._mutex:
            lock_fd = self._lock_keyring()
            try:
                keyring = self._read_keyring()
                result = change(keyring)
                self._write_keyring(keyring)
                self._keyring = keyring
                self._signature = self._file_signature()
                self._invalidate()
                self._bump_generation()
                return result
            finally:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
                os.close(lock_fd)

    def rekey(self, new_master_key: bytes | str) -> RekeyResult:
        """Re-encrypt the keyring under ``new_master_key``, atomically, and use that key from now on.

        Under the keyring's lock: the file is opened with the current master key, sealed
        under the new one into a temp file (0600) beside it, fsynced, read back and opened
        with the new key, then renamed over the keyring; the folder is fsynced and every
        process sharing the keyring is told it changed. Until the rename the current key
        opens the keyring; after it only the new key does. Processes still holding the old
        key then refuse to read the keyring, and so never write it (every change re-reads
        the file under the same lock). Versions, states and encryption counts are kept as
        they are, so every ciphertext made before still decrypts.

        A keyring the current key cannot open but ``new_master_key`` can is one whose
        re-keying already reached the rename (a run that stopped after it): nothing is
        written and the result says ``already=True``.

        :raises ConfigurationError: the new key is not 32 bytes, is the key in use, there is
            no keyring yet, or neither key opens it.
        :raises StorageUnavailable: the folder refused the temp file or the rename; the
            keyring is unchanged and the current key still opens it.
        """
        if isinstance(new_master_key, str):
            new_master_key = decode_master_key(new_master_key)
        if len(new_master_key) != 32:
            raise ConfigurationError("the new local KMS master key must be 32 bytes")
        new_master = AESGCM(new_master_key)
        with self._mutex:
            lock_fd = self._lock_keyring()
            try:
                blob = self._read_blob()
                if blob is None:
                    raise ConfigurationError(f"there is no local keyring at {self.path} to re-key")
                already = False
                try:
                    keyring = self._open_blob(blob, self._master)
                except ConfigurationError:
                    keyring = self._open_blob(blob, new_master)  # raises too when neither key opens it
                    already = True
                else:
                    if new_master_key == self._master_key:
                        raise ConfigurationError("the new master key is the one the keyring is sealed with already")

                    def check(written: Path) -> None:
                        if self._open_blob(written.read_bytes(), new_master) != keyring:
                            raise ConfigurationError("the re-keyed keyring did not read back as written; nothing changed")

                    self._replace_file(self._seal(keyring, new_master), check)
                self._master, self._master_key = new_master, new_master_key
                self._keyring = keyring
                self._signature = self._file_signature()
                self._invalidate()
                self._bump_generation()
                return RekeyResult(keys=len(keyring["keys"]), already=already)
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

    def set_primary_version(self, key_id: str, version: int) -> KeyInfo:
        def change(keyring: dict) -> KeyInfo:
            key = self._key(keyring, key_id)
            self._require_usable_key(key, key_id)
            record = self._version(key, key_id, version)
            if record["state"] != VersionState.ENABLED:
                raise KeyDisabled(f"version {version} of {key_id!r} is {record['state']}; only enabled versions can be primary")
            key["primary"] = version
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

    def _next_block(self, key_id: str, version: int) -> int:
        """How many encryptions to reserve: more after a block that was used up quickly."""
        previous = self._reservations.get((key_id, version))
        if previous is None or _monotonic() - previous.reserved_at >= RESERVATION_GROWTH_SECONDS:
            return self.reservation_block
        return min(previous.block * 4, self.max_reservation_block)

    def _reserve_block(self, key_id: str, version: int) -> _Reservation:
        """Charge a block of encryptions to the keyring file and return it, one already taken."""
        block = self._next_block(key_id, version)

        def change(keyring: dict) -> int:
            record = self._version(self._key(keyring, key_id), key_id, version)
            available = self.max_encryptions - record["encrypt_count"]
            if available <= 0:
                raise KeyDisabled(
                    f"version {version} of {key_id!r} reached its limit of {self.max_encryptions} encryptions; rotate the key"
                )
            granted = min(block, available)
            record["encrypt_count"] += granted
            return granted

        try:
            granted = self._mutate(change)
        except StorageUnavailable as exc:
            # Every encryption is charged to the keyring before it is made, so that no process can take
            # a version past its limit (AES-GCM nonce safety): without a write, no more encryptions.
            raise StorageUnavailable(
                f"version {version} of {key_id!r} cannot encrypt in this process: it has no reserved "
                f"encryptions left and cannot reserve more ({exc})",
                path=exc.path,
                errno=exc.errno,
            ) from exc
        reservation = _Reservation(granted, block)
        reservation.take()
        self._reservations[(key_id, version)] = reservation
        return reservation

    def _take_encryption(self, key_id: str) -> tuple[int, Callable, bytes, Callable[[], int], int]:
        """Return the primary version's slot, with one encryption counted against it.

        ``encrypt`` and ``generate_data_key_parts`` inline the fast half (fresh
        keyring, slot present, block not used up) and call this otherwise.
        """
        generation = self._generation  # _refresh(), inlined for the hot path
        if generation is None or generation[0] != self._seen_generation or _monotonic() >= self._recheck_at:
            self._reload()
        slot = self._encrypt_slots.get(key_id)
        if slot is not None and slot[3]() < slot[4]:
            return slot
        with self._mutex:
            key = self._key(self._current(), key_id)
            self._require_usable_key(key, key_id)
            version = key["primary"]
            record = key["versions"][str(version)]
            if record["state"] != VersionState.ENABLED:
                raise KeyDisabled(f"primary version {version} of {key_id!r} is {record['state']}")
            reservation = self._reservations.get((key_id, version))
            if reservation is None or not reservation.take():
                reservation = self._reserve_block(key_id, version)  # rebuilds the views
                key = self._key(self._keyring, key_id)
                record = key["versions"][str(version)]
            header = HEADER.pack(key_id, version)
            slot = (
                version,
                self._cipher(key_id, version, record).encrypt,
                header,
                reservation.next_index,
                reservation.granted,
            )
            self._encrypt_slots[key_id] = slot
            return slot

    def encrypt(
        self, key_id: str, plaintext: bytes, *, encryption_context: EncryptionContext | None = None
    ) -> EncryptResult:
        generation = self._generation
        slot = self._encrypt_slots.get(key_id)
        if (  # _take_encryption's fast half, inlined
            slot is None
            or generation is None
            or generation[0] != self._seen_generation
            or _monotonic() >= self._recheck_at
            or slot[3]() >= slot[4]
        ):
            slot = self._take_encryption(key_id)
        version, seal, header, _, _ = slot
        nonce = os.urandom(NONCE_BYTES)
        aad = header + (  # a BoundContext was encoded once, by its maker
            encryption_context.encoded if type(encryption_context) is BoundContext else encode_context(encryption_context)
        )
        return _encrypt_result(header + nonce + seal(nonce, plaintext, aad), key_id, version)

    def decrypt(self, ciphertext: bytes, *, encryption_context: EncryptionContext | None = None) -> DecryptResult:
        if type(ciphertext) is not bytes:
            ciphertext = as_frame(ciphertext)
        plaintext, key_id, version = self.decrypt_parts(ciphertext, bind_context(encryption_context))
        return _decrypt_result(plaintext, key_id, version)

    def decrypt_parts(self, ciphertext: bytes, encryption_context: BoundContext = EMPTY_BOUND) -> tuple[bytes, str, int]:
        """:meth:`decrypt` as ``(plaintext, key_id, key_version)``, without building a result object.

        The one implementation behind :meth:`decrypt`; the envelope calls it directly on its
        hot path (``keyvault/kms/fastpath.py``), with ``bytes`` and a ``BoundContext``.
        """
        generation = self._generation  # _refresh(), inlined for the hot path
        if generation is None or generation[0] != self._seen_generation or _monotonic() >= self._recheck_at:
            self._reload()
        # HEADER.read, inlined for the hot path: a header seen before is looked up as it stands;
        # any other (or a ciphertext too short to hold one) goes through HEADER.read in _decryption_slot.
        try:
            header_end = ciphertext[1] + KEY_HEADER_FIXED
            header = ciphertext[:header_end]
            key_id, version, open_sealed = self._decrypt_slots[header]
        except (IndexError, KeyError):
            header_end, (key_id, version, open_sealed) = self._decryption_slot(ciphertext)
            header = ciphertext[:header_end]
        aad = header + encryption_context.encoded
        try:
            plaintext = open_sealed(
                ciphertext[header_end : header_end + NONCE_BYTES], ciphertext[header_end + NONCE_BYTES :], aad
            )
        except (InvalidTag, ValueError):  # ValueError: too short to hold a whole nonce
            raise InvalidCiphertext() from None
        return plaintext, key_id, version

    def rewrap_many(self, items: Sequence[RewrapItem], *, key_id: str | None = None) -> list[RewrapOutcome]:
        """The contract's default loop, item for item, with the opened key kept in one local.

        Each item is opened and sealed by the same calls, in the same order, as :meth:`rewrap`
        would make them, so every outcome and error is the same. Only the per-item result
        object of the decryption and two copies of the opened key are gone: the default's
        wipe of a copy never reached the opened ``bytes`` either. A rotation calls this for
        every data key: about half of a local rotation worker's CPU (bench/README.md, stop 26).
        """
        results: list[RewrapOutcome] = []
        append, open_parts, seal = results.append, self.decrypt_parts, self.encrypt
        for item in items:
            ciphertext = item.ciphertext
            try:
                if type(ciphertext) is not bytes:
                    ciphertext = as_frame(ciphertext)
                context = bind_context(item.encryption_context)
                plaintext, source_key, _ = open_parts(ciphertext, context)
                append(seal(key_id or source_key, plaintext, encryption_context=context))
            except ProviderUnavailable:
                raise
            except KMSError as exc:
                append(exc)
        return results

    def _decryption_slot(self, ciphertext: bytes) -> tuple[int, tuple[str, int, Callable]]:
        """Validate a ciphertext's header against the keyring and remember the outcome: (header length, slot)."""
        key_id, version, header_end = HEADER.read(ciphertext)
        header = ciphertext[:header_end]
        key_id = sys.intern(key_id)  # callers compare it with their own (interned) id: identity is quickest
        key = self._keyring["keys"].get(key_id)
        record = key["versions"].get(str(version)) if key else None
        if record is None:
            raise InvalidCiphertext()
        # A version that is not enabled opens nothing, and says so only as InvalidCiphertext: the version
        # number in a header is anyone's to write (keyvault/kms/README.md, "What a failed decrypt reveals").
        if record["material"] is None or record["state"] != VersionState.ENABLED:
            open_sealed = _open_nothing
        elif key["state"] != KeyState.ENABLED:
            open_sealed = _open_then_refuse(
                self._cipher(key_id, version, record).decrypt,
                f"local key {key_id!r} is {key['state'].replace('_', ' ')}",
            )
        else:
            open_sealed = self._cipher(key_id, version, record).decrypt
        slot = (key_id, version, open_sealed)
        self._decrypt_slots[header] = slot
        return header_end, slot

    def generate_data_key(
        self,
        key_id: str,
        *,
        encryption_context: EncryptionContext | None = None,
        key_spec: str = "AES_256",
    ) -> DataKey:
        plaintext, ciphertext, version = self.generate_data_key_parts(key_id, bind_context(encryption_context), key_spec)
        return _data_key(plaintext, ciphertext, key_id, version)

    def generate_data_key_parts(
        self, key_id: str, encryption_context: BoundContext = EMPTY_BOUND, key_spec: str = "AES_256"
    ) -> tuple[bytearray, bytes, int]:
        """:meth:`generate_data_key` as ``(plaintext, ciphertext, key_version)``; the caller wipes the plaintext.

        The one implementation behind :meth:`generate_data_key`; the envelope calls it
        directly on its hot path, with a ``BoundContext``.
        """
        length = KEY_SPECS.get(key_spec) or self.key_length(key_spec)  # the latter raises for unknown specs
        generation = self._generation
        slot = self._encrypt_slots.get(key_id)
        if (  # _take_encryption's fast half, inlined
            slot is None
            or generation is None
            or generation[0] != self._seen_generation
            or _monotonic() >= self._recheck_at
            or slot[3]() >= slot[4]
        ):
            slot = self._take_encryption(key_id)
        version, seal, header, _, _ = slot
        random = os.urandom(length + NONCE_BYTES)  # one system call for the key and the nonce
        plaintext = bytearray(random[:length])
        nonce = random[length:]
        aad = header + encryption_context.encoded
        return plaintext, header + nonce + seal(nonce, plaintext, aad), version

    def health_check(self) -> HealthStatus:
        def probe() -> str:
            keyring = self._read_keyring()
            self._probe_writable()
            if not self.path.exists():
                return f"keyring {self.path} not created yet (no keys); its folder is writable"
            return f"keyring {self.path} opened, {len(keyring['keys'])} key(s); its folder can hold a new copy"

        return self.timed_health(probe)

    def _probe_writable(self) -> None:
        """Write a scratch file as large as the keyring beside it, fsync it and remove it.

        A keyring change needs exactly that (the new keyring is written beside the old
        one, then renamed over it), and so does reserving encryptions. A folder not yet
        created is probed at its nearest existing parent, where the first write creates it.

        :raises StorageUnavailable: the folder is read-only, full or not ours to write.
        """
        folder = self.path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            size = max(os.stat(self.path).st_size, 1)
        except FileNotFoundError:
            size = 1
        try:
            fd, scratch = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".probe", dir=folder)
        except OSError as exc:
            raise self._storage_error(exc, "create a file beside the") from exc
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(bytes(size))
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise self._storage_error(exc, f"write {size} bytes beside the") from exc
        finally:
            Path(scratch).unlink(missing_ok=True)
