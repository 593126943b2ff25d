"""Problem details to typed errors, and the retry wait: total functions over whatever a server sends."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from keyvault_client import KeyvaultClient
from keyvault_client.cache import canonical_context
from keyvault_client.errors import (
    CODES,
    PROBLEM_BASE,
    DecryptionFailed,
    Forbidden,
    KeyvaultError,
    RateLimited,
    ServerError,
    error_from_problem,
)

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=10)


def test_every_server_code_has_a_class_and_the_status_it_is_sent_with():
    from keyvault.api.views import PROBLEMS

    assert set(CODES) == set(PROBLEMS)
    for code, (status, title) in PROBLEMS.items():
        error = error_from_problem({"type": PROBLEM_BASE + code, "title": title, "status": status})
        assert error.status == status and error.code == code and str(error) == title


def test_codes_pick_the_class_before_the_status():
    assert type(error_from_problem({"type": PROBLEM_BASE + "decryption-failed", "status": 400})) is DecryptionFailed
    assert type(error_from_problem({"type": PROBLEM_BASE + "forbidden-context", "status": 403})) is Forbidden
    assert type(error_from_problem({"type": "about:blank", "status": 429}, 429)) is RateLimited
    assert type(error_from_problem("not a problem", 502)) is ServerError


@given(body=JSON, status=st.none() | st.integers(100, 599))
def test_any_body_maps_to_a_keyvault_error(body, status):
    error = error_from_problem(body, status)
    assert isinstance(error, KeyvaultError) and len(str(error)) <= 300


@given(attempt=st.integers(0, 30), retry_after=st.none() | st.floats(0, 60))
def test_the_wait_is_never_sooner_than_retry_after_nor_longer_than_the_ceiling_otherwise(attempt, retry_after):
    client = KeyvaultClient("http://127.0.0.1:9", "token", backoff=0.1, max_backoff=5.0)
    wait = client._wait(attempt, retry_after)
    assert wait >= (retry_after or 0) and wait <= max(retry_after or 0, 5.0)


@given(st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=6))
def test_a_context_has_one_canonical_spelling_whatever_its_order(context):
    assert canonical_context(dict(reversed(list(context.items())))) == canonical_context(context)
