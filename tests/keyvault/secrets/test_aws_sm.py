"""AWS Secrets Manager source on moto's real HTTP server: stages, deprecated versions, JSON fields."""

from __future__ import annotations

import json

import boto3
import pytest

from keyvault.secrets import SecretNotFound, SecretSourceUnavailable
from keyvault.secrets.aws_sm import AWSSecretsManagerSource
from tests.keyvault.secrets.conftest import unique
from tests.servers.moto import free_port


@pytest.fixture
def boto_client(moto_server):
    return boto3.client("secretsmanager", region_name=moto_server.region, endpoint_url=moto_server.endpoint_url)


def test_writes_move_awscurrent_and_awsprevious(aws_secret_source, boto_client):
    path = unique("kvtest/")
    first = aws_secret_source.write(path, "one")
    second = aws_secret_source.write(path, "two")
    third = aws_secret_source.write(path, "three")

    stages = aws_secret_source.stages(path)

    assert stages[third.version] == ["AWSCURRENT"]
    assert stages[second.version] == ["AWSPREVIOUS"]
    assert stages[first.version] == []
    assert boto_client.get_secret_value(SecretId=path)["SecretString"] == "three"
    states = {v.version: v.state for v in aws_secret_source.list_versions(path)}
    assert states == {first.version: "deprecated", second.version: "enabled", third.version: "enabled"}


def test_deleting_the_previous_version_takes_its_label_off(aws_secret_source, boto_client):
    path = unique("kvtest/")
    old = aws_secret_source.write(path, "old")
    aws_secret_source.write(path, "new")

    aws_secret_source.delete_version(path, old.version)

    described = boto_client.describe_secret(SecretId=path)["VersionIdsToStages"]
    assert old.version not in described or described[old.version] == []
    with pytest.raises(SecretNotFound):
        aws_secret_source.read(path, version=old.version)


def test_json_field_is_merged_into_the_secret_string(aws_secret_source, boto_client):
    path = unique("kvtest/")
    boto_client.create_secret(Name=path, SecretString=json.dumps({"username": "app", "password": "p1"}))

    aws_secret_source.write(path + "#password", "p2")

    assert json.loads(boto_client.get_secret_value(SecretId=path)["SecretString"]) == {
        "username": "app",
        "password": "p2",
    }
    assert aws_secret_source.read(path + "#username").value == "app"
    arn = boto_client.describe_secret(SecretId=path)["ARN"]
    assert aws_secret_source.read(arn + "#password").value == "p2"


def test_unreachable_endpoint_is_unavailable(aws_credentials):
    source = AWSSecretsManagerSource(
        region="us-east-1", endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1, connect_timeout=1
    )

    with pytest.raises(SecretSourceUnavailable):
        source.read("anything")
    assert source.health_check()[0] is False
