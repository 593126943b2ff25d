"""Bad input never makes a 500, and every state-changing view needs the CSRF token.

Walks the authorisation matrix (every console URL with its form data): each POST
row is sent as a key administrator with each field replaced by hostile values
(overlong, NUL, non-UTF-8 bytes, negative and huge numbers, unknown choices),
and each GET row with hostile query strings and path arguments. Every answer
must be below 500: a form error (200), a refusal (4xx) or a redirect.
"""

from __future__ import annotations

import pytest
from django.core.cache import cache
from django.test import Client
from django.urls import reverse

from tests.keyvault import build_world, make_role_user, use_temp_keyring
from tests.keyvault.test_authorisation_matrix import MATRIX

pytestmark = pytest.mark.django_db

BAD_VALUES = (
    "x" * 20_000,  # overlong
    "nul\x00byte",
    "-1",
    "-99999999999999999999999",
    "99999999999999999999999999999999",
    "1e309",
    "NaN",
    "not-a-choice",
    "<script>alert(1)</script>",
    "../../etc/passwd",
    "",
    " ",
    "\u202e\ufeff\ud7ff",
)
RAW_BODIES = (
    b"name=\xff\xfe\xfd&reason=\xc3\x28&waiting_days=\xe2\x82",  # invalid UTF-8, raw
    b"name=%ff%fe&reason=%c3%28&confirm_name=%80",  # invalid UTF-8, percent-encoded
    b"%%%%&&&===",
)
BAD_QUERIES = ("?o=99", "?o=-1.x", "?p=-5", "?p=999999999999999", "?q=%00", "?q=%ff", "?state=bogus",
               "?all=", "?_changelist_filters=%ff", "?" + "a=1&" * 2000)

POST_ROWS = [row for row in MATRIX if row.method == "POST"]
#: Known 500s, each to be fixed where it lives (strict: the mark must go when the fix lands).
KNOWN_500: dict[str, str] = {}


def _with_known(rows):
    return [pytest.param(row, id=row.name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_500[row.name]))
            if row.name in KNOWN_500 else pytest.param(row, id=row.name) for row in rows]
GET_ROWS = [row for row in MATRIX if row.method == "GET"]


@pytest.fixture(autouse=True)
def _isolated(settings, tmp_path):
    use_temp_keyring(settings, tmp_path)
    cache.clear()


@pytest.fixture
def administrator_client(db):
    client = Client(raise_request_exception=False)
    client.force_login(make_role_user("administrator"))
    return client


def assert_no_server_error(response, what: str) -> None:
    assert response.status_code < 500, f"{what}: {response.status_code}"


#: Values tried in one field at a time (the others valid), where a crash hides behind valid neighbours.
PER_FIELD_VALUES = ("-99999999999999999999999", "99999999999999999999999999999999", "x" * 300, "not-a-choice")


@pytest.mark.parametrize("row", _with_known(POST_ROWS))
def test_hostile_form_values_never_make_a_500(administrator_client, row):
    # given the world every action needs and the row's valid form data
    world = build_world()
    url = row.url(world)
    valid = row.data(world)
    fields = set(valid) | {"reason", "name", "confirm_name", "waiting_days", "state", "description"}

    # when every field holds each hostile value at once, then one field at a time holds the worst ones,
    # and raw undecodable bodies are posted
    attempts = [(f"all={value[:20]!r}", {**valid, **dict.fromkeys(fields, value)}) for value in BAD_VALUES]
    attempts += [(f"{field}={value[:20]!r}", {**valid, field: value})
                 for field in sorted(set(valid)) for value in PER_FIELD_VALUES]
    for what, data in attempts:
        response = administrator_client.post(url, data)
        # then the answer is a form error, a refusal or a redirect, never a server error
        assert_no_server_error(response, f"POST {url} {what}")
    for body in RAW_BODIES:
        response = administrator_client.generic("POST", url, body, content_type="application/x-www-form-urlencoded")
        assert_no_server_error(response, f"POST {url} raw {body[:20]!r}")


@pytest.mark.parametrize("row", GET_ROWS, ids=lambda row: row.name)
def test_hostile_query_strings_never_make_a_500(administrator_client, row):
    url = row.url(build_world())
    for query in BAD_QUERIES:
        assert_no_server_error(administrator_client.get(url + query), f"GET {url}{query[:30]}")


def test_hostile_path_arguments_never_make_a_500(administrator_client):
    build_world()
    for path in ("/keyvault/keyencryptionkey/99999999999999999999999/change/",
                 "/keyvault/keyencryptionkey/-1/change/", "/keyvault/keyencryptionkey/%ff/change/",
                 "/keyvault/keyencryptionkey/1/retire/99999999999999999999/",
                 "/keyvault/datakey/abc/change/", "/keyvault/auditevent/%00/change/"):
        assert_no_server_error(administrator_client.get(path), f"GET {path}")


def test_login_and_token_forms_reject_hostile_values(settings):
    # given 2FA required and a password-authenticated user
    settings.REQUIRE_2FA = True
    make_role_user("auditor", password="correct horse battery staple")
    client = Client(raise_request_exception=False)

    for value in BAD_VALUES:
        response = client.post(reverse("admin:login"), {"username": value, "password": value})
        assert_no_server_error(response, f"login {value[:20]!r}")
    for body in RAW_BODIES:
        response = client.generic("POST", reverse("admin:login"), body, content_type="application/x-www-form-urlencoded")
        assert_no_server_error(response, "login raw")

    cache.clear()
    from axes.models import AccessAttempt

    AccessAttempt.objects.all().delete()  # the hostile logins above locked this client's address
    client.post(reverse("admin:login"), {"username": "auditor", "password": "correct horse battery staple"})
    for url in (reverse("otp-enrol"), reverse("otp-verify")):
        for value in BAD_VALUES:
            response = client.post(url, {"token": value, "next": value})
            assert_no_server_error(response, f"{url} {value[:20]!r}")
            if response.status_code == 200:
                assert b"errornote" in response.content
        for body in RAW_BODIES:
            assert_no_server_error(client.generic("POST", url, body,
                                                  content_type="application/x-www-form-urlencoded"), url)
        assert client.get(reverse("admin:index")).status_code == 302  # still not through


# -- CSRF -----------------------------------------------------------------------------------


@pytest.mark.parametrize("row", POST_ROWS, ids=lambda row: row.name)
def test_every_state_changing_view_needs_the_csrf_token(row):
    # given a key administrator's browser that enforces CSRF, as real browsers' sessions are
    world = build_world()
    client = Client(enforce_csrf_checks=True, raise_request_exception=False)
    client.force_login(make_role_user("administrator"))

    # when the row's valid form is posted without a token
    response = client.post(row.url(world), row.data(world))

    # then it is refused
    assert response.status_code == 403, f"POST {row.url(world)} without CSRF token: {response.status_code}"


@pytest.mark.parametrize("name", ["otp-enrol", "otp-verify", "admin:logout"])
def test_login_flow_posts_need_the_csrf_token(settings, name):
    settings.REQUIRE_2FA = True
    client = Client(enforce_csrf_checks=True, raise_request_exception=False)
    client.force_login(make_role_user("auditor"))
    assert client.post(reverse(name), {"token": "123456"}).status_code == 403


# -- managed secrets: odd ids in the rotate and provide-value URLs are a 404 (issue 12, #12) --------------------


@pytest.mark.parametrize("object_id", ["%C2%B2", "%F0%9D%9F%98", "-1", "abc", str(2**63), str(10**30)])
@pytest.mark.parametrize("action", ["rotate", "provide-value"])
def test_managed_secret_actions_answer_404_for_odd_ids(administrator_client, object_id, action):
    # when an administrator (who may do both) asks for a secret by an id that is not a plain in-range number
    response = administrator_client.get(f"/keyvault/managedsecret/{object_id}/{action}/")

    # then there is no such secret: 404, not a 500 (int('²') fails although '²'.isdigit() is true)
    assert response.status_code == 404, f"{action} {object_id}: {response.status_code}"
