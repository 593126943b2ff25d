"""The API's own WSGI handler (keyvault/api/handler.py): /api/ through the short middleware chain, the rest through the console's.

Requests go through ``keyvault.wsgi.application``, the application gunicorn serves, as WSGI calls.
"""

from __future__ import annotations

import json

import pytest
from django.core.wsgi import get_wsgi_application
from django.test.client import RequestFactory

from keyvault.api import services
from keyvault.api.handler import API_MIDDLEWARE, ApiHandler, dispatch
from keyvault.audit import Actor
from keyvault.models import AuditEvent
from keyvault.wsgi import application

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _served(served_in_process):
    pass


def _call(app, method: str, path: str, body: dict | None = None, **headers) -> tuple[int, dict, bytes]:
    request = RequestFactory().generic(method, path, json.dumps(body) if body is not None else "",
                                       content_type="application/json", **headers)
    answer = {}

    def start_response(status, response_headers, exc_info=None):
        answer["status"], answer["headers"] = int(status.split()[0]), dict(response_headers)

    content = b"".join(app(request.environ, start_response))
    return answer["status"], answer["headers"], content


def test_an_api_call_takes_the_api_chain_and_a_console_page_the_full_one(billing):
    client, token = billing
    row, plaintext = services.generate_data_key(client, "billing-kek", actor=Actor.system("tests"),
                                                context={"service": "billing"})

    # when a data key is unwrapped through the served application
    status, headers, content = _call(application, "POST", f"/api/v1/data-keys/{row.pk}/unwrap",
                                     {"context": {"service": "billing"}}, HTTP_AUTHORIZATION=f"Bearer {token}")

    # then it is answered and audited as through the full stack, with the security headers kept
    assert status == 200, content
    assert json.loads(content)["plaintext"]
    assert AuditEvent.objects.filter(action=AuditEvent.Action.DATA_KEY_UNWRAPPED, target_id=str(row.pk)).exists()
    assert headers["X-Content-Type-Options"] == "nosniff"
    # and none of the console's middleware ran: no session or CSRF cookie, no CSP, no Vary: Cookie
    assert "Set-Cookie" not in headers and "Content-Security-Policy" not in headers
    assert "Cookie" not in headers.get("Vary", "")

    # while a console page still gets the console's whole stack
    status, headers, _ = _call(application, "GET", "/login/")
    assert status == 200
    assert "Content-Security-Policy" in headers and "csrftoken" in headers.get("Set-Cookie", "")


def test_the_api_chain_refuses_malformed_requests_and_redirects_plain_http(settings, billing):
    _, token = billing
    # a NUL in the path: the guard's 400, before any view or query
    status, _, content = _call(application, "GET", "/api/v1/data-keys/1%00", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert status == 400 and b"NUL" in content
    # a Host the instance does not serve: 400, as on the console
    status, _, _ = _call(application, "GET", "/api/v1/keks", HTTP_HOST="evil.example",
                         HTTP_AUTHORIZATION=f"Bearer {token}")
    assert status == 400

    # plain HTTP where HTTPS is required: redirected, as the console is (settings read at start)
    settings.SECURE_SSL_REDIRECT = True
    served = dispatch(get_wsgi_application())
    status, headers, _ = _call(served, "GET", "/api/v1/keks", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert status == 301 and headers["Location"].startswith("https://")


def test_the_api_handler_loads_only_the_api_middleware():
    handler = ApiHandler()
    names = []
    chain = handler._middleware_chain
    while chain is not None:  # each middleware holds the next as get_response (wrapped by Django)
        middleware = getattr(chain, "__wrapped__", chain)
        if not hasattr(middleware, "get_response"):
            break
        names.append(f"{type(middleware).__module__}.{type(middleware).__name__}")
        chain = middleware.get_response
    assert names == list(API_MIDDLEWARE)
