"""Provider options declared by each provider (OPTIONS, CONFIGURED_BY), read into settings.KMS without Django."""

import pytest

from keyvault.kms.local import DEFAULT_MAX_ENCRYPTIONS, LocalKMSProvider, generate_master_key
from keyvault.kms.options import MappingEnv, Option, read_options
from keyvault.kms.registry import BUILTIN_PROVIDERS, load_provider_class, providers_from_env


def providers(variables: dict, *, default: str = "local", given: dict | None = None) -> dict:
    env = MappingEnv(variables)
    return providers_from_env(env, default=default, is_set=env.is_set, given=given)


def test_only_the_default_provider_is_listed_when_nothing_is_configured():
    assert providers({}, default="vault") == {
        "vault": {
            "class": "keyvault.kms.vault.VaultTransitProvider",
            "addr": "",
            "token": "",
            "role_id": "",
            "secret_id": "",
            "kubernetes_role": "",
            "kubernetes_jwt_path": "/var/run/secrets/kubernetes.io/serviceaccount/token",
            "namespace": "",
            "mount": "transit",
            "ca_cert": "",
            "timeout": 10.0,
            "batch_size": 200,
        }
    }


@pytest.mark.parametrize(
    ("variables", "listed"),
    [
        ({"HMD_AWS_REGION": "eu-west-1"}, {"aws"}),
        ({"HMD_AWS_KMS_ENDPOINT_URL": "http://127.0.0.1:5000"}, {"aws"}),
        ({"HMD_GCP_PROJECT": "p"}, {"gcp"}),
        ({"HMD_VAULT_ADDR": "http://127.0.0.1:8200"}, {"vault"}),
        ({"HMD_PKCS11_LIBRARY": "/lib.so"}, {"pkcs11"}),
        ({"HMD_GCP_LOCATION": "europe-west1"}, set()),  # not what makes gcp configured
    ],
)
def test_a_provider_is_listed_when_its_configuring_variable_is_set(variables, listed):
    assert set(providers(variables, default="local")) == listed | {"local"}


def test_options_are_typed_and_defaulted_by_the_provider():
    listed = providers({"HMD_AWS_REGION": "eu-west-1", "HMD_AWS_MAX_ATTEMPTS": "7", "HMD_AWS_STATE_TTL": "2.5"}, default="aws")

    assert listed["aws"] == {
        "class": "keyvault.kms.aws.AWSKMSProvider",
        "region": "eu-west-1",
        "endpoint_url": "",
        "connect_timeout": 5.0,
        "read_timeout": 10.0,
        "max_attempts": 7,
        "state_ttl": 2.5,
        "rotation_wait": 30.0,
        "concurrency": 16,
    }


def test_given_options_list_a_provider_and_win(tmp_path):
    key = generate_master_key()

    listed = providers(
        {"HMD_LOCAL_KMS_MAX_ENCRYPTIONS": "99"},
        default="gcp",
        given={"local": {"keyring_path": str(tmp_path / "k"), "master_key": key}},
    )

    assert listed["local"] == {
        "class": "keyvault.kms.local.LocalKMSProvider",
        "max_encryptions_per_version": 99,
        "keyring_path": str(tmp_path / "k"),
        "master_key": key,
    }
    options = dict(listed["local"])
    cls = load_provider_class("local", options.pop("class"))
    assert cls.from_config(options).max_encryptions == 99


def test_the_local_default_limit_comes_from_the_provider():
    assert read_options(LocalKMSProvider.OPTIONS, MappingEnv({})) == {
        "max_encryptions_per_version": DEFAULT_MAX_ENCRYPTIONS
    }


def test_every_builtin_provider_declares_its_options_as_hmd_variables():
    for name in BUILTIN_PROVIDERS:
        cls = load_provider_class(name)
        assert cls.OPTIONS, name
        assert all(option.variable.startswith("HMD_") for option in cls.OPTIONS)
        assert set(cls.CONFIGURED_BY) <= {option.variable for option in cls.OPTIONS}


@pytest.mark.parametrize(
    ("kind", "raw", "value"),
    [("str", "x", "x"), ("int", "12", 12), ("float", "1.5", 1.5), ("bool", "yes", True), ("bool", "0", False)],
)
def test_mapping_env_reads_each_kind(kind, raw, value):
    assert read_options([Option("o", "HMD_O", None, kind)], MappingEnv({"HMD_O": raw})) == {"o": value}
