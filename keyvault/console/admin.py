"""The security console: the Django admin over the key inventory and the audit log.

Nothing here changes keys itself. KEK actions are custom views
(``keyvault.console.admin_views``) that call ``keyvault.keys.services``; the only generic
admin write is the KEK settings form, saved through ``services.update_kek_settings``.
Data keys, versions, audit events and checkpoints are read-only for everyone,
superusers included, and nothing can be deleted.

Large tables stay fast: no full ``COUNT(*)`` (estimated or capped counts instead),
no facets, filters and sorting only on indexed columns, related rows joined.
"""

from __future__ import annotations

import json
from datetime import UTC, timedelta

from django.contrib import admin
from django.contrib.admin.options import ShowFacets
from django.contrib.admin.utils import unquote
from django.contrib.admin.views.main import ChangeList
from django.core.paginator import Paginator
from django.db import connections
from django.db.models.expressions import RawSQL
from django.contrib import messages
from django.db.models import F, IntegerField, OuterRef, Q, Subquery
from django.urls import reverse
from django.utils.functional import cached_property
from django.utils.html import format_html
from django.utils.text import capfirst
from django.utils.http import urlencode

from keyvault.keys import services
from keyvault.console.admin_views import (
    AuditChainViewsMixin,
    DataKeyViewsMixin,
    KEKActionViewsMixin,
    available_actions,
    group_actions,
    kek_coverage,
    kek_panels,
)
from django.utils.dateparse import date_re

from keyvault.audit import Actor
from keyvault.console import reports, selection
from keyvault.console.timezones import format_when
from keyvault.console.reports import InvalidReportRequest, keyset_beyond, parse_moment
from keyvault.models import AuditCheckpoint, AuditEvent, DataKey, KeyEncryptionKey, KeyVersion
from django import forms
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db import IntegrityError
from django.http import HttpResponse
from django.template.response import TemplateResponse
from django.utils.decorators import method_decorator
from django.views.decorators.debug import sensitive_post_parameters

from keyvault.audit import siem
from keyvault.models import SiemConsumer

admin.site.site_header = "Keyvault security console"
admin.site.site_title = "Keyvault"
admin.site.index_title = "Key inventory and audit log"
admin.site.site_url = None  # the console is the whole site

CONSOLE_CSS = {"all": ("keyvault/console.css",)}


# -- counting big tables -----------------------------------------------------------


class EstimatedCountPaginator(Paginator):
    """A paginator that never counts a big table row by row.

    Unfiltered on PostgreSQL it takes the planner's estimate (``pg_class.reltuples``,
    kept current by autovacuum's ANALYZE) when that is above ``exact_up_to``.
    Otherwise it counts at most ``exact_up_to + 1`` rows: exact for small results,
    "more than N" for big ones (pages beyond are reached by filtering).
    """

    exact_up_to = 10_000

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.count_is_estimate = False
        self.count_is_lower_bound = False

    def _postgres_estimate(self) -> int | None:
        queryset = self.object_list
        query = queryset.query
        if query.where or query.distinct or query.combinator or query.is_sliced:
            return None
        connection = connections[queryset.db]
        if connection.vendor != "postgresql":
            return None
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)",
                [connection.ops.quote_name(queryset.model._meta.db_table)],
            )
            row = cursor.fetchone()
        return row[0] if row and row[0] is not None and row[0] >= 0 else None

    @cached_property
    def count(self) -> int:
        estimate = self._postgres_estimate()
        if estimate is not None and estimate > self.exact_up_to:
            self.count_is_estimate = True
            return estimate
        capped = self.object_list.order_by()[: self.exact_up_to + 1].count()
        if capped > self.exact_up_to:
            self.count_is_lower_bound = True
            return self.exact_up_to
        return capped

    @property
    def count_text(self) -> str:
        count = self.count
        if self.count_is_estimate:
            return f"about {count:,}"
        if self.count_is_lower_bound:
            return f"more than {count:,}"
        return f"{count:,}"


class ExactInputFilter(admin.ListFilter):
    """A text box filtering one indexed column by exact value (no DISTINCT over a big table)."""

    parameter_name: str = ""
    template = "admin/keyvault/input_filter.html"

    def __init__(self, request, params, model, model_admin) -> None:
        super().__init__(request, params, model, model_admin)
        if self.parameter_name in params:
            self.used_parameters[self.parameter_name] = params.pop(self.parameter_name)[-1]

    def value(self) -> str:
        return self.used_parameters.get(self.parameter_name, "")

    def has_output(self) -> bool:
        return True

    def expected_parameters(self) -> list[str]:
        return [self.parameter_name]

    def queryset(self, request, queryset):
        value = self.value()
        return queryset.filter(**{self.parameter_name: value}) if value else queryset

    def choices(self, changelist):
        other = {k: v for k, v in changelist.params.items() if k != self.parameter_name}
        yield {
            "parameter_name": self.parameter_name,
            "value": self.value(),
            "hidden": sorted(other.items()),
            "clear_query_string": changelist.get_query_string(remove=[self.parameter_name]),
        }


class ActorFilter(ExactInputFilter):
    title = "actor"
    parameter_name = "actor"


class TargetTypeFilter(ExactInputFilter):
    title = "target type"
    parameter_name = "target_type"


class TargetIdFilter(ExactInputFilter):
    title = "target"
    parameter_name = "target_id"


class OwnerFilter(ExactInputFilter):
    title = "owner"
    parameter_name = "owner_ref"


EXPORT_PERMISSION = "keyvault.export_auditevent"


@admin.action(description="Export selected as CSV (recorded in the audit log)", permissions=["export"])
def export_selected_csv(modeladmin, request, queryset):
    """The safe bulk action: the chosen rows' metadata as a sealed CSV, audited (``selection.export_selection``)."""
    try:
        result = selection.export_selection(modeladmin.opts.model_name, queryset.values_list("pk", flat=True),
                                            actor=Actor.from_request(request))
    except reports.InvalidReportRequest as exc:
        modeladmin.message_user(request, str(exc), level="error")
        return None
    response = HttpResponse(result.content, content_type=result.content_type)
    response["Content-Disposition"] = f'attachment; filename="{result.filename}"'
    response["X-Keyvault-Audit-Event"] = str(result.event_sequence)
    response["Cache-Control"] = "no-store"
    return response


class SelectionExport:
    """Lists whose rows may be exported in bulk: by whoever may export the audit log (auditors, administrators)."""

    actions = [export_selected_csv]

    def has_export_permission(self, request) -> bool:
        return request.user.has_perm(EXPORT_PERMISSION)

    def response_action(self, request, queryset):
        """Refuse a selection that is not row ids (a database refuses ``pk__in`` past 64 bits with a 500)."""
        selected = request.POST.getlist(helpers.ACTION_CHECKBOX_NAME)
        if not all(value.isascii() and value.isdigit() and int(value) < 2**63 for value in selected):
            self.message_user(request, "The selection holds something that is not a row id.", level="error")
            return None
        return super().response_action(request, queryset)
class DateRangeFilter(admin.ListFilter):
    """Events between two moments, any range: ``from`` and ``to`` take a date or an ISO 8601 date-time (UTC).

    ``to`` as a bare date includes that whole day. A value that is not a date is reported on the
    page and selects nothing, rather than being ignored.
    """

    title = "time (UTC)"
    field_name = "timestamp"
    parameters = ("from", "to")
    #: While a range is chosen the list is in time order (``KeysetChangeList.time_field``).
    orders_by_time = True
    template = "admin/keyvault/range_filter.html"

    def __init__(self, request, params, model, model_admin) -> None:
        super().__init__(request, params, model, model_admin)
        for name in self.parameters:
            if name in params:
                self.used_parameters[name] = params.pop(name)[-1].strip()[:64]
        self.bounds, self.error = {}, ""
        try:
            self.bounds = parse_range(self.used_parameters.get("from"), self.used_parameters.get("to"))
        except InvalidReportRequest as exc:
            self.error = str(exc)

    def has_output(self) -> bool:
        return True

    def expected_parameters(self) -> list[str]:
        return list(self.parameters)

    def queryset(self, request, queryset):
        if self.error:
            messages.error(request, f"Time filter: {self.error}")
            return queryset.none()
        lookups = {}
        if "from" in self.bounds:
            lookups[f"{self.field_name}__gte"] = self.bounds["from"]
        if "to" in self.bounds:
            lookups[f"{self.field_name}__lt"] = self.bounds["to"]
        return queryset.filter(**lookups)

    def choices(self, changelist):
        other = {k: v for k, v in changelist.params.items() if k not in self.parameters}
        yield {
            "values": [(name, self.used_parameters.get(name, "")) for name in self.parameters],
            "hidden": sorted(other.items()),
            "error": self.error,
            "active": any(self.used_parameters.values()),
            "clear_query_string": changelist.get_query_string(remove=list(self.parameters)),
        }


def parse_range(start: str | None, end: str | None) -> dict:
    """``{"from": datetime, "to": datetime}`` (``to`` exclusive; a bare date ends after that day).

    :raises InvalidReportRequest: not a date, or ``from`` not before ``to``.
    """
    bounds = {}
    if start:
        bounds["from"] = parse_moment(start, name="from")
    if end:
        bounds["to"] = parse_moment(end, name="to")
        if date_re.match(end.strip()):  # a day: up to the end of it
            bounds["to"] += timedelta(days=1)
    if "from" in bounds and "to" in bounds and bounds["from"] >= bounds["to"]:
        raise InvalidReportRequest("from must be before to")
    return bounds


class OutcomeFilter(admin.SimpleListFilter):
    """Success, failure, denied, or both kinds of trouble at once (the ``audit_outcome_seq`` index)."""

    title = "outcome"
    parameter_name = "outcome"
    PROBLEMS = "problems"

    def lookups(self, request, model_admin):
        return [*AuditEvent.Outcome.choices, (self.PROBLEMS, "Failure or denied")]

    def queryset(self, request, queryset):
        value = self.value()
        if value == self.PROBLEMS:
            return queryset.filter(outcome__in=[AuditEvent.Outcome.FAILURE, AuditEvent.Outcome.DENIED])
        if value in AuditEvent.Outcome.values:
            return queryset.filter(outcome=value)
        return queryset


#: Query-string names of the keyset cursor: rows older (``before``) or newer (``after``) than a key.
CURSOR_PARAMS = ("before", "after")


class KeysetChangeList(ChangeList):
    """A change list paged by key, newest first: ``?before=K`` / ``?after=K`` instead of ``?p=N``.

    Page *n* of an OFFSET list reads and throws away every row before it; a keyset page is
    one index range scan of ``list_per_page + 1`` rows wherever it is. The list is always in
    descending ``keyset_field`` order (a unique, indexed column); counts stay estimated or
    capped (``EstimatedCountPaginator``).
    """

    keyset_field = "id"
    #: A column whose index (``time_field``, ``keyset_field``) serves a time range; "" if none.
    time_field = ""

    def __init__(self, request, *args, **kwargs) -> None:
        self.cursor = {name: _cursor_value(request.GET.get(name)) for name in CURSOR_PARAMS}
        self.has_newer = self.has_older = False
        super().__init__(request, *args, **kwargs)

    def get_filters_params(self, params=None):
        lookup_params = super().get_filters_params(params)
        for name in CURSOR_PARAMS:
            lookup_params.pop(name, None)
        return lookup_params

    def get_query_string(self, new_params=None, remove=None) -> str:
        # Changing a filter starts again at the newest rows.
        new_params = dict(new_params or {})
        keep = {name for name in CURSOR_PARAMS if name in new_params}
        remove = [*(remove or []), *(name for name in CURSOR_PARAMS if name not in keep)]
        return super().get_query_string(new_params, remove)

    def _order(self) -> tuple[str, ...]:
        """The keys rows are in: by time then key while a time range is chosen, else by key alone."""
        ranged = self.time_field and any(
            getattr(spec, "orders_by_time", False) and any(spec.used_parameters.values())
            for spec in self.filter_specs)
        return (self.time_field, self.keyset_field) if ranged else (self.keyset_field,)

    def _beyond(self, queryset, cursor: int, *, older: bool):
        """Rows strictly before (``older``) or after the row whose key is ``cursor``, in :meth:`_order`."""
        order = self._order()
        return keyset_beyond(queryset, key=self.keyset_field, cursor=cursor, older=older,
                             time_field=order[0] if len(order) > 1 else "")

    def get_results(self, request) -> None:
        key, limit = self.keyset_field, self.list_per_page
        order = self._order()
        queryset = self.queryset.order_by()
        rows = []
        if self.cursor["after"] is not None:
            newer = list(self._beyond(queryset, self.cursor["after"], older=False).order_by(*order)[: limit + 1])
            if len(newer) > limit:
                rows, self.has_newer, self.has_older = newer[:limit][::-1], True, True
        if not rows:  # the first page, or the page before a cursor
            older = queryset.order_by(*(f"-{name}" for name in order))
            if self.cursor["before"] is not None and self.cursor["after"] is None:
                older = self._beyond(older, self.cursor["before"], older=True)
                self.has_newer = True
            rows = list(older[: limit + 1])
            self.has_older = len(rows) > limit
            rows = rows[:limit]
        self.paginator = self.model_admin.get_paginator(request, self.queryset, limit)
        self.result_list = rows
        self.result_count = self.paginator.count
        self.full_result_count = None
        self.show_full_result_count = False
        self.show_admin_actions = False
        self.can_show_all = False
        self.multi_page = self.has_newer or self.has_older
        self.newer_query = self.get_query_string({"after": getattr(rows[0], key)}) if rows and self.has_newer else ""
        self.older_query = self.get_query_string({"before": getattr(rows[-1], key)}) if rows and self.has_older else ""
        self.newest_query = self.get_query_string() if self.has_newer else ""


def _cursor_value(value: str | None) -> int | None:
    """A cursor is a positive integer key; anything else starts at the newest rows."""
    return int(value) if value and value.isdigit() and len(value) < 19 else None


class KeysetPagedAdmin(admin.ModelAdmin):
    """Lists too big for OFFSET paging: keyset pages, no sorting but newest first."""

    keyset_field = "id"
    time_field = ""
    sortable_by = ()

    def get_changelist(self, request, **kwargs):
        return type(f"{type(self).__name__}ChangeList", (KeysetChangeList,),
                    {"keyset_field": self.keyset_field, "time_field": self.time_field})


class ReadOnlyAdmin(admin.ModelAdmin):
    """Viewable by whoever has the view permission; nobody adds, changes or deletes."""

    actions = None
    show_full_result_count = False
    show_facets = ShowFacets.NEVER

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


def _pretty_json(value) -> str:
    return format_html('<pre class="kv-json">{}</pre>', json.dumps(value, indent=2, sort_keys=True))


def _compact_time(value):
    """A ``<time>`` in the console's one format (``timezones.format_when``: the user's zone, named)."""
    return format_html('<time datetime="{}">{}</time>', value.astimezone(UTC).isoformat(), format_when(value))


def _state_badge(state: str, label: str):
    return format_html('<span class="kv-state kv-state-{}">{}</span>', state, label)


# -- key-encryption keys -----------------------------------------------------------


class KeyVersionInline(admin.TabularInline):
    """A KEK's versions, newest first; changed only through the retire action."""

    model = KeyVersion
    fields = ("number", "state_display", "is_primary", "encrypt_count", "provider_version_ref", "created_at")
    readonly_fields = fields
    ordering = ("-number",)
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = False
    verbose_name_plural = "versions"

    @admin.display(description="state")
    def state_display(self, obj: KeyVersion):
        return _state_badge(obj.state, KeyVersion.State(obj.state).label)

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


#: The KEK list counts each key's data keys up to this many; past it the page says "more than".
DEK_COUNT_CAP = 10_000


def _dek_count():
    """Data keys of the KEK on the row, counted by an index-only scan that stops at the cap.

    An exact count of a KEK with a million data keys costs most of a second per row;
    the coverage on the KEK's own page gives exact figures.
    """
    table, kek_table = DataKey._meta.db_table, KeyEncryptionKey._meta.db_table
    return RawSQL(
        f'SELECT COUNT(*) FROM (SELECT 1 FROM "{table}" AS d WHERE d.kek_id = "{kek_table}"."id" LIMIT %s) AS capped',
        (DEK_COUNT_CAP + 1,),
        output_field=IntegerField(),
    )


def _primary_number():
    return Subquery(KeyVersion.objects.filter(kek=OuterRef("pk"), is_primary=True).values("number")[:1])


class KEKChangeList(ChangeList):
    def get_queryset(self, request, exclude_parameters=None):
        # A correlated count per KEK: only the rows on the page are counted, each by
        # an index-only range scan of datakey_kek_version_id.
        return super().get_queryset(request, exclude_parameters).annotate(dek_count=_dek_count())


@admin.register(KeyEncryptionKey)
class KeyEncryptionKeyAdmin(KEKActionViewsMixin, SelectionExport, admin.ModelAdmin):
    list_display = ("name", "state_display", "provider", "primary_version", "last_rotated_at", "next_rotation",
                    "data_key_count")
    list_filter = ("state", "provider")
    search_fields = ("name",)
    show_full_result_count = False
    show_facets = ShowFacets.NEVER
    inlines = [KeyVersionInline]
    editable_fields = ("description", "max_encryptions_per_version")
    fieldsets = (
        (None, {"fields": ("name", "state_display", "deletion_date", "description")}),
        ("Provider", {"fields": ("provider", "provider_key_id")}),
        # The schedule (period, next due date) is shown once, in the rotation policy's box below.
        ("Rotation", {"fields": ("primary_version", "max_encryptions_per_version", "last_rotated_at")}),
        ("Record", {"classes": ("collapse",), "fields": ("created_at", "updated_at")}),
    )
    readonly_fields = ("name", "state_display", "deletion_date", "provider", "provider_key_id", "primary_version",
                       "last_rotated_at", "created_at", "updated_at")

    class Media:
        css = CONSOLE_CSS

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(primary_number=_primary_number(),
                                                      next_due=F("rotation_policy__next_due_at"))

    def get_changelist(self, request, **kwargs):
        return KEKChangeList

    @admin.display(description="state", ordering="state")
    def state_display(self, obj: KeyEncryptionKey):
        return _state_badge(obj.state, KeyEncryptionKey.State(obj.state).label)

    @admin.display(description="primary version", ordering="primary_number")
    def primary_version(self, obj: KeyEncryptionKey):
        number = getattr(obj, "primary_number", None)
        return f"v{number}" if number is not None else "—"

    @admin.display(description="next rotation", ordering="next_due")
    def next_rotation(self, obj: KeyEncryptionKey):
        """Its rotation policy's next due date: the schedule lives there only."""
        return getattr(obj, "next_due", None) or "—"

    # Not a sort key: KEKChangeList adds the count after ordering, for the rows of the page only.
    @admin.display(description="data keys")
    def data_key_count(self, obj: KeyEncryptionKey):
        count = getattr(obj, "dek_count", None)
        if count is None:
            return "—"
        url = reverse("admin:keyvault_datakey_changelist") + "?" + urlencode({"kek__id__exact": obj.pk})
        label = f"more than {DEK_COUNT_CAP:,}" if count > DEK_COUNT_CAP else f"{count:,}"
        return format_html('<a href="{}">{}</a>', url, label)

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # deletion is a scheduled state change, never a row delete

    def change_view(self, request, object_id, form_url="", extra_context=None):
        kek = self.get_object(request, unquote(object_id))
        extra_context = {"show_save_and_add_another": False, **(extra_context or {})}
        if kek is not None and self.has_view_or_change_permission(request, kek):
            audit_url = reverse("admin:keyvault_auditevent_changelist") + "?" + urlencode(
                {"target_type": "keyencryptionkey", "target_id": kek.name}
            )
            actions = available_actions(request.user, kek, self.admin_site.name)
            extra_context.update(
                kek_actions=actions,
                kek_actions_grouped=group_actions(actions),
                coverage=kek_coverage(kek, user=request.user, admin_site_name=self.admin_site.name),
                audit_url=audit_url if request.user.has_perm("keyvault.view_auditevent") else "",
                kek_panels=kek_panels(kek, user=request.user, admin_site_name=self.admin_site.name),
            )
        return super().change_view(request, object_id, form_url, extra_context)

    def save_model(self, request, obj, form, change):
        """Settings changes go through the service, which locks the row and audits them."""
        if not change:  # the generic add view is replaced by the create view
            raise ValueError("KEKs are created with services.create_kek")
        data = form.cleaned_data
        services.update_kek_settings(
            obj,
            actor=Actor.from_request(request),
            description=data.get("description", obj.description),
            max_encryptions_per_version=data.get("max_encryptions_per_version", obj.max_encryptions_per_version),
        )
        obj.refresh_from_db()

    def save_related(self, request, form, formsets, change):
        """Versions are read-only here: save nothing, report nothing added, changed or deleted."""
        for formset in formsets:
            formset.new_objects, formset.changed_objects, formset.deleted_objects = [], [], []


# -- data keys ---------------------------------------------------------------------


@admin.register(DataKey)
class DataKeyAdmin(DataKeyViewsMixin, SelectionExport, KeysetPagedAdmin, ReadOnlyAdmin):
    list_display = ("id", "kek", "kek_version", "owner_ref", "created", "fingerprint")
    list_filter = ("kek", OwnerFilter)
    list_select_related = ("kek",)
    keyset_field = "id"
    paginator = EstimatedCountPaginator
    fields = ("id", "kek", "kek_version", "fingerprint", "key_spec", "context_display", "purpose", "owner_ref",
              "created_at", "last_rewrapped_at")
    readonly_fields = fields

    class Media:
        css = CONSOLE_CSS

    def get_queryset(self, request):
        # The fingerprint is stored (DataKey.fingerprint): no page needs the wrapped bytes.
        return super().get_queryset(request).select_related("kek").defer("wrapped_key")

    @admin.display(description="created")
    def created(self, obj: DataKey):
        return _compact_time(obj.created_at)

    @admin.display(description="wrapped key fingerprint")
    def fingerprint(self, obj: DataKey):
        return format_html('<code class="kv-fingerprint">{}</code>', obj.fingerprint)

    @admin.display(description="encryption context")
    def context_display(self, obj: DataKey):
        return _pretty_json(obj.encryption_context)


# -- audit log ---------------------------------------------------------------------

TARGET_LABELS = {"keyencryptionkey": "KEK", "datakey": "data key"}


@admin.register(AuditEvent)
class AuditEventAdmin(AuditChainViewsMixin, SelectionExport, KeysetPagedAdmin, ReadOnlyAdmin):
    """The audit log: newest first, keyset-paged, searchable by exact actor, target or request id.

    Every filter and the search are served by an index ending in ``sequence`` (``AuditEvent.Meta``),
    so a page is one index range scan however long the log is. Failures and denials are marked red.
    """

    list_display = ("sequence", "time", "actor", "action", "target", "outcome_display", "request", "short_hash")
    list_filter = (OutcomeFilter, DateRangeFilter, ActorFilter, "action", TargetTypeFilter, TargetIdFilter)
    keyset_field = "sequence"
    time_field = "timestamp"
    search_fields = ("actor", "target_id", "request_id")  # shows the search box; get_search_results decides
    search_help_text = ("Exact actor (alice, user:alice, system:beat), target (a KEK name, a data key id) "
                        "or request id.")
    paginator = EstimatedCountPaginator
    fields = ("sequence", "timestamp", "actor", "action", "target_type", "target_id", "outcome", "request_id",
              "ip_address", "details_display", "prev_hash", "hash")
    readonly_fields = fields

    class Media:
        css = {"all": (*CONSOLE_CSS["all"], "keyvault/reports.css")}

    def get_search_results(self, request, queryset, search_term):
        """Exact matches on indexed columns, never ``LIKE '%…%'`` over the whole log."""
        term = search_term.strip()[:255]
        if not term:
            return queryset, False
        if not term.isprintable():  # PostgreSQL refuses NUL in a parameter; such a value names nothing
            return queryset.none(), False
        actors = {term} if ":" in term else {term, f"user:{term}", f"system:{term}"}
        return queryset.filter(Q(actor__in=actors) | Q(target_id=term) | Q(request_id=term)), False

    @admin.display(description="time")
    def time(self, obj: AuditEvent):
        return _compact_time(obj.timestamp)

    @admin.display(description="request id")
    def request(self, obj: AuditEvent):
        """The request id, linked to every event of that request."""
        if not obj.request_id:
            return "—"
        return format_html('<a href="?{}" class="kv-request-id" title="{}">{}…</a>', urlencode({"q": obj.request_id}),
                           obj.request_id, obj.request_id[:8])

    @admin.display(description="target")
    def target(self, obj: AuditEvent):
        """The target, linked to the log filtered to it (the audit_target_seq index)."""
        if not obj.target_type:
            return "—"
        query = urlencode({"target_type": obj.target_type, "target_id": obj.target_id})
        label = TARGET_LABELS.get(obj.target_type, obj.target_type)
        return format_html('<a href="?{}" title="{}:{}">{} {}</a>', query, obj.target_type, obj.target_id,
                           label, obj.target_id)

    @admin.display(description="outcome")
    def outcome_display(self, obj: AuditEvent):
        """A badge; failures and denials red (reports.css also tints their whole row)."""
        label = AuditEvent.Outcome(obj.outcome).label
        if obj.outcome == AuditEvent.Outcome.SUCCESS:
            return format_html('<span class="kv-outcome kv-outcome-success">{}</span>', label)
        return format_html('<strong class="kv-outcome kv-outcome-{} kv-outcome-problem">&#9888; {}</strong>',
                           obj.outcome, label)

    @admin.display(description="hash")
    def short_hash(self, obj: AuditEvent):
        return format_html('<code title="{}">{}…</code>', obj.hash, obj.hash[:10])

    @admin.display(description="details")
    def details_display(self, obj: AuditEvent):
        return _pretty_json(obj.details)


@admin.register(AuditCheckpoint)
class AuditCheckpointAdmin(ReadOnlyAdmin):
    list_display = ("sequence", "signed_at", "short_event_hash", "short_public_key")
    sortable_by = ("sequence",)
    fields = ("sequence", "event_hash", "signed_at", "public_key", "prev_signature", "signature")
    readonly_fields = fields

    @admin.display(description="event hash")
    def short_event_hash(self, obj: AuditCheckpoint):
        return format_html('<code title="{}">{}…</code>', obj.event_hash, obj.event_hash[:12])

    @admin.display(description="public key")
    def short_public_key(self, obj: AuditCheckpoint):
        return format_html('<code title="{}">{}…</code>', obj.public_key, obj.public_key[:12])


# -- the Providers page in the app list (index, app index, sidebar) -------------------

_site_get_app_list = admin.site.get_app_list


def _app_list_with_providers(request, app_label=None):
    """The admin's app list, plus a "KMS providers" entry under Keyvault for who may see it."""
    from keyvault.console.admin_views import PROVIDERS_PERMISSION

    app_list = _site_get_app_list(request, app_label)
    if not request.user.has_perm(PROVIDERS_PERMISSION):
        return app_list
    for app in app_list:
        if app["app_label"] == "keyvault":
            app["models"].append({
                "model": None,
                "name": "KMS providers",
                "object_name": "KMSProviders",
                "perms": {"add": False, "change": False, "delete": False, "view": True},
                "admin_url": reverse("keyvault_providers"),
                "add_url": None,
                "view_only": True,
            })
    return app_list


#: Third-party apps shown together under one heading instead of as "Axes" and "Otp_Totp".
SIGN_IN_SECURITY_APPS = ("axes", "otp_totp")
SIGN_IN_SECURITY_LABEL = "Sign-in security"


def regroup_sign_in_security(app_list: list[dict]) -> list[dict]:
    """Lockouts (django-axes) and TOTP devices (django-otp) as one "Sign-in security" app, listed last."""
    grouped = [app for app in app_list if app["app_label"] in SIGN_IN_SECURITY_APPS]
    if not grouped:
        return app_list
    merged = {**grouped[0], "name": SIGN_IN_SECURITY_LABEL,
              "models": [model for app in grouped for model in app["models"]]}
    return [app for app in app_list if app["app_label"] not in SIGN_IN_SECURITY_APPS] + [merged]


def _console_app_list(request, app_label=None):
    return regroup_sign_in_security(_app_list_with_providers(request, app_label))


admin.site.get_app_list = _console_app_list


# -- SIEM consumers (keyvault.audit.siem) ------------------------------------------------------


class SiemConsumerCreateForm(forms.Form):
    name = forms.SlugField(max_length=100, help_text="Which collector this is, e.g. splunk-prod.")

    def clean_name(self):
        name = self.cleaned_data["name"]
        if SiemConsumer.objects.filter(name=name).exists():
            raise forms.ValidationError("A SIEM consumer with this name already exists.")
        return name


@admin.register(SiemConsumer)
class SiemConsumerAdmin(admin.ModelAdmin):
    """Key administrators add consumers (the token is shown once) and (de)activate them; nobody deletes them."""

    list_display = ("name", "active", "created_by", "created_at", "last_used_at", "last_sequence")
    fields = ("name", "active", "token_fingerprint", "created_by", "created_at", "last_used_at", "last_sequence")
    readonly_fields = ("name", "token_fingerprint", "created_by", "created_at", "last_used_at", "last_sequence")
    actions = None
    show_facets = ShowFacets.NEVER

    class Media:
        css = CONSOLE_CSS

    @admin.display(description="token fingerprint")
    def token_fingerprint(self, obj: SiemConsumer):
        return format_html('<code title="first characters of the token\'s SHA-256">{}…</code>', obj.token_hash[:12])

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # the audit log names consumers: deactivate instead

    @method_decorator(sensitive_post_parameters())
    def add_view(self, request, form_url="", extra_context=None):
        """Create a consumer and show its token once; only its SHA-256 is kept."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        form = SiemConsumerCreateForm(request.POST if request.method == "POST" else None)
        context = {**self.admin_site.each_context(request), "opts": self.opts, "title": "Add SIEM consumer"}
        request.current_app = self.admin_site.name
        if request.method == "POST" and form.is_valid():
            try:
                consumer, token = siem.create_consumer(name=form.cleaned_data["name"],
                                                       actor=Actor.from_request(request), user=request.user)
            except IntegrityError:
                form.add_error("name", "A SIEM consumer with this name already exists.")
            else:
                return TemplateResponse(request, "keyvault/reports/siem_token.html",
                                        {**context, "consumer": consumer, "token": token,
                                         "title": f"SIEM consumer {consumer.name} created",
                                         "endpoint": request.build_absolute_uri(reverse("siem-events"))})
        return TemplateResponse(request, "keyvault/reports/siem_add.html",
                                {**context, "form": form,
                                 "adminform": helpers.AdminForm(form, [(None, {"fields": ["name"]})], {})})

    def save_model(self, request, obj, form, change):
        """Only ``active`` changes here, through the service that audits it."""
        if not change:
            raise ValueError("SIEM consumers are created with siem.create_consumer")
        siem.set_active(obj, active=form.cleaned_data["active"], actor=Actor.from_request(request))
# -- users and groups: Django's admin, every change audited through keyvault.access.accounts ----------

from django.contrib.auth import admin as auth_admin  # noqa: E402 - registers User and Group, replaced below
from django.contrib.auth.models import Group, User  # noqa: E402
from django.core.exceptions import FieldDoesNotExist  # noqa: E402

from keyvault.access import accounts  # noqa: E402


class AccountChangesAudited:
    """Run the admin's writes inside :func:`keyvault.access.accounts.recording`, as the signed-in user.

    Django's forms make the changes (user flags, password, groups, permissions,
    group permissions and members); the accounts service names the actor and
    writes one audit event per changed user or group, with before and after.
    """

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        with accounts.recording(Actor.from_request(request)):
            return super().changeform_view(request, object_id, form_url, extra_context)

    def changelist_view(self, request, extra_context=None):  # the "delete selected" action
        with accounts.recording(Actor.from_request(request)):
            return super().changelist_view(request, extra_context)

    def delete_view(self, request, object_id, extra_context=None):
        with accounts.recording(Actor.from_request(request)):
            return super().delete_view(request, object_id, extra_context)


class KeyvaultUserAdmin(AccountChangesAudited, auth_admin.UserAdmin):
    def user_change_password(self, request, id, form_url=""):
        with accounts.recording(Actor.from_request(request)):
            return super().user_change_password(request, id, form_url)


class GroupAdminForm(forms.ModelForm):
    """A group with its members, so a role is granted from the group's page too (and audited)."""

    members = forms.ModelMultipleChoiceField(
        queryset=User.objects.order_by("username"), required=False,
        widget=admin.widgets.FilteredSelectMultiple("members", is_stacked=False))

    class Meta:
        model = Group
        fields = ("name", "permissions")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.fields["members"].initial = self.instance.user_set.all()

    def _save_m2m(self) -> None:
        super()._save_m2m()
        self.instance.user_set.set(self.cleaned_data["members"])


class KeyvaultGroupAdmin(AccountChangesAudited, auth_admin.GroupAdmin):
    form = GroupAdminForm


admin.site.unregister(User)
admin.site.unregister(Group)
admin.site.register(User, KeyvaultUserAdmin)
admin.site.register(Group, KeyvaultGroupAdmin)


# -- changelists filter only by what they declare -----------------------------------------------

#: What a declared field filter may add to its field path in the URL (Django's own filters use these).
FILTER_SUFFIXES = frozenset({"", "exact", "iexact", "isnull", "in", "gte", "gt", "lte", "lt", "isempty",
                             "id__exact", "id__in", "pk__exact", "year", "month", "day"})


def declared_lookups(model_admin, request=None) -> set[str]:
    """The URL parameters a changelist's declared filters and date hierarchy stand for."""
    items = model_admin.get_list_filter(request) if request is not None else model_admin.list_filter
    paths = {model_admin.date_hierarchy} if model_admin.date_hierarchy else set()
    for item in items:
        if isinstance(item, (list, tuple)):
            paths.add(item[0])
        elif isinstance(item, str):
            paths.add(item)
        elif getattr(item, "parameter_name", None):
            paths.add(item.parameter_name)
        elif getattr(item, "parameters", None):  # a filter of several parameters (DateRangeFilter)
            paths.update(item.parameters)
    return paths


def declared_lookup_allowed(model_admin, lookup: str, value, request=None) -> bool:
    """Allow a changelist lookup only if a declared filter makes it.

    Django's default allows any lookup on any local field, so ``?key__regex=^[0-7]``
    on a changelist answers questions about a column nobody shows (a TOTP secret,
    a password hash) one bit at a time. Anything not declared is refused (400).
    """
    for path in declared_lookups(model_admin, request):
        if lookup == path or (lookup.startswith(path + "__") and lookup[len(path) + 2:] in FILTER_SUFFIXES):
            return True
    return _by_related_key(model_admin.model, lookup)


#: "Rows of this related object", by its primary key (which pages show anyway), as links make them.
RELATED_KEY_SUFFIXES = frozenset({"id__exact", "pk__exact", "id__in", "pk__in", "exact", "in"})


def _by_related_key(model, lookup: str) -> bool:
    """``kek__id__exact=3``: a foreign key compared with a primary key says nothing a page does not."""
    name, _, rest = lookup.partition("__")
    try:
        field = model._meta.get_field(name)
    except FieldDoesNotExist:
        return False
    return bool(field.many_to_one) and rest in RELATED_KEY_SUFFIXES


def restrict_lookups(site=admin.site) -> None:
    """Give every registered ModelAdmin (ours, other apps', third-party) the declared-lookups rule."""
    for model_admin in site._registry.values():
        default = model_admin.lookup_allowed
        if getattr(default, "declared_only", False):
            continue

        def lookup_allowed(lookup, value, request=None, _admin=model_admin, _default=default):
            return declared_lookup_allowed(_admin, lookup, value, request) and _default(lookup, value, request)

        lookup_allowed.declared_only = True
        model_admin.lookup_allowed = lookup_allowed


_site_get_urls = admin.site.get_urls


def plain_changelist_titles(site=admin.site) -> None:
    """Title every list page by what it lists ("Key-encryption keys"), not "Select key-encryption key to change"."""
    for model_admin in site._registry.values():
        default = model_admin.changelist_view
        if getattr(default, "plain_title", False):
            continue

        def changelist_view(request, extra_context=None, _admin=model_admin, _default=default):
            title = capfirst(_admin.opts.verbose_name_plural)
            return _default(request, extra_context={"title": title, **(extra_context or {})})

        changelist_view.plain_title = True
        model_admin.changelist_view = changelist_view


def _urls_after_restricting_lookups():
    """Built once every app has registered its admins (the URLconf asks for them last)."""
    restrict_lookups(admin.site)
    plain_changelist_titles(admin.site)
    return _site_get_urls()


admin.site.get_urls = _urls_after_restricting_lookups


from keyvault.console import secrets_admin  # noqa: E402,F401 - registers the managed-secret pages
from keyvault.console import api_admin  # noqa: E402,F401 - registers the API client pages
