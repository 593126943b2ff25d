"""``/metrics``: the Prometheus exposition of Keyvault's metrics.

What is measured lives in :mod:`keyvault.kms.metrics` (per-provider calls, errors
by class, latency, health). This view only serves prometheus_client's default
registry, to one of:

* a scraper presenting ``Authorization: Bearer <HMD_METRICS_TOKEN>`` (compared in
  constant time; with the setting empty no token is accepted), or
* a logged-in staff user holding ``keyvault.view_keyencryptionkey`` (every console role).

Anyone else gets 401 (no or wrong credentials) or 403 (logged in, not allowed).
Scraping never calls a provider: health gauges change only when a health check runs.
"""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

#: Who may read the metrics through a console session.
VIEW_PERMISSION = "keyvault.view_keyencryptionkey"


def bearer_token(request: HttpRequest) -> str | None:
    """The token of an ``Authorization: Bearer …`` header, or ``None``."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_is_valid(token: str | None) -> bool:
    """Whether ``token`` is the configured metrics token (constant-time; never true when unset)."""
    expected = getattr(settings, "METRICS_TOKEN", "") or ""
    if not expected or token is None:
        return False
    return hmac.compare_digest(token.encode("utf-8"), expected.encode("utf-8"))


def _unauthorized(reason: str) -> HttpResponse:
    response = HttpResponse(f"{reason}\n", status=401, content_type="text/plain; charset=utf-8")
    response["WWW-Authenticate"] = 'Bearer realm="keyvault-metrics"'
    return response


@never_cache
@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    token = bearer_token(request)
    if token is not None:
        if not token_is_valid(token):
            return _unauthorized("invalid metrics token")
    else:
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            return _unauthorized("a bearer token or a console login is required")
        if not (user.is_active and user.is_staff and user.has_perm(VIEW_PERMISSION)):
            return HttpResponse("not allowed to read metrics\n", status=403, content_type="text/plain; charset=utf-8")
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
