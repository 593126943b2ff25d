"""Secret rotations end to end with the secret in real remote sources: OpenBao KV v2 and moto's Secrets Manager."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import psycopg
import pytest
from django.test import override_settings
from django.utils import timezone

from keyvault.secrets import get_source
from rotation import services
from keyvault.secrets import keyring
from tests.rotation.executors.conftest import rotate
from tests.rotation.executors.test_postgres import ADMIN_DSN, admin, app_db, stored_matches  # noqa: F401 - fixtures

pytestmark = pytest.mark.django_db


@pytest.fixture(params=["vault", "aws"])
def remote(request):
    """``(source name, path)`` for a fresh secret in OpenBao KV v2 or in moto's Secrets Manager."""
    name = request.param
    if name == "vault":
        server = request.getfixturevalue("openbao_server")
        options = {"addr": server.addr, "token": server.root_token}
        path = f"h11/{uuid.uuid4().hex[:10]}#value"
    else:
        server = request.getfixturevalue("moto_server")
        options = {"region": server.region, "endpoint_url": server.endpoint_url}
        path = f"h11/{uuid.uuid4().hex[:10]}"
    with override_settings(SECRET_SOURCES={"default": name, "sources": {name: options}}):
        yield name, path


def test_cookie_keyring_rotation_and_retirement_in_a_remote_source(remote, system_actor):
    source_name, path = remote
    source = get_source(source_name)
    source.write(path, keyring.dump(keyring.new_key(), []))
    old = keyring.parse(source.read(path).value)[0]
    secret = services.register_secret(name=f"cookies-{source_name}", secret_type="cookie_signing",
                                      source=source_name, path=path, actor=system_actor)
    t0 = timezone.now()

    run = rotate(secret, actor=system_actor, now=t0)
    current, previous = keyring.parse(source.read(path).value)
    assert run.state == "retiring", run.last_error
    assert current != old and previous == [old]

    services.execute_run(run.pk, now=t0 + timedelta(days=15))
    run.refresh_from_db()
    assert run.state == "completed" and keyring.parse(source.read(path).value) == (current, [])


@pytest.mark.postgres
def test_postgres_blue_green_rotation_with_the_credential_in_a_remote_source(remote, app_db, admin, system_actor):  # noqa: F811
    source_name, path = remote
    source = get_source(source_name)
    source.write(path, json.dumps({"engine": "postgres", "host": "127.0.0.1", "port": 5432, "dbname": app_db["db"],
                                   "username": app_db["blue"], "password": "initial-" + app_db["blue"]}))
    secret = services.register_secret(
        name=f"db-{source_name}", secret_type="database_credential", source=source_name, path=path, actor=system_actor,
        config={"host": "127.0.0.1", "dbname": app_db["db"], "usernames": [app_db["blue"], app_db["green"]],
                "admin_dsn": ADMIN_DSN},
    )
    run = rotate(secret, actor=system_actor)
    document = json.loads(source.read(path).value)
    assert run.state == "retiring", run.last_error
    assert document["username"] == app_db["green"] and stored_matches(admin, app_db["green"], document["password"])
    with psycopg.connect(host="127.0.0.1", dbname=app_db["db"], user=document["username"],
                         password=document["password"]) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (app_db["green"],)
