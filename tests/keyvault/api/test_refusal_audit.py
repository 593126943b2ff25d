"""Calls anyone can flood (no valid token, or over a client's rate limit) are in the audit chain, aggregated.

Each such call is either an event of its own (the first per source and minute) or counted in its
minute's summary event, so every call is accounted for in the chain while a flood costs at most one
full event and one summary per source and minute.
"""

from __future__ import annotations

import json

import pytest

from keyvault.access import security
from keyvault.audit import Action
from keyvault.models import ApiClient, AuditEvent

pytestmark = pytest.mark.django_db


@pytest.fixture
def clock(monkeypatch):
    now = [1_800_000_000.0]  # the start of a minute
    monkeypatch.setattr(security, "_now", lambda: now[0])
    return now


def _denials():
    return list(AuditEvent.objects.filter(action=Action.API_DENIED).order_by("sequence"))


def test_calls_without_a_valid_token_are_audited_first_in_full_then_as_a_count(api, billing, clock):
    stolen_guess = "kvapi_" + "A" * 43

    answers = [api.get("keks", token=stolen_guess, address="203.0.113.7").status_code for _ in range(25)]
    answers += [api.get("keks", address="203.0.113.7").status_code for _ in range(5)]  # no header at all
    assert set(answers) == {401}

    # the first is in the chain at once, in full, naming the address, never the token sent
    [first] = _denials()
    assert (first.actor, first.target_type, first.target_id, first.outcome) == (
        "anonymous", "address", "203.0.113.7", "denied")
    assert first.details == {"operation": "list_keks", "reason": "unauthenticated"}

    # another address is a source of its own
    assert api.get("keks", token=stolen_guess, address="198.51.100.2").status_code == 401
    assert len(_denials()) == 2

    # once the minute is over, one summary counts every call of that minute from that address
    clock[0] += security.FAILURE_WINDOW_SECONDS
    assert security.flush_failure_summaries() == 1
    summary = _denials()[-1]
    assert summary.details["reason"] == "api_unauthenticated_summary"
    assert (summary.target_id, summary.details["count"], summary.details["recorded_individually"]) == (
        "203.0.113.7", 30, 1)
    assert stolen_guess not in json.dumps([event.details for event in _denials()])


def test_calls_over_the_rate_limit_are_audited_first_in_full_then_as_a_count(api, billing, clock):
    client, token = billing
    ApiClient.objects.filter(pk=client.pk).update(rate_limit_per_second=2)

    answers = [api.get("keks", token=token).status_code for _ in range(12)]  # one second of the test clock
    limited = answers.count(429)
    assert limited >= 10 - 2 and answers.count(200) >= 1

    refusals = [e for e in _denials() if e.details.get("reason") == "rate_limited"]
    assert len(refusals) == 1
    assert (refusals[0].actor, refusals[0].target_type, refusals[0].target_id) == ("api:billing", "apiclient",
                                                                                  "billing")
    assert refusals[0].details == {"operation": "list_keks", "reason": "rate_limited", "limit_per_second": 2}

    clock[0] += security.FAILURE_WINDOW_SECONDS
    security.flush_failure_summaries()
    summary = _denials()[-1]
    assert summary.details["reason"] == "api_rate_limited_summary"
    assert (summary.actor, summary.target_type, summary.target_id, summary.details["count"]) == (
        "api:billing", "apiclient", "billing", limited)


def test_a_single_refusal_writes_no_summary(api, billing, clock):
    assert api.get("keks", token="kvapi_nope", address="192.0.2.1").status_code == 401

    clock[0] += security.FAILURE_WINDOW_SECONDS

    assert security.flush_failure_summaries() == 0
    assert len(_denials()) == 1


def test_every_unauthenticated_call_is_audited_in_full_while_the_cache_is_down(api, billing, clock, monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("cache down")

    monkeypatch.setattr(security.cache, "add", unreachable)
    monkeypatch.setattr(security.cache, "incr", unreachable)

    for _ in range(3):
        assert api.get("keks", token="kvapi_nope", address="192.0.2.9").status_code == 401

    assert len(_denials()) == 3
