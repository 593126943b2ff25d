"""Application clients: creation, tokens stored only as keyed digests, rotation with overlap, revocation, scope."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from django.core.management import call_command
from django.test import override_settings
from django.utils import timezone

from keyvault.api import services
from keyvault.exceptions import ApiAuthenticationFailed, ApiBadRequest, ApiForbidden, ApiNotFound, ApiRateLimited
from keyvault.keys import services as key_services
from keyvault.models import ApiClient, ApiToken, AuditEvent, DataKey

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[3]


def bearer(token: str) -> str:
    return f"Bearer {token}"


def test_create_client_stores_only_a_digest_of_a_256_bit_token(billing):
    client, token = billing

    row = ApiToken.objects.get(client=client)
    assert token.startswith(services.TOKEN_PREFIX) and len(token) >= len(services.TOKEN_PREFIX) + 43
    assert row.digest == services.token_digest(token) and token not in row.digest
    assert len(row.prefix) < len(token) // 4
    assert client.operations == sorted(["generate", "unwrap", "describe", "encrypt", "decrypt", "rewrap"])
    assert client.context_constraints == {"service": ["billing"]}
    event = AuditEvent.objects.get(action="api.client_created")
    assert event.target_id == "billing" and token not in str(event.details)
    assert event.details["keks"] == ["billing-kek"] and event.details["context_keys"] == ["service"]


def test_the_stored_digest_grants_nothing_and_survives_a_secret_key_rotation(billing):
    client, token = billing
    digest = services.token_digest(token)
    # the database row alone grants nothing: its digest is not a token
    with pytest.raises(ApiAuthenticationFailed):
        services.authenticate(bearer(digest))
    # SECRET_KEY is a rotated secret (the cookie-signing keyring); rotating it keeps applications signed in
    with override_settings(SECRET_KEY="another-server-secret-" + "x" * 40):
        assert services.token_digest(token) == digest
        assert services.authenticate(bearer(token)) == client


def test_authenticate_accepts_the_token_and_refuses_everything_else(billing):
    client, token = billing
    assert services.authenticate(bearer(token)) == client
    for header in (None, "", token, f"Basic {token}", "Bearer ", bearer(token + "x"), bearer("x" * 500)):
        with pytest.raises(ApiAuthenticationFailed):
            services.authenticate(header)


def test_bad_settings_are_refused_with_clear_errors(kek, system_actor):
    with pytest.raises(ValueError, match="unknown operation"):
        services.create_client(name="a", actor=system_actor, keks=[kek.name], operations=["steal"])
    with pytest.raises(ValueError, match="no KEK named nope"):
        services.create_client(name="a", actor=system_actor, keks=["nope"], operations=["unwrap"])
    with pytest.raises(ValueError):
        services.create_client(name="a", actor=system_actor, keks=[kek.name], operations=["unwrap"],
                               allowed_networks=["10.0.0.0/33"])
    with pytest.raises(ValueError, match="at least one operation"):
        services.create_client(name="a", actor=system_actor, keks=[kek.name], operations=[])
    assert not ApiClient.objects.exists()


def test_rotation_keeps_the_previous_token_for_the_overlap_only(billing, system_actor):
    client, first = billing
    now = timezone.now()

    second = services.rotate_token("billing", actor=system_actor, overlap=timedelta(hours=1), now=now)

    assert services.authenticate(bearer(first), now=now + timedelta(minutes=59)) == client
    assert services.authenticate(bearer(second), now=now + timedelta(minutes=59)) == client
    with pytest.raises(ApiAuthenticationFailed):
        services.authenticate(bearer(first), now=now + timedelta(hours=1, seconds=1))
    assert services.authenticate(bearer(second), now=now + timedelta(days=30)) == client
    event = AuditEvent.objects.filter(action="api.client_changed").get()
    assert event.details["event"] == "token_rotated" and second not in str(event.details)


def test_at_most_two_tokens_work_at_once(billing, system_actor):
    _, first = billing
    second = services.rotate_token("billing", actor=system_actor)
    third = services.rotate_token("billing", actor=system_actor)

    with pytest.raises(ApiAuthenticationFailed):
        services.authenticate(bearer(first))
    services.authenticate(bearer(second))
    services.authenticate(bearer(third))
    client = ApiClient.objects.get(name="billing")
    assert services.active_token_count(client) == 2


def test_revoke_refuses_every_token_and_is_audited(billing, system_actor):
    _, first = billing
    second = services.rotate_token("billing", actor=system_actor)

    services.revoke_client("billing", actor=system_actor, reason="decommissioned")
    services.revoke_client("billing", actor=system_actor)  # idempotent

    for token in (first, second):
        with pytest.raises(ApiAuthenticationFailed):
            services.authenticate(bearer(token))
    with pytest.raises(ValueError, match="revoked"):
        services.rotate_token("billing", actor=system_actor)
    revoked = AuditEvent.objects.filter(action="api.client_changed", details__event="revoked")
    assert revoked.count() == 1 and revoked.get().details["tokens_revoked"] == 2


def test_an_expired_client_is_refused(kek, system_actor):
    _, token = services.create_client(name="temp", actor=system_actor, keks=[kek.name], operations=["unwrap"],
                                       expires_at=timezone.now() + timedelta(hours=1))
    services.authenticate(bearer(token))
    with pytest.raises(ApiAuthenticationFailed):
        services.authenticate(bearer(token), now=timezone.now() + timedelta(hours=2))


def test_context_constraints_need_the_keys_and_match_values_or_globs(kek, system_actor):
    client, _ = services.create_client(
        name="c", actor=system_actor, keks=[kek.name], operations=["unwrap"],
        context_constraints=services.parse_context_requirements(["service=billing", "tenant=acme-*", "region"]))

    assert services.check_context(client, {"service": "billing", "tenant": "acme-eu", "region": "ü"})
    for bad in ({}, {"service": "billing", "tenant": "acme-eu"}, {"service": "hr", "tenant": "acme-eu", "region": "x"},
                {"service": "billing", "tenant": "other", "region": "x"}):
        with pytest.raises(ApiForbidden) as caught:
            services.check_context(client, bad)
        assert caught.value.code == "context"
    for invalid in ({"service": 1}, {"service": "billing", "tenant": "acme-1", "region": "\ud800"}):
        with pytest.raises(ApiBadRequest):
            services.check_context(client, invalid)


def test_address_allowlist(kek, system_actor):
    client, _ = services.create_client(name="c", actor=system_actor, keks=[kek.name], operations=["unwrap"],
                                       allowed_networks=["10.1.0.0/16", "2001:db8::/32"])
    services.check_address(client, "10.1.2.3")
    services.check_address(client, "2001:db8::1")
    for address in ("10.2.0.1", None, "not-an-address"):
        with pytest.raises(ApiForbidden):
            services.check_address(client, address)


def test_foreign_and_missing_keks_and_data_keys_look_the_same(billing, other_kek, system_actor):
    client, _ = billing
    foreign, plain = key_services.create_data_key(other_kek, actor=system_actor,
                                                  encryption_context={"service": "billing"})
    plain.wipe()
    for name in ("hr-kek", "no-such-kek"):
        with pytest.raises(ApiNotFound, match="^no such KEK$"):
            services.kek_for(client, name)
    for data_key_id in (foreign.pk, foreign.pk + 1000):
        with pytest.raises(ApiNotFound, match="^no such data key$"):
            services.data_key_for(client, data_key_id)


def test_rate_limit_is_counted_in_the_shared_cache(billing):
    client, _ = billing
    client.rate_limit_per_second = 3
    for _ in range(3):
        services.throttle(client, now=1000.2)
    with pytest.raises(ApiRateLimited) as caught:
        services.throttle(client, now=1000.9)
    assert caught.value.retry_after == 1
    services.throttle(client, now=1001.0)  # the next window


def test_cli_create_rotate_list_revoke(kek, capsys):
    call_command("api", "client", "create", "billing", "--kek", kek.name, "--ops", "unwrap,generate",
                 "--context-require", "service=billing", "--owner", "payments")
    token = capsys.readouterr().out.strip()
    client = services.authenticate(bearer(token))
    assert client.operations == ["generate", "unwrap"] and client.context_constraints == {"service": ["billing"]}

    call_command("api", "client", "rotate-token", "billing", "--overlap-hours", "2")
    new_token = capsys.readouterr().out.strip()
    assert new_token != token and services.authenticate(bearer(new_token)) == client

    call_command("api", "client", "list")
    listing = capsys.readouterr().out
    assert "billing\tenabled\tkeks=billing-kek\tops=generate,unwrap\tcontext=service=billing\ttokens=2" in listing

    call_command("api", "client", "revoke", "billing", "--reason", "test")
    assert "revoked" in capsys.readouterr().out
    with pytest.raises(ApiAuthenticationFailed):
        services.authenticate(bearer(new_token))
    events = AuditEvent.objects.filter(actor__startswith="system:cli:").values_list("action", flat=True)
    assert list(events.order_by("sequence")) == ["api.client_created", "api.client_changed", "api.client_changed"]


THROTTLE_ELSEWHERE = """
import django, sys
django.setup()
from keyvault.api import services
from keyvault.exceptions import ApiRateLimited
from keyvault.models import ApiClient
client = ApiClient(pk=int(sys.argv[1]), rate_limit_per_second=3)
try:
    services.throttle(client, now=float(sys.argv[2]))
except ApiRateLimited:
    print("429")
else:
    print("ok")
"""


def test_the_rate_limit_is_one_budget_across_processes_through_redis(billing, settings):
    # given the shared cache is Redis (HMD_CACHE_URL), as in production
    url = os.environ.get("HMD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    redis.Redis.from_url(url).flushdb()
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": url,
                                   "KEY_PREFIX": "keyvault"}}
    client, _ = billing
    client.rate_limit_per_second = 3
    window = 5000.5

    # when this process spends the client's budget for one second
    for _ in range(3):
        services.throttle(client, now=window)

    # then another process is refused in that second, and allowed in the next
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "keyvault.settings", "HMD_CACHE_URL": url}
    answers = [subprocess.run([sys.executable, "-c", THROTTLE_ELSEWHERE, str(client.pk), str(now)], env=env,
                              capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
               for now in (window, window + 1)]
    assert answers == ["429", "ok"]


def test_a_rate_limit_out_of_range_is_refused_before_the_database_sees_it(system_actor):
    for limit in (-1, 10**20):
        with pytest.raises(ValueError, match="rate limit must be 0"):
            services.create_client(name=f"c{abs(limit) % 97}", actor=system_actor, keks=[], operations=["describe"],
                                   rate_limit_per_second=limit)


# -- the per-process token cache ---------------------------------------------------------------


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = _Clock()
    monkeypatch.setattr(services, "_clock", fake)
    return fake


@override_settings(API_TOKEN_CACHE_SECONDS=2.0)
def test_a_revocation_in_another_process_takes_effect_within_the_cache_bound(billing, clock, django_assert_num_queries):
    client, token = billing
    services.authenticate(f"Bearer {token}")
    with django_assert_num_queries(0):  # the look-up is cached
        services.authenticate(f"Bearer {token}")
    # as another process revokes: the rows change, this process's cache is not told
    ApiToken.objects.filter(client=client).update(revoked_at=timezone.now())
    clock.now += 1.9
    assert services.authenticate(f"Bearer {token}") == client  # still within the bound
    clock.now += 0.2
    with pytest.raises(ApiAuthenticationFailed):
        services.authenticate(f"Bearer {token}")


@override_settings(API_TOKEN_CACHE_SECONDS=2.0)
def test_a_revocation_in_this_process_takes_effect_at_once(billing, clock, system_actor):
    _, token = billing
    services.authenticate(f"Bearer {token}")
    services.revoke_client("billing", actor=system_actor)
    with pytest.raises(ApiAuthenticationFailed):
        services.authenticate(f"Bearer {token}")


@override_settings(API_TOKEN_CACHE_SECONDS=2.0)
def test_revoking_tokens_but_not_the_client_takes_effect_at_once_in_this_process(billing, clock, system_actor):
    client, old = billing
    new = services.rotate_token("billing", actor=system_actor)
    services.authenticate(f"Bearer {old}")  # cached

    services.revoke_tokens("billing", actor=system_actor, reason="emergency", keep=client.tokens.latest("pk").pk)

    with pytest.raises(ApiAuthenticationFailed):
        services.authenticate(f"Bearer {old}")
    assert services.authenticate(f"Bearer {new}").pk == client.pk


@override_settings(API_TOKEN_CACHE_SECONDS=2.0)
def test_a_cached_token_still_expires_on_time(kek, clock, system_actor):
    client, token = services.create_client(name="short", actor=system_actor, keks=[kek.name], operations=["unwrap"],
                                           expires_at=timezone.now() + timedelta(hours=1))
    services.authenticate(f"Bearer {token}")
    with pytest.raises(ApiAuthenticationFailed):
        services.authenticate(f"Bearer {token}", now=timezone.now() + timedelta(hours=2))


@override_settings(API_TOKEN_CACHE_SECONDS=2.0)
def test_unknown_tokens_are_not_cached(db, clock):
    for n in range(3):
        with pytest.raises(ApiAuthenticationFailed):
            services.authenticate(f"Bearer kvapi_unknown{n}")
    assert services._token_cache == {}


@override_settings(API_TOKEN_CACHE_SECONDS=0)
def test_no_cache_means_every_call_looks_up(billing, django_assert_num_queries):
    _, token = billing
    services.authenticate(f"Bearer {token}")
    with django_assert_num_queries(1):
        services.authenticate(f"Bearer {token}")


def test_a_redis_count_starts_at_one_and_expires_with_its_window(settings):
    # given the shared cache is Redis, where a count is one pipelined round trip
    url = os.environ.get("HMD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    server = redis.Redis.from_url(url)
    server.flushdb()
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": url,
                                   "KEY_PREFIX": "keyvault"}}
    from django.core.cache import cache
    from keyvault.access import security

    # when a key is counted three times with a 5-second window
    counts = [security.increment("probe", timeout=5) for _ in range(3)]

    # then the counts run 1, 2, 3 and the key lapses with the window set by the first count only
    stored = cache.make_and_validate_key("probe")
    assert counts == [1, 2, 3]
    assert 0 < server.ttl(stored) <= 5
    assert int(server.get(stored)) == 3


@pytest.mark.django_db
def test_the_client_data_key_query_gives_the_rows_the_orm_gives(billing, kek, other_kek, system_actor):
    # given the client's data keys under two versions of its KEK (the first disabled), and a foreign one
    client, _ = billing
    first, _ = services.generate_data_key(client, kek.name, actor=system_actor, context={"service": "billing"},
                                          owner_ref="first")
    key_services.rotate_kek_version(kek, actor=system_actor)
    key_services.set_version_state(kek, 1, "disabled", actor=system_actor, force=True, reason="test")
    second, _ = services.generate_data_key(client, kek.name, actor=system_actor, context={"service": "billing"},
                                           owner_ref="second")
    foreign, _ = key_services.create_data_key(other_kek, actor=system_actor, owner_ref="foreign")

    # when the rows are read by the hand-written query
    rows = services._client_data_keys(client, [first.pk, second.pk, foreign.pk, 999_999])

    # then they are the client's rows only, field for field as DataKey.objects.select_related("kek") reads them
    expected = {row.pk: row for row in DataKey.objects.select_related("kek").filter(pk__in=[first.pk, second.pk])}
    assert sorted(rows) == sorted(expected) == sorted([first.pk, second.pk])
    for pk, row in rows.items():
        for field in DataKey._meta.concrete_fields:
            assert getattr(row, field.attname) == getattr(expected[pk], field.attname), field.name
        for field in row.kek._meta.concrete_fields:
            assert getattr(row.kek, field.attname) == getattr(expected[pk].kek, field.attname), field.name
    assert (rows[first.pk].version_state, rows[second.pk].version_state) == ("disabled", "enabled")
    assert type(rows[first.pk].encryption_context) is dict and type(rows[first.pk].created_at) is type(first.created_at)
