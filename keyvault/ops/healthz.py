"""``GET /healthz``: can this process serve? Database, broker, default KMS provider.

For load balancers and orchestrators: no login, plain HTTP allowed, JSON body,
200 when every check passes, 503 otherwise. The body names each check, whether
it passed, how long it took and, on failure, only the error's class: never a
message, URL, path or credential (they can hold hostnames, passwords or key ids).

Any ``Host`` is accepted here, and only here: a Kubernetes probe sends the pod's
address (``Host: 10.1.2.3:8000``), which is never in ``HMD_ALLOWED_HOSTS``, so
through the normal stack (``CommonMiddleware`` validates the host) every probe
got 400 and no pod became Ready. :class:`HealthzMiddleware` sits before
``CommonMiddleware`` and answers the exact path ``/healthz`` itself. The host is
never read, so nothing built from it (a redirect, an absolute URL, a cookie
domain) can be poisoned; the body is the same whatever the host.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from django.conf import settings
from django.db import connection
from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

#: Seconds the broker may take to accept a connection before the check fails.
BROKER_TIMEOUT = 2.0


def check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def check_broker() -> None:
    from kombu import Connection

    options = dict(getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}) or {})
    with Connection(settings.CELERY_BROKER_URL, transport_options=options, connect_timeout=BROKER_TIMEOUT) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, interval_max=0.2,
                               timeout=BROKER_TIMEOUT)


class ProviderUnhealthy(Exception):
    """The default KMS provider's own health check failed."""


def check_kms() -> None:
    """The default provider's health check; its result also sets ``keyvault_kms_provider_healthy``."""
    from keyvault.kms import get_provider, registry
    from keyvault.kms.metrics import record_health

    name = registry.default_provider_name()
    try:
        status = get_provider(name).health_check()
    except Exception:
        record_health(name, False)
        raise
    record_health(name, status.healthy)
    if not status.healthy:
        raise ProviderUnhealthy()


CHECKS: dict[str, Callable[[], None]] = {"database": check_database, "broker": check_broker, "kms": check_kms}


def run_checks() -> tuple[bool, dict]:
    results = {}
    for name, check in CHECKS.items():
        started = time.perf_counter()
        try:
            check()
            result = {"ok": True}
        except Exception as exc:  # a health check reports; it never raises
            result = {"ok": False, "error": type(exc).__name__}
        result["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
        results[name] = result
    return all(result["ok"] for result in results.values()), results


#: The one path served whatever the ``Host`` header says.
HEALTHZ_PATH = "/healthz"


@never_cache
@require_GET
def healthz(request):
    healthy, checks = run_checks()
    body = {"status": "ok" if healthy else "unavailable", "checks": checks}
    return JsonResponse(body, status=200 if healthy else 503)


class HealthzMiddleware:
    """Serve exactly ``/healthz`` before host validation (see the module docstring); pass everything else on."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        if request.path_info == HEALTHZ_PATH:
            return healthz(request)
        return self.get_response(request)
