"""The rotation engine in the security console: policies and runs.

Nothing here changes state itself. Policies (a KEK's schedule lives there only) are edited
in a form saved through ``rotation.services.update_policy``, which moves the next due date;
runs are started from the KEK's page (whose run buttons and rotation box this module
registers there) and driven from the run page (``rotation.admin_views``), each action
calling one service. Every KEK gets its policy with it (``services.create_kek_with_policy``)
or from ``services.ensure_policy``, so there is no "add" and nothing is ever deleted here.
"""

from __future__ import annotations

from django.contrib import admin
from django.contrib.admin.options import ShowFacets
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from keyvault.audit import Actor
from keyvault.console.admin import SelectionExport
from keyvault.console.admin_views import KEKAction, register_kek_actions, register_kek_panel, runbook_for
from keyvault.models import KeyEncryptionKey
from rotation import permissions, services
from rotation.admin_views import RotationRunViewsMixin, kek_rotation_panel, run_status, start_from_console
from rotation.forms import (
    EmergencyRotationForm, MigrateForm, ProviderRateLimitForm, RotationPolicyForm, StartRotationForm,
)
from rotation.models import ProviderRateLimit, RotationPolicy, RotationRun, format_period

CONSOLE_CSS = {"all": ("keyvault/console.css", "rotation/rotation.css")}


def _state_badge(state: str, label: str):
    return format_html('<span class="kv-state kv-run-state-{}">{}</span>', state, label)


def _start(kind: str):
    def perform(kek, data, actor):
        return start_from_console(kek, data, actor, kind=kind)

    return perform


ENABLED = frozenset({KeyEncryptionKey.State.ENABLED})

#: The KEK page's buttons that start runs, and its rotation box. The keyvault console is below us:
#: we register them there rather than it importing this console.
register_kek_actions(
    KEKAction(
        slug="rotate",
        button="Rotate now",
        title="Rotate key-encryption key",
        permission=("keyvault.rotate_keyencryptionkey", permissions.START_RUN),
        states=ENABLED,
        form_class=StartRotationForm,
        perform=_start(RotationRun.Kind.ON_DEMAND),
        explanation=(
            "Starts an on-demand rotation run: a new primary version at the provider, every data key on an older "
            "version rewrapped, verified, and the old versions retired after the policy's grace period. If the "
            "policy requires approvals, the run waits for them. The rotation schedule restarts from the rotation."
        ),
    ),
    KEKAction(
        slug="emergency-rotate",
        button="Emergency rotate",
        title="Emergency rotation of key-encryption key",
        permission=(permissions.START_RUN, permissions.EMERGENCY_RUN),
        states=ENABLED,
        form_class=EmergencyRotationForm,
        perform=_start(RotationRun.Kind.EMERGENCY),
        explanation=(
            "For a suspected compromise: rotates at once, rewraps every data key at top priority and disables "
            "the old versions as soon as coverage reaches 100%, with no grace period."
        ),
        danger=True,
    ),
    KEKAction(
        slug="migrate",
        button="Migrate to another KEK",
        title="Migrate data keys to another key-encryption key",
        permission=(permissions.START_RUN, "keyvault.change_state_keyencryptionkey"),
        states=ENABLED,
        form_class=MigrateForm,
        perform=_start(RotationRun.Kind.MIGRATE),
        explanation=(
            "Starts a migration run: every data key wrapped by this key is unwrapped and wrapped by the "
            "destination KEK in the worker, in resumable batches. This key stays enabled for rollback."
        ),
    ),
)
register_kek_panel("rotation", kek_rotation_panel)


@admin.register(RotationPolicy)
class RotationPolicyAdmin(admin.ModelAdmin):
    form = RotationPolicyForm
    list_display = ("target", "period_display", "next_due_at", "approvals_required", "auto", "warnings_display")
    list_filter = ("auto", "approvals_required")
    list_select_related = ("kek",)
    search_fields = ("kek__name",)
    ordering = ("kek__name",)
    actions = None
    show_facets = ShowFacets.NEVER
    fieldsets = (
        (None, {"fields": ("target", "warnings_display", "next_due_at")}),
        ("Schedule", {"fields": ("period", "usage_threshold", "auto", "grace_period")}),
        ("Approvals", {"fields": ("approvals_required",)}),
        ("Window for automatic runs", {"fields": ("window_weekdays", "window_start", "window_end")}),
    )
    readonly_fields = ("target", "warnings_display", "next_due_at")

    class Media:
        css = CONSOLE_CSS

    @admin.display(description="target", ordering="kek__name")
    def target(self, obj: RotationPolicy):
        if not obj.kek_id:
            return "—"
        url = reverse("admin:keyvault_keyencryptionkey_change", args=[obj.kek_id])
        return format_html('<a href="{}">KEK {}</a>', url, obj.kek.name)

    @admin.display(description="period", ordering="period")
    def period_display(self, obj: RotationPolicy):
        return format_period(obj.period)

    @admin.display(description="NIST warnings")
    def warnings_display(self, obj: RotationPolicy):
        warnings = obj.warnings()
        if not warnings:
            return "—"
        return format_html('<ul class="kv-warnings">{}</ul>', format_html_join("", "<li>{}</li>", ((w,) for w in warnings)))

    def has_add_permission(self, request) -> bool:
        return False  # every KEK gets its policy from services.ensure_policy

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = {
            "show_save_and_add_another": False,
            "show_save_and_continue": True,
            "runbook": runbook_for("edit-policy"),
            **(extra_context or {}),
        }
        return super().change_view(request, object_id, form_url, extra_context)

    def save_model(self, request, obj, form, change):
        """Through the service: it locks the row, moves the next due date and audits the change."""
        changes = {name: form.cleaned_data[name] for name in form.changed_data if name in services.POLICY_FIELDS}
        if changes and obj.secret_id:
            services.update_secret_policy(obj.secret, actor=Actor.from_request(request), **changes)
        elif changes:
            services.update_policy(obj.kek, actor=Actor.from_request(request), **changes)
        obj.refresh_from_db()

    def log_change(self, request, obj, message):
        return None  # the audit log records the change (services.update_policy), not admin's LogEntry


@admin.register(RotationRun)
class RotationRunAdmin(SelectionExport, RotationRunViewsMixin, admin.ModelAdmin):
    """The run list, with the bulk "Export selected as CSV" the other lists have (``selection.export_selection``)."""

    list_display = ("run_id", "target", "kind", "status_display", "initiator", "created_at")
    list_display_links = ("run_id",)
    list_filter = ("state", "kind")
    list_select_related = ("kek",)
    search_fields = ("kek__name", "initiator", "incident_ref")
    show_facets = ShowFacets.NEVER
    show_full_result_count = False

    class Media:
        css = CONSOLE_CSS

    @admin.display(description="run", ordering="pk")
    def run_id(self, obj: RotationRun):
        return f"#{obj.pk}"

    @admin.display(description="target", ordering="kek__name")
    def target(self, obj: RotationRun):
        return obj.target_label

    @admin.display(description="status", ordering="state")
    def status_display(self, obj: RotationRun):
        """The run page's badge and sentence (retiring reads as done with one pending step); a bar only while working."""
        status = run_status(obj)
        bar = format_html('<progress max="100" value="{}">{}%</progress> {}%', obj.percent, obj.percent, obj.percent) \
            if status.show_bar and status.phase == "working" else ""
        return format_html('<div class="kv-run-status-cell kv-phase-{}">{}<span class="kv-run-sentence">{}</span>{}</div>',
                           status.phase, _state_badge(obj.state, status.badge), status.summary, bar)

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("policy").prefetch_related("approvals")

    def has_add_permission(self, request) -> bool:
        return False  # runs are started from a KEK's page (or the CLI / the beat sweep)

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # runs change only through their actions

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(ProviderRateLimit)
class ProviderRateLimitAdmin(admin.ModelAdmin):
    """Rotation's cap per provider: changed here or with ``rotation rate-limit``, both through the service."""

    form = ProviderRateLimitForm
    list_display = ("provider", "cap_display", "allowed_display", "measured_display", "throttles")
    fields = ("provider", "cap", "status_display")
    readonly_fields = ("status_display",)
    actions = None
    show_facets = ShowFacets.NEVER

    class Media:
        css = CONSOLE_CSS

    @staticmethod
    def _status(obj: ProviderRateLimit):
        return services.rate_limit_status(obj.provider)

    @admin.display(description="cap (calls/s)")
    def cap_display(self, obj: ProviderRateLimit):
        limit = self._status(obj)
        return f"{limit.cap:,} ({limit.cap_source})" if limit.cap else f"none ({limit.cap_source})"

    @admin.display(description="allowed now (calls/s)")
    def allowed_display(self, obj: ProviderRateLimit):
        allowed = self._status(obj).allowed
        return "no limit" if allowed is None else f"{allowed:,.0f}"

    @admin.display(description="measured (calls/s)")
    def measured_display(self, obj: ProviderRateLimit):
        measured = self._status(obj).measured
        return "—" if measured is None else f"{measured:,.0f}"

    @admin.display(description="now")
    def status_display(self, obj: ProviderRateLimit):
        return self._status(obj).describe() if obj.provider else "—"

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # an empty cap returns to the default

    def save_model(self, request, obj, form, change):
        """Through the service: it locks the row, applies the cap to running batches and audits the change."""
        saved = services.set_rate_limit(form.cleaned_data["provider"], form.cleaned_data["cap"],
                                        actor=Actor.from_request(request))
        obj.pk = saved.pk
        obj.refresh_from_db()

    def log_change(self, request, obj, message):
        return None  # the audit log records the change (services.set_rate_limit), not admin's LogEntry

    def log_addition(self, request, obj, message):
        return None
