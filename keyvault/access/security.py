"""Console hardening that is not two-factor login: session expiry and audited denials.

* :class:`SessionExpiryMiddleware` ends a session after ``SESSION_IDLE_SECONDS``
  without a request and ``SESSION_ABSOLUTE_SECONDS`` after login, whatever the
  activity (Django's own ``SESSION_COOKIE_AGE`` only knows one of the two).
* :class:`DeniedAuditMiddleware` writes an ``auth.access_denied`` audit event for
  every 403 a signed-in user gets (permission refusals and CSRF failures alike).
* Failed logins and lockouts (django-axes) are audited by the signal receivers at
  the bottom, through :mod:`keyvault.audit` like every other event: the first per
  client address and minute in full, the rest of that minute as one counted summary.
  The application API's calls without a valid token and over a rate limit are
  aggregated the same way (:mod:`keyvault.api.services`).

Audit details name the path and method, never form data: a password typed into
the wrong field must not end up in the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import get_user_model, logout
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.dispatch import receiver
from django.contrib.auth.views import redirect_to_login
from django.core.cache import cache, caches
from django.core.cache.backends.redis import RedisCache
from django.urls import reverse
from redis.exceptions import RedisError

from keyvault import audit
from keyvault.audit import Actor, events
from keyvault.web.request_meta import client_ip, request_id

logger = logging.getLogger(__name__)

#: Session keys (epoch seconds) written at login and on activity.
STARTED_KEY = "_keyvault_session_started"
SEEN_KEY = "_keyvault_session_seen"


def _now() -> float:
    return time.time()


def _activity_write_interval() -> float:
    """Write the last-seen time at most this often: one session save per minute, not per request."""
    return min(60.0, settings.SESSION_IDLE_SECONDS / 10)


class SessionExpiryMiddleware:
    """Log out sessions that were idle too long or are older than the absolute limit."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            expired = self._expired(request)
            if expired:
                logout(request)
                messages.info(request, f"Your session ended ({expired}). Please sign in again.")
                return redirect_to_login(request.get_full_path(), reverse("admin:login"))
        return self.get_response(request)

    @staticmethod
    def _expired(request) -> str:
        session = request.session
        now = _now()
        started = session.get(STARTED_KEY)
        seen = session.get(SEEN_KEY)
        if started is None or seen is None:  # a session from before this middleware: start counting now
            session[STARTED_KEY] = session.get(STARTED_KEY, now)
            session[SEEN_KEY] = now
            return ""
        if now - float(started) > settings.SESSION_ABSOLUTE_SECONDS:
            return "maximum session length reached"
        if now - float(seen) > settings.SESSION_IDLE_SECONDS:
            return "inactive for too long"
        if now - float(seen) >= _activity_write_interval():
            session[SEEN_KEY] = now
        return ""


@receiver(user_logged_in, dispatch_uid="keyvault.access.security.session_started")
def _session_started(sender, request, user, **kwargs) -> None:
    if request is not None and hasattr(request, "session"):
        now = _now()
        request.session[STARTED_KEY] = now
        request.session[SEEN_KEY] = now


def _request_actor(request) -> Actor:
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return Actor.from_request(request)
    return Actor(name="anonymous", ip_address=client_ip(request), request_id=request_id(request))


def csrf_failure(request, reason: str = ""):
    """Django's CSRF failure page, marked so the 403 is not audited as an access denial.

    A missing or stale token is a broken form post (or a forged one, which Django
    already logs on ``django.security.csrf``), not a permission decision; and a
    refused forged post must leave the audit log untouched.
    """
    from django.views.csrf import csrf_failure as django_csrf_failure

    request.keyvault_csrf_failure = True
    return django_csrf_failure(request, reason=reason)


class DeniedAuditMiddleware:
    """Audit each permission 403 answered to a signed-in user.

    Anonymous 403s and CSRF failures are not audited, so nobody can fill the audit
    log without an account and a valid form.
    """

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        user = getattr(request, "user", None)
        if (response.status_code == 403 and user is not None and user.is_authenticated
                and not getattr(request, "keyvault_csrf_failure", False)):
            try:
                events.access_denied(actor=Actor.from_request(request), method=request.method, path=request.path)
            except Exception:  # the refusal stands even if it could not be recorded; say so loudly
                logger.exception("could not audit a 403 for %s", user.get_username())
        return response


# -- failed logins and lockouts ---------------------------------------------------------


#: Longest username recorded for throttling: the user model's own limit (axes' column holds 255).
MAX_USERNAME_LENGTH = 150


def axes_username(request, credentials: dict | None = None) -> str | None:
    """The username django-axes throttles on, cut to a length its table can hold.

    An overlong username cannot belong to an account, so cutting it loses nothing,
    and a hostile 10 kB username becomes a failed login instead of a database error.
    """
    source = credentials if credentials else getattr(request, "POST", {})
    username = source.get("username") if source else None
    return username[:MAX_USERNAME_LENGTH] if isinstance(username, str) else username


def _attempted_name(username: str | None) -> tuple[str, bool]:
    """The attempted username if such a user exists, else its HMAC.

    People type passwords into the username field; an unknown name is recorded
    only as an HMAC so the audit log never holds one in clear.
    """
    username = (username or "")[:150]
    if username and get_user_model().objects.filter(**{get_user_model().USERNAME_FIELD: username}).exists():
        return username, True
    return audit.hmac_value(username), False


@receiver(user_login_failed, dispatch_uid="keyvault.access.security.login_failed")
def _audit_login_failed(sender, credentials, request=None, **kwargs) -> None:
    if request is None:
        return
    actor = _request_actor(request)

    def record_first() -> None:
        name, known = _attempted_name(credentials.get("username"))
        events.password_login_failed(
            name, known_user=known,
            actor=Actor(name=f"user:{name}" if known else "anonymous", ip_address=actor.ip_address,
                        request_id=actor.request_id),
        )

    audit_unauthenticated_failure(LOGIN_FAILED, actor.ip_address, record_first)


def _audit_locked_out(sender, request, username, ip_address, **kwargs) -> None:
    rid = request_id(request) if request is not None else ""

    def record_first() -> None:
        name, known = _attempted_name(username)
        events.locked_out(
            name, known_user=known, failure_limit=settings.AXES_FAILURE_LIMIT,
            cooloff_seconds=int(settings.AXES_COOLOFF_TIME.total_seconds()),
            actor=Actor(name=f"user:{name}" if known else "anonymous", ip_address=ip_address or None,
                        request_id=rid),
        )

    audit_unauthenticated_failure(LOCKED_OUT, ip_address or None, record_first)


# -- aggregating what anyone can trigger without an account ---------------------------------
#
# A failed login, a refusal while locked out, an API call without a valid token and an API
# call over its client's rate limit can be produced as fast as someone can send them. The first of each kind from a client address in a minute is audited at once,
# in full; later ones in that minute only count, in the shared cache (every worker and host
# sees the same count). When the minute is over, one summary event records the count: beat
# writes it within a minute (keyvault.tasks), or sooner the next such event or login does.

#: Length of an aggregation window.
FAILURE_WINDOW_SECONDS = 60
#: How long counts wait in the cache for their summary.
FAILURE_COUNT_TTL = 86400
LOGIN_FAILED = "login_failed"
LOCKED_OUT = "locked_out"
#: Application API calls without a valid token (source: the address), and calls over a client's
#: rate limit (source: the client's name): both can come as fast as a caller can send them.
API_UNAUTHENTICATED = "api_unauthenticated"
API_RATE_LIMITED = "api_rate_limited"
_SUMMARY = {
    LOGIN_FAILED: events.login_failures_summarised,
    LOCKED_OUT: events.lockouts_summarised,
    API_UNAUTHENTICATED: events.api_unauthenticated_summarised,
    API_RATE_LIMITED: events.api_rate_limited_summarised,
}
#: Whose name a summary is recorded under: the source itself for a client's calls, else anonymous.
_SUMMARY_ACTOR = {API_RATE_LIMITED: lambda source: Actor(name=f"api:{source}")}
_PREFIX = "keyvault:auth-failures"
#: What the shared cache raises when it is unreachable: Redis errors, or I/O errors of the file cache.
CACHE_ERRORS = (RedisError, OSError)


def audit_unauthenticated_failure(kind: str, address: str | None, record_first: Callable[[], None]) -> None:
    """Audit one failure of ``kind`` from ``address`` (or client): the first in its window at once, the rest as a count."""
    source = address or "unknown"
    window = int(_now()) // FAILURE_WINDOW_SECONDS
    try:
        if increment(f"{_PREFIX}:count:{kind}:{source}:{window}") != 1:
            return
        position = increment(f"{_PREFIX}:windows", timeout=None)  # outlives the cursor's entries
        cache.set(f"{_PREFIX}:window:{position}", (kind, source, window), timeout=FAILURE_COUNT_TTL)
        flush_failure_summaries()
    except CACHE_ERRORS:  # the cache (Redis) is down: audit every failure rather than lose any
        logger.warning("login-failure counts unavailable (cache error); auditing this failure in full",
                       exc_info=True)
    record_first()


def flush_failure_summaries(*, now: float | None = None) -> int:
    """Write the summary of every finished window that counted more than its first event; return how many.

    Windows are visited in the order they opened, from a cursor in the cache; a summary
    is claimed with ``cache.add`` so two processes flushing at once write it once.
    """
    current = int(_now() if now is None else now) // FAILURE_WINDOW_SECONDS
    done = cache.get(f"{_PREFIX}:flushed", 0)
    last = cache.get(f"{_PREFIX}:windows", 0)
    written = 0
    for position in range(done + 1, last + 1):
        entry = cache.get(f"{_PREFIX}:window:{position}")
        if entry is not None:
            kind, source, window = entry
            if window >= current:
                break  # still open; so are the ones registered after it
            count = cache.get(f"{_PREFIX}:count:{kind}:{source}:{window}", 0)
            if count > 1 and cache.add(f"{_PREFIX}:summarised:{kind}:{source}:{window}", 1, FAILURE_COUNT_TTL):
                _record_summary(kind, source, window, count)
                written += 1
        cache.set(f"{_PREFIX}:flushed", position, timeout=None)
    return written


def _record_summary(kind: str, source: str, window: int, count: int) -> None:
    actor = _SUMMARY_ACTOR[kind](source) if kind in _SUMMARY_ACTOR else Actor(
        name="anonymous", ip_address=None if source == "unknown" else source)
    _SUMMARY[kind](
        source, actor=actor,
        window_start=datetime.fromtimestamp(window * FAILURE_WINDOW_SECONDS, tz=UTC),
        window_seconds=FAILURE_WINDOW_SECONDS, count=count,
    )


def increment(key: str, *, timeout: int | None = FAILURE_COUNT_TTL) -> int:
    """Count one more at ``key`` in the shared cache (atomic where the cache is, e.g. Redis); the new count."""
    redis_client = _redis_client()
    if redis_client is not None:
        # One round trip instead of Django's add + exists + incr (three, each on a new client
        # object): this runs on every API call for the per-client rate limit.
        pipe = redis_client.pipeline(transaction=False)
        full_key = cache.make_and_validate_key(key)
        pipe.set(full_key, 0, ex=timeout, nx=True)
        pipe.incr(full_key)
        return pipe.execute()[1]
    cache.add(key, 0, timeout=timeout)
    try:
        return cache.incr(key)
    except ValueError:  # evicted between add and incr
        cache.set(key, 1, timeout=timeout)
        return 1


def _redis_client():
    """The shared cache's Redis client, kept per process; None when the cache is not Redis.

    Django's Redis cache builds a new client object (and its callback table) on every call;
    one per connection pool is enough, as clients are thread-safe.
    """
    backend = caches["default"]
    if not isinstance(backend, RedisCache):
        return None
    pool = backend._cache._get_connection_pool(write=True)
    client = _REDIS_CLIENTS.get(id(pool))
    if client is None or client.connection_pool is not pool:
        client = _REDIS_CLIENTS[id(pool)] = backend._cache._client(connection_pool=pool)
    return client


_REDIS_CLIENTS: dict[int, object] = {}


@receiver(user_logged_in, dispatch_uid="keyvault.access.security.flush_failure_summaries")
def _flush_on_login(sender, request, user, **kwargs) -> None:
    try:
        flush_failure_summaries()
    except CACHE_ERRORS:  # a cache outage must not stop a login; the counts wait for the next flush
        logger.warning("could not write login-failure summaries (cache error)", exc_info=True)


def _connect_axes() -> None:
    from axes.signals import user_locked_out

    user_locked_out.connect(_audit_locked_out, dispatch_uid="keyvault.access.security.locked_out")


_connect_axes()


def audit_otp_failure(request, *, reason: str) -> None:
    """A wrong or throttled second factor for a password-authenticated user."""
    events.second_factor_failed(request.user.get_username(), actor=Actor.from_request(request), reason=reason)
