"""Fixtures of the application API tests: KEKs, clients with tokens, a bearer-token HTTP client."""

from __future__ import annotations

import pytest
from django.core import signals
from django.core.cache import cache
from django.db import close_old_connections
from django.test import Client

from keyvault.api import services
from keyvault.keys import services as key_services

ALL_OPS = ["generate", "unwrap", "describe", "encrypt", "decrypt", "rewrap"]


@pytest.fixture(autouse=True)
def _fresh_rate_windows():
    cache.clear()
    services.forget_tokens()
    yield
    cache.clear()
    services.forget_tokens()


@pytest.fixture
def served_in_process():
    """Calling the served WSGI application in process, as Django's test client does: the request's
    end must not close the test's database connection."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def kek(system_actor):
    return key_services.create_kek(name="billing-kek", actor=system_actor)


@pytest.fixture
def other_kek(system_actor):
    return key_services.create_kek(name="hr-kek", actor=system_actor)


@pytest.fixture
def billing(kek, system_actor):
    """A client of ``billing-kek`` for every operation, in contexts whose service is billing."""
    client, token = services.create_client(
        name="billing", actor=system_actor, keks=[kek.name], operations=ALL_OPS,
        context_constraints={"service": ["billing"]}, owner="payments team",
    )
    return client, token


@pytest.fixture
def api():
    return ApiCaller()


class ApiCaller:
    """A Django test client speaking JSON with a bearer token."""

    def __init__(self):
        self.http = Client(enforce_csrf_checks=True)

    def _headers(self, token, address):
        headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
        if address:
            headers["REMOTE_ADDR"] = address
        return headers

    def post(self, path, body, *, token=None, address=None, raw=None):
        data = raw if raw is not None else __import__("json").dumps(body)
        return self.http.post("/api/v1/" + path, data=data, content_type="application/json",
                              **self._headers(token, address))

    def get(self, path, *, token=None, address=None):
        return self.http.get("/api/v1/" + path, **self._headers(token, address))
