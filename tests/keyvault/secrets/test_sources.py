"""The contract every secret source keeps, run against each backend (see conftest.py)."""

from __future__ import annotations

import pytest

from keyvault.secrets import (
    CurrentVersionError,
    InvalidSecretValue,
    ReadOnlySource,
    SecretNotFound,
    SecretSourceError,
)

ALL_SOURCES = ["env", "file", "vault", "aws", "gcp", "k8s"]
WRITABLE_SOURCES = ["file", "vault", "aws", "gcp", "k8s"]
#: Sources that keep more than one version (Kubernetes keeps only the current one).
VERSIONED_SOURCES = ["file", "vault", "aws", "gcp"]


def _harness(request, name):
    return request.getfixturevalue(f"{name}_secret_harness")


@pytest.fixture(params=ALL_SOURCES)
def harness(request):
    return _harness(request, request.param)


@pytest.fixture(params=WRITABLE_SOURCES)
def writable(request):
    return _harness(request, request.param)


@pytest.fixture(params=VERSIONED_SOURCES)
def versioned(request):
    return _harness(request, request.param)


def test_reads_what_was_put(harness):
    path = harness.new_path()
    harness.put(path, "first value")

    secret = harness.source.read(path)

    assert secret.value == "first value"
    assert secret.current is True
    assert secret.path == path


def test_missing_secret_is_not_found(harness):
    with pytest.raises(SecretNotFound):
        harness.source.read(harness.new_path())
    with pytest.raises(SecretNotFound):
        harness.source.list_versions(harness.new_path())


def test_values_never_in_reprs_or_errors(harness):
    path = harness.new_path()
    harness.put(path, "hunter2-very-secret")

    secret = harness.source.read(path)
    versions = harness.source.list_versions(path)

    assert "hunter2" not in repr(secret) and "hunter2" not in str(secret)
    assert "hunter2" not in repr(versions) and "hunter2" not in repr(harness.source)
    with pytest.raises(SecretSourceError) as error:
        harness.source.read(path, version="999999")
    assert "hunter2" not in str(error.value)


def test_health_check_reports_healthy(harness):
    healthy, detail = harness.source.health_check()

    assert healthy is True, detail


def test_write_round_trip_returns_new_current_version(writable):
    path = writable.new_path()

    first = writable.source.write(path, "v1 value")
    second = writable.source.write(path, "v2 value")

    assert first.version != second.version and second.current
    assert writable.source.read(path).value == "v2 value"
    assert writable.source.read(path).version == second.version


def test_versions_listed_oldest_first_with_one_current(versioned):
    path = versioned.new_path()
    written = [versioned.source.write(path, f"value {n}") for n in range(3)]

    versions = versioned.source.list_versions(path)

    assert [v.version for v in versions] == [w.version for w in written]
    assert [v.current for v in versions] == [False, False, True]
    # The previous version is readable everywhere (AWS serves only versions with a staging label).
    previous = versioned.source.read(path, version=written[1].version)
    assert previous.value == "value 1" and previous.current is False


def test_delete_old_version(versioned):
    path = versioned.new_path()
    old = versioned.source.write(path, "old")
    versioned.source.write(path, "new")

    versioned.source.delete_version(path, old.version)

    live = [v for v in versioned.source.list_versions(path) if v.state == "enabled"]
    assert old.version not in [v.version for v in live]
    with pytest.raises(SecretNotFound):
        versioned.source.read(path, version=old.version)
    assert versioned.source.read(path).value == "new"


def test_current_version_cannot_be_deleted(versioned):
    path = versioned.new_path()
    versioned.source.write(path, "old")
    current = versioned.source.write(path, "new")

    with pytest.raises(CurrentVersionError):
        versioned.source.delete_version(path, current.version)
    assert versioned.source.read(path).value == "new"


def test_empty_value_is_refused_without_echo(writable):
    with pytest.raises(InvalidSecretValue):
        writable.source.write(writable.new_path(), "")


def test_env_source_refuses_writes(env_secret_harness):
    path = env_secret_harness.new_path()
    env_secret_harness.put(path, "set by the operator")

    with pytest.raises(ReadOnlySource):
        env_secret_harness.source.write(path, "other")
    with pytest.raises(ReadOnlySource):
        env_secret_harness.source.delete_version(path, "current")
    assert env_secret_harness.source.writable is False
    assert env_secret_harness.source.read(path).value == "set by the operator"
