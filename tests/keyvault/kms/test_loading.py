"""keyvault/kms/loading.py: SDKs imported when a provider is built, classes named by dotted path."""

import sys

import pytest

from keyvault.kms import aws, gcp, pkcs11, vault
from keyvault.kms.errors import ConfigurationError
from keyvault.kms.loading import import_string, require_sdk
from keyvault.kms.local import LocalKMSProvider
from keyvault.kms.registry import load_provider_class
from keyvault.secrets.base import SecretSourceConfigurationError


def test_require_sdk_returns_the_modules_by_name():
    sdk = require_sdk({"json": "json", "decoder": "json.decoder"}, package="json", user="a test")

    assert sdk.json is sys.modules["json"] and sdk.decoder is sys.modules["json.decoder"]


def test_a_missing_sdk_is_a_configuration_error_naming_the_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "hvac", None)  # as if it were not installed

    with pytest.raises(ConfigurationError, match=r"the vault KMS provider needs the hvac package .*pip install hvac"):
        require_sdk(vault.SDK_MODULES, package="hvac", user="the vault KMS provider")


def test_a_secret_source_gets_its_own_error_class(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)

    with pytest.raises(SecretSourceConfigurationError, match="pip install boto3"):
        require_sdk({"boto3": "boto3"}, package="boto3", user="x", error=SecretSourceConfigurationError)


@pytest.mark.parametrize(
    ("blocked", "build", "package"),
    [
        ("boto3", lambda: aws.AWSKMSProvider(region="us-east-1"), "boto3"),
        ("google.cloud.kms_v1", lambda: gcp.GCPKMSProvider(project="p", key_ring="r"), "google-cloud-kms"),
        ("hvac", lambda: vault.VaultTransitProvider("http://127.0.0.1:1", vault.TokenAuth("t")), "hvac"),
        ("pkcs11", lambda: pkcs11.PKCS11Provider("/no/lib.so", "t", "1234").describe_key("k"), "python-pkcs11"),
    ],
    ids=["aws", "gcp", "vault", "pkcs11"],
)
def test_every_provider_reports_its_missing_sdk_when_used(monkeypatch, blocked, build, package):
    monkeypatch.setitem(sys.modules, blocked, None)

    with pytest.raises(ConfigurationError, match=f"pip install {package}"):
        build()


def test_import_string_returns_the_attribute():
    assert import_string("keyvault.kms.local.LocalKMSProvider") is LocalKMSProvider


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("LocalKMSProvider", "not a dotted path"),
        ("keyvault.kms.nowhere.Provider", "keyvault.kms.nowhere missing"),
        ("keyvault.kms.local.NoSuchProvider", "no class"),
    ],
)
def test_import_string_failures_are_configuration_errors(path, message):
    with pytest.raises(ConfigurationError, match=message):
        import_string(path, what="KMS provider 'x'")


def test_a_provider_class_path_overrides_the_builtin_one():
    assert load_provider_class("anything", "keyvault.kms.local.LocalKMSProvider") is LocalKMSProvider
    with pytest.raises(ConfigurationError, match="unknown KMS provider 'anything'"):
        load_provider_class("anything")
