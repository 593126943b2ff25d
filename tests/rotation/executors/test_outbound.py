"""HMD_OUTBOUND_ALLOWLIST: which endpoints rotation executors may contact (issue 12, finding 3)."""

from __future__ import annotations

import pytest

from rotation.executors import executor_for, outbound
from rotation.executors.base import SecretConfigError


@pytest.mark.parametrize("entries,scheme,host,port,allowed", [
    (["idp.example.com"], "https", "IDP.example.com.", 443, True),
    (["idp.example.com"], "https", "evil.example.com", 443, False),
    (["idp.example.com:8443"], "https", "idp.example.com", 443, False),
    (["https://idp.example.com"], "http", "idp.example.com", 80, False),
    (["https://idp.example.com:443"], "https", "idp.example.com", 443, True),
    (["*.corp.example"], "postgresql", "db1.corp.example", 5432, True),
    (["*.corp.example"], "postgresql", "corp.example", 5432, False),
    (["*.corp.example"], "postgresql", "evilcorp.example", 5432, False),
    (["10.0.0.0/8"], "tls", "10.1.2.3", 443, True),
    (["10.0.0.0/8"], "tls", "11.1.2.3", 443, False),
    (["[::1]:8443"], "tls", "::1", 8443, True),
    (["127.0.0.1"], "http", "127.0.0.1", 8450, True),
    ([], "http", "127.0.0.1", 8450, False),
    (["*"], "https", "anything.example", 443, True),
])
def test_entries_match_as_documented(settings, entries, scheme, host, port, allowed):
    settings.OUTBOUND_ALLOWLIST = entries
    assert outbound.is_allowed(scheme, host, port) is allowed


@pytest.mark.parametrize("entry", ["https://", "host:99999", "a*b.example", "300.0.0.0/8", "https://h/path"])
def test_a_bad_entry_is_a_clear_configuration_error(entry):
    with pytest.raises(SecretConfigError, match="HMD_OUTBOUND_ALLOWLIST entry"):
        outbound.parse_rule(entry)


def test_every_executor_endpoint_is_checked_when_the_config_is_validated(settings):
    # given: an allowlist with one IdP, one TLS endpoint and one database host
    settings.OUTBOUND_ALLOWLIST = ["https://idp.example.com", "tls://web.example.com:443", "postgresql://db:5432"]

    # then: those validate, anything else is refused by name
    executor_for("oauth_client_secret").validate_config({"token_endpoint": "https://idp.example.com/t", "client_id": "c"})
    executor_for("tls_certificate").validate_config({"common_name": "web", "endpoint": "web.example.com:443"})
    pg = {"host": "db", "dbname": "d", "usernames": ["a", "b"], "admin_dsn": "host=db user=postgres"}
    executor_for("database_credential").validate_config(pg)
    for secret_type, config, shown in [
        ("oauth_client_secret", {"token_endpoint": "https://evil.example/t", "client_id": "c"}, "https://evil.example:443"),
        ("tls_certificate", {"common_name": "web", "endpoint": "evil.example:443"}, "tls://evil.example:443"),
        ("database_credential", {**pg, "host": "evil"}, "postgresql://evil:5432"),
        ("database_credential", {**pg, "admin_dsn": "host=db,evil user=postgres"}, "postgresql://evil:5432"),
        ("database_credential", {**pg, "admin_dsn": "hostaddr=203.0.113.9 user=postgres"}, "postgresql://203.0.113.9"),
    ]:
        with pytest.raises(outbound.OutboundNotAllowed, match=shown.replace(".", r"\.")):
            executor_for(secret_type).validate_config(config)
    with pytest.raises(SecretConfigError, match="not a service"):
        executor_for("database_credential").validate_config({**pg, "admin_dsn": "service=prod user=postgres"})


@pytest.mark.parametrize("changes,shown", [
    # libpq connects to the host of a slot whose hostaddr is empty: that host must be checked, with its own port
    ({"admin_dsn": "host=evil.example,db hostaddr=,10.0.0.5 port=6666,5432 user=postgres"}, "postgresql://evil.example:6666"),
    ({"admin_dsn": "host=db,db hostaddr=10.0.0.5,10.0.0.5 port=5432,6666 user=postgres"}, "postgresql://10.0.0.5:6666"),
    # a comma in the login's host is a list of hosts to libpq, tried in order: each one is checked
    ({"host": "evil.example,db.corp.example"}, "postgresql://evil.example:5432"),
])
def test_every_host_libpq_would_try_is_checked(settings, changes, shown):
    # given: an allowlist of one database network, one sub-domain and one address:port
    settings.OUTBOUND_ALLOWLIST = ["postgresql://*.corp.example", "postgresql://10.0.0.5:5432"]
    pg = {"host": "db.corp.example", "dbname": "d", "usernames": ["a", "b"],
          "admin_dsn": "host=db hostaddr=10.0.0.5 user=postgres"}
    executor_for("database_credential").validate_config(pg)

    # when/then: a configuration that also names a server outside it is refused, naming that server
    with pytest.raises(outbound.OutboundNotAllowed, match=shown.replace(".", r"\.")):
        executor_for("database_credential").validate_config({**pg, **changes})


# -- at connect time: a secret saved under an older, wider allowlist is still refused ---------------------------


@pytest.fixture
def narrowed(settings):
    """Shrink the allowlist after registration, as an operator tightening it would."""
    def narrow():
        settings.OUTBOUND_ALLOWLIST = ["https://idp.example.com"]
    return narrow


def _failed_with(run, step: str):
    from keyvault.models import AuditEvent

    assert run.state == "failed" and "OutboundNotAllowed" in run.last_error
    assert run.steps.get(key=step).status == "failed"
    assert AuditEvent.objects.filter(action="secret", details__event="outbound_refused", outcome="denied").exists()


@pytest.mark.django_db
def test_tls_verification_handshake_is_refused_at_connect_time(file_source, system_actor, narrowed):
    from rotation import services
    from rotation.executors.tls import issue, _key_pem, _pem
    from tests.rotation.executors.conftest import rotate

    key, _, cert = issue(common_name="web.internal", sans=["web.internal"])
    file_source.write("pki/web", _pem(cert) + _key_pem(key))
    secret = services.register_secret(name="web-cert", secret_type="tls_certificate", source="file", path="pki/web",
                                      config={"common_name": "web.internal", "endpoint": "127.0.0.1:9"},
                                      actor=system_actor)
    narrowed()
    _failed_with(rotate(secret, actor=system_actor), "verify.handshake")


@pytest.mark.django_db
def test_postgres_connections_are_refused_at_connect_time(file_source, system_actor, narrowed):
    import json

    from rotation import services
    from tests.rotation.executors.conftest import rotate

    file_source.write("db/app", json.dumps({"engine": "postgres", "host": "127.0.0.1", "port": 5432, "dbname": "app",
                                            "username": "app_blue", "password": "p"}))
    secret = services.register_secret(
        name="app-db", secret_type="database_credential", source="file", path="db/app", actor=system_actor,
        config={"host": "127.0.0.1", "dbname": "app", "usernames": ["app_blue", "app_green"],
                "admin_dsn": "host=127.0.0.1 user=postgres dbname=postgres"})
    narrowed()
    _failed_with(rotate(secret, actor=system_actor), "precheck.admin")


# -- redirects: an allowed endpoint cannot send a credential on to one that is not ---------------------------


class _Recorder:
    """An HTTP server on 127.0.0.1 that answers every request with ``respond(handler)`` and keeps its headers."""

    def __init__(self, respond):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.seen: list[dict] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                recorder.seen.append({"method": self.command, "authorization": self.headers.get("Authorization"),
                                      "body": self.rfile.read(length).decode() if length else ""})
                respond(self)

            do_GET = do_POST = _any  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_an_allowed_token_endpoint_redirecting_elsewhere_gets_no_credential_through(settings, status):
    from rotation.executors.oauth import token_request

    # given: the attacker's server, outside the allowlist, and an allowed endpoint that redirects to it
    def refuse(handler):
        handler.send_response(401)
        handler.end_headers()

    attacker = _Recorder(refuse)

    def redirect(handler):
        handler.send_response(status)
        handler.send_header("Location", f"http://127.0.0.1:{attacker.port}/steal")
        handler.end_headers()

    allowed = _Recorder(redirect)
    settings.OUTBOUND_ALLOWLIST = [f"http://127.0.0.1:{allowed.port}"]
    try:
        # when: a token request goes to the allowed endpoint, with either client authentication
        for method in ("client_secret_basic", "client_secret_post"):
            accepted, detail = token_request(f"http://127.0.0.1:{allowed.port}/token", "app", "s3cret-value",
                                             auth_method=method)
            # then: the redirect is an answer, not followed: refused, and the attacker never hears of it
            assert not accepted and f"HTTP {status}" in detail
        assert attacker.seen == [] and len(allowed.seen) == 2
    finally:
        attacker.close()
        allowed.close()
