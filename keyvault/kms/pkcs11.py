"""PKCS#11 provider: AES-256 KEKs generated inside an HSM token, used there with AES-GCM.

The KEKs are created by the token (``C_GenerateKey``) and can never leave it:
Keyvault only ever holds object handles. Tested against SoftHSM2 2.6
(``tests/servers/softhsm.py``); any PKCS#11 v2.40 token with ``CKM_AES_GCM``
should work.

Configuration (``keyvault/settings.py``, ``_provider_options()["pkcs11"]``)
==========================================================================

``HMD_PKCS11_LIBRARY``
    Path of the vendor's PKCS#11 module, e.g. ``/usr/lib/softhsm/libsofthsm2.so``.
``HMD_PKCS11_TOKEN_LABEL``
    Label of the token (HSM partition) holding Keyvault's keys.
``HMD_PKCS11_PIN`` (or ``HMD_PKCS11_PIN_FILE``)
    The token's user (CKU_USER) PIN.

Token setup
===========

Give Keyvault a token of its own, initialised with a user PIN, e.g. on SoftHSM2::

    softhsm2-util --init-token --free --label keyvault --pin <user PIN> --so-pin <SO PIN>

Nothing else is needed: every object is created by the provider. The token is
the single source of truth; there is no side file, so several processes (web,
Celery workers, other hosts sharing a network HSM) see the same keys.

Objects on the token
====================

For a key ``K`` with versions ``1..N`` (all objects ``CKA_TOKEN`` and
``CKA_PRIVATE``, so only a logged-in user sees them)::

    CKO_SECRET_KEY  label "keyvault:K:v<n>"  CKA_ID = K (UTF-8)   one per live version
    CKO_DATA        label "keyvault:K"        application "keyvault/key"       key record
    CKO_DATA        label "keyvault:K:v<n>"   application "keyvault/version"   version record
    CKO_DATA        label "keyvault:K:disabled" application "keyvault/disabled"  only while disabled

*Secret keys.* AES-256 (``CKM_AES_KEY_GEN``) with ``CKA_SENSITIVE=True`` and
``CKA_EXTRACTABLE=False`` (the token then also reports ``CKA_ALWAYS_SENSITIVE``
and ``CKA_NEVER_EXTRACTABLE``, and refuses to read ``CKA_VALUE`` or to wrap the
key), ``CKA_COPYABLE=False``, ``CKA_WRAP``/``CKA_UNWRAP``/``CKA_SIGN``/
``CKA_VERIFY``/``CKA_DERIVE`` all False: the key does AES-GCM encrypt/decrypt
and nothing else. ``CKA_ID`` is the key id, shared by all versions, so one
``C_FindObjects`` lists a key's versions. ``CKA_MODIFIABLE`` stays True because
the state lives in two flags the token enforces itself:

* ``CKA_ENCRYPT`` is True only on the primary version (the newest): a stolen
  session cannot encrypt under a retired version.
* ``CKA_DECRYPT`` False means the version is **disabled**. The token refuses
  ``C_DecryptInit`` for it, so disabling does not depend on Keyvault's code.

*Records.* ``CKO_DATA`` objects whose ``CKA_VALUE`` is a small JSON document
(the key's description and creation time; a version's creation time). The
token makes a data object's value read-only, so records are written once and
never updated; the kind is told apart by ``CKA_APPLICATION`` (key ids may
contain ``:``, so labels alone could collide). Version records are never
deleted: a version record without a secret key is a **destroyed** version,
which is how ``describe_key`` still lists it (decrypt answers ``InvalidCiphertext``
for it, as for an unknown version). Versions are numbered without gaps.

*Key state.* **Disabled** is the presence of the ``keyvault/disabled`` marker
(creating or destroying one object is atomic); it is enforced by this provider,
not by the token, because the per-version ``CKA_DECRYPT`` flags must keep their
own meaning while the key is off. **Destroyed** is "no version has key
material left": :meth:`destroy_key` destroys every secret key (the primary
first) and keeps the records as tombstones, so the name cannot be reused for
different material that old ciphertexts would then be tried against.

The **primary** is the highest version that still has material; only
:meth:`rotate_key` creates versions and the primary can neither be disabled
nor destroyed on its own, so it is always the newest. Rotation writes the
version record, generates the key with ``CKA_ENCRYPT=True``, then clears
``CKA_ENCRYPT`` on the older versions; a crash at any step leaves a consistent
token (encrypt picks the newest encrypting version; a record without material
shows as destroyed). Changes of one key must not run concurrently from two
processes (there is no lock on a token); within a process they are serialised,
and Keyvault's services lock the key's row while they change it.

Why AES-GCM (and not AES key wrap + HMAC)
=========================================

``CKM_AES_GCM`` with ``CK_GCM_PARAMS`` (python-pkcs11 ``GCMParams(iv, aad,
tag_bits)``) works on SoftHSM2 2.6 and on every current HSM, and gives one
authenticated operation in the token that binds our header and the encryption
context as AAD, exactly like :mod:`keyvault.kms.local`. The fallback the issue
mentions, ``CKM_AES_KEY_WRAP_PAD``, binds no AAD, so the context would need a
second key (HMAC) and a second token operation, and it only accepts key-sized
inputs. It is not implemented: a token without ``CKM_AES_GCM`` is reported as a
:class:`ConfigurationError` when the provider logs in.

The 96-bit IV comes from ``os.urandom`` (the kernel CSPRNG; IVs must be unique,
not secret) and the tag is 128 bits. Data keys from :meth:`generate_data_key`
come from the token's RNG (``C_GenerateRandom``).

Ciphertext layout (as :mod:`keyvault.kms.local`, all integers big-endian)::

    u8  format version (1)
    u8  key id length L (1..255)
    L   key id, UTF-8
    u32 key version
    12  IV
    N   AES-GCM ciphertext ‖ 16-byte tag

AAD = everything before the IV ‖ :func:`keyvault.kms.context.encode_context`.

Decrypt and disabled/destroyed versions
=======================================

An enabled version is used only after the tag verifies; only then does an
authentic ciphertext learn that its *key* is disabled (as in the local
provider). A disabled or destroyed *version* cannot verify anything (the token
refuses the key, or the material is gone), so a ciphertext whose header names
one gets :class:`InvalidCiphertext`, exactly as one naming a version that never
existed: anyone can write a version number into a header, and the answer must not
tell them which versions exist or were retired (``keyvault/kms/README.md``).

Sessions, login and threads
===========================

PKCS#11 login belongs to the *process*: once one session logs in, every
session of the process is logged in, closing a PIN session logs everyone out,
and a second ``C_Login`` is refused without the PIN being checked. So the
provider keeps one logged-in session per (library, token) for the whole
process, shared by every provider instance, and never closes it. A provider
whose PIN differs from the one that logged in gets :class:`AccessDenied`
(the token cannot verify a second PIN). A PIN the token rejected is not tried
again by this process, so a wrong ``HMD_PKCS11_PIN`` cannot lock the token
by retries: fix it and restart.

python-pkcs11 calls ``C_Initialize(NULL)``, which promises the module that it
is never called from two threads at once (SoftHSM2 then turns off its own
locks). Every call into one library is therefore serialised by a process-wide
lock; HSM operations take microseconds to a few milliseconds, so one session
is enough. After ``fork`` (Celery's prefork pool) the child re-initialises the
library and logs in again, as PKCS#11 requires.

Errors
======

* library path missing or not loadable, token label unknown, token without
  AES-GCM, user PIN not initialised: :class:`ConfigurationError`;
* PIN incorrect/locked/expired, another PIN already logged in:
  :class:`AccessDenied`;
* the token fails at run time (``DeviceRemoved``, ``SessionClosed``, invalid
  session handle, logged out underneath us, ...): :class:`ProviderUnavailable`;
  the shared session is dropped and the next call logs in again;
* GCM tag mismatch (SoftHSM2 returns ``CKR_GENERAL_ERROR``, others
  ``CKR_ENCRYPTED_DATA_INVALID``): :class:`InvalidCiphertext`.

Limits
======

* No encryption counter (``Capability.ENCRYPT_COUNT`` is not declared): a data
  object's value is read-only, and a write per encryption would be slow. NIST
  SP 800-38D allows 2^32 random-IV encryptions per key; rotate well before
  (Keyvault's rotation schedule and inventory count uses).
* ``DESTROY_SCHEDULED`` is not supported: destroying a version is immediate.
* HSMs in a FIPS mode that insists on generating GCM IVs themselves are not
  supported; nor are labels longer than the token allows (the label is
  ``"keyvault:" + key id + ":v" + n``; SoftHSM2 has no limit).
* ``rewrap`` is the default decrypt-then-encrypt inside this process.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

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
from .errors import (
    AccessDenied,
    ConfigurationError,
    InvalidCiphertext,
    KeyDisabled,
    KeyNotFound,
    KMSError,
    ProviderUnavailable,
    UnsupportedOperation,
)
from .loading import require_sdk
from .options import Option
from .wire import KeyHeader, as_frame

IV_BYTES = 12
TAG_BITS = 128
TAG_BYTES = TAG_BITS // 8
KEK_BITS = 256
RECORD_FORMAT = 1

LABEL_PREFIX = "keyvault"
APPLICATION_KEY = "keyvault/key"
APPLICATION_VERSION = "keyvault/version"
APPLICATION_DISABLED = "keyvault/disabled"

_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,254}$")
#: The ciphertext header (keyvault/kms/wire.py), as the local provider's: then the IV and the sealed data.
HEADER = KeyHeader(key_id_pattern=_KEY_ID, min_trailer=IV_BYTES + TAG_BYTES)

# python-pkcs11 exception class names, grouped by what they mean to a caller.
_UNAVAILABLE_ERRORS = (
    "DeviceError",
    "DeviceMemory",
    "DeviceRemoved",
    "FunctionFailed",
    "HostMemory",
    "SessionClosed",
    "SessionCount",
    "SessionHandleInvalid",
    "SlotIDInvalid",
    "TokenNotPresent",
    "TokenNotRecognised",
    "UserNotLoggedIn",
)
_PIN_ERRORS = ("PinIncorrect", "PinInvalid", "PinLenRange", "PinExpired", "PinLocked")
# What a token answers when a GCM tag does not verify or the input is malformed.
_BAD_CIPHERTEXT_ERRORS = (
    "GeneralError",
    "EncryptedDataInvalid",
    "EncryptedDataLenRange",
    "DataInvalid",
    "DataLenRange",
)

T = TypeVar("T")


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _sdk() -> Any:
    """python-pkcs11 (imported once, at the first call into a token)."""
    return require_sdk({"pkcs11": "pkcs11"}, package="python-pkcs11", user="the pkcs11 KMS provider").pkcs11


def _errors(p11: Any, names: tuple[str, ...]) -> tuple[type[BaseException], ...]:
    return tuple(getattr(p11.exceptions, name) for name in names if hasattr(p11.exceptions, name))


def key_label(key_id: str) -> str:
    """Label of the key record of ``key_id``."""
    return f"{LABEL_PREFIX}:{key_id}"


def version_label(key_id: str, version: int) -> str:
    """Label of version ``version`` of ``key_id`` (its secret key and its record)."""
    return f"{LABEL_PREFIX}:{key_id}:v{version}"


def disabled_label(key_id: str) -> str:
    """Label of the marker that exists while ``key_id`` is disabled."""
    return f"{LABEL_PREFIX}:{key_id}:disabled"


# -- process-wide library state -----------------------------------------------


@dataclass
class _Login:
    """The logged-in session of this process on one token, and who logged it in."""

    session: Any
    pin_digest: bytes


@dataclass
class _Library:
    """One loaded PKCS#11 module: its lock, its logins and the PINs it refused."""

    path: str
    lib: Any
    pid: int
    lock: threading.RLock = field(default_factory=threading.RLock)
    logins: dict[int, _Login] = field(default_factory=dict)
    refused_pins: dict[int, set[bytes]] = field(default_factory=dict)


_libraries_lock = threading.Lock()
_libraries: dict[str, _Library] = {}
# PINs are compared by keyed digest, so the process-wide state holds no PIN.
_PIN_DIGEST_KEY = os.urandom(32)


def _pin_digest(pin: str) -> bytes:
    return hmac.new(_PIN_DIGEST_KEY, pin.encode("utf-8"), hashlib.sha256).digest()


def _load_library(p11: Any, path: str) -> _Library:
    """Return the loaded module at ``path``, initialising it again after a fork."""
    real = os.path.realpath(path)
    if not os.path.isfile(real):
        raise ConfigurationError(f"PKCS#11 library {path} does not exist (check HMD_PKCS11_LIBRARY)")
    pid = os.getpid()
    with _libraries_lock:
        library = _libraries.get(real)
        if library is not None and library.pid == pid:
            return library
        try:
            lib = p11.lib(real)
            if library is not None:
                # A forked child inherits the parent's handles, which PKCS#11 says
                # are not valid here: initialise again and log in afresh.
                lib.reinitialize()
        except p11.PKCS11Error as exc:
            raise ConfigurationError(f"PKCS#11 library {path} cannot be loaded: {exc}") from None
        library = _Library(path=real, lib=lib, pid=pid)
        _libraries[real] = library
        return library


class PKCS11Provider(KMSProvider):
    """AES-256 KEKs inside a PKCS#11 token (HSM), AES-GCM done by the token."""

    name = "pkcs11"
    OPTIONS = (
        Option("library", "HMD_PKCS11_LIBRARY", ""),
        Option("token_label", "HMD_PKCS11_TOKEN_LABEL", ""),
        Option("pin", "HMD_PKCS11_PIN", ""),
    )
    CONFIGURED_BY = ("HMD_PKCS11_LIBRARY",)
    capabilities = frozenset(
        {
            Capability.DISABLE_VERSION,
            Capability.DESTROY_VERSION,
            Capability.DISABLE_KEY,
            Capability.DESTROY_KEY,
        }
    )

    def __init__(self, library: str, token_label: str, pin: str) -> None:
        for option, value in (("library", library), ("token_label", token_label), ("pin", pin)):
            if not isinstance(value, str) or not value:
                setting = {"library": "HMD_PKCS11_LIBRARY", "token_label": "HMD_PKCS11_TOKEN_LABEL"}.get(
                    option, "HMD_PKCS11_PIN or HMD_PKCS11_PIN_FILE"
                )
                raise ConfigurationError(f"the pkcs11 KMS provider needs the {option!r} option ({setting})")
        self.library = library
        self.token_label = token_label
        self._pin = pin
        self._pin_digest = _pin_digest(pin)
        #: (library, slot id) of our token once found, so calls skip the slot scan.
        self._slot: tuple[_Library, int] | None = None

    @classmethod
    def from_config(cls, options: dict) -> PKCS11Provider:
        """Build from the ``pkcs11`` entry of the provider settings (nothing is loaded yet)."""
        return cls(options.get("library", ""), options.get("token_label", ""), options.get("pin", ""))

    def __repr__(self) -> str:
        return f"PKCS11Provider(library={self.library!r}, token_label={self.token_label!r})"

    # -- sessions --------------------------------------------------------

    def _call(self, work: Callable[[Any, Any], T]) -> T:
        """Run ``work(p11, session)`` on the logged-in session, under the library lock."""
        p11 = _sdk()
        library = _load_library(p11, self.library)
        with library.lock:
            slot_id, session = self._session(p11, library)
            try:
                return work(p11, session)
            except p11.PKCS11Error as exc:
                raise self._translate(p11, library, slot_id, exc) from None

    def _session(self, p11: Any, library: _Library) -> tuple[int, Any]:
        """Return the process's logged-in session on our token, logging in if needed."""
        cached = self._slot
        if cached is not None and cached[0] is library and cached[1] in library.logins:
            login = library.logins[cached[1]]
            if hmac.compare_digest(login.pin_digest, self._pin_digest):
                return cached[1], login.session
        # Slow path: find the token (every slot is asked), check the PIN, log in.
        try:
            token = library.lib.get_token(token_label=self.token_label)
        except p11.NoSuchToken:
            labels = self._token_labels(library)
            raise ConfigurationError(
                f"no PKCS#11 token labelled {self.token_label!r} in {self.library} "
                f"(tokens present: {', '.join(map(repr, labels)) or 'none'}; check HMD_PKCS11_TOKEN_LABEL)"
            ) from None
        except p11.MultipleTokensReturned:
            raise ConfigurationError(f"several PKCS#11 tokens are labelled {self.token_label!r}") from None
        except p11.PKCS11Error as exc:
            raise ProviderUnavailable(
                f"PKCS#11 token {self.token_label!r} is not usable: {_describe_error(exc)}"
            ) from None
        slot_id = token.slot.slot_id
        login = library.logins.get(slot_id)
        if login is not None:
            if not hmac.compare_digest(login.pin_digest, self._pin_digest):
                raise AccessDenied(
                    f"PKCS#11 token {self.token_label!r} is logged in by this process with another PIN; "
                    "a second PIN cannot be verified"
                )
            self._slot = (library, slot_id)
            return slot_id, login.session
        if self._pin_digest in library.refused_pins.get(slot_id, ()):
            raise AccessDenied(
                f"PKCS#11 token {self.token_label!r} refused this PIN before; not retried so the token "
                "does not lock: fix HMD_PKCS11_PIN and restart"
            )
        try:
            if p11.Mechanism.AES_GCM not in token.slot.get_mechanisms():
                raise ConfigurationError(f"PKCS#11 token {self.token_label!r} does not offer CKM_AES_GCM")
            session = token.open(rw=True, user_pin=self._pin)
        except _errors(p11, _PIN_ERRORS) as exc:
            library.refused_pins.setdefault(slot_id, set()).add(self._pin_digest)
            raise AccessDenied(
                f"PKCS#11 token {self.token_label!r} refused the PIN ({type(exc).__name__})"
            ) from None
        except p11.UserAlreadyLoggedIn:
            raise AccessDenied(
                f"PKCS#11 token {self.token_label!r} is already logged in by other code in this process; "
                "the PIN cannot be verified"
            ) from None
        except p11.UserPinNotInitialized:
            raise ConfigurationError(f"PKCS#11 token {self.token_label!r} has no user PIN set") from None
        except p11.PKCS11Error as exc:
            raise self._translate(p11, library, slot_id, exc) from None
        library.logins[slot_id] = _Login(session=session, pin_digest=self._pin_digest)
        self._slot = (library, slot_id)
        return slot_id, session

    @staticmethod
    def _token_labels(library: _Library) -> list[str]:
        labels = []
        try:
            for slot in library.lib.get_slots(token_present=True):
                label = slot.get_token().label
                if label:  # SoftHSM2 always shows one empty, uninitialised slot
                    labels.append(label)
        except Exception:  # only decorates an error message
            pass
        return labels

    def _translate(self, p11: Any, library: _Library, slot_id: int, exc: BaseException) -> KMSError:
        """Map a python-pkcs11 error to our tree; drop the session if the token failed."""
        detail = _describe_error(exc)
        if isinstance(exc, _errors(p11, _UNAVAILABLE_ERRORS)):
            # The shared session (or the login) is gone: the next call logs in again.
            library.logins.pop(slot_id, None)
            return ProviderUnavailable(f"PKCS#11 token {self.token_label!r} failed: {detail}")
        if isinstance(exc, _errors(p11, _PIN_ERRORS + ("AnotherUserAlreadyLoggedIn", "TokenWriteProtected"))):
            return AccessDenied(f"PKCS#11 token {self.token_label!r} refused: {detail}")
        return KMSError(f"PKCS#11 token {self.token_label!r} failed: {detail}")

    @staticmethod
    def _assert_logged_in(p11: Any, session: Any) -> None:
        """Raise ``UserNotLoggedIn`` if the session lost its login.

        Logged out, private objects are simply invisible, which would read as
        "no such key"; so before answering that, prove the login by creating
        (and dropping) a private session object.
        """
        A = p11.Attribute
        probe = session.create_object(
            {A.CLASS: p11.ObjectClass.DATA, A.TOKEN: False, A.PRIVATE: True, A.VALUE: b""}
        )
        probe.destroy()

    # -- token objects ---------------------------------------------------

    @staticmethod
    def _find(p11: Any, session: Any, template: dict) -> list:
        return list(session.get_objects(template))

    def _record(self, p11: Any, session: Any, application: str, label: str) -> Any | None:
        A = p11.Attribute
        found = self._find(
            p11, session, {A.CLASS: p11.ObjectClass.DATA, A.APPLICATION: application, A.LABEL: label}
        )
        return found[0] if found else None

    def _read_record(self, p11: Any, record: Any, key_id: str) -> dict:
        try:
            data = json.loads(bytes(record[p11.Attribute.VALUE]))
        except ValueError:
            raise KMSError(f"PKCS#11 record of key {key_id!r} is not Keyvault JSON") from None
        if not isinstance(data, dict) or data.get("key_id") != key_id or "created_at" not in data:
            raise KMSError(f"PKCS#11 record labelled for key {key_id!r} is not a Keyvault record of that key")
        return data

    def _create_record(self, p11: Any, session: Any, application: str, label: str, data: dict) -> Any:
        A = p11.Attribute
        return session.create_object(
            {
                A.CLASS: p11.ObjectClass.DATA,
                A.TOKEN: True,
                A.PRIVATE: True,
                A.MODIFIABLE: False,
                A.APPLICATION: application,
                A.LABEL: label,
                A.VALUE: json.dumps({"format": RECORD_FORMAT, **data}, sort_keys=True).encode("utf-8"),
            }
        )

    def _version_keys(self, p11: Any, session: Any, key_id: str, *, encrypting: bool = False) -> dict[int, Any]:
        """Return ``{version: secret key}`` for the live versions of ``key_id``."""
        A = p11.Attribute
        template = {A.CLASS: p11.ObjectClass.SECRET_KEY, A.KEY_TYPE: p11.KeyType.AES, A.ID: key_id.encode("utf-8")}
        if encrypting:
            template[A.ENCRYPT] = True
        prefix = version_label(key_id, 0)[:-1]
        versions = {}
        for key in self._find(p11, session, template):
            label = key[A.LABEL]
            number = label[len(prefix) :] if label.startswith(prefix) else ""
            if number.isdigit() and not number.startswith("0"):
                versions[int(number)] = key
        return versions

    def _version_key(self, p11: Any, session: Any, key_id: str, version: int) -> Any | None:
        A = p11.Attribute
        found = self._find(
            p11,
            session,
            {
                A.CLASS: p11.ObjectClass.SECRET_KEY,
                A.KEY_TYPE: p11.KeyType.AES,
                A.ID: key_id.encode("utf-8"),
                A.LABEL: version_label(key_id, version),
            },
        )
        return found[0] if found else None

    def _is_disabled(self, p11: Any, session: Any, key_id: str) -> bool:
        return self._record(p11, session, APPLICATION_DISABLED, disabled_label(key_id)) is not None

    def _generate_version(self, p11: Any, session: Any, key_id: str, version: int) -> Any:
        """Generate the AES-256 KEK of a new primary version inside the token."""
        A = p11.Attribute
        return session.generate_key(
            p11.KeyType.AES,
            KEK_BITS,
            label=version_label(key_id, version),
            id=key_id.encode("utf-8"),
            store=True,
            template={
                A.TOKEN: True,
                A.PRIVATE: True,
                A.SENSITIVE: True,
                A.EXTRACTABLE: False,
                A.COPYABLE: False,
                A.MODIFIABLE: True,  # ENCRYPT/DECRYPT carry the version's state
                A.ENCRYPT: True,
                A.DECRYPT: True,
                A.WRAP: False,
                A.UNWRAP: False,
                A.SIGN: False,
                A.VERIFY: False,
                A.DERIVE: False,
            },
        )

    @staticmethod
    def _destroy_quietly(objects: list) -> None:
        for obj in reversed(objects):
            try:
                obj.destroy()
            except Exception:  # best-effort undo of a half-done change; the first error wins
                pass

    # -- describing ------------------------------------------------------

    def _describe(self, p11: Any, session: Any, key_id: str) -> KeyInfo:
        if not isinstance(key_id, str) or not _KEY_ID.match(key_id):
            raise KeyNotFound(f"PKCS#11 key {key_id!r} does not exist")
        record = self._record(p11, session, APPLICATION_KEY, key_label(key_id))
        if record is None:
            self._assert_logged_in(p11, session)
            raise KeyNotFound(f"PKCS#11 key {key_id!r} does not exist")
        meta = self._read_record(p11, record, key_id)
        material = self._version_keys(p11, session, key_id)
        versions = []
        number = 1
        # Version records are never deleted and numbered without gaps: read until the first miss.
        while (entry := self._record(p11, session, APPLICATION_VERSION, version_label(key_id, number))) is not None:
            created_at = datetime.fromisoformat(self._read_record(p11, entry, key_id)["created_at"])
            key = material.get(number)
            if key is None:
                version_state = VersionState.DESTROYED
            elif key[p11.Attribute.DECRYPT]:
                version_state = VersionState.ENABLED
            else:
                version_state = VersionState.DISABLED
            versions.append(
                KeyVersionInfo(version=number, state=version_state, created_at=created_at, encrypt_count=None)
            )
            number += 1
        live = [v.version for v in versions if v.state is not VersionState.DESTROYED]
        if not live:
            state = KeyState.DESTROYED
        elif self._is_disabled(p11, session, key_id):
            state = KeyState.DISABLED
        else:
            state = KeyState.ENABLED
        return KeyInfo(
            key_id=key_id,
            state=state,
            primary_version=max(live) if live else (versions[-1].version if versions else 0),
            versions=tuple(versions),
            created_at=datetime.fromisoformat(meta["created_at"]),
            description=meta.get("description", ""),
        )

    # -- key lifecycle -------------------------------------------------

    def create_key(self, key_id: str, *, description: str = "") -> KeyInfo:
        if not isinstance(key_id, str) or not _KEY_ID.match(key_id):
            raise ConfigurationError(
                f"invalid PKCS#11 key id {key_id!r}: 1-255 characters of letters, digits and _ . : / -"
            )
        if not isinstance(description, str):
            raise ConfigurationError("a key description must be a string")

        def work(p11: Any, session: Any) -> KeyInfo:
            if self._record(p11, session, APPLICATION_KEY, key_label(key_id)) is not None:
                raise ConfigurationError(f"PKCS#11 key {key_id!r} already exists")
            now = _now()
            created: list = []
            try:
                created.append(
                    self._create_record(
                        p11,
                        session,
                        APPLICATION_KEY,
                        key_label(key_id),
                        {"key_id": key_id, "description": description, "created_at": now.isoformat()},
                    )
                )
                created.append(self._new_version_record(p11, session, key_id, 1, now))
                created.append(self._generate_version(p11, session, key_id, 1))
            except BaseException:
                self._destroy_quietly(created)
                raise
            version = KeyVersionInfo(version=1, state=VersionState.ENABLED, created_at=now, encrypt_count=None)
            return KeyInfo(
                key_id=key_id,
                state=KeyState.ENABLED,
                primary_version=1,
                versions=(version,),
                created_at=now,
                description=description,
            )

        return self._call(work)

    def _new_version_record(self, p11: Any, session: Any, key_id: str, version: int, now: datetime) -> Any:
        return self._create_record(
            p11,
            session,
            APPLICATION_VERSION,
            version_label(key_id, version),
            {"key_id": key_id, "version": version, "created_at": now.isoformat()},
        )

    def describe_key(self, key_id: str) -> KeyInfo:
        return self._call(lambda p11, session: self._describe(p11, session, key_id))

    def rotate_key(self, key_id: str) -> KeyVersionInfo:
        def work(p11: Any, session: Any) -> KeyVersionInfo:
            info = self._describe(p11, session, key_id)
            if info.state is not KeyState.ENABLED:
                raise KeyDisabled(f"PKCS#11 key {key_id!r} is {info.state.value.replace('_', ' ')}")
            number = info.versions[-1].version + 1
            now = _now()
            record = self._new_version_record(p11, session, key_id, number, now)
            try:
                self._generate_version(p11, session, key_id, number)
            except BaseException:
                self._destroy_quietly([record])
                raise
            # Only the primary may encrypt; the token enforces it from here on.
            for older, key in self._version_keys(p11, session, key_id, encrypting=True).items():
                if older != number:
                    key[p11.Attribute.ENCRYPT] = False
            return KeyVersionInfo(version=number, state=VersionState.ENABLED, created_at=now, encrypt_count=None)

        return self._call(work)

    def set_key_version_state(self, key_id: str, version: int, state: VersionState) -> KeyVersionInfo:
        state = VersionState(state)
        if state is VersionState.DESTROY_SCHEDULED:
            raise UnsupportedOperation("the PKCS#11 provider destroys versions at once; use DESTROYED")

        def work(p11: Any, session: Any) -> KeyVersionInfo:
            info = self._describe(p11, session, key_id)
            try:
                current = info.version(version)
            except KeyError:
                raise KeyNotFound(f"PKCS#11 key {key_id!r} has no version {version}") from None
            if version == info.primary_version and state is not VersionState.ENABLED:
                raise KeyDisabled(f"version {version} of {key_id!r} is primary; rotate before retiring it")
            if current.state is VersionState.DESTROYED:
                if state is VersionState.DESTROYED:
                    return current
                raise KeyDisabled(f"version {version} of {key_id!r} is destroyed and cannot come back")
            key = self._version_key(p11, session, key_id, version)
            if key is None:  # destroyed between the two reads
                raise KeyDisabled(f"version {version} of {key_id!r} is destroyed and cannot come back")
            if state is VersionState.DESTROYED:
                key.destroy()
            else:
                key[p11.Attribute.DECRYPT] = state is VersionState.ENABLED
            return KeyVersionInfo(version=version, state=state, created_at=current.created_at, encrypt_count=None)

        return self._call(work)

    def set_key_state(self, key_id: str, state: KeyState) -> KeyInfo:
        state = KeyState(state)
        if state not in (KeyState.ENABLED, KeyState.DISABLED):
            raise UnsupportedOperation(
                f"the PKCS#11 provider can enable or disable a key, not set it {state.value}; use destroy_key"
            )

        def work(p11: Any, session: Any) -> KeyInfo:
            info = self._describe(p11, session, key_id)
            if info.state is KeyState.DESTROYED:
                raise KeyDisabled(f"PKCS#11 key {key_id!r} is destroyed")
            A = p11.Attribute
            markers = self._find(
                p11,
                session,
                {A.CLASS: p11.ObjectClass.DATA, A.APPLICATION: APPLICATION_DISABLED, A.LABEL: disabled_label(key_id)},
            )
            if state is KeyState.DISABLED and not markers:
                self._create_record(
                    p11,
                    session,
                    APPLICATION_DISABLED,
                    disabled_label(key_id),
                    {"key_id": key_id, "disabled_at": _now().isoformat()},
                )
            elif state is KeyState.ENABLED:
                for marker in markers:
                    marker.destroy()
            return self._describe(p11, session, key_id)

        return self._call(work)

    def destroy_key(self, key_id: str) -> None:
        def work(p11: Any, session: Any) -> None:
            self._describe(p11, session, key_id)  # KeyNotFound
            # Primary first: once it is gone the key reads as destroyed even if
            # this loop is interrupted, and a second call finishes the job.
            for _, key in sorted(self._version_keys(p11, session, key_id).items(), reverse=True):
                key.destroy()

        self._call(work)

    # -- cryptography --------------------------------------------------

    def _primary(self, p11: Any, session: Any, key_id: str) -> tuple[int, Any]:
        """Return the version and secret key that encrypt for ``key_id`` now."""
        if not isinstance(key_id, str) or not _KEY_ID.match(key_id):
            raise KeyNotFound(f"PKCS#11 key {key_id!r} does not exist")
        encrypting = self._version_keys(p11, session, key_id, encrypting=True)
        if not encrypting:
            info = self._describe(p11, session, key_id)  # KeyNotFound, or explains why
            raise KeyDisabled(f"PKCS#11 key {key_id!r} is {info.state.value.replace('_', ' ')}")
        if self._is_disabled(p11, session, key_id):
            raise KeyDisabled(f"PKCS#11 key {key_id!r} is disabled")
        version = max(encrypting)
        return version, encrypting[version]

    def _seal(self, p11: Any, session: Any, key_id: str, plaintext: bytes, context: bytes) -> EncryptResult:
        version, key = self._primary(p11, session, key_id)
        header = HEADER.pack(key_id, version)
        iv = os.urandom(IV_BYTES)
        sealed = key.encrypt(
            plaintext,
            mechanism=p11.Mechanism.AES_GCM,
            mechanism_param=p11.GCMParams(iv, header + context, TAG_BITS),
        )
        return EncryptResult(ciphertext=header + iv + bytes(sealed), key_id=key_id, key_version=version)

    @staticmethod
    def _plaintext(plaintext: object) -> bytes:
        if not isinstance(plaintext, (bytes, bytearray, memoryview)):
            raise TypeError("plaintext must be bytes")
        return bytes(plaintext)

    def encrypt(
        self, key_id: str, plaintext: bytes, *, encryption_context: EncryptionContext | None = None
    ) -> EncryptResult:
        data = self._plaintext(plaintext)
        context = encode_context(encryption_context)
        return self._call(lambda p11, session: self._seal(p11, session, key_id, data, context))

    def decrypt(self, ciphertext: bytes, *, encryption_context: EncryptionContext | None = None) -> DecryptResult:
        ciphertext = as_frame(ciphertext)
        key_id, version, header_end = HEADER.read(ciphertext)
        aad = ciphertext[:header_end] + encode_context(encryption_context)
        iv = ciphertext[header_end : header_end + IV_BYTES]
        sealed = ciphertext[header_end + IV_BYTES :]

        def work(p11: Any, session: Any) -> DecryptResult:
            key = self._version_key(p11, session, key_id, version)
            if key is None:  # unknown or destroyed: the same answer (README: "What a failed decrypt reveals")
                self._assert_logged_in(p11, session)
                raise InvalidCiphertext()
            if not key[p11.Attribute.DECRYPT]:  # a disabled version opens nothing, and does not say why
                raise InvalidCiphertext()
            try:
                plaintext = key.decrypt(
                    sealed,
                    mechanism=p11.Mechanism.AES_GCM,
                    mechanism_param=p11.GCMParams(iv, aad, TAG_BITS),
                )
            except _errors(p11, _BAD_CIPHERTEXT_ERRORS):
                raise InvalidCiphertext() from None
            # Only an authentic ciphertext learns that its key is switched off.
            if self._is_disabled(p11, session, key_id):
                raise KeyDisabled(f"PKCS#11 key {key_id!r} is disabled")
            return DecryptResult(plaintext=bytes(plaintext), key_id=key_id, key_version=version)

        return self._call(work)

    def generate_data_key(
        self,
        key_id: str,
        *,
        encryption_context: EncryptionContext | None = None,
        key_spec: str = "AES_256",
    ) -> DataKey:
        length = self.key_length(key_spec)
        context = encode_context(encryption_context)

        def work(p11: Any, session: Any) -> DataKey:
            self._primary(p11, session, key_id)  # refuse before drawing a key for nothing
            plaintext = bytearray(session.generate_random(length * 8))
            wrapped = self._seal(p11, session, key_id, bytes(plaintext), context)
            return DataKey(
                plaintext=plaintext, ciphertext=wrapped.ciphertext, key_id=key_id, key_version=wrapped.key_version
            )

        return self._call(work)

    def health_check(self) -> HealthStatus:
        def probe() -> str:
            def work(p11: Any, session: Any) -> str:
                token = session.token
                session.generate_random(64)  # a real round trip to the token
                return (
                    f"token {token.label!r} ({token.manufacturer_id} {token.model}, "
                    f"serial {token.serial.decode('ascii', 'replace').strip()}) via {self.library}: logged in"
                )

            return self._call(work)

        return self.timed_health(probe)


def _describe_error(exc: BaseException) -> str:
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
