"""The console's pages for application API clients: key administrators create, re-token and revoke; everyone reads.

Every write goes through :mod:`keyvault.api.services` (as ``manage.py api client`` does), which audits it.
Tokens are shown once, on the page that creates them.
"""

from __future__ import annotations

from datetime import timedelta

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.options import ShowFacets
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.decorators import method_decorator
from django.views.decorators.debug import sensitive_post_parameters

from keyvault.api import services
from keyvault.audit import Actor
from keyvault.models import ApiClient, KeyEncryptionKey

ACTION_TEMPLATE = "keyvault/action.html"
TOKEN_TEMPLATE = "keyvault/api/client_token.html"


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.replace(",", "\n").splitlines() if line.strip()]


class ApiClientCreateForm(forms.Form):
    name = forms.SlugField(max_length=100, help_text="The application, e.g. billing.")
    owner = forms.CharField(max_length=200, required=False, help_text="Team or person answerable for it.")
    keks = forms.ModelMultipleChoiceField(queryset=KeyEncryptionKey.objects.order_by("name"), label="KEKs",
                                          to_field_name="name", help_text="The only KEKs this client may use.")
    operations = forms.MultipleChoiceField(choices=ApiClient.Operation.choices, widget=forms.CheckboxSelectMultiple)
    context_require = forms.CharField(
        label="required context", required=False, widget=forms.Textarea(attrs={"rows": 3}),
        help_text="One per line: KEY (required, any value) or KEY=VALUE (a value or glob, e.g. tenant=acme-*).")
    networks = forms.CharField(label="source networks", required=False, widget=forms.Textarea(attrs={"rows": 2}),
                               help_text="CIDRs, one per line; empty allows any address.")
    expires_at = forms.DateTimeField(label="expires", required=False, help_text="Optional, e.g. 2027-06-30 00:00.")
    rate_limit_per_second = forms.IntegerField(label="rate limit (requests/s)", min_value=0, initial=200)


class RotateTokenForm(forms.Form):
    overlap_hours = forms.FloatField(label="overlap (hours)", min_value=0, max_value=24 * 366, initial=24,  # services.MAX_OVERLAP
                                     help_text="How long the current token keeps working beside the new one.")


class RevokeForm(forms.Form):
    reason = forms.CharField(max_length=500, help_text="Why (incident, ticket, decommissioned).")


@admin.register(ApiClient)
class ApiClientAdmin(admin.ModelAdmin):
    """Read-only pages with three actions (create, rotate token, revoke), each through the API services."""

    list_display = ("name", "owner", "enabled", "kek_names", "operation_names", "live_tokens", "expires_at",
                    "created_at")
    fields = ("name", "manage", "owner", "enabled", "kek_names", "operation_names", "context_constraints", "allowed_networks",
              "expires_at", "rate_limit_per_second", "live_tokens", "created_by", "created_at", "revoked_at")
    readonly_fields = fields
    actions = None
    show_facets = ShowFacets.NEVER

    class Media:
        css = {"all": ("keyvault/console.css",)}

    @admin.display(description="manage")
    def manage(self, obj: ApiClient) -> str:
        if not obj.enabled:
            return "revoked"
        return format_html('<a href="{}">Rotate token</a> · <a href="{}">Revoke</a>',
                           reverse("admin:keyvault_apiclient_rotate_token", args=[obj.pk]),
                           reverse("admin:keyvault_apiclient_revoke", args=[obj.pk]))

    @admin.display(description="KEKs")
    def kek_names(self, obj: ApiClient) -> str:
        return ", ".join(kek.name for kek in obj.keks.all()) or "-"

    @admin.display(description="operations")
    def operation_names(self, obj: ApiClient) -> str:
        return ", ".join(obj.operations)

    @admin.display(description="live tokens")
    def live_tokens(self, obj: ApiClient) -> int:
        return services.active_token_count(obj)

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # the page only shows; rotate and revoke are their own forms

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # the audit log names clients: revoke instead

    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [
            path("<path:object_id>/rotate-token/", wrap(self.rotate_token_view),
                 name="keyvault_apiclient_rotate_token"),
            path("<path:object_id>/revoke/", wrap(self.revoke_view), name="keyvault_apiclient_revoke"),
            *super().get_urls(),
        ]

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra = {**(extra_context or {}), "show_save": False, "show_save_and_continue": False}
        return super().change_view(request, object_id, form_url, extra)

    def _may_manage(self, request) -> None:
        if not request.user.has_perm("keyvault.change_apiclient"):
            raise PermissionDenied

    def _render(self, request, *, title, intro, form, submit_label, cancel_url, danger=False, original=None):
        context = {**self.admin_site.each_context(request), "opts": self.opts, "title": title, "intro": intro,
                   "form": form, "adminform": [admin.helpers.Fieldset(form, fields=list(form.fields))],
                   "submit_label": submit_label, "danger": danger, "action": "api-client", "cancel_url": cancel_url,
                   "original": original, "media": self.media + form.media}
        request.current_app = self.admin_site.name
        return TemplateResponse(request, ACTION_TEMPLATE, context)

    def _token_page(self, request, client, token, **extra):
        context = {**self.admin_site.each_context(request), "opts": self.opts, "client": client, "token": token,
                   "title": f"API client {client.name}: token", "endpoint": request.build_absolute_uri("/api/v1/"),
                   **extra}
        request.current_app = self.admin_site.name
        return TemplateResponse(request, TOKEN_TEMPLATE, context)

    @method_decorator(sensitive_post_parameters())
    def add_view(self, request, form_url="", extra_context=None):
        """Create a client and show its first token once."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        form = ApiClientCreateForm(request.POST if request.method == "POST" else None)
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            try:
                client, token = services.create_client(
                    name=data["name"], actor=Actor.from_request(request), owner=data["owner"],
                    keks=[kek.name for kek in data["keks"]], operations=data["operations"],
                    context_constraints=services.parse_context_requirements(_lines(data["context_require"])),
                    allowed_networks=_lines(data["networks"]), expires_at=data["expires_at"],
                    rate_limit_per_second=data["rate_limit_per_second"])
            except ValueError as exc:
                form.add_error(None, str(exc))
            else:
                return self._token_page(request, client, token)
        return self._render(request, title="Add API client", form=form, submit_label="Create client and token",
                            intro="An application that fetches and uses its data keys over /api/v1/ with its own "
                                  "bearer token, limited to these KEKs, operations and contexts.",
                            cancel_url=reverse("admin:keyvault_apiclient_changelist"))

    @method_decorator(sensitive_post_parameters())
    def rotate_token_view(self, request, object_id):
        self._may_manage(request)
        client = _client_or_404(object_id)
        form = RotateTokenForm(request.POST if request.method == "POST" else None)
        if request.method == "POST" and form.is_valid():
            try:
                token = services.rotate_token(client.name, actor=Actor.from_request(request),
                                              overlap=timedelta(hours=form.cleaned_data["overlap_hours"]))
            except ValueError as exc:
                form.add_error(None, str(exc))
            else:
                previous = client.tokens.exclude(expires_at=None).order_by("-created_at").first()
                return self._token_page(request, client, token, rotated=True,
                                        previous_expires=previous.expires_at if previous else "")
        return self._render(request, title=f"Rotate the token of {client.name}", form=form, original=client,
                            submit_label="Issue a new token",
                            intro="A new token is shown once; the current one keeps working for the overlap, "
                                  "any older one stops now.",
                            cancel_url=reverse("admin:keyvault_apiclient_change", args=[client.pk]))

    def revoke_view(self, request, object_id):
        self._may_manage(request)
        client = _client_or_404(object_id)
        form = RevokeForm(request.POST if request.method == "POST" else None)
        if request.method == "POST" and form.is_valid():
            services.revoke_client(client.name, actor=Actor.from_request(request),
                                   reason=form.cleaned_data["reason"])
            messages.success(request, f"API client {client.name} is revoked; its tokens are refused.")
            return HttpResponseRedirect(reverse("admin:keyvault_apiclient_change", args=[client.pk]))
        return self._render(request, title=f"Revoke {client.name}", form=form, original=client, danger=True,
                            submit_label="Revoke client",
                            intro="Every token of this client answers 401 at once. A revoked client cannot be "
                                  "re-enabled: create a new one.",
                            cancel_url=reverse("admin:keyvault_apiclient_change", args=[client.pk]))


#: The largest primary key the database can hold (bigint); a larger number names nothing.
MAX_ID = 2**63 - 1


def _client_or_404(object_id: str) -> ApiClient:
    """The client with this id; anything but a plain in-range number is a 404, never a 500."""
    if not (object_id.isascii() and object_id.isdigit()) or int(object_id) > MAX_ID:
        raise Http404("no such API client")
    return get_object_or_404(ApiClient, pk=int(object_id))
