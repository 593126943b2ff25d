"""Console views for the dashboard (the console home) and the auditor reports.

Thin callers: ``keyvault.console.dashboard`` and ``keyvault.console.reports`` hold the logic. Every
view is wrapped in ``admin.site.admin_view`` (login, staff, never cached) in
``keyvault/urls.py`` and checks its permission itself: reading needs
``keyvault.view_auditevent``, exporting ``keyvault.export_auditevent``. Bad filter
input is a 400 page naming the problem, never a 500.
"""

from __future__ import annotations

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse, StreamingHttpResponse
from django.template.response import TemplateResponse
from django.utils.http import urlencode
from django.utils.safestring import mark_safe
from django.views.decorators.http import require_GET, require_POST

from keyvault.audit import Actor
from keyvault.console import charts, dashboard, reports

VIEW_PERMISSION = "keyvault.view_auditevent"
EXPORT_PERMISSION = "keyvault.export_auditevent"
#: Cancelling a deletion is the schedule-deletion permission (``admin_views.OWN_KEK_ACTIONS``).
CANCEL_DELETION_PERMISSION = "keyvault.schedule_deletion_keyencryptionkey"
CONSOLE_INDEX_TEMPLATE = "keyvault/reports/console_index.html"


def _require(request, permission: str) -> None:
    if not request.user.has_perm(permission):
        raise PermissionDenied


# -- the console home --------------------------------------------------------------


def dashboard_charts(data: dashboard.Dashboard) -> dict[str, str]:
    """The three dashboard charts as inline SVG (escaped inside ``charts``; safe to mark safe)."""
    months = data.rotations_per_month
    # Lowest share first; KEKs wrapping no data keys last, labelled "no data keys" rather than a 100% bar.
    coverage = sorted(data.coverage, key=lambda item: (item.share is None, item.share or 0.0, item.kek))[:25]
    return {
        "rotations_chart": mark_safe(charts.bar_chart(  # noqa: S308 - charts escapes every label
            chart_id="kv-chart-rotations",
            title="Rotations per month",
            description="New KEK versions per calendar month (UTC), last 12 months: "
            + ", ".join(f"{label} {count}" for label, count in months) + ".",
            bars=months,
        )),
        "coverage_chart": mark_safe(charts.hbar_chart(  # noqa: S308
            chart_id="kv-chart-coverage",
            title="Version coverage per KEK",
            description="Share of each KEK's data keys wrapped by its primary version (lowest first): "
            + ", ".join(f"{item.kek} " + ("no data keys" if item.share is None else f"{item.share}%")
                        for item in coverage) + ".",
            bars=[(item.kek, item.share) for item in coverage],
            warn_below=100.0,
            empty="No enabled or disabled key-encryption keys",
            missing="no data keys",
        )),
        "certificates_chart": mark_safe(charts.timeline_chart(  # noqa: S308
            chart_id="kv-chart-certificates",
            title="Certificates expiring in the next 90 days",
            description="TLS certificates by expiry date: "
            + ", ".join(f"{item.name} {item.expires_at:%Y-%m-%d}" for item in data.certificates[:20]) + ".",
            items=[(item.name, item.expires_at) for item in data.certificates[:20]],
            start=data.now,
            days=dashboard.CERTIFICATE_HORIZON_DAYS,
            empty="No certificate expires in the next 90 days",
        )),
    }


@require_GET
def console_index(request, extra_context=None):
    """The console home: the dashboard above Django's app list (the template extends ``admin/index.html``)."""
    context = dict(extra_context or {})
    if request.user.has_perm(VIEW_PERMISSION):
        data = dashboard.build()
        context.update(dashboard=data, **dashboard_charts(data),
                       can_export=request.user.has_perm(EXPORT_PERMISSION),
                       can_cancel_deletion=request.user.has_perm(CANCEL_DELETION_PERMISSION),
                       recent_events=dashboard.recent_events_of(request.user))
    response = admin.site.index(request, extra_context=context)
    response.template_name = CONSOLE_INDEX_TEMPLATE  # extends admin/index.html; not yet rendered
    return response


# -- reports -------------------------------------------------------------------------


def _context(request, **extra) -> dict:
    return {**admin.site.each_context(request), "reports": list(reports.REPORTS.values()), **extra}


@require_GET
def report_index(request):
    _require(request, VIEW_PERMISSION)
    request.current_app = admin.site.name
    return TemplateResponse(request, "keyvault/reports/index.html",
                            _context(request, title="Audit reports",
                                     can_export=request.user.has_perm(EXPORT_PERMISSION)))


def _spec_or_404(name: str) -> reports.ReportSpec:
    spec = reports.REPORTS.get(name)
    if spec is None:
        raise Http404("No such report.")
    return spec


@require_GET
def report_view(request, name: str):
    """The report as a page, filtered by the query string; export buttons for who may export."""
    _require(request, VIEW_PERMISSION)
    spec = _spec_or_404(name)
    values = {key: request.GET.get(key, "")[:200] for key in spec.filters}
    after = request.GET.get("after", "")
    error, report = "", None
    try:
        if spec.keyset is not None:  # can be large: one keyset page at a time
            report = reports.build_page(spec.name, request.GET, after=int(after) if after.isdigit() else None)
        else:
            report = reports.build(spec.name, request.GET)
    except reports.InvalidReportRequest as exc:
        error = str(exc)
    request.current_app = admin.site.name
    context = _context(
        request, title=spec.title, spec=spec, report=report, error=error, values=values,
        table=reports.marked_table(report) if report else [], can_export=request.user.has_perm(EXPORT_PERMISSION),
        formats=("csv", "json"), paged_from=after if after.isdigit() else "",
        first_page_query=urlencode({k: v for k, v in values.items() if v}),
        next_page_query=urlencode({**{k: v for k, v in values.items() if v}, "after": report.next_after})
        if report and report.next_after is not None else "",
    )
    return TemplateResponse(request, "keyvault/reports/report.html", context, status=400 if error else 200)


@require_POST
def report_export(request, name: str, fmt: str):
    """Download the report as CSV or JSON (POST: the export itself is written to the audit log)."""
    _require(request, EXPORT_PERMISSION)
    spec = _spec_or_404(name)
    if fmt not in ("csv", "json"):
        raise Http404("No such format.")
    try:
        if fmt == "csv" and spec.keyset is not None:
            return _streamed(reports.stream_csv(spec.name, request.POST, actor=Actor.from_request(request)))
        report = reports.build(spec.name, request.POST)
    except reports.InvalidReportRequest as exc:
        return HttpResponse(f"Bad request: {exc}\n", status=400, content_type="text/plain; charset=utf-8")
    result = reports.export(report, fmt=fmt, actor=Actor.from_request(request))
    response = HttpResponse(result.content, content_type=result.content_type)
    response["Content-Disposition"] = f'attachment; filename="{result.filename}"'
    response["X-Keyvault-Body-SHA256"] = result.body_sha256
    response["X-Keyvault-Audit-Event"] = str(result.event_sequence)
    response["X-Keyvault-Chain-Position"] = f"{report.chain_sequence}:{report.chain_hash}"
    response["Cache-Control"] = "no-store"
    return response


def _streamed(stream: reports.StreamedExport) -> StreamingHttpResponse:
    """The CSV as it is produced; its hash and audit event are in the seal on its last line."""
    response = StreamingHttpResponse(stream, content_type=stream.content_type)
    response["Content-Disposition"] = f'attachment; filename="{stream.filename}"'
    response["X-Keyvault-Chain-Position"] = f"{stream.report.chain_sequence}:{stream.report.chain_hash}"
    response["Cache-Control"] = "no-store"
    return response


def urlpatterns():
    """The report routes (``reports:`` namespace), each behind the console's login (``admin_view``)."""
    from django.urls import path

    wrap = admin.site.admin_view
    return (
        [
            path("", wrap(report_index), name="index"),
            path("<slug:name>/", wrap(report_view), name="report"),
            path("<slug:name>/export.<slug:fmt>", wrap(report_export), name="export"),
        ],
        "reports",
    )
