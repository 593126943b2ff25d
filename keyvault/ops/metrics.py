"""``/metrics``: the Prometheus exposition of Keyvault's metrics.

Two kinds of series. Provider calls (calls, errors by class, latency, health) are
measured in :mod:`keyvault.kms.metrics`. The state of rotations, secrets and the audit
chain is read from the database at scrape time by :class:`StateCollector`, with a
handful of indexed counts (the alert rules in ``deploy/prometheus/keyvault-alerts.yml``
use these; every process serving ``/metrics`` reports the same values):

* ``keyvault_rotation_runs_failed{target_type}`` — KEKs / managed secrets whose latest
  run failed (a later run, a resume or a rollback clears it);
* ``keyvault_rotation_runs_paused{target_type}`` — active runs paused (a provider down,
  or waiting for a person to tick a manual step);
* ``keyvault_rotation_runs_pending_approval{target_type,kind}`` — runs waiting for approvers;
* ``keyvault_rotations_overdue{target_type}`` and ``keyvault_rotation_overdue_seconds{target_type}``
  — policies past their due date with no run under way, and how long the oldest is overdue;
* ``keyvault_managed_secret_expiry_timestamp_seconds{secret,type}`` — when each managed
  secret with a known expiry (a certificate's notAfter) expires;
* ``keyvault_audit_chain_ok``, ``keyvault_audit_chain_checked_timestamp_seconds`` — the
  audit chain status the console's banner shows (extended by at most
  :data:`SCRAPE_VERIFY_BUDGET` events, at most once a minute across processes);
* ``keyvault_audit_witness_ok`` — 0 while the newest checkpoint could not be written to a witness;
* ``keyvault_state_metrics_up`` — 0 when the database could not be read (the other state
  series are then missing from that scrape).

This view only serves prometheus_client's default registry, to one of:

* a scraper presenting ``Authorization: Bearer <HMD_METRICS_TOKEN>`` (compared in
  constant time; with the setting empty no token is accepted), or
* a logged-in staff user holding ``keyvault.view_keyencryptionkey`` (every console role).

Anyone else gets 401 (no or wrong credentials) or 403 (logged in, not allowed).
Scraping never calls a provider: health gauges change only when a health check runs.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator

from django.conf import settings
from django.db import DatabaseError
from django.db.models import Count, Max, Min, Q
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

#: Who may read the metrics through a console session.
VIEW_PERMISSION = "keyvault.view_keyencryptionkey"
#: Audit events a scrape verifies at most when the chain status is older than a minute.
SCRAPE_VERIFY_BUDGET = 5000
TARGET_TYPES = ("kek", "secret")

#: Series name -> (help, labels): what :class:`StateCollector` exports (also its ``describe``).
STATE_METRICS = {
    "keyvault_rotation_runs_failed": ("KEKs or managed secrets whose latest rotation run failed.", ["target_type"]),
    "keyvault_rotation_runs_paused": ("Active rotation runs paused (provider down, or waiting for a person).",
                                      ["target_type"]),
    "keyvault_rotation_runs_pending_approval": ("Rotation runs waiting for approvals.", ["target_type", "kind"]),
    "keyvault_rotations_overdue": ("Rotation policies past their due date with no run under way.", ["target_type"]),
    "keyvault_rotation_overdue_seconds": ("How long the most overdue rotation without a run is overdue (0: none).",
                                          ["target_type"]),
    "keyvault_managed_secret_expiry_timestamp_seconds": (
        "When a managed secret expires (TLS: the certificate's notAfter), Unix time.", ["secret", "type"]),
    "keyvault_audit_chain_ok": ("1 if the audit chain verified as far as it was checked, 0 if it is broken.", []),
    "keyvault_audit_chain_checked_timestamp_seconds": ("When the audit chain status was computed, Unix time.", []),
    "keyvault_audit_witness_ok": ("0 while the newest audit checkpoint could not be written to a witness.", []),
    "keyvault_state_metrics_up": ("1 if the rotation, secret and audit state could be read from the database.", []),
}


def _gauge(name: str) -> GaugeMetricFamily:
    text, labels = STATE_METRICS[name]
    return GaugeMetricFamily(name, text, labels=labels)


def _target(row: dict) -> str:
    return "kek" if row.get("kek_id") else "secret"


def rotation_gauges(now) -> list[GaugeMetricFamily]:
    """Failed, paused, waiting and overdue rotations: a few indexed queries."""
    from keyvault.models import KeyEncryptionKey
    from rotation.models import RotationPolicy, RotationRun

    state = RotationRun.State
    failed, paused, overdue, late = (_gauge(name) for name in (
        "keyvault_rotation_runs_failed", "keyvault_rotation_runs_paused", "keyvault_rotations_overdue",
        "keyvault_rotation_overdue_seconds"))
    pending = _gauge("keyvault_rotation_runs_pending_approval")
    # the latest run of each target (ids grow with creation) decides whether its failure is still open
    latest = set()
    for field in ("kek", "secret"):
        latest |= set(RotationRun.objects.filter(**{f"{field}__isnull": False}).values(field)
                      .annotate(last=Max("id")).values_list("last", flat=True))
    failed_counts = {kind: 0 for kind in TARGET_TYPES}
    for row in RotationRun.objects.filter(pk__in=latest, state=state.FAILED).values("kek_id"):
        failed_counts[_target(row)] += 1
    paused_counts = {kind: 0 for kind in TARGET_TYPES}
    for row in RotationRun.objects.filter(state__in=RotationRun.ACTIVE_STATES).exclude(paused_reason="").values("kek_id"):
        paused_counts[_target(row)] += 1
    waiting: dict[tuple[str, str], int] = {}
    for row in RotationRun.objects.filter(state=state.PENDING_APPROVAL).values("kek_id", "kind"):
        key = (_target(row), row["kind"])
        waiting[key] = waiting.get(key, 0) + 1
    busy = RotationRun.objects.filter(state__in=RotationRun.BLOCKING_STATES)
    due = RotationPolicy.objects.filter(next_due_at__lt=now).filter(
        Q(kek__state=KeyEncryptionKey.State.ENABLED) | Q(secret__isnull=False)
    ).exclude(kek__in=busy.filter(kek__isnull=False).values("kek")).exclude(
        secret__in=busy.filter(secret__isnull=False).values("secret"))
    for kind, field in (("kek", "kek"), ("secret", "secret")):
        row = due.filter(**{f"{field}__isnull": False}).aggregate(n=Count("id"), oldest=Min("next_due_at"))
        failed.add_metric([kind], failed_counts[kind])
        paused.add_metric([kind], paused_counts[kind])
        overdue.add_metric([kind], row["n"])
        late.add_metric([kind], (now - row["oldest"]).total_seconds() if row["oldest"] else 0.0)
    for (kind, run_kind), count in sorted(waiting.items()):
        pending.add_metric([kind, run_kind], count)
    return [failed, paused, pending, overdue, late]


def secret_gauges() -> list[GaugeMetricFamily]:
    from keyvault.models import ManagedSecret

    expiry = _gauge("keyvault_managed_secret_expiry_timestamp_seconds")
    for name, kind, expires_at in (ManagedSecret.objects.filter(expires_at__isnull=False)
                                   .values_list("name", "secret_type", "expires_at").order_by("name")):
        expiry.add_metric([name, kind], expires_at.timestamp())
    return [expiry]


def audit_gauges() -> list[GaugeMetricFamily]:
    from keyvault.audit import status as audit_status
    from keyvault.audit import witness as audit_witness

    chain = audit_status.chain_status(budget=SCRAPE_VERIFY_BUDGET)
    ok, checked, witness = (_gauge(name) for name in (
        "keyvault_audit_chain_ok", "keyvault_audit_chain_checked_timestamp_seconds", "keyvault_audit_witness_ok"))
    ok.add_metric([], 1 if chain.ok else 0)
    checked.add_metric([], chain.checked_at.timestamp() if chain.checked_at else 0.0)
    witness.add_metric([], 0 if audit_witness.last_failure() else 1)
    return [ok, checked, witness]


class StateCollector(Collector):
    """Rotation, managed-secret and audit-chain state, read from the database at scrape time."""

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Without describe(), registering would call collect() and query the database at import.
        return iter([_gauge(name) for name in STATE_METRICS])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = _gauge("keyvault_state_metrics_up")
        try:
            families = rotation_gauges(timezone.now()) + secret_gauges() + audit_gauges()
        except DatabaseError as exc:  # a scrape reports; it never fails the provider series with it
            log.warning("state metrics unavailable: %s", type(exc).__name__)
            up.add_metric([], 0)
            return iter([up])
        up.add_metric([], 1)
        return iter([*families, up])


STATE_COLLECTOR = StateCollector()
REGISTRY.register(STATE_COLLECTOR)


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
