"""What the PKCS#11 provider promises beyond the contract suite, checked on a real SoftHSM2 token.

The token is inspected with python-pkcs11 directly (a second, raw view of the
same objects), so these tests see what an HSM administrator would see.
"""

import ctypes
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

import keyvault.kms.pkcs11 as pkcs11_provider
from keyvault.kms import (
    AccessDenied,
    ConfigurationError,
    InvalidCiphertext,
    KeyState,
    EncryptResult,
    ProviderUnavailable,
    RewrapItem,
    VersionState,
    encode_context,
)
from keyvault.kms.pkcs11 import PKCS11Provider, disabled_label, key_label, version_label
from keyvault.kms.registry import load_provider_class
from tests.servers.softhsm import LOGIN_TOKEN, RECOVERY_TOKEN

CONTEXT = {"tenant": "acme", "purpose": "pkcs11"}
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def provider(pkcs11_harness):
    return pkcs11_harness.provider


@pytest.fixture
def key_id(pkcs11_harness):
    return pkcs11_harness.new_key()


@pytest.fixture
def token_session(softhsm, provider):
    """A raw python-pkcs11 session on the contract token.

    It opens without a PIN: PKCS#11 login belongs to the process, and the
    provider has logged it in. Closing a PIN-less session never logs out.
    """
    provider.health_check()
    token = pkcs11.lib(softhsm.library).get_token(token_label=softhsm.token().label)
    session = token.open(rw=True)
    yield session
    session.close()


def secret_keys(session, key_id):
    return {
        key[Attribute.LABEL]: key
        for key in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: key_id.encode()})
    }


def data_objects(session, application):
    return {
        obj[Attribute.LABEL]: obj
        for obj in session.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: application})
    }


def raw_open(kek, ciphertext, key_id, context=None):
    """Decrypt one of the provider's ciphertexts with python-pkcs11 alone."""
    header_end = 2 + len(key_id.encode()) + 4
    iv, sealed = ciphertext[header_end : header_end + 12], ciphertext[header_end + 12 :]
    params = pkcs11.GCMParams(iv, ciphertext[:header_end] + encode_context(context), 128)
    return kek.decrypt(sealed, mechanism=Mechanism.AES_GCM, mechanism_param=params)


# -- the KEK never leaves the token ------------------------------------------


def test_kek_is_sensitive_and_never_extractable(provider, key_id, token_session):
    (kek,) = secret_keys(token_session, key_id).values()

    assert kek[Attribute.TOKEN] and kek[Attribute.PRIVATE] and kek[Attribute.LOCAL]
    assert kek[Attribute.SENSITIVE] and kek[Attribute.ALWAYS_SENSITIVE]
    assert not kek[Attribute.EXTRACTABLE] and kek[Attribute.NEVER_EXTRACTABLE]
    assert kek[Attribute.KEY_TYPE] == KeyType.AES and kek[Attribute.VALUE_LEN] == 32
    assert not any(kek[a] for a in (Attribute.WRAP, Attribute.UNWRAP, Attribute.SIGN, Attribute.DERIVE))
    with pytest.raises(pkcs11.exceptions.AttributeSensitive):
        kek[Attribute.VALUE]
    with pytest.raises(pkcs11.exceptions.AttributeReadOnly):
        kek[Attribute.EXTRACTABLE] = True
    with pytest.raises(pkcs11.exceptions.AttributeReadOnly):
        kek[Attribute.SENSITIVE] = False
    wrapping_key = token_session.generate_key(KeyType.AES, 256, store=False, template={Attribute.WRAP: True})
    with pytest.raises(pkcs11.exceptions.KeyUnextractable):
        wrapping_key.wrap_key(kek, mechanism=Mechanism.AES_KEY_WRAP)


# -- the token is the source of truth ------------------------------------------


def test_token_objects_follow_the_documented_scheme(provider, key_id, token_session):
    old = provider.encrypt(key_id, b"v1 data")
    provider.rotate_key(key_id)

    keys = secret_keys(token_session, key_id)
    assert sorted(keys) == [version_label(key_id, 1), version_label(key_id, 2)] == [
        f"keyvault:{key_id}:v1",
        f"keyvault:{key_id}:v2",
    ]
    v1, v2 = keys[version_label(key_id, 1)], keys[version_label(key_id, 2)]
    assert (v1[Attribute.ENCRYPT], v1[Attribute.DECRYPT]) == (False, True), "only the primary encrypts"
    assert (v2[Attribute.ENCRYPT], v2[Attribute.DECRYPT]) == (True, True)
    key_record = data_objects(token_session, "keyvault/key")[key_label(key_id)]
    assert json.loads(key_record[Attribute.VALUE])["description"] == "contract suite"
    version_records = {label for label in data_objects(token_session, "keyvault/version") if key_id in label}
    assert version_records == {f"keyvault:{key_id}:v1", f"keyvault:{key_id}:v2"}

    assert raw_open(v1, old.ciphertext, key_id) == b"v1 data"
    provider.set_key_version_state(key_id, 1, VersionState.DISABLED)
    assert v1[Attribute.DECRYPT] is False
    with pytest.raises(pkcs11.PKCS11Error, match="0x68"):  # the token itself refuses: CKR_KEY_FUNCTION_NOT_PERMITTED
        raw_open(v1, old.ciphertext, key_id)

    provider.set_key_state(key_id, KeyState.DISABLED)
    assert disabled_label(key_id) in data_objects(token_session, "keyvault/disabled")
    provider.set_key_state(key_id, KeyState.ENABLED)
    assert disabled_label(key_id) not in data_objects(token_session, "keyvault/disabled")

    provider.set_key_version_state(key_id, 1, VersionState.DESTROYED)
    assert list(secret_keys(token_session, key_id)) == [version_label(key_id, 2)], "v1's material is gone"
    assert version_label(key_id, 1) in data_objects(token_session, "keyvault/version"), "its record stays"
    with pytest.raises(InvalidCiphertext):  # as for a version that never existed (kms/README.md)
        provider.decrypt(old.ciphertext)


def test_a_second_provider_instance_sees_what_the_first_did(softhsm, provider, key_id):
    token = softhsm.token()
    ciphertext = provider.encrypt(key_id, b"shared", encryption_context=CONTEXT).ciphertext
    provider.rotate_key(key_id)
    provider.set_key_version_state(key_id, 1, VersionState.DISABLED)

    second = PKCS11Provider(softhsm.library, token.label, token.pin)

    assert second.describe_key(key_id) == provider.describe_key(key_id)
    with pytest.raises(InvalidCiphertext):
        second.decrypt(ciphertext, encryption_context=CONTEXT)
    second.set_key_version_state(key_id, 1, VersionState.ENABLED)
    assert provider.decrypt(ciphertext, encryption_context=CONTEXT).plaintext == b"shared"


def test_another_process_reads_the_same_token(softhsm, provider, key_id):
    """A fresh process has its own SoftHSM instance and session: only the token files are shared."""
    token = softhsm.token()
    ciphertext = provider.encrypt(key_id, b"across processes", encryption_context=CONTEXT).ciphertext
    provider.rotate_key(key_id)
    script = (
        "import json, sys\n"
        "from keyvault.kms.pkcs11 import PKCS11Provider\n"
        "args = json.load(sys.stdin)\n"
        "provider = PKCS11Provider(args['library'], args['label'], args['pin'])\n"
        "info = provider.describe_key(args['key_id'])\n"
        "opened = provider.decrypt(bytes.fromhex(args['ciphertext']), encryption_context=args['context'])\n"
        "print(json.dumps({'primary': info.primary_version, 'versions': [v.version for v in info.versions],"
        " 'plaintext': opened.plaintext.decode(), 'version': opened.key_version}))\n"
    )
    request = {
        "library": softhsm.library,
        "label": token.label,
        "pin": token.pin,
        "key_id": key_id,
        "ciphertext": ciphertext.hex(),
        "context": CONTEXT,
    }

    result = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(request),
        env={**softhsm.env(), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "primary": 2,
        "versions": [1, 2],
        "plaintext": "across processes",
        "version": 1,
    }


# -- the ciphertext format -----------------------------------------------------

KAT_KEY = bytes(range(32))
KAT_CONTEXT = {"tenant": "acme", "purpose": "kat"}
KAT_PLAINTEXT = b"keyvault pkcs11 known answer"
#: Made with pyca/cryptography's AESGCM, not with the token:
#: 01 ‖ 0a "kat-vector" ‖ 00000001 ‖ IV 000102…0b ‖ AES-GCM(KAT_KEY, AAD = header ‖ encode_context(KAT_CONTEXT)).
KAT_CIPHERTEXT = bytes.fromhex(
    "010a6b61742d766563746f7200000001000102030405060708090a0b"
    "2c67af6da490ae6fad31fce8c2d8494de8b8e8439e5b3e124b1080f7"
    "03d996fae7c360964cc3e2aad5700605"
)


@pytest.fixture
def kat_key(token_session):
    """Version 1 of key "kat-vector", imported with known material (only tests may do that)."""
    existing = secret_keys(token_session, "kat-vector")
    if existing:
        return "kat-vector"
    token_session.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
            Attribute.LABEL: version_label("kat-vector", 1),
            Attribute.ID: b"kat-vector",
            Attribute.VALUE: KAT_KEY,
        }
    )
    return "kat-vector"


def test_known_answer_vector_decrypts(provider, kat_key):
    opened = provider.decrypt(KAT_CIPHERTEXT, encryption_context=dict(reversed(list(KAT_CONTEXT.items()))))

    assert (opened.plaintext, opened.key_id, opened.key_version) == (KAT_PLAINTEXT, "kat-vector", 1)
    with pytest.raises(InvalidCiphertext):
        provider.decrypt(KAT_CIPHERTEXT, encryption_context={"tenant": "acme"})


def test_token_ciphertext_opens_with_plain_aes_gcm(provider, kat_key):
    ciphertext = provider.encrypt(kat_key, KAT_PLAINTEXT, encryption_context=KAT_CONTEXT).ciphertext

    header, iv, body = ciphertext[:16], ciphertext[16:28], ciphertext[28:]
    assert header == b"\x01\x0akat-vector\x00\x00\x00\x01"
    assert len(body) == len(KAT_PLAINTEXT) + 16
    assert AESGCM(KAT_KEY).decrypt(iv, body, header + encode_context(KAT_CONTEXT)) == KAT_PLAINTEXT


# -- login, configuration and failures ---------------------------------------------


def test_wrong_pin_is_access_denied(softhsm):
    token = softhsm.token(LOGIN_TOKEN)
    wrong = PKCS11Provider(softhsm.library, token.label, token.pin + "x")

    with pytest.raises(AccessDenied, match="refused the PIN"):
        wrong.describe_key("anything")
    with pytest.raises(AccessDenied, match="not retried"):
        wrong.describe_key("anything")
    status = wrong.health_check()
    assert not status.healthy and status.detail.startswith("AccessDenied")
    assert token.pin not in status.detail

    right = PKCS11Provider(softhsm.library, token.label, token.pin)
    assert right.create_key("after-a-wrong-pin").state is KeyState.ENABLED

    # Logged in now: a second C_Login would not check the PIN, so the provider does.
    with pytest.raises(AccessDenied, match="another PIN"):
        PKCS11Provider(softhsm.library, token.label, "0" + token.pin).describe_key("after-a-wrong-pin")


def test_missing_python_pkcs11_is_a_configuration_error(softhsm, monkeypatch):
    token = softhsm.token()
    monkeypatch.setitem(sys.modules, "pkcs11", None)  # makes `import pkcs11` raise ImportError
    provider = PKCS11Provider(softhsm.library, token.label, token.pin)

    with pytest.raises(ConfigurationError, match="python-pkcs11"):
        provider.encrypt("any-key", b"x")
    status = provider.health_check()
    assert not status.healthy and "python-pkcs11" in status.detail


def test_missing_library_is_a_configuration_error_and_health_reports_it(tmp_path):
    provider = PKCS11Provider(str(tmp_path / "libnothing.so"), "keyvault", "1234")

    with pytest.raises(ConfigurationError, match="does not exist"):
        provider.describe_key("any-key")
    status = provider.health_check()
    assert not status.healthy
    assert "libnothing.so" in status.detail


def test_a_file_that_is_no_pkcs11_module_is_a_configuration_error(tmp_path):
    fake = tmp_path / "libfake.so"
    fake.write_bytes(b"not an ELF file")

    with pytest.raises(ConfigurationError, match="cannot be loaded"):
        PKCS11Provider(str(fake), "keyvault", "1234").describe_key("any-key")


def test_unknown_token_label_names_the_tokens_present(softhsm):
    provider = PKCS11Provider(softhsm.library, "no-such-token", "1234")

    with pytest.raises(ConfigurationError, match="no-such-token") as error:
        provider.describe_key("any-key")
    assert softhsm.token().label in str(error.value)


@pytest.mark.parametrize("missing", ["library", "token_label", "pin"])
def test_from_config_requires_every_option(missing):
    options = {"library": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "keyvault", "pin": "1234"}
    options[missing] = ""

    with pytest.raises(ConfigurationError, match=missing):
        PKCS11Provider.from_config(options)


def test_the_registry_builds_it_from_the_settings_options(softhsm):
    token = softhsm.token()
    options = {"library": softhsm.library, "token_label": token.label, "pin": token.pin}

    provider = load_provider_class("pkcs11").from_config(options)

    assert isinstance(provider, PKCS11Provider)
    assert provider.health_check().healthy


def test_repr_has_no_pin(softhsm):
    token = softhsm.token()
    provider = PKCS11Provider.from_config({"library": softhsm.library, "token_label": token.label, "pin": token.pin})

    assert token.pin not in repr(provider)


def _shared_session(softhsm, label):
    """The process's logged-in session on token ``label``, as the provider keeps it."""
    library = pkcs11_provider._libraries[softhsm.library]
    slot_id = pkcs11.lib(softhsm.library).get_token(token_label=label).slot.slot_id
    return library.logins[slot_id].session


def _close_session_underneath(softhsm, label):
    """Close the shared session (python-pkcs11 logs out first): the handle becomes invalid."""
    _shared_session(softhsm, label).close()


def _log_out_underneath(softhsm, label):
    """Call C_Logout as other code in the process could: the session stays valid but public."""
    module = ctypes.CDLL(softhsm.library)  # the module already loaded, not a second copy
    module.C_Logout.argtypes = [ctypes.c_ulong]
    assert module.C_Logout(_shared_session(softhsm, label).handle) == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # python-pkcs11's search finaliser
@pytest.mark.parametrize("break_login", [_close_session_underneath, _log_out_underneath], ids=["closed", "logged-out"])
def test_a_lost_login_is_unavailable_never_key_not_found_then_recovers(softhsm, break_login):
    token = softhsm.token(RECOVERY_TOKEN)
    provider = PKCS11Provider(softhsm.library, token.label, token.pin)
    key_id = f"survivor-{break_login.__name__}"
    provider.create_key(key_id)
    ciphertext = provider.encrypt(key_id, b"still here").ciphertext
    operations = {
        "describe": lambda: provider.describe_key(key_id).primary_version,
        "encrypt": lambda: provider.encrypt(key_id, b"x").key_version,
        "decrypt": lambda: provider.decrypt(ciphertext).key_version,
        "rotate": lambda: provider.rotate_key(key_id).version - 1,
    }

    for name, operation in operations.items():
        break_login(softhsm, token.label)
        # Logged out, private objects are invisible: that must not read as "no such key".
        with pytest.raises(ProviderUnavailable):
            operation()
        assert operation() == 1, f"{name} works again after logging in afresh"


def test_threads_share_the_token_safely(provider, key_id):
    errors = []

    def worker(number):
        try:
            for round_ in range(10):
                plaintext = f"{number}-{round_}".encode()
                sealed = provider.encrypt(key_id, plaintext, encryption_context=CONTEXT)
                assert provider.decrypt(sealed.ciphertext, encryption_context=CONTEXT).plaintext == plaintext
        except Exception as exc:  # collected for the main thread to report
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)


def test_a_forked_child_logs_in_again(softhsm, provider, key_id):
    ciphertext = provider.encrypt(key_id, b"before the fork").ciphertext

    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only if the inherited provider works
        code = 1
        try:
            opened = provider.decrypt(ciphertext)
            provider.encrypt(key_id, b"in the child")
            reinitialised = pkcs11_provider._libraries[softhsm.library].pid == os.getpid()
            code = 0 if opened.plaintext == b"before the fork" and reinitialised else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    assert provider.decrypt(ciphertext).plaintext == b"before the fork", "the parent is unaffected"


# -- the session pool ------------------------------------------------------------------------


def _login_of(softhsm, provider, label):
    provider.health_check()
    library = pkcs11_provider._libraries[softhsm.library]
    slot_id = pkcs11.lib(softhsm.library).get_token(token_label=label).slot.slot_id
    return library, library.logins[slot_id]


def test_the_module_is_initialised_for_threads(softhsm, provider):
    library, _ = _login_of(softhsm, provider, softhsm.token().label)

    assert library.threaded, "C_Initialize with CKF_OS_LOCKING_OK, so sessions may be used in parallel"


def test_the_pool_lends_each_call_its_own_session_and_no_more_than_its_size(softhsm, provider):
    _, login = _login_of(softhsm, provider, softhsm.token().label)
    lent = [login.acquire() for _ in range(login.size)]
    waiting: list = []
    waiter = threading.Thread(target=lambda: waiting.append(login.acquire()))

    waiter.start()
    waiter.join(timeout=0.3)
    assert waiter.is_alive(), "a call waits while every session is lent"
    login.release(lent.pop())
    waiter.join(timeout=10)

    assert len({id(session) for session in [*lent, *waiting]}) == login.size == provider.sessions
    for session in [*lent, *waiting]:
        login.release(session)


def test_rewrap_many_moves_every_item_to_the_new_primary(provider, key_id):
    items = [RewrapItem(provider.encrypt(key_id, b"dek %d" % n, encryption_context=CONTEXT).ciphertext, CONTEXT)
             for n in range(40)]
    items.insert(7, RewrapItem(items[0].ciphertext, {"tenant": "other"}))
    provider.rotate_key(key_id)

    results = provider.rewrap_many(items)

    assert type(results[7]) is InvalidCiphertext
    moved = results[:7] + results[8:]
    assert all(isinstance(result, EncryptResult) and result.key_version == 2 for result in moved)
    assert [provider.decrypt(result.ciphertext, encryption_context=CONTEXT).plaintext for result in moved] == [
        b"dek %d" % n for n in range(40)
    ]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # python-pkcs11's search finaliser
def test_a_token_failing_mid_batch_fails_the_whole_call_then_recovers(softhsm):
    token = softhsm.token(RECOVERY_TOKEN)
    provider = PKCS11Provider(softhsm.library, token.label, token.pin, sessions=3)
    provider.create_key("batch-survivor")
    items = [RewrapItem(provider.encrypt("batch-survivor", b"%d" % n).ciphertext) for n in range(12)]
    _close_session_underneath(softhsm, token.label)  # logs the whole process out of the token

    with pytest.raises(ProviderUnavailable):
        provider.rewrap_many(items)

    assert [result.key_version for result in provider.rewrap_many(items)] == [1] * 12


def test_a_module_other_code_initialised_first_is_used_one_thread_at_a_time(softhsm):
    token = softhsm.token()
    code = (
        "import pkcs11, sys\n"
        "from keyvault.kms import RewrapItem\n"
        "import keyvault.kms.pkcs11 as provider_module\n"
        "library, label, pin = sys.argv[1:4]\n"
        "pkcs11.lib(library)  # python-pkcs11's own C_Initialize(NULL): one thread promised\n"
        "provider = provider_module.PKCS11Provider(library, label, pin)\n"
        "ciphertext = provider.encrypt(provider.describe_key(sys.argv[4]).key_id, b'x').ciphertext\n"
        "results = provider.rewrap_many([RewrapItem(ciphertext)] * 5)\n"
        "print(provider_module._libraries[library].threaded, sorted({type(r).__name__ for r in results}))\n"
    )
    key_id = PKCS11Provider(softhsm.library, token.label, token.pin).create_key(f"serial-{os.getpid()}").key_id

    result = subprocess.run(
        [sys.executable, "-c", code, softhsm.library, token.label, token.pin, key_id],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=softhsm.env(), check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "['EncryptResult']"]


@pytest.mark.parametrize("sessions", [0, -1, 257, "four"])
def test_sessions_option_is_validated(softhsm, sessions):
    with pytest.raises(ConfigurationError, match="HMD_PKCS11_SESSIONS"):
        PKCS11Provider.from_config({"library": softhsm.library, "token_label": "t", "pin": "1", "sessions": sessions})
