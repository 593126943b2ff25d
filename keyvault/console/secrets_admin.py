"""Managed secrets in the security console: inventory, badges, start-rotation and provide-value actions.

Like the KEK pages, nothing here changes a secret itself: registration goes through
``rotation.services.register_secret``, rotations through ``start_run`` and a value a
person hands over (OAuth) through ``provide_secret_value``. Runs are shown on the
rotation run pages (``rotation.admin``); this page links to them.
"""

from __future__ import annotations

import json

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.options import ShowFacets
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.decorators import method_decorator
from django.utils.html import format_html, format_html_join
from django.views.decorators.debug import sensitive_post_parameters

from keyvault.audit import Actor
from keyvault.console.admin_views import SERVICE_ERRORS, service_error_message
from keyvault.console.timezones import format_when
from keyvault.models import ManagedSecret
from keyvault.secrets import SecretSourceError
from rotation.exceptions import ConfigFieldError
from rotation.executors import EXECUTORS, executor_for
from rotation.permissions import EMERGENCY_RUN as EMERGENCY_PERMISSION  # as for KEKs: no grace period needs it

ACTION_TEMPLATE = "keyvault/action.html"
ROTATE_PERMISSION = "keyvault.rotate_managedsecret"
#: Largest primary key (BigAutoField): a larger number in a URL is a 404, not a database error.
MAX_ID = 2**63 - 1


def _runbook(secret_type: str, kind: str = "on_demand"):
    from rotation import runbooks

    return runbooks.for_run(f"secret-{secret_type}", kind)


class AttentionFilter(admin.SimpleListFilter):
    title = "attention"
    parameter_name = "attention"

    def lookups(self, request, model_admin):
        return (("yes", "Needs attention"),)

    def queryset(self, request, queryset):
        if self.value() == "yes":
            from rotation.services import secrets_needing_attention

            return queryset.filter(pk__in=[s.pk for s, _ in secrets_needing_attention(timezone.now())])
        return queryset


class ManagedSecretForm(forms.ModelForm):
    """Add/change form; the configuration is JSON, checked by the type's executor."""

    config = forms.JSONField(required=False, initial=dict, widget=forms.Textarea(attrs={"rows": 8, "cols": 80}),
                             help_text=ManagedSecret._meta.get_field("config").help_text)

    #: Who is filling the form in (set by ``ManagedSecretAdmin.get_form``): refusals of Keyvault's own secrets are audited.
    actor: Actor | None = None

    class Meta:
        model = ManagedSecret
        fields = ("name", "secret_type", "source", "path", "owner", "description", "config", "warn_before")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "config" in self.fields:  # absent where the user may only view the secret (read-only fields)
            self.fields["config"].help_text = config_help()
        if "source" in self.fields:
            self.fields["source"].widget = forms.Select(choices=source_choices(self.instance.source))


    def clean(self):
        from rotation import services

        data = super().clean()
        if self.instance.pk is not None:
            # A change: everything update_secret would refuse (a run in progress, the allowlist, own secrets).
            changes = {name: data[name] for name in services.SECRET_FIELDS if name in data}
            if changes.get("config") is None and "config" in changes:
                changes["config"] = {}
            try:
                services.check_secret_change(self.instance, actor=self.actor, **changes)
            except ValidationError:
                pass  # the model's own validation reports these on the fields
            except ConfigFieldError as exc:
                raise ValidationError({_form_field(exc): service_error_message(exc)}) from None
            except SERVICE_ERRORS as exc:
                raise ValidationError(service_error_message(exc)) from None
            return data
        if data.get("secret_type"):
            secret = ManagedSecret(name=data.get("name") or "", secret_type=data["secret_type"],
                                   source=data.get("source") or "", path=data.get("path") or "",
                                   config=data.get("config") or {})
            try:
                services.check_secret_config(secret)
                services.check_secret_references(secret, actor=self.actor)
            except ConfigFieldError as exc:
                raise ValidationError({_form_field(exc): service_error_message(exc)}) from None
            except SERVICE_ERRORS as exc:
                raise ValidationError({"config": service_error_message(exc)}) from None
        return data


def source_choices(current: str = "") -> list[tuple[str, str]]:
    """The configured secret sources to pick from; a stored source no longer configured stays shown, marked.

    Only the choice is offered here: a forged value is refused by ``check_secret_references`` with the
    message that names the configured sources.
    """
    from keyvault.secrets.registry import default_source_name, source_names

    default = default_source_name()
    names = source_names()
    choices = [(name, f"{name} (default)" if name == default else name) for name in names]
    if current and current not in names:
        choices.append((current, f"{current} (not configured)"))
    return [("", "---------"), *choices]


def config_help():
    """The configuration field's help: the model's note, then each type's keys from its schema (* required)."""
    keys = format_html_join("", "<li><code>{}</code>: {}</li>", (
        (secret_type, executor_for(secret_type).schema.summary()) for secret_type in sorted(EXECUTORS)))
    return format_html("{} Keys per type (* required; <code>manage.py secret schema TYPE</code> explains each):"
                       "<ul>{}</ul>", ManagedSecret._meta.get_field("config").help_text, keys)


def _form_field(exc: ConfigFieldError) -> str:
    """The form field a refused configuration is reported on: ``source``, or ``config`` for a config key."""
    return "config" if exc.in_config else exc.field


class StartSecretRotationForm(forms.Form):
    kind = forms.ChoiceField(choices=(("on_demand", "On demand"), ("emergency", "Emergency (no grace period)")),
                             initial="on_demand")
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), required=False)
    incident_ref = forms.CharField(label="Incident / ticket", required=False, max_length=100,
                                   help_text="Required for emergency rotations.")

    def __init__(self, *args, emergency: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if not emergency:  # offered only to those with rotation.emergency_rotationrun
            self.fields["kind"].choices = [("on_demand", "On demand")]


def _secret_or_404(object_id: str) -> ManagedSecret:
    """The secret with this id; anything but a plain in-range number is a 404, never a 500."""
    if not (object_id.isascii() and object_id.isdigit()) or int(object_id) > MAX_ID:
        raise Http404("no such managed secret")
    return get_object_or_404(ManagedSecret, pk=int(object_id))


class ProvideValueForm(forms.Form):
    value = forms.CharField(label="New secret value", strip=True, widget=forms.PasswordInput(render_value=False),
                            help_text="Stored straight in the secret's source; Keyvault keeps only its version id.")


@admin.register(ManagedSecret)
class ManagedSecretAdmin(admin.ModelAdmin):
    form = ManagedSecretForm
    list_display = ("name", "secret_type", "source", "owner", "expires_at", "status_badge", "due_badge", "last_rotated_at")
    list_filter = (AttentionFilter, "secret_type", "status", "source")
    search_fields = ("name", "owner", "path")
    actions = None
    show_facets = ShowFacets.NEVER
    readonly_fields = ("status", "last_rotated_at", "expires_at", "metadata_display", "policy_display", "runs_display")

    class Media:
        css = {"all": ("keyvault/console.css",)}

    def get_fieldsets(self, request, obj=None):
        main = ("name", "secret_type", "source", "path", "owner", "description", "config", "warn_before")
        if obj is None:
            return ((None, {"fields": main}),)
        return (
            (None, {"fields": main}),
            ("State", {"fields": ("status", "last_rotated_at", "expires_at", "metadata_display")}),
            ("Rotation", {"fields": ("policy_display", "runs_display")}),
        )

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change=change, **kwargs)
        return type(form.__name__, (form,), {"actor": Actor.from_request(request)})

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return ()
        return (*self.readonly_fields, "name", "secret_type")

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: ManagedSecret):
        return format_html('<span class="kv-state kv-secret-{}">{}</span>', obj.status, obj.get_status_display())

    @admin.display(description="due")
    def due_badge(self, obj: ManagedSecret):
        policy = getattr(obj, "rotation_policy", None)
        if not policy or not policy.next_due_at:
            return "—"
        now = timezone.now()
        if policy.next_due_at <= now:
            return format_html('<span class="kv-state kv-overdue">overdue since {}</span>', format_when(policy.next_due_at))
        if policy.next_due_at <= now + obj.effective_warn_before:
            return format_html('<span class="kv-state kv-due">due {}</span>', format_when(policy.next_due_at))
        return format_when(policy.next_due_at)

    @admin.display(description="observed")
    def metadata_display(self, obj: ManagedSecret):
        if not obj.metadata:
            return "—"
        return format_html("<pre>{}</pre>", json.dumps(obj.metadata, indent=2, default=str))

    @admin.display(description="policy")
    def policy_display(self, obj: ManagedSecret):
        from rotation.models import format_period
        from rotation.services import ensure_secret_policy

        policy = ensure_secret_policy(obj)
        url = reverse("admin:rotation_rotationpolicy_change", args=[policy.pk])
        return format_html(
            '<a href="{}">every {}, grace {}, {} approval(s), {}</a>; next due {}', url, format_period(policy.period),
            format_period(policy.grace_period), policy.approvals_required, "automatic" if policy.auto else "manual",
            format_when(policy.next_due_at))

    @admin.display(description="recent runs")
    def runs_display(self, obj: ManagedSecret):
        runs = obj.rotation_runs.order_by("-created_at")[:5]
        rows = format_html_join(
            "", '<li><a href="{}">run #{}</a> {} — {}{}</li>',
            ((reverse("admin:rotation_rotationrun_change", args=[r.pk]), r.pk, r.get_kind_display().lower(),
              r.get_state_display().lower(), f" ({r.paused_reason})" if r.paused_reason else "") for r in runs))
        rotate_url = reverse("admin:keyvault_managedsecret_rotate", args=[obj.pk])
        return format_html('<ul>{}</ul><a class="button" href="{}">Start rotation…</a>', rows or "none yet", rotate_url)

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("rotation_policy")

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def save_model(self, request, obj, form, change):
        """New secrets through ``register_secret``, changes through ``update_secret``: validated and audited there."""
        from rotation import services

        data = form.cleaned_data
        if change:
            changes = {name: data[name] for name in services.SECRET_FIELDS if name in data}
            if "config" in changes and changes["config"] is None:
                changes["config"] = {}
            services.update_secret(ManagedSecret.objects.get(pk=obj.pk), actor=Actor.from_request(request), **changes)
            return
        created = services.register_secret(
            name=data["name"], secret_type=data["secret_type"], source=data["source"], path=data["path"],
            owner=data.get("owner", ""), description=data.get("description", ""), config=data.get("config") or {},
            warn_before=data.get("warn_before"), actor=Actor.from_request(request))
        obj.pk = created.pk

    def log_addition(self, request, obj, message):
        return None  # audited in the chain by register_secret

    def log_change(self, request, obj, message):
        return None  # audited in the chain, with before and after, by update_secret

    # -- custom views ---------------------------------------------------------------------
    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [
            path("<path:object_id>/rotate/", wrap(self.rotate_view), name="keyvault_managedsecret_rotate"),
            path("<path:object_id>/provide-value/", wrap(self.provide_value_view),
                 name="keyvault_managedsecret_provide_value"),
            *super().get_urls(),
        ]

    def _render(self, request, secret, *, title, intro, form, action, submit_label, runbook, danger=False):
        context = {
            **self.admin_site.each_context(request), "opts": self.opts, "original": secret, "title": title,
            "intro": intro, "form": form, "adminform": [admin.helpers.Fieldset(form, fields=list(form.fields))],
            "submit_label": submit_label, "danger": danger, "action": action, "runbook": runbook,
            "cancel_url": reverse("admin:keyvault_managedsecret_change", args=[secret.pk]), "media": self.media + form.media,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, ACTION_TEMPLATE, context)

    def rotate_view(self, request, object_id):
        from rotation import services

        secret = _secret_or_404(object_id)
        if not request.user.has_perm(ROTATE_PERMISSION):
            raise PermissionDenied
        emergency_allowed = request.user.has_perm(EMERGENCY_PERMISSION)
        if request.method == "POST" and request.POST.get("kind") == "emergency" and not emergency_allowed:
            raise PermissionDenied  # as for a KEK: no grace period needs the emergency permission
        form = StartSecretRotationForm(request.POST or None, emergency=emergency_allowed)
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            try:
                run = services.start_run(secret=secret, actor=Actor.from_request(request), user=request.user,
                                         kind=data["kind"], reason=data["reason"], incident_ref=data["incident_ref"])
            except SERVICE_ERRORS as exc:
                form.add_error(None, service_error_message(exc))
            else:
                messages.success(request, f"Started run #{run.pk} of {secret.name}.")
                return HttpResponseRedirect(reverse("admin:rotation_rotationrun_change", args=[run.pk]))
        intro = f"{secret.get_secret_type_display()} in {secret.source}:{secret.path}."
        emergency = _runbook(secret.secret_type, "emergency")
        if emergency_allowed and emergency is not None and emergency != _runbook(secret.secret_type):
            intro += f" An emergency run follows its own runbook, “{emergency.title}”, shown on the run."
        return self._render(request, secret, title=f"Rotate {secret.name}", form=form, action="rotate-secret",
                            intro=intro, submit_label="Start rotation", runbook=_runbook(secret.secret_type))

    @method_decorator(sensitive_post_parameters("value"))
    def provide_value_view(self, request, object_id):
        from rotation import services
        from rotation.models import RotationRun

        secret = _secret_or_404(object_id)
        if not request.user.has_perm("rotation.tick_runstep"):
            raise PermissionDenied
        run = RotationRun.objects.filter(secret=secret, state=RotationRun.State.ROTATING).first()
        form = ProvideValueForm(request.POST or None)
        if run is None:
            messages.error(request, f"No run of {secret.name} is waiting for a value.")
            return HttpResponseRedirect(reverse("admin:keyvault_managedsecret_change", args=[secret.pk]))
        if request.method == "POST" and form.is_valid():
            try:
                services.provide_secret_value(run, form.cleaned_data["value"], actor=Actor.from_request(request))
            except (*SERVICE_ERRORS, SecretSourceError) as exc:
                form.add_error(None, service_error_message(exc))
            else:
                messages.success(request, f"The new value of {secret.name} is stored (run #{run.pk}).")
                return HttpResponseRedirect(reverse("admin:rotation_rotationrun_change", args=[run.pk]))
        return self._render(request, secret, title=f"Provide the new value of {secret.name}", form=form,
                            action="provide-secret-value", submit_label="Store new value",
                            intro=f"Run #{run.pk} waits for the value you created at the identity provider.",
                            runbook=_runbook(secret.secret_type, run.kind))
