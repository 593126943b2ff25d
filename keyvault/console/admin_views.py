"""The console's custom admin views: key actions and the audit chain status.

Each action is a route added in ``get_urls()`` and wrapped in
``admin_site.admin_view`` (login, staff, CSRF, never cached), the way
``UserAdmin`` adds its password view. The view checks the action's permission
itself (403 otherwise), validates a form and calls one function of
``keyvault.keys.services`` with ``Actor.from_request`` (creating a KEK: of
``rotation.services``, which gives it its rotation policy too); the service does the work
and writes the audit event. Errors the services raise become form errors, never a 500.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from django import forms
from django.contrib import messages
from django.contrib.admin import helpers
from django.contrib.admin.utils import unquote
from django.core.exceptions import ImproperlyConfigured, PermissionDenied
from django.db import IntegrityError
from django.http import Http404, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.decorators import method_decorator
from django.views.decorators.debug import sensitive_post_parameters

from keyvault import audit
from keyvault.audit import Actor
from keyvault.audit import status as audit_status
from keyvault.console.forms import (
    ConfirmForm, CreateKEKForm, DestroyDataKeyForm, DisableForm, RetireVersionForm, ScheduleDeletionForm,
)
from keyvault.console.timezones import format_when
from keyvault.exceptions import AuditVerificationTooSoon, KeyvaultError
from keyvault.keys import impact, services
from keyvault.kms.errors import KMSError
from keyvault.models import KeyEncryptionKey, KeyVersion
from rotation import services as rotation_services

logger = logging.getLogger(__name__)

KEK = KeyEncryptionKey
ACTION_TEMPLATE = "keyvault/action.html"

#: What a service may raise for a request it refuses; shown to the user as a form error.
SERVICE_ERRORS = (KeyvaultError, KMSError, ValueError)


#: Console action → runbook file (``rotation/runbooks/<slug>.md``), the one source of the panel beside it.
ACTION_RUNBOOKS = {
    "create": "kek-creation",
    "rotate": "kek-rotation",
    "emergency-rotate": "kek-emergency-rotation",
    "migrate": "kek-migration",
    "disable": "kek-disable",
    "enable": "kek-disable",
    "schedule-deletion": "kek-deletion",
    "cancel-deletion": "kek-deletion",
    "retire-version": "version-retirement",
    "verify-audit-chain": "audit-verification",
    "approve-run": "run-approval",
    "edit-policy": "rotation-policy",
    "destroy-data-key": "data-key-destruction",
}


def runbook_for(action: str):
    """The ``rotation.runbooks.Runbook`` shown beside an action's form (None for an unknown action)."""
    from rotation import runbooks

    slug = ACTION_RUNBOOKS.get(action)
    return runbooks.get(slug) if slug else None


def service_error_message(exc: Exception) -> str:
    """The text shown for a refused action: the service's message, which never holds key bytes."""
    text = str(exc).strip()
    return text or (type(exc).__doc__ or type(exc).__name__).strip().splitlines()[0]


# -- KEK actions -------------------------------------------------------------------


@dataclass(frozen=True)
class KEKAction:
    """One button on the KEK page: who may press it, when it is offered, what it calls."""

    slug: str
    button: str
    title: str
    permission: str | tuple[str, ...]
    states: frozenset[str]
    form_class: type[forms.Form]
    perform: Callable[[KeyEncryptionKey, dict, Actor], ActionOutcome]
    explanation: str
    danger: bool = False
    #: Extra template context for the action's page (e.g. what a deletion would break), or None.
    details: Callable[[KeyEncryptionKey], dict] | None = None

    @property
    def url_name(self) -> str:
        return f"keyvault_keyencryptionkey_{self.slug.replace('-', '_')}"

    def allowed(self, user) -> bool:
        return user.has_perms((self.permission,) if isinstance(self.permission, str) else self.permission)


@dataclass(frozen=True)
class ActionOutcome:
    """What an action did and which console page shows its result (default: the KEK's page)."""

    message: str
    url_name: str = ""
    args: tuple = ()
    #: What the action did not do that the operator may assume it did (shown as a warning).
    warning: str = ""


def _disable(kek: KeyEncryptionKey, data: dict, actor: Actor) -> ActionOutcome:
    services.disable_kek(kek, actor=actor, reason=data.get("reason", ""))
    return ActionOutcome(f"Disabled {kek.name}: it refuses every encrypt and decrypt until enabled.")


def _enable(kek: KeyEncryptionKey, data: dict, actor: Actor) -> ActionOutcome:
    services.enable_kek(kek, actor=actor)
    return ActionOutcome(f"Enabled {kek.name}.")


def _schedule_deletion(kek: KeyEncryptionKey, data: dict, actor: Actor) -> ActionOutcome:
    kek = services.schedule_kek_deletion(kek, actor=actor, waiting_days=data["waiting_days"])
    return ActionOutcome(
        f"Scheduled {kek.name} for deletion on {format_when(kek.deletion_date)}. "
        "It refuses all cryptography now; cancel the deletion before that date to keep it."
    )


def _deletion_details(kek: KeyEncryptionKey) -> dict:
    return {"impact": impact.deletion_impact(kek)}


def _cancel_deletion(kek: KeyEncryptionKey, data: dict, actor: Actor) -> ActionOutcome:
    services.cancel_kek_deletion(kek, actor=actor)
    return ActionOutcome(f"Cancelled the deletion of {kek.name}. The key stays disabled until you enable it.")


#: The key services' own actions. Rotate now, Emergency rotate and Migrate start runs of the rotation
#: engine: rotation's console, which builds on this module, registers them (``register_kek_actions``).
OWN_KEK_ACTIONS: tuple[KEKAction, ...] = (
    KEKAction(
        slug="disable",
        button="Disable",
        title="Disable key-encryption key",
        permission="keyvault.change_state_keyencryptionkey",
        states=frozenset({KEK.State.ENABLED}),
        form_class=DisableForm,
        perform=_disable,
        explanation=(
            "Every encrypt, decrypt, rewrap and data-key operation with this key fails until it is enabled again."
        ),
        danger=True,
    ),
    KEKAction(
        slug="enable",
        button="Enable",
        title="Enable key-encryption key",
        permission="keyvault.change_state_keyencryptionkey",
        states=frozenset({KEK.State.DISABLED}),
        form_class=ConfirmForm,
        perform=_enable,
        explanation="The key encrypts and decrypts again.",
    ),
    KEKAction(
        slug="schedule-deletion",
        button="Schedule deletion",
        title="Schedule deletion of key-encryption key",
        permission="keyvault.schedule_deletion_keyencryptionkey",
        states=frozenset({KEK.State.ENABLED, KEK.State.DISABLED}),
        form_class=ScheduleDeletionForm,
        perform=_schedule_deletion,
        explanation=(
            "The key refuses all cryptography at once and is destroyed at the provider when the waiting period "
            "ends. Data keys it wraps can then never be opened again."
        ),
        danger=True,
        details=_deletion_details,
    ),
    KEKAction(
        slug="cancel-deletion",
        button="Cancel deletion",
        title="Cancel deletion of key-encryption key",
        permission="keyvault.schedule_deletion_keyencryptionkey",
        states=frozenset({KEK.State.PENDING_DELETION}),
        form_class=ConfirmForm,
        perform=_cancel_deletion,
        explanation="The key is kept. As with AWS KMS it stays disabled until someone enables it.",
    ),
)
_registered_actions: dict[str, KEKAction] = {}


def register_kek_actions(*actions: KEKAction) -> None:
    """Put actions another app owns on the KEK page, before the key services' own (a slug again replaces it)."""
    own = {action.slug for action in OWN_KEK_ACTIONS}
    for action in actions:
        if action.slug in own:
            raise ImproperlyConfigured(f"KEK action {action.slug!r} is the key services' own")
        _registered_actions[action.slug] = action


def kek_actions() -> tuple[KEKAction, ...]:
    """Every action of the KEK page, in button order: registered ones first."""
    return (*_registered_actions.values(), *OWN_KEK_ACTIONS)


#: Boxes other apps add to a KEK's page, by name: ``build(kek, *, user, admin_site_name)`` returns a panel
#: (which names its template in ``panel.template``) or None when the user may not see it.
_kek_panels: dict[str, Callable[..., object | None]] = {}


def register_kek_panel(name: str, build: Callable[..., object | None]) -> None:
    """Add a box to the KEK page (rotation's policy and runs); registering a name again replaces it."""
    _kek_panels[name] = build


def kek_panels(kek: KeyEncryptionKey, *, user, admin_site_name: str = "admin") -> list:
    """The registered boxes ``user`` may see on ``kek``'s page."""
    built = (build(kek, user=user, admin_site_name=admin_site_name) for build in _kek_panels.values())
    return [panel for panel in built if panel is not None]


RETIRE_PERMISSION = "keyvault.retire_keyversion"


@dataclass(frozen=True)
class ActionLink:
    label: str
    url: str
    danger: bool = False


def available_actions(user, kek: KeyEncryptionKey, admin_site_name: str = "admin") -> list[ActionLink]:
    """The action buttons ``user`` may press on ``kek`` in its current state."""
    return [
        ActionLink(action.button, reverse(f"{admin_site_name}:{action.url_name}", args=[kek.pk]), action.danger)
        for action in kek_actions()
        if kek.state in action.states and action.allowed(user)
    ]


@dataclass(frozen=True)
class GroupedActions:
    """The KEK page's buttons: one primary action, the other safe ones, and the destructive ones (in a menu)."""

    primary: ActionLink | None
    more: list[ActionLink]
    danger: list[ActionLink]


def group_actions(links: list[ActionLink]) -> GroupedActions:
    """The first safe action (Rotate now, when offered) stands alone; the rest go in the "More actions" menu."""
    safe = [link for link in links if not link.danger]
    return GroupedActions(primary=safe[0] if safe else None, more=safe[1:],
                          danger=[link for link in links if link.danger])


@dataclass(frozen=True)
class CoverageRow:
    number: int
    state: str
    state_label: str
    is_primary: bool
    encrypt_count: int
    data_keys: int
    share: float
    retire_url: str = ""


@dataclass(frozen=True)
class Coverage:
    """How many data keys each version wraps, and the primary version's share of them."""

    rows: list[CoverageRow] = field(default_factory=list)
    total: int = 0
    primary_number: int | None = None
    primary_share: float = 100.0

    @property
    def on_older_versions(self) -> int:
        return sum(row.data_keys for row in self.rows if not row.is_primary)


def kek_coverage(kek: KeyEncryptionKey, *, user=None, admin_site_name: str = "admin") -> Coverage:
    """One grouped count over the (kek, kek_version, id) index, plus the versions."""
    counts = services.version_coverage(kek)
    total = sum(counts.values())
    can_retire = user is not None and user.has_perm(RETIRE_PERMISSION)
    rows = []
    primary_number = None
    for version in kek.versions.order_by("-number"):
        count = counts.get(version.number, 0)
        retirable = can_retire and not version.is_primary and version.state != KeyVersion.State.DESTROYED
        retire_url = (
            reverse(f"{admin_site_name}:keyvault_keyencryptionkey_retire_version", args=[kek.pk, version.number])
            if retirable
            else ""
        )
        rows.append(
            CoverageRow(
                number=version.number,
                state=version.state,
                state_label=KeyVersion.State(version.state).label,
                is_primary=version.is_primary,
                encrypt_count=version.encrypt_count,
                data_keys=count,
                share=round(100.0 * count / total, 1) if total else 0.0,
                retire_url=retire_url,
            )
        )
        if version.is_primary:
            primary_number = version.number
    primary_share = round(100.0 * counts.get(primary_number, 0) / total, 1) if total else 100.0
    return Coverage(rows=rows, total=total, primary_number=primary_number, primary_share=primary_share)


class KEKActionViewsMixin:
    """Create, rotate, disable/enable, schedule/cancel deletion and retire-version views for KEKs."""

    action_template = ACTION_TEMPLATE

    def get_urls(self):
        wrap = self.admin_site.admin_view
        urls = [
            path(
                f"<path:object_id>/{action.slug}/",
                wrap(self.kek_action_view),
                {"action": action.slug},
                name=action.url_name,
            )
            for action in kek_actions()
        ]
        urls.append(
            path(
                "<path:object_id>/versions/<int:number>/retire/",
                wrap(self.retire_version_view),
                name="keyvault_keyencryptionkey_retire_version",
            )
        )
        return urls + super().get_urls()

    # The generic "add" must not bypass services: it *is* the create view.
    def add_view(self, request, form_url="", extra_context=None):
        return self.create_kek_view(request)

    def _change_url(self, kek: KeyEncryptionKey) -> str:
        return reverse(f"{self.admin_site.name}:keyvault_keyencryptionkey_change", args=[kek.pk])

    def _get_kek(self, request, object_id: str) -> KeyEncryptionKey:
        kek = self.get_object(request, unquote(object_id))
        if kek is None:
            raise Http404("No key-encryption key with that id.")
        return kek

    def _render_action(self, request, *, action: str, title: str, form, kek=None, intro: str = "",
                       submit_label: str, danger: bool = False, extra: dict | None = None):
        fieldsets = [(None, {"fields": list(form.base_fields)})]
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "subtitle": str(kek) if kek else None,
            "opts": self.opts,
            "original": kek,
            "form": form,
            "adminform": helpers.AdminForm(form, fieldsets, {}),
            "media": self.media + form.media,
            "action": action,
            "intro": intro,
            "submit_label": submit_label,
            "danger": danger,
            "cancel_url": self._change_url(kek) if kek else reverse(
                f"{self.admin_site.name}:keyvault_keyencryptionkey_changelist"
            ),
            "runbook": runbook_for(action),
            **(extra or {}),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, self.action_template, context)

    @method_decorator(sensitive_post_parameters())
    def create_kek_view(self, request):
        if not self.has_add_permission(request):
            raise PermissionDenied
        if request.method == "POST":
            form = CreateKEKForm(request.POST)
            if form.is_valid():
                data = form.cleaned_data
                try:
                    kek = rotation_services.create_kek_with_policy(
                        name=data["name"],
                        actor=Actor.from_request(request),
                        provider_name=data["provider"],
                        description=data["description"],
                        period=timedelta(days=data["rotation_period_days"]),
                        max_encryptions_per_version=data["max_encryptions_per_version"],
                    )
                except IntegrityError:  # a concurrent create won the unique name
                    form.add_error("name", "A key-encryption key with this name already exists.")
                except SERVICE_ERRORS as exc:
                    logger.warning("console: creating KEK %r refused: %s", data["name"], type(exc).__name__)
                    form.add_error(None, service_error_message(exc))
                else:
                    messages.success(request, f"Created {kek.name} at provider {kek.provider}; v1 is primary.")
                    return HttpResponseRedirect(self._change_url(kek))
        else:
            form = CreateKEKForm()
        return self._render_action(
            request,
            action="create",
            title="Create key-encryption key",
            form=form,
            intro="The key is created at the chosen provider; Keyvault stores only its reference.",
            submit_label="Create key",
        )

    @method_decorator(sensitive_post_parameters())
    def kek_action_view(self, request, object_id: str, action: str):
        spec = next(candidate for candidate in kek_actions() if candidate.slug == action)
        if not spec.allowed(request.user):
            raise PermissionDenied
        kek = self._get_kek(request, object_id)
        if request.method == "POST":
            form = spec.form_class(request.POST, kek=kek)
            if form.is_valid():
                try:
                    outcome = spec.perform(kek, form.cleaned_data, Actor.from_request(request))
                except SERVICE_ERRORS as exc:
                    logger.warning("console: %s of KEK %r refused: %s", spec.slug, kek.name, type(exc).__name__)
                    form.add_error(None, service_error_message(exc))
                else:
                    messages.success(request, outcome.message)
                    if outcome.warning:
                        messages.warning(request, outcome.warning)
                    if outcome.url_name:
                        return HttpResponseRedirect(
                            reverse(f"{self.admin_site.name}:{outcome.url_name}", args=outcome.args))
                    return HttpResponseRedirect(self._change_url(kek))
        else:
            form = spec.form_class(kek=kek)
        unavailable = ""
        if kek.state not in spec.states:
            unavailable = f"This key is {KEK.State(kek.state).label.lower()}; this action does not apply in that state."
        return self._render_action(
            request,
            action=spec.slug,
            title=spec.title,
            form=form,
            kek=kek,
            intro=spec.explanation,
            submit_label=spec.button,
            danger=spec.danger,
            extra={"unavailable": unavailable, **(spec.details(kek) if spec.details else {})},
        )

    @method_decorator(sensitive_post_parameters())
    def retire_version_view(self, request, object_id: str, number: int):
        if not request.user.has_perm(RETIRE_PERMISSION):
            raise PermissionDenied
        kek = self._get_kek(request, object_id)
        version = get_object_or_404(KeyVersion, kek=kek, number=number)
        if request.method == "POST":
            form = RetireVersionForm(request.POST, kek=kek, version=version)
            if form.is_valid():
                state = KeyVersion.State(form.cleaned_data["state"])
                try:
                    changed = services.set_version_state(
                        kek, number, state, actor=Actor.from_request(request), reason=form.cleaned_data["reason"]
                    )
                except SERVICE_ERRORS as exc:
                    logger.warning("console: v%s of KEK %r to %s refused: %s", number, kek.name, state,
                                   type(exc).__name__)
                    form.add_error(None, service_error_message(exc))
                else:
                    where = "at the provider" if changed.enforced_by == "provider" else "in Keyvault only"
                    messages.success(request, f"v{number} of {kek.name} is now {state.label.lower()} {where}.")
                    if changed.enforced_by != "provider" and state != KeyVersion.State.ENABLED:
                        messages.warning(request, services.revocation_gap(kek)
                                         or f"Provider {kek.provider} still accepts v{number}; only Keyvault refuses it.")
                    return HttpResponseRedirect(self._change_url(kek))
        else:
            form = RetireVersionForm(kek=kek, version=version)
        wrapped = services.version_coverage(kek).get(number, 0)
        intro = (
            f"v{number} is {KeyVersion.State(version.state).label.lower()}"
            f"{' and primary' if version.is_primary else ''}; it wraps {wrapped} data key(s). "
            "A retired version no longer decrypts, so Keyvault refuses to retire a version that still wraps "
            "data keys: rewrap them first. Destroying removes the material for good."
        )
        return self._render_action(
            request,
            action="retire-version",
            title=f"Retire version v{number}",
            form=form,
            kek=kek,
            intro=intro,
            submit_label="Change version state",
            danger=True,
            extra={"version": version, "unavailable": "" if not version.is_primary else
                   "This is the primary version; rotate the key before retiring it."},
        )


# -- data keys -----------------------------------------------------------------------

#: Destroying a data key is as final as deleting a KEK, and needs the same permission.
DESTROY_DATA_KEY_PERMISSION = "keyvault.schedule_deletion_keyencryptionkey"


class DataKeyViewsMixin:
    """The data key page's *Destroy* view: a superseded data key deleted for good, through the key services."""

    def get_urls(self):
        destroy = path("<path:object_id>/destroy/", self.admin_site.admin_view(self.destroy_data_key_view),
                       name="keyvault_datakey_destroy")
        return [destroy, *super().get_urls()]

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = dict(extra_context or {})
        if request.user.has_perm(DESTROY_DATA_KEY_PERMISSION):
            extra_context["destroy_url"] = reverse(f"{self.admin_site.name}:keyvault_datakey_destroy", args=[object_id])
        return super().change_view(request, object_id, form_url, extra_context)

    @method_decorator(sensitive_post_parameters())
    def destroy_data_key_view(self, request, object_id: str):
        if not request.user.has_perm(DESTROY_DATA_KEY_PERMISSION):
            raise PermissionDenied
        data_key = self.get_object(request, unquote(object_id))
        if data_key is None:
            raise Http404("No data key with that id.")
        if request.method == "POST":
            form = DestroyDataKeyForm(request.POST, data_key=data_key)
            if form.is_valid():
                replacement = form.cleaned_data["replaced_by"]
                try:
                    services.destroy_data_key(data_key, replaced_by=replacement, actor=Actor.from_request(request),
                                              reason=form.cleaned_data["reason"])
                except SERVICE_ERRORS as exc:
                    logger.warning("console: destroying data key #%s refused: %s", data_key.pk, type(exc).__name__)
                    form.add_error(None, service_error_message(exc))
                else:
                    messages.success(request, f"Destroyed data key #{object_id}; data key #{replacement.pk} replaces it.")
                    return HttpResponseRedirect(reverse(f"{self.admin_site.name}:keyvault_datakey_changelist"))
        else:
            form = DestroyDataKeyForm(data_key=data_key)
        context = {
            **self.admin_site.each_context(request),
            "title": f"Destroy data key #{data_key.pk}",
            "subtitle": str(data_key),
            "opts": self.opts,
            "original": data_key,
            "form": form,
            "adminform": helpers.AdminForm(form, [(None, {"fields": list(form.base_fields)})], {}),
            "media": self.media + form.media,
            "action": "destroy-data-key",
            "intro": (f"Data key #{data_key.pk} of {data_key.owner_ref or 'no owner'} is deleted from the registry for "
                      "good. Keyvault refuses unless a newer data key of the same owner opens in its place."),
            "submit_label": "Destroy data key",
            "danger": True,
            "cancel_url": reverse(f"{self.admin_site.name}:keyvault_datakey_change", args=[data_key.pk]),
            "runbook": runbook_for("destroy-data-key"),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, ACTION_TEMPLATE, context)


# -- audit chain status ------------------------------------------------------------
#
# The banner's state and its incremental checks live in keyvault.audit.status.

EXPORT_PERMISSION = "keyvault.export_auditevent"


class AuditChainViewsMixin:
    """The chain banner on the audit changelist and the "Verify now" view."""

    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [path("verify/", wrap(self.verify_chain_view), name="keyvault_auditevent_verify")] + super().get_urls()

    def changelist_view(self, request, extra_context=None):
        extra_context = {
            "chain_status": audit_status.chain_status(),
            "can_verify_chain": request.user.has_perm(EXPORT_PERMISSION),
            **(extra_context or {}),
        }
        return super().changelist_view(request, extra_context)

    @method_decorator(sensitive_post_parameters())
    def verify_chain_view(self, request):
        if not request.user.has_perm(EXPORT_PERMISSION):
            raise PermissionDenied
        changelist = reverse(f"{self.admin_site.name}:keyvault_auditevent_changelist")
        form = forms.Form(request.POST if request.method == "POST" else None)
        if request.method == "POST" and form.is_valid():
            try:
                result = audit_status.verify_fully(actor=Actor.from_request(request))
            except AuditVerificationTooSoon as exc:
                messages.warning(request, f"Full verification not started: {exc}.")
                return HttpResponseRedirect(changelist)
            if result.ok:
                messages.success(request, f"Full verification: {result}")
            else:
                messages.error(request, f"Full verification: {result}")
            return HttpResponseRedirect(changelist)
        last_sequence, _ = audit.chain_position()
        context = {
            **self.admin_site.each_context(request),
            "title": "Verify the audit chain",
            "opts": self.opts,
            "form": form,
            "adminform": helpers.AdminForm(form, [(None, {"fields": []})], {}),
            "action": "verify-audit-chain",
            "intro": (
                f"Recomputes the hash of every event (#1 to #{last_sequence}) and checks every signed checkpoint. "
                "On a large log this takes a while. The result is recorded in the audit log."
            ),
            "submit_label": "Verify now",
            "danger": False,
            "cancel_url": changelist,
            "runbook": runbook_for("verify-audit-chain"),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, ACTION_TEMPLATE, context)


# -- KMS providers -------------------------------------------------------------------

#: Who may see the Providers page (every console role, auditors included).
PROVIDERS_PERMISSION = "keyvault.view_keyencryptionkey"


def providers_view(request, admin_site=None):
    """Every configured provider: health, latency, capabilities and the check of each of its KEKs.

    Read-only; the checks run on each request (one ``health_check`` and one
    ``describe_key`` per enabled KEK), as ``kms health --all`` does.
    """
    from django.contrib import admin as django_admin

    from keyvault.keys import health

    if not request.user.has_perm(PROVIDERS_PERMISSION):
        raise PermissionDenied
    site = admin_site or django_admin.site
    report = health.check_all()
    context = {
        **site.each_context(request),
        "title": "KMS providers",
        "report": report,
        "kek_changelist": reverse(f"{site.name}:keyvault_keyencryptionkey_changelist"),
    }
    request.current_app = site.name
    return TemplateResponse(request, "keyvault/providers.html", context)
