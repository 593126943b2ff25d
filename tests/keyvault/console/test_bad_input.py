"""Bad input never makes a 500, and every state-changing view needs the CSRF token.

Walks the authorisation matrix (every console URL with its form data): each POST
row is sent as a key administrator with each field replaced by hostile values
(overlong, NUL, non-UTF-8 bytes, negative and huge numbers, unknown choices),
and each GET row with hostile query strings and path arguments. Every answer
must be below 500: a form error (200), a refusal (4xx) or a redirect.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, urlencode

import pytest
from django.core.cache import cache
from django.test import Client
from django.urls import URLResolver, get_resolver, reverse
from django.urls.resolvers import RoutePattern

from tests.keyvault import build_world, make_role_user, use_temp_keyring
from tests.keyvault.access.test_authorisation_matrix import MATRIX, pending_run

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
#: Whole query strings sent to every route as they are (undecodable bytes, thousands of parameters...).
BAD_QUERIES = ("?o=99", "?o=-1.x&p=-5", "?o=" + ".".join(f"-{n}" for n in range(16)), "?state=bogus&all=", "?" + "=%ff&".join(("q", "_changelist_filters", "next",
               "e", "_to_field", "")), "?" + "a=1&" * 2000)

POST_ROWS = [row for row in MATRIX if row.method == "POST"]
#: Known 500s, each to be fixed where it lives (strict: the mark must go when the fix lands).
KNOWN_500: dict[str, str] = {}


def _with_known(rows):
    return [pytest.param(row, id=row.name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_500[row.name]))
            if row.name in KNOWN_500 else pytest.param(row, id=row.name) for row in rows]


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


# -- every routed URL, with odd characters and numbers in every path argument and query parameter ----------------
#
# The URL resolver is walked (as the authorisation matrix is checked against the admin registry), so a
# new route is covered the day it is added. Each path argument in turn, the others valid, and each query
# parameter a view reads (list filters, search, ordering, page, SIEM cursor, report filters, next), gets
# each odd value, by GET and by POST, for a superuser whose second factor is verified (every permission
# check passes, so every view body runs) and for an anonymous visitor. Nothing may answer 500 or show a
# traceback.

ODD_VALUES = (
    "²",  # str.isdigit() is true, int() refuses it
    "\U0001d7d8",  # MATHEMATICAL DOUBLE-STRUCK DIGIT ZERO: astral, and int() accepts it
    "\u202e\U0001f600",  # right-to-left override, emoji
    "\x00",  # PostgreSQL refuses NUL in text
    str(2**63),  # one past a bigint
    "-1",
    str(10**30),
)
#: Routes an authenticated crawl must not POST to (it would end the crawl's session).
SESSION_ENDING = {"admin:logout"}
#: Known 500s in routes owned elsewhere, each to be fixed where it lives: route name -> reason. Strict: a
#: route that no longer fails must leave its table (as a strict xfail would).
KNOWN_PATH_500: dict[str, str] = {}
KNOWN_QUERY_500: dict[str, str] = {}


@dataclass(frozen=True)
class Route:
    """One routed URL pattern: ``template`` holds ``{argument}`` where each path argument goes."""

    name: str  # "namespace:name", or the pattern itself for unnamed routes
    template: str
    arguments: tuple[str, ...]


def _routes(patterns=None, prefix: str = "", namespace: str | None = None):
    for pattern in get_resolver().url_patterns if patterns is None else patterns:
        if isinstance(pattern, URLResolver):
            yield from _routes(pattern.url_patterns, prefix + _template(pattern.pattern), pattern.namespace or namespace)
            continue
        template = prefix + _template(pattern.pattern)
        arguments = tuple(re.findall(r"\{(\w+)\}", template))
        name = f"{namespace}:{pattern.name}" if namespace and pattern.name else pattern.name or template
        yield Route(name=name, template="/" + template, arguments=arguments)


def _template(pattern) -> str:
    if isinstance(pattern, RoutePattern):
        return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", str(pattern))
    return re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", str(pattern.regex.pattern)).lstrip("^").rstrip("$")


ROUTES = tuple(_routes())


def _admin_model(route: Route):
    """The model an admin route belongs to (``app_label/model_name/...``), or None."""
    from django.contrib import admin

    parts = route.template.strip("/").split("/")
    for model in admin.site._registry:
        if parts[:2] == [model._meta.app_label, model._meta.model_name]:
            return model
    return None


def _valid_arguments(route: Route, world) -> dict[str, str]:
    """A valid value for each path argument of ``route`` (objects from ``world``)."""
    from django.contrib.contenttypes.models import ContentType

    model = _admin_model(route)
    pk = None
    if model is not None:
        pk = world.alpha.pk if model is type(world.alpha) else model._default_manager.order_by("pk").values_list(
            "pk", flat=True).first()
    valid = {"object_id": str(pk or 1), "number": "1", "key": "precheck.owners", "name": "rotations", "fmt": "csv",
             "data_key_id": "1",  # the application API (bearer only: every odd value must still answer 4xx)
             "id": str(world.superuser.pk), "app_label": "keyvault", "url": "nowhere/",
             "content_type_id": str(ContentType.objects.get_for_model(type(world.alpha)).pk)}
    if route.name.startswith("admin:rotation_rotationrun_"):
        valid["object_id"] = str(world.pending_run.pk)
    if route.name == "admin:view_on_site":
        valid["object_id"] = str(world.alpha.pk)
    return {argument: valid[argument] for argument in route.arguments}


def _url(route: Route, arguments: dict[str, str]) -> str:
    return route.template.format(**{name: quote(value, safe="") for name, value in arguments.items()})


#: Query parameters any page might read (``next``, the admin's ordering, page, search, preserved filters,
#: to-field): sent together, one odd value at a time; a view's own parameters are sent one by one.
COMMON_PARAMETERS = ("next", "o", "p", "q", "_changelist_filters", "_to_field", "_popup", "e")


def _own_parameters(route: Route, world) -> list[str]:
    """The query parameters the route's view reads itself: a changelist's list filters (their lookups),
    date hierarchy, facets and "show all"; a report's filters; the SIEM cursor."""
    from django.contrib import admin
    from django.contrib.admin.views import main
    from django.test import RequestFactory

    from keyvault.console import reports

    if route.name == "siem-events":
        return ["after", "limit"]
    if route.name in ("reports:report", "reports:export"):
        return sorted(reports.REPORTS["rotations"].filters)
    model = _admin_model(route)
    if model is None or not route.name.endswith("_changelist"):
        return []
    request = RequestFactory().get(_url(route, {}))
    request.user = world.superuser
    changelist = admin.site._registry[model].get_changelist_instance(request)
    names = {name for spec in changelist.filter_specs for name in spec.expected_parameters()}
    if changelist.date_hierarchy:
        names |= {f"{changelist.date_hierarchy}__{part}" for part in ("year", "month", "day")}
    return sorted(names | {main.ALL_VAR, main.IS_FACETS_VAR})


@dataclass
class Crawl:
    """The world, a verified superuser's client, an anonymous client and the SIEM token."""

    world: object
    clients: dict
    siem_token: str
    failures: list
    login_url: str

    #: (route, method) pairs that sent anonymous to the login page: the view never runs, so once is enough.
    login_gated: set

    def request(self, who: str, method: str, route: Route, url: str) -> None:
        if who != "anonymous" and method == "POST" and route.name in SESSION_ENDING:
            return
        if who == "anonymous" and (route.name, method) in self.login_gated:
            return
        extra = {"HTTP_AUTHORIZATION": f"Bearer {self.siem_token}"} if route.name == "siem-events" else {}
        client = self.clients[who]
        response = client.get(url, **extra) if method == "GET" else client.post(url, {}, **extra)
        content = b"" if response.streaming else response.content
        if response.status_code >= 500 or b"Traceback (most recent call last)" in content:
            self.failures.append(f"{method} {url!r} as {who}: {response.status_code} ({route.name})")
        if who == "anonymous" and response.status_code == 302 and response["Location"].startswith(self.login_url):
            self.login_gated.add((route.name, method))


@pytest.fixture
def crawl(settings) -> Crawl:
    """A Key administrator who is also superuser, through the password and TOTP login; and anonymous."""
    from django.contrib.auth.models import User
    from django_otp import device_classes
    from django_otp.oath import totp

    from keyvault.audit import Actor, siem
    from keyvault.keys import services
    from keyvault.models import KeyEncryptionKey

    settings.REQUIRE_2FA = True
    world = build_world()
    pending_run(world)  # a run waiting for approval, before the crawl's POSTs start others
    user = make_role_user("administrator", password="correct horse battery staple")
    User.objects.filter(pk=user.pk).update(is_superuser=True)
    world.superuser = User.objects.get(pk=user.pk)
    if not KeyEncryptionKey.objects.filter(name=settings.FIELD_ENCRYPTION_KEK).exists():  # encrypts TOTP secrets
        services.create_kek(name=settings.FIELD_ENCRYPTION_KEK, actor=Actor.system("tests"))
    totp_device = next(cls for cls in device_classes() if cls.__name__ == "TOTPDevice")  # the installed one
    device = totp_device.objects.create(user=user, name="console", confirmed=True)
    verified = Client(raise_request_exception=False)
    verified.post(reverse("admin:login"), {"username": "administrator", "password": "correct horse battery staple"})
    code = f"{totp(device.bin_key, step=device.step, t0=device.t0, digits=device.digits):0{device.digits}d}"
    verified.post(reverse("otp-verify"), {"token": code})
    assert verified.get(reverse("admin:auth_user_changelist")).status_code == 200  # verified, and a superuser
    _, token = siem.create_consumer(name="crawl", actor=Actor.system("tests"))
    return Crawl(world=world, clients={"superuser": verified, "anonymous": Client(raise_request_exception=False)},
                 siem_token=token, failures=[], login_url=reverse("admin:login") + "?next=", login_gated=set())


def assert_only_known_failures(failures: list[str], known: dict[str, str]) -> None:
    unexpected = [failure for failure in failures if not any(failure.endswith(f"({name})") for name in known)]
    assert not unexpected, "\n".join(unexpected)
    still_failing = {name for name in known if any(failure.endswith(f"({name})") for failure in failures)}
    assert still_failing == set(known), f"fixed, take out of the known 500s: {sorted(set(known) - still_failing)}"


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_odd_path_arguments_in_every_route_never_make_a_500(crawl, method):
    # given every routed URL with path arguments, valid arguments for each from the world
    routes = [route for route in ROUTES if route.arguments]
    assert len(routes) > 40  # the resolver was walked

    # when each argument in turn holds each odd value (the others valid), for a superuser and for anonymous
    for route in routes:
        valid = _valid_arguments(route, crawl.world)
        for argument in route.arguments:
            for value in ODD_VALUES:
                url = _url(route, {**valid, argument: value})
                for who in crawl.clients:
                    crawl.request(who, method, route, url)

    # then nothing answered a server error (the known ones are listed with the reason, to be fixed where they live)
    assert_only_known_failures(crawl.failures, KNOWN_PATH_500)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_odd_query_parameters_on_every_route_never_make_a_500(crawl, method):
    # given every routed URL (valid path arguments) and the query parameters its view reads
    for route in ROUTES:
        url = _url(route, _valid_arguments(route, crawl.world))
        own = _own_parameters(route, crawl.world)
        for value in ODD_VALUES:
            # when the common parameters together, then each of the view's own in turn, hold each odd value
            for who in crawl.clients:
                crawl.request(who, method, route, f"{url}?{urlencode(dict.fromkeys(COMMON_PARAMETERS, value))}")
            for name in own if method == "GET" or route.name == "siem-events" else ():  # POST parses them alike
                crawl.request("superuser", method, route, f"{url}?{urlencode({name: value})}")
            if own and route.name == "siem-events":  # the token, not a session, opens it
                crawl.request("anonymous", method, route, f"{url}?{urlencode(dict.fromkeys(own, value))}")
        for query in BAD_QUERIES if method == "GET" else ():
            crawl.request("superuser", method, route, url + query)

    # then nothing answered a server error
    assert_only_known_failures(crawl.failures, KNOWN_QUERY_500)


# -- the 500s reported in issue 12: each answers 400 (or 404) now ----------------------------------------------


@pytest.mark.parametrize("query", ["after=9223372036854775808", "after=%C2%B2", "limit=%C2%B2", "after=%F0%9D%9F%98",
                                   "after=99999999999999999999", "after=-1"])
def test_siem_cursor_out_of_range_or_not_ascii_digits_is_a_400(crawl, query):
    # when a SIEM consumer asks for a cursor past a bigint, or written in digits int() or the database refuse
    response = crawl.clients["anonymous"].get(f"/siem/events?{query}", HTTP_AUTHORIZATION=f"Bearer {crawl.siem_token}")

    # then the request is refused as bad, naming the parameter
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"


def test_siem_cursor_accepts_the_largest_sequence(crawl):
    response = crawl.clients["anonymous"].get(f"/siem/events?after={2**63 - 1}",
                                              HTTP_AUTHORIZATION=f"Bearer {crawl.siem_token}")
    assert response.status_code == 200 and response.json()["events"] == []


@pytest.mark.parametrize("url", ["/keyvault/auditevent/?actor=%00", "/keyvault/auditevent/?target_id=%00",
                                 "/keyvault/keyencryptionkey/?state__exact=%00", "/reports/rotations/?kek=%00",
                                 "/axes/accessattempt/?attempt_time__year=9223372036854775808"])
def test_nul_or_overflowing_filter_values_are_a_400(crawl, url):
    # when a verified superuser filters a list by a value PostgreSQL cannot take
    response = crawl.clients["superuser"].get(url)

    # then it is a bad request, answered before any query runs
    assert response.status_code == 400
    assert b"Traceback" not in response.content


def test_a_nul_step_key_is_a_400(crawl):
    response = crawl.clients["superuser"].get(f"/rotation/rotationrun/{crawl.world.pending_run.pk}/steps/%00/tick/")
    assert response.status_code == 400


def test_a_report_export_naming_a_kek_with_nul_is_a_400(crawl):
    # when the export form (a POST body, which no middleware reads) names a KEK with NUL
    response = crawl.clients["superuser"].post("/reports/rotations/export.csv", {"kek": "alpha\x00"})

    # then the report refuses it as it refuses any unknown KEK
    assert response.status_code == 400
    assert b"no key-encryption key named" in response.content


# -- managed secrets: odd ids in the rotate and provide-value URLs are a 404 (issue 12, #12) --------------------


@pytest.mark.parametrize("object_id", ["%C2%B2", "%F0%9D%9F%98", "-1", "abc", str(2**63), str(10**30)])
@pytest.mark.parametrize("action", ["rotate", "provide-value"])
def test_managed_secret_actions_answer_404_for_odd_ids(administrator_client, object_id, action):
    # when an administrator (who may do both) asks for a secret by an id that is not a plain in-range number
    response = administrator_client.get(f"/keyvault/managedsecret/{object_id}/{action}/")

    # then there is no such secret: 404, not a 500 (int('²') fails although '²'.isdigit() is true)
    assert response.status_code == 404, f"{action} {object_id}: {response.status_code}"
