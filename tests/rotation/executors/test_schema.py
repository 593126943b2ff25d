"""The configuration schema of each managed-secret type: what it accepts, what it refuses and how it says so."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rotation.exceptions import ConfigFieldError, SecretConfigError
from rotation.executors import EXECUTORS, executor_for

SOURCES = lambda: ["env", "file"]  # noqa: E731 - the configured sources these tests assume

VALID = {
    "generic": {"length": 48, "alphabet": "hex"},
    "cookie_signing": {"format": "json"},
    "tls_certificate": {"common_name": "api.internal", "sans": ["api.internal", "10.0.0.5", "*.api.internal"],
                        "endpoint": "127.0.0.1:8443", "issuer": "internal_ca",
                        "ca_ref": {"source": "file", "path": "pki/ca"}, "crl_ref": {"source": "file", "path": "pki/crl"},
                        "key_type": "rsa", "validity_days": 30, "verify_attempts": 5},
    "oauth_client_secret": {"token_endpoint": "http://127.0.0.1:9000/oauth2/token", "client_id": "billing",
                            "scope": "read write", "auth_method": "client_secret_post"},
    "database_credential": {"host": "127.0.0.1", "port": 5432, "dbname": "app", "usernames": ["app_blue", "app_green"],
                            "admin_dsn": "host=127.0.0.1 port=5432 user=postgres dbname=postgres",
                            "admin_password_ref": {"source": "file", "path": "db/admin"}, "retire": "password",
                            "terminate_sessions": "always"},
    "vault_approle_secret_id": {"role": "billing-app", "mount": "approle-prod"},
    "api_client_token": {"client": "billing", "api_url": "https://keyvault.internal", "overlap_hours": 12},
}


def schema(secret_type):
    return executor_for(secret_type).schema


@pytest.mark.parametrize("secret_type", sorted(EXECUTORS))
def test_a_valid_configuration_comes_back_with_the_defaults_filled_in(secret_type):
    options = schema(secret_type).validate(VALID[secret_type], source_names=SOURCES)
    assert {k: v for k, v in options.items() if k in VALID[secret_type]} == VALID[secret_type]
    defaults = {f.name: f.default for f in schema(secret_type).fields if f.default is not None}
    assert set(defaults) <= set(options)


def test_defaults_are_written_once_in_the_schema():
    assert schema("generic").validate({}, source_names=SOURCES) == {"length": 32, "alphabet": "urlsafe"}
    assert schema("database_credential").validate(
        {"host": "db", "dbname": "app", "mode": "single", "username": "app", "admin_dsn": "host=db"},
        source_names=SOURCES)["port"] == 5432


@pytest.mark.parametrize(("secret_type", "change", "field", "message"), [
    ("generic", {"colour": "red"}, "colour", "unknown key for this type (known: alphabet, length)"),
    ("generic", {"length": "48"}, "length", "must be an integer, not str"),
    ("generic", {"length": True}, "length", "must be an integer, not bool"),
    ("generic", {"length": 8}, "length", "must be from 16 to 1024"),
    ("generic", {"alphabet": "base32"}, "alphabet", "must be one of urlsafe, hex"),
    ("cookie_signing", {"format": ["django"]}, "format", "must be text, not list"),
    ("tls_certificate", {"common_name": ""}, "common_name", "is required"),
    ("tls_certificate", {"common_name": "bad_name!"}, "common_name", "is not a DNS name or IP address"),
    ("tls_certificate", {"sans": "api.internal"}, "sans", "must be a list, not str"),
    ("tls_certificate", {"sans": ["a.internal", "a.internal"]}, "sans", "items must be different"),
    ("tls_certificate", {"sans": ["ok.internal", 7]}, "sans", "item 2 must be text"),
    ("tls_certificate", {"endpoint": "127.0.0.1"}, "endpoint", "is not host:port"),
    ("tls_certificate", {"endpoint": "127.0.0.1:99999"}, "endpoint", "is not a number from 1 to 65535"),
    ("tls_certificate", {"ca_ref": None}, "ca_ref", "is required when issuer is internal_ca"),
    ("tls_certificate", {"ca_ref": {"source": "vault", "path": "pki/ca"}}, "ca_ref", "secret source 'vault' is not configured"),
    ("tls_certificate", {"ca_ref": {"source": "file"}}, "ca_ref", 'needs both "source" and "path"'),
    ("tls_certificate", {"ca_ref": {"source": "file", "path": "p", "x": 1}}, "ca_ref", "unknown key(s) x"),
    ("tls_certificate", {"crl_ref": {"source": "file", "path": "pki/ca"}}, "crl_ref", "must not be ca_ref"),
    ("tls_certificate", {"validity_days": 0}, "validity_days", "must be from 1 to 825"),
    ("oauth_client_secret", {"token_endpoint": "http://idp.example/token"}, "token_endpoint", "must be https"),
    ("oauth_client_secret", {"token_endpoint": "ftp://idp.example/token"}, "token_endpoint", "must be an https:// URL"),
    ("oauth_client_secret", {"token_endpoint": "https://u:p@idp.example/t"}, "token_endpoint", "must not carry credentials"),
    ("oauth_client_secret", {"token_endpoint": "https://idp.example:0x1/t"}, "token_endpoint", "valid port"),
    ("oauth_client_secret", {"client_id": None}, "client_id", "is required"),
    ("oauth_client_secret", {"auth_method": "private_key_jwt"}, "auth_method", "must be one of"),
    ("database_credential", {"port": 0}, "port", "must be from 1 to 65535"),
    ("database_credential", {"host": "db host"}, "host", "is not a DNS name"),
    ("database_credential", {"usernames": ["app_blue"]}, "usernames", "must hold 2 item(s), not 1"),
    ("database_credential", {"usernames": None}, "usernames", "is required when mode is blue_green"),
    ("database_credential", {"mode": "single"}, "username", "is required when mode is single"),
    ("database_credential", {"admin_dsn": "host=db password=pw"}, "admin_dsn", "must not contain a password"),
    ("database_credential", {"admin_dsn": "service=prod"}, "admin_dsn", "not a service"),
    ("database_credential", {"admin_dsn": "host=db port=five"}, "admin_dsn", "is not a number from 1 to 65535"),
    ("database_credential", {"admin_dsn": "host='unterminated"}, "admin_dsn", "not a libpq connection string"),
    ("database_credential", {"retire": "drop"}, "retire", "must be one of nologin, password (got 'drop')"),
    ("database_credential", {"terminate_sessions": "sometimes"}, "terminate_sessions", "must be one of"),
])
def test_a_bad_configuration_is_refused_naming_the_field(secret_type, change, field, message):
    config = {**VALID[secret_type], **change}
    with pytest.raises(ConfigFieldError) as info:
        schema(secret_type).validate(config, source_names=SOURCES)
    assert info.value.field == field
    assert str(info.value).startswith(f"config field {field!r}: ")
    assert message in str(info.value)


def test_a_configuration_that_is_not_an_object_is_refused():
    with pytest.raises(ConfigFieldError, match="config field 'config': must be a JSON object, not list"):
        schema("generic").validate(["length", 32], source_names=SOURCES)


def test_the_markdown_table_lists_every_field_with_its_requirement_and_default():
    table = schema("database_credential").markdown_table().splitlines()
    assert table[0] == "| Key | Type | Required | Default | Meaning |"
    assert [row.split("|")[1].strip(" `") for row in table[2:]] == [f.name for f in schema("database_credential").fields]
    assert "| `usernames` | list of 2 roles | if mode is blue_green |" in table[6]
    assert "| `port` | integer 1–65535 | no | `5432` |" in table[3]


# -- property tests: whatever the input, the only failure is the typed validation error -------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _configs(secret_type):
    """Dicts mixing the type's own keys (with values of any JSON type, or near-valid text) and random keys."""
    names = [f.name for f in schema(secret_type).fields]
    near = st.sampled_from(["", "api.internal", "127.0.0.1:443", "https://idp.example/t", "host=db user=x", "ec",
                            "internal_ca", "single", "nologin", "a" * 300, "\x00", "[::1]:5432", "db,/run/pg"])
    value = JSON | near | st.lists(near, max_size=3) | st.fixed_dictionaries({"source": near, "path": near})
    own = st.dictionaries(st.sampled_from(names), value, max_size=len(names)) if names else st.just({})
    extra = st.dictionaries(st.text(max_size=10), JSON, max_size=2)
    return st.one_of(own, st.builds(lambda a, b: {**b, **a}, own, extra), JSON)


@pytest.mark.parametrize("secret_type", sorted(EXECUTORS))
def test_random_configurations_are_accepted_or_refused_by_field_and_never_crash(secret_type):
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(config=_configs(secret_type))
    def check(config):
        try:
            options = schema(secret_type).validate(config, source_names=SOURCES)
        except ConfigFieldError as exc:
            assert isinstance(exc.field, str) and str(exc).startswith(f"config field {exc.field!r}: ")
            return
        # then: what it accepted, it accepts again unchanged (defaults are stable)
        assert schema(secret_type).validate(options, source_names=SOURCES) == options

    check()


@pytest.mark.django_db  # api_client_token looks its client up
@pytest.mark.parametrize("secret_type", sorted(EXECUTORS))
def test_random_configurations_through_the_executor_raise_only_configuration_errors(secret_type):
    # The executor adds HMD_OUTBOUND_ALLOWLIST to the schema: still only SecretConfigError.
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(config=_configs(secret_type))
    def check(config):
        try:
            executor_for(secret_type).validate_config(config)
        except SecretConfigError:
            pass

    check()


# -- one definition per type ------------------------------------------------------------------------------------


@pytest.mark.parametrize("secret_type", sorted(EXECUTORS))
def test_every_executor_declares_its_schema(secret_type):
    from rotation.executors.base import Executor

    # then: its own schema with at least one key, or deliberately none (cookie keys have one optional key)
    assert type(executor_for(secret_type)).schema is not Executor.schema, (
        f"{secret_type}: declare `schema = ConfigSchema(...)` (rotation/executors/schema.py) instead of checking "
        "the configuration by hand; the console form, the CLI, the docs table and the run use it")


def test_an_executor_without_a_schema_is_still_checked_by_its_own_validate_config():
    from rotation.executors.base import Executor
    from rotation.executors.generic import GenericSecretExecutor

    class Legacy(GenericSecretExecutor):
        schema = Executor.schema

        def validate_config(self, config):
            if "role" not in config:
                raise SecretConfigError("configuration needs 'role'")
            return {"mount": "approle", **config}

    assert Legacy().options({"role": "app"}) == {"mount": "approle", "role": "app"}
    with pytest.raises(SecretConfigError, match="needs 'role'"):
        Legacy().options({})
    # and a declared schema wins over the base validate_config
    assert GenericSecretExecutor().options({}) == {"length": 32, "alphabet": "urlsafe"}
