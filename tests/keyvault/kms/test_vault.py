"""Vault Transit provider behaviour beyond the contract suite, on real OpenBao servers.

The shared server (``openbao_server``) carries the contract suite; tests that
seal, stop or audit a server get a private one.
"""

import base64
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from keyvault.kms import (
    AccessDenied,
    ConfigurationError,
    EncryptResult,
    InvalidCiphertext,
    KeyDisabled,
    KeyNotFound,
    ProviderUnavailable,
    RewrapItem,
    Throttled,
    UnsupportedOperation,
    VersionState,
    encode_context,
)
from keyvault.kms import vault
from keyvault.kms.vault import (
    DEFAULT_BATCH_SIZE,
    MAX_BATCH_SIZE,
    UNKNOWN_TIME,
    AppRoleAuth,
    KubernetesAuth,
    TokenAuth,
    VaultTransitProvider,
    pack_ciphertext,
    policy_hcl,
    unpack_ciphertext,
)
from tests.keyvault.kms.backends.vault import POLICY_NAME
from tests.servers.openbao import running_openbao

CONTEXT = {"tenant": "acme", "purpose": "vault-tests"}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def policy_provider(vault_harness) -> VaultTransitProvider:
    """The contract suite's provider: a token holding only the documented policy."""
    return vault_harness.provider


@pytest.fixture
def root_provider(openbao_server) -> VaultTransitProvider:
    return VaultTransitProvider(openbao_server.addr, TokenAuth(openbao_server.root_token), timeout=5)


@pytest.fixture(scope="module")
def audited_bao():
    """A private TLS server with a file audit device, Transit, AppRole and the documented policy."""
    with running_openbao(tls=True, audit_log=True) as server:
        server.enable_secrets_engine("transit", "transit")
        server.enable_auth("approle", "approle")
        server.write_policy(POLICY_NAME, policy_hcl("transit"))
        yield server


def audited_requests(server, path_prefix: str) -> int:
    return sum(
        1
        for entry in server.audit_entries()
        if entry.get("type") == "request" and entry["request"].get("path", "").startswith(path_prefix)
    )


# -- the documented contract of this module -------------------------------


def test_documented_policy_is_the_policy_tests_log_in_with():
    guide = Path(__file__).resolve().parents[3] / "docs" / "ops" / "secrets.md"

    assert policy_hcl("transit") in guide.read_text()


def test_ciphertext_layout_known_answer():
    vault_ciphertext = "vault:v2:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGw=="

    blob = pack_ciphertext("kek-1", vault_ciphertext)

    assert blob == b"\x01\x05kek-1vault:v2:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGw=="
    assert unpack_ciphertext(blob) == ("kek-1", 2, vault_ciphertext)


@pytest.mark.parametrize(
    "blob",
    [
        b"\x01\x05kek-1vault:v02:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGw==",  # leading zero
        b"\x01\x05kek-1vault:v0:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGw==",  # version 0
        b"\x01\x05kek-1vault:v2:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGx==",  # stray padding bits
        b"\x01\x05kek-1vault:v2:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGw==\n",  # trailing newline
        b"\x01\x05kek/1vault:v2:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGw==",  # not a key name
        b"\x01\x05kek-1vault:v2:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGA==",  # shorter than nonce + tag
    ],
    ids=["leading-zero", "version-0", "padding-bits", "newline", "bad-name", "too-short"],
)
def test_non_canonical_ciphertexts_are_refused_before_vault(blob):
    with pytest.raises(InvalidCiphertext):
        unpack_ciphertext(blob)


def test_vault_ignores_padding_bits_so_the_provider_must_not(policy_provider, vault_harness, openbao_server):
    key_id = vault_harness.new_key()
    name, _, vault_ciphertext = unpack_ciphertext(policy_provider.encrypt(key_id, b"").ciphertext)
    body = vault_ciphertext.rsplit(":", 1)[1]  # 28 bytes: ends in "==", four padding bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = body.rstrip("=")[-1]
    twin = vault_ciphertext[: -len(body)] + body.rstrip("=")[:-1] + alphabet[alphabet.index(last) ^ 1] + "=="

    opened_by_vault = openbao_server.request(
        "POST",
        f"transit/decrypt/{name}",
        {"ciphertext": twin, "context": base64.b64encode(encode_context(None)).decode()},
    )
    assert opened_by_vault["data"]["plaintext"] == ""
    forged = bytes((1, len(name))) + name.encode() + twin.encode()
    with pytest.raises(InvalidCiphertext):
        policy_provider.decrypt(forged)


# -- keys are never created behind our back -------------------------------


def test_encrypt_does_not_create_a_missing_key(root_provider, openbao_server):
    missing = unique("missing")

    with pytest.raises(KeyNotFound):
        root_provider.encrypt(missing, b"x", encryption_context=CONTEXT)

    with pytest.raises(RuntimeError, match="HTTP 404"):
        openbao_server.request("GET", f"transit/keys/{missing}")


def test_key_deleted_behind_the_cache_is_key_not_found(policy_provider, vault_harness, openbao_server):
    key_id = vault_harness.new_key()
    policy_provider.encrypt(key_id, b"cached")
    openbao_server.request("POST", f"transit/keys/{key_id}/config", {"deletion_allowed": True})
    openbao_server.request("DELETE", f"transit/keys/{key_id}")

    with pytest.raises(KeyNotFound):
        policy_provider.encrypt(key_id, b"again")

    with pytest.raises(RuntimeError, match="HTTP 404"):
        openbao_server.request("GET", f"transit/keys/{key_id}")


def test_key_not_made_by_keyvault_is_refused(policy_provider, openbao_server):
    foreign = unique("foreign")
    openbao_server.request("POST", f"transit/keys/{foreign}", {"type": "aes256-gcm96"})  # not derived

    with pytest.raises(ConfigurationError, match="derived"):
        policy_provider.encrypt(foreign, b"x")


# -- retirement and destruction -------------------------------------------


def test_retirement_by_min_decryption_version(policy_provider, vault_harness):
    key_id = vault_harness.new_key()
    ciphertexts = {1: policy_provider.encrypt(key_id, b"v1").ciphertext}
    for version in (2, 3, 4):
        policy_provider.rotate_key(key_id)
        ciphertexts[version] = policy_provider.encrypt(key_id, b"v%d" % version).ciphertext

    settings = policy_provider.retire_versions_below(key_id, 3)

    assert settings.min_decryption_version == 3
    info = policy_provider.describe_key(key_id)
    assert [v.state for v in info.versions] == [VersionState.DISABLED] * 2 + [VersionState.ENABLED] * 2
    assert [v.created_at == UNKNOWN_TIME for v in info.versions] == [True, True, False, False]
    for version in (1, 2):
        with pytest.raises(InvalidCiphertext):  # "too old" is not said: kms/README.md
            policy_provider.decrypt(ciphertexts[version])
    assert policy_provider.decrypt(ciphertexts[3]).plaintext == b"v3"

    with pytest.raises(UnsupportedOperation, match="would also enable versions 2..2"):
        policy_provider.set_key_version_state(key_id, 1, VersionState.ENABLED)
    policy_provider.set_key_version_state(key_id, 2, VersionState.ENABLED)
    assert policy_provider.decrypt(ciphertexts[2]).plaintext == b"v2"
    with pytest.raises(UnsupportedOperation, match="oldest first"):
        policy_provider.set_key_version_state(key_id, 3, VersionState.DISABLED)
    assert policy_provider.key_settings(key_id).min_decryption_version == 2


def test_destroying_versions_trims_oldest_first(policy_provider, vault_harness):
    key_id = vault_harness.new_key()
    first = policy_provider.encrypt(key_id, b"v1").ciphertext
    policy_provider.rotate_key(key_id)
    policy_provider.rotate_key(key_id)

    with pytest.raises(UnsupportedOperation, match="oldest first"):
        policy_provider.set_key_version_state(key_id, 2, VersionState.DESTROYED)
    destroyed = policy_provider.set_key_version_state(key_id, 1, VersionState.DESTROYED)

    assert destroyed.state is VersionState.DESTROYED
    settings = policy_provider.key_settings(key_id)
    assert settings.min_available_version == settings.min_decryption_version == settings.min_encryption_version == 2
    with pytest.raises(InvalidCiphertext):
        policy_provider.decrypt(first)
    with pytest.raises(KeyDisabled):
        policy_provider.retire_versions_below(key_id, 1)
    assert policy_provider.encrypt(key_id, b"still works").key_version == 3


def test_min_encryption_version_bounds(policy_provider, vault_harness):
    key_id = vault_harness.new_key()
    policy_provider.rotate_key(key_id)

    assert policy_provider.set_min_encryption_version(key_id, 2).min_encryption_version == 2
    with pytest.raises(ConfigurationError):
        policy_provider.set_min_encryption_version(key_id, 3)
    assert policy_provider.set_min_encryption_version(key_id, 0).min_encryption_version == 0


@pytest.mark.parametrize(
    "period",
    [timedelta(minutes=59), timedelta(seconds=-1), timedelta(hours=1, microseconds=500), 3600],
    ids=["under-an-hour", "negative", "fractional", "not-a-timedelta"],
)
def test_auto_rotate_period_is_validated(policy_provider, vault_harness, period):
    key_id = vault_harness.new_key()

    with pytest.raises(ConfigurationError, match="auto_rotate_period"):
        policy_provider.set_auto_rotate_period(key_id, period)
    assert policy_provider.key_settings(key_id).auto_rotate_period == timedelta(0)


def test_auto_rotate_period_is_set_and_cleared(policy_provider, vault_harness):
    key_id = vault_harness.new_key()

    assert policy_provider.set_auto_rotate_period(key_id, timedelta(days=30)).auto_rotate_period == timedelta(days=30)
    assert policy_provider.set_auto_rotate_period(key_id, timedelta(hours=1)).auto_rotate_period == timedelta(hours=1)
    assert policy_provider.set_auto_rotate_period(key_id, timedelta(0)).auto_rotate_period == timedelta(0)


# -- bulk rewrap ----------------------------------------------------------


def test_rewrap_many_in_few_requests(audited_bao):
    provider = VaultTransitProvider(
        audited_bao.addr, TokenAuth(audited_bao.root_token), ca_cert=audited_bao.ca_cert, timeout=10
    )
    first, second = unique("batch-a"), unique("batch-b")
    provider.create_key(first)
    provider.create_key(second)
    owner = {n: first if n < 250 else second for n in range(300)}
    items = [
        RewrapItem(provider.encrypt(owner[n], b"dek %d" % n, encryption_context={"row": str(n)}).ciphertext, {"row": str(n)})
        for n in range(300)
    ]
    provider.rotate_key(first)
    provider.rotate_key(second)
    tampered = bytearray(items[0].ciphertext)
    tampered[-10] = ord("A") if tampered[-10] != ord("A") else ord("B")  # still canonical base64: Vault must judge it
    items += [RewrapItem(items[0].ciphertext, {"row": "wrong"}), RewrapItem(bytes(tampered), {"row": "0"}), RewrapItem(b"junk")]
    before = audited_requests(audited_bao, "transit/rewrap/")

    results = provider.rewrap_many(items)

    # 252 items for `first` (200 + 52) and 50 for `second`; the junk never leaves the process.
    assert audited_requests(audited_bao, "transit/rewrap/") - before == 3
    assert provider.batch_size == DEFAULT_BATCH_SIZE == 200
    assert all(isinstance(result, EncryptResult) and result.key_version == 2 for result in results[:300])
    assert [type(result) for result in results[300:]] == [InvalidCiphertext] * 3
    for n in (0, 1, 249, 250, 299):
        assert results[n].key_id == owner[n]
        assert provider.decrypt(results[n].ciphertext, encryption_context={"row": str(n)}).plaintext == b"dek %d" % n


def test_rewrap_many_sends_batch_size_items_per_request(audited_bao):
    provider = VaultTransitProvider.from_config(
        {"addr": audited_bao.addr, "token": audited_bao.root_token, "ca_cert": audited_bao.ca_cert, "batch_size": "40"}
    )
    key_id = unique("batch-size")
    provider.create_key(key_id)
    items = [RewrapItem(provider.encrypt(key_id, b"%d" % n).ciphertext) for n in range(100)]
    before = audited_requests(audited_bao, "transit/rewrap/")

    results = provider.rewrap_many(items)

    assert audited_requests(audited_bao, "transit/rewrap/") - before == 3  # 40 + 40 + 20
    assert [provider.decrypt(result.ciphertext).plaintext for result in results] == [b"%d" % n for n in range(100)]


def test_a_batch_the_server_finds_too_big_is_split_and_the_smaller_size_kept(vault_harness, vault_policy_token, openbao_server):
    # OpenBao refuses a body of over 1,000 JSON strings: 249 items of four strings at most.
    provider = VaultTransitProvider(openbao_server.addr, TokenAuth(vault_policy_token), batch_size=600)
    key_id = vault_harness.new_key()
    items = [RewrapItem(provider.encrypt(key_id, b"%d" % n, encryption_context={"n": str(n)}).ciphertext, {"n": str(n)})
             for n in range(600)]
    provider.rotate_key(key_id)

    results = provider.rewrap_many(items)

    assert all(isinstance(result, EncryptResult) and result.key_version == 2 for result in results)
    assert provider.decrypt(results[599].ciphertext, encryption_context={"n": "599"}).plaintext == b"599"
    assert provider.batch_size == 150  # 600 refused, 300 refused, 150 accepted


@pytest.mark.parametrize("batch_size", [0, -1, MAX_BATCH_SIZE + 1, True, "many"])
def test_batch_size_is_validated(batch_size):
    with pytest.raises(ConfigurationError, match="HMD_VAULT_BATCH_SIZE"):
        VaultTransitProvider.from_config({"addr": "http://127.0.0.1:1", "token": "t", "batch_size": batch_size})


def test_rewrap_many_reports_retired_versions_per_item(policy_provider, vault_harness):
    key_id = vault_harness.new_key()
    old = policy_provider.encrypt(key_id, b"old").ciphertext
    policy_provider.rotate_key(key_id)
    current = policy_provider.encrypt(key_id, b"current").ciphertext
    policy_provider.set_key_version_state(key_id, 1, VersionState.DISABLED)

    results = policy_provider.rewrap_many([RewrapItem(old), RewrapItem(current), RewrapItem(b"junk")])

    assert [type(result) for result in results] == [InvalidCiphertext, EncryptResult, InvalidCiphertext]
    assert policy_provider.decrypt(results[1].ciphertext).plaintext == b"current"


def test_rewrap_many_of_a_key_deleted_meanwhile_is_invalid_per_item(policy_provider, vault_harness):
    key_id, survivor = vault_harness.new_key(), vault_harness.new_key()
    doomed = policy_provider.encrypt(key_id, b"doomed").ciphertext
    kept = policy_provider.encrypt(survivor, b"kept").ciphertext
    policy_provider.destroy_key(key_id)

    results = policy_provider.rewrap_many([RewrapItem(doomed), RewrapItem(kept)])

    assert type(results[0]) is InvalidCiphertext
    assert policy_provider.decrypt(results[1].ciphertext).plaintext == b"kept"


def test_a_rate_limit_quota_is_throttled_with_the_delay_vault_asks_for():
    with running_openbao() as bao:
        bao.enable_secrets_engine("transit", "transit")
        provider = VaultTransitProvider(bao.addr, TokenAuth(bao.root_token), timeout=5)
        key_id = unique("quota")
        provider.create_key(key_id)
        items = [RewrapItem(provider.encrypt(key_id, b"x").ciphertext)]
        bao.request("POST", "sys/quotas/config", {"enable_rate_limit_response_headers": True})
        bao.request("POST", "sys/quotas/rate-limit/transit", {"path": "transit/", "rate": 1, "interval": "60s"})
        provider.rewrap_many(items)  # the one request the quota allows

        with pytest.raises(Throttled) as throttled:
            provider.rewrap_many(items)

    assert isinstance(throttled.value, ProviderUnavailable)
    assert 0 < throttled.value.retry_after <= 60
    assert "rate limit quota exceeded" in str(throttled.value)


# -- authentication and transport -----------------------------------------


def test_approle_login_with_the_documented_policy_and_relogin_on_403(audited_bao):
    role_id, secret_id = audited_bao.approle_credentials(unique("keyvault"), [POLICY_NAME], token_ttl="10m")
    provider = VaultTransitProvider(
        audited_bao.addr, AppRoleAuth(role_id, secret_id), ca_cert=audited_bao.ca_cert, timeout=10
    )
    key_id = unique("approle")
    logins_before = audited_requests(audited_bao, "auth/approle/login")

    provider.create_key(key_id)
    sealed = provider.encrypt(key_id, b"via approle", encryption_context=CONTEXT)
    provider.rotate_key(key_id)
    rewrapped = provider.rewrap(sealed.ciphertext, encryption_context=CONTEXT)
    with provider.generate_data_key(key_id) as data_key:
        assert provider.decrypt(data_key.ciphertext).plaintext == bytes(data_key.plaintext)
    provider.set_key_version_state(key_id, 1, VersionState.DISABLED)
    provider.set_key_version_state(key_id, 1, VersionState.ENABLED)
    assert provider.health_check().healthy
    assert audited_requests(audited_bao, "auth/approle/login") - logins_before == 1

    audited_bao.request("PUT", "sys/leases/revoke-prefix/auth/approle")  # every AppRole token dies

    assert provider.decrypt(rewrapped.ciphertext, encryption_context=CONTEXT).plaintext == b"via approle"
    assert audited_requests(audited_bao, "auth/approle/login") - logins_before == 2
    provider.set_key_version_state(key_id, 1, VersionState.DESTROYED)
    provider.destroy_key(key_id)
    with pytest.raises(KeyNotFound):
        provider.describe_key(key_id)


def test_token_is_replaced_before_its_lease_ends(audited_bao, monkeypatch):
    monkeypatch.setattr(vault, "RELOGIN_AT", 0.1)  # log in again after 10 % of the lease
    role_id, secret_id = audited_bao.approle_credentials(unique("keyvault"), [POLICY_NAME], token_ttl="5s")
    provider = VaultTransitProvider(
        audited_bao.addr, AppRoleAuth(role_id, secret_id), ca_cert=audited_bao.ca_cert, timeout=10
    )
    logins_before = audited_requests(audited_bao, "auth/approle/login")
    provider.health_check()

    time.sleep(0.6)  # past 10 % of 5 s, well before the token expires
    failures_before = [entry for entry in audited_bao.audit_entries() if entry.get("error")]
    assert provider.health_check().healthy

    assert audited_requests(audited_bao, "auth/approle/login") - logins_before == 2
    assert [entry for entry in audited_bao.audit_entries() if entry.get("error")] == failures_before


def test_wrong_secret_id_is_access_denied(audited_bao):
    role_id, _ = audited_bao.approle_credentials(unique("keyvault"), [POLICY_NAME])
    provider = VaultTransitProvider(
        audited_bao.addr, AppRoleAuth(role_id, "not-the-secret"), ca_cert=audited_bao.ca_cert, timeout=10
    )

    with pytest.raises(AccessDenied, match="approle login"):
        provider.describe_key("anything")
    assert not provider.health_check().healthy


def test_token_without_permission_is_access_denied(openbao_server):
    token = openbao_server.create_token(["default"])
    provider = VaultTransitProvider(openbao_server.addr, TokenAuth(token), timeout=5)

    with pytest.raises(AccessDenied):
        provider.create_key(unique("denied"))


def test_kubernetes_login_reads_the_jwt_each_time(openbao_server, tmp_path):
    jwt_path = tmp_path / "token"
    provider = VaultTransitProvider(openbao_server.addr, KubernetesAuth("keyvault", str(jwt_path)), timeout=5)

    with pytest.raises(ConfigurationError, match=str(jwt_path)):
        provider.describe_key("anything")

    # No Kubernetes API here: OpenBao's kubernetes auth (mounted, no such role) refuses the login.
    openbao_server.request("POST", "sys/auth/kubernetes", {"type": "kubernetes"})
    jwt_path.write_text("eyJhbGciOiJSUzI1NiJ9.e30.c2ln\n")
    with pytest.raises(AccessDenied, match='invalid role name'):
        provider.describe_key("anything")


def test_tls_needs_the_servers_ca(audited_bao):
    trusting = VaultTransitProvider(
        audited_bao.addr, TokenAuth(audited_bao.root_token), ca_cert=audited_bao.ca_cert, timeout=5
    )
    untrusting = VaultTransitProvider(audited_bao.addr, TokenAuth(audited_bao.root_token), timeout=5)

    assert trusting.health_check().healthy
    with pytest.raises(ConfigurationError, match="HMD_VAULT_CACERT"):
        untrusting.describe_key("anything")


def test_sealed_then_stopped_server_is_provider_unavailable():
    with running_openbao() as server:
        server.enable_secrets_engine("transit", "transit")
        provider = VaultTransitProvider(server.addr, TokenAuth(server.root_token), timeout=2)
        key_id = unique("outage")
        provider.create_key(key_id)
        ciphertext = provider.encrypt(key_id, b"x").ciphertext

        server.seal()
        with pytest.raises(ProviderUnavailable, match="sealed"):
            provider.decrypt(ciphertext)
        status = provider.health_check()
        assert not status.healthy and "sealed" in status.detail

        server.stop()
        with pytest.raises(ProviderUnavailable, match="unreachable"):
            provider.encrypt(key_id, b"y")
        assert not provider.health_check().healthy


def test_missing_mount_is_configuration_error(openbao_server):
    provider = VaultTransitProvider(
        openbao_server.addr, TokenAuth(openbao_server.root_token), mount="no-such-transit", timeout=5
    )

    with pytest.raises(ConfigurationError, match="nothing mounted"):
        provider.describe_key("anything")


# -- configuration ----------------------------------------------------------


def test_missing_hvac_is_configuration_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "hvac", None)  # what `import hvac` sees when it is not installed

    with pytest.raises(ConfigurationError, match="hvac"):
        VaultTransitProvider.from_config({"addr": "http://127.0.0.1:8200", "token": "s.x"})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"addr": "http://127.0.0.1:8200"}, "got none"),
        ({"addr": "http://127.0.0.1:8200", "token": "t", "role_id": "r"}, "got token, role_id"),
        ({"addr": "", "token": "t"}, "HMD_VAULT_ADDR"),
        ({"addr": "127.0.0.1:8200", "token": "t"}, "HMD_VAULT_ADDR"),
        ({"addr": "http://127.0.0.1:8200", "token": "t", "mount": "a b"}, "HMD_VAULT_TRANSIT_MOUNT"),
        ({"addr": "http://127.0.0.1:8200", "token": "t", "timeout": 0}, "HMD_VAULT_TIMEOUT"),
        ({"addr": "http://127.0.0.1:8200", "token": "t", "timeout": "soon"}, "HMD_VAULT_TIMEOUT"),
        ({"addr": "https://127.0.0.1:8200", "token": "t", "ca_cert": "/nonexistent/ca.pem"}, "HMD_VAULT_CACERT"),
    ],
    ids=["no-auth", "two-auths", "no-addr", "no-scheme", "bad-mount", "zero-timeout", "bad-timeout", "missing-ca"],
)
def test_bad_configuration_is_refused(options, message):
    with pytest.raises(ConfigurationError, match=message):
        VaultTransitProvider.from_config(options)


def test_from_config_picks_the_auth_method_and_hides_secrets():
    approle = VaultTransitProvider.from_config(
        {"addr": "http://127.0.0.1:8200", "role_id": "role", "secret_id": "very-secret", "timeout": 3.0}
    )
    kubernetes = VaultTransitProvider.from_config(
        {"addr": "http://127.0.0.1:8200", "kubernetes_role": "keyvault", "kubernetes_jwt_path": "/tmp/jwt"}
    )
    token = VaultTransitProvider.from_config({"addr": "http://127.0.0.1:8200/", "token": "s.very-secret"})

    assert approle.auth == AppRoleAuth("role", "very-secret")
    assert kubernetes.auth == KubernetesAuth("keyvault", "/tmp/jwt")
    assert token.addr == "http://127.0.0.1:8200"
    for provider in (approle, token):
        assert "very-secret" not in repr(provider) + repr(provider.auth)


def test_invalid_key_names_name_no_key(policy_provider):
    with pytest.raises(ConfigurationError):
        policy_provider.create_key("../sys/seal")
    with pytest.raises(KeyNotFound):
        policy_provider.encrypt("../sys/seal", b"x")
    with pytest.raises(KeyNotFound):
        policy_provider.describe_key("a/b")
