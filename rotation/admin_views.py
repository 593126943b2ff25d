"""The rotation engine's console views: starting runs from a KEK's page, the run page and its actions.

As in ``keyvault.console.admin_views``, every view is a route added in ``get_urls()`` and
wrapped in ``admin_site.admin_view`` (login, staff, CSRF, never cached); it checks
its permission itself (403 otherwise), validates a form and calls one function of
``rotation.services`` with ``Actor.from_request``. Refusals the services raise
(``ApprovalRefused``, ``InvalidRunTransition`` …) become form errors, never a 500.

The run page is polled by ``static/rotation/run.js`` through ``progress.json``,
so its progress bar and checklist move without a reload.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from django.contrib import messages
from django.contrib.admin import helpers
from django.contrib.admin.utils import unquote
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponseRedirect, JsonResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.decorators import method_decorator
from django.views.decorators.debug import sensitive_post_parameters

from keyvault.audit import Actor
from keyvault.console.admin_views import (
    ACTION_TEMPLATE,
    SERVICE_ERRORS,
    ActionOutcome,
    runbook_for,
    service_error_message,
)
from keyvault.keys import services as key_services
from keyvault.models import KeyEncryptionKey
from rotation import permissions, runbooks, services
from rotation.forms import DecisionForm, RunControlForm, TickStepForm
from rotation.run_page import (  # run_status and run_progress are re-exported for rotation.admin
    RUN_EVENTS_SHOWN,
    TERMINAL_STATES,
    _audit_target,
    available_run_actions,
    run_events,
    run_progress,
    run_runbook,
    run_status,
    runbook_section_html,
    runbook_sections,
    when,
)
from rotation.models import RotationPolicy, RotationRun, RunStep, format_period

logger = logging.getLogger(__name__)

S = RotationRun.State
RUN_TEMPLATE = "admin/rotation/rotationrun/run.html"

VIEW_PERMISSION = permissions.VIEW_RUN
APPROVE_PERMISSION = permissions.APPROVE_RUN
CANCEL_PERMISSION = permissions.CANCEL_RUN
TICK_PERMISSION = permissions.TICK_STEP
POLICY_CHANGE_PERMISSION = permissions.CHANGE_POLICY



# -- starting runs from the KEK page ------------------------------------------------


def _initiating_user(actor: Actor):
    return get_user_model().objects.filter(pk=actor.user_id).first() if actor.user_id else None


def start_from_console(kek: KeyEncryptionKey, data: dict, actor: Actor, *, kind: str) -> ActionOutcome:
    """The KEK page's Rotate now / Emergency rotate / Migrate: start a run and show its page."""
    run = services.start_run(
        kek=kek, actor=actor, user=_initiating_user(actor), kind=kind, reason=data.get("reason", ""),
        incident_ref=data.get("incident_ref", ""), destination=data.get("destination"),
    )
    if run.state == S.PENDING_APPROVAL:
        needed = run.policy.approvals_required if run.policy else 0
        message = (f"Started run #{run.pk} of {kek.name}; it waits for {needed} approval{'s' if needed != 1 else ''} "
                   "by someone other than you before it rotates.")
    else:
        message = f"Started run #{run.pk} of {kek.name}; a worker rotates the key and rewraps its data keys."
    gap = key_services.revocation_gap(kek) if kind == RotationRun.Kind.EMERGENCY else ""
    warning = f"This emergency run rotates and rewraps, but {gap}" if gap else ""
    return ActionOutcome(message, "rotation_rotationrun_change", (run.pk,), warning=warning)


@dataclass(frozen=True)
class KEKRotationPanel:
    """The rotation box on a KEK's page: its policy, NIST warnings, the active and recent runs."""

    template: ClassVar[str] = "rotation/kek_rotation_panel.html"
    policy: RotationPolicy
    period: str
    grace_period: str
    warnings: list[str]
    edit_url: str
    active_run: RotationRun | None
    recent_runs: list[RotationRun]
    runs_url: str


def kek_rotation_panel(kek: KeyEncryptionKey, *, user, admin_site_name: str = "admin") -> KEKRotationPanel | None:
    if not user.has_perm(permissions.VIEW_POLICY) and not user.has_perm(VIEW_PERMISSION):
        return None
    policy = services.ensure_policy(kek)
    runs = list(RotationRun.objects.filter(kek=kek).select_related("kek", "policy").prefetch_related("approvals")
                .order_by("-created_at")[:5]) if user.has_perm(VIEW_PERMISSION) else []
    for run in runs:
        run.status = run_status(run)  # the run page's badge and sentence, for the panel's table
    active = next((run for run in runs if run.is_active), None)
    edit_url = ""
    if user.has_perm(POLICY_CHANGE_PERMISSION):
        edit_url = reverse(f"{admin_site_name}:rotation_rotationpolicy_change", args=[policy.pk])
    runs_url = reverse(f"{admin_site_name}:rotation_rotationrun_changelist") + f"?kek__id__exact={kek.pk}"
    return KEKRotationPanel(
        policy=policy, period=format_period(policy.period), grace_period=format_period(policy.grace_period),
        warnings=policy.warnings(), edit_url=edit_url, active_run=active, recent_runs=runs,
        runs_url=runs_url if user.has_perm(VIEW_PERMISSION) else "",
    )


# -- the run page's data -----------------------------------------------------------


# -- views -------------------------------------------------------------------------


@dataclass(frozen=True)
class RunControl:
    slug: str
    title: str
    button: str
    explanation: str
    danger: bool


RUN_CONTROLS = {
    "cancel": RunControl("cancel", "Cancel rotation run", "Cancel run",
                         "The run stops before rotating (or after failing). Nothing is retired; a failed run's new "
                         "version stays enabled and primary.", True),
    "rollback": RunControl("rollback", "Roll back rotation run", "Roll back",
                           "The run stops before retirement and the previous version becomes primary again where the "
                           "provider supports it. Both versions stay enabled, so rewrapped data keys keep opening.",
                           True),
    "resume": RunControl("resume", "Resume rotation run", "Resume run",
                         "The failed run is queued again and continues from what is left in the database.", False),
}


class RotationRunViewsMixin:
    """The run page, its progress endpoint, approvals, manual steps and cancel / roll back / resume."""

    def get_urls(self):
        wrap = self.admin_site.admin_view
        info = "rotation_rotationrun"
        urls = [
            path("<path:object_id>/progress.json", wrap(self.progress_view), name=f"{info}_progress"),
            path("<path:object_id>/approve/", wrap(self.decide_view), name=f"{info}_approve"),
            path("<path:object_id>/steps/<str:key>/tick/", wrap(self.tick_step_view), name=f"{info}_tick"),
        ]
        urls += [
            path(f"<path:object_id>/{slug}/", wrap(self.control_view), {"control": slug}, name=f"{info}_{slug}")
            for slug in RUN_CONTROLS
        ]
        return urls + super().get_urls()

    def _get_run(self, request, object_id: str) -> RotationRun:
        try:
            pk = int(unquote(object_id))
        except ValueError:
            raise Http404("No rotation run with that id.") from None
        run = RotationRun.objects.select_related("kek", "destination_kek", "policy", "initiated_by").filter(pk=pk).first()
        if run is None:
            raise Http404("No rotation run with that id.")
        return run

    def _run_url(self, run: RotationRun) -> str:
        return reverse(f"{self.admin_site.name}:rotation_rotationrun_change", args=[run.pk])

    def _require(self, request, permission: str) -> None:
        if not request.user.has_perm(permission):
            raise PermissionDenied

    # the run page ------------------------------------------------------------------

    def change_view(self, request, object_id, form_url="", extra_context=None):
        self._require(request, VIEW_PERMISSION)
        if request.method != "GET" and request.method != "HEAD":
            raise PermissionDenied  # runs change only through their actions, never through a generic form
        run = self._get_run(request, object_id)
        user = request.user
        site = self.admin_site.name
        state_actions = available_run_actions(run)
        # Every control the user may use is on the page, hidden unless the state allows it: run.js
        # shows Roll back the moment the run can be rolled back, without a reload.
        controls = [
            {"label": control.button, "url": reverse(f"{site}:rotation_rotationrun_{slug}", args=[run.pk]),
             "slug": slug, "danger": control.danger}
            for slug, control in RUN_CONTROLS.items()
            if user.has_perm(CANCEL_PERMISSION) and run.state not in TERMINAL_STATES
        ]
        can_approve = user.has_perm(APPROVE_PERMISSION) and "approve" in state_actions
        decision_form = None
        if can_approve and not run.approvals.filter(approver=user).exists() and run.initiated_by_id != user.pk:
            decision_form = DecisionForm(allow_break_glass=services.is_break_glass(user))
        kek_url = reverse(f"{site}:keyvault_keyencryptionkey_change", args=[run.kek_id]) if run.kek_id else ""
        audit_url = ""
        target = _audit_target(run)
        if target and user.has_perm("keyvault.view_auditevent"):
            audit_url = reverse(f"{site}:keyvault_auditevent_changelist") + f"?target_type={target[0]}&target_id={target[1]}"
        runbook = run_runbook(run)
        events = list(run_events(run).order_by("-sequence")[:RUN_EVENTS_SHOWN]) if user.has_perm(
            "keyvault.view_auditevent") else []
        context = {
            **self.admin_site.each_context(request),
            "title": f"Rotation run #{run.pk}",
            "subtitle": run.target_label,
            "opts": self.opts,
            "original": run,
            "run": run,
            "progress": run_progress(run),
            "progress_url": reverse(f"{site}:rotation_rotationrun_progress", args=[run.pk]),
            "kek_url": kek_url,
            "audit_url": audit_url,
            "status": run_status(run),
            "created_label": when(run.created_at),
            "decision_form": decision_form,
            "decide_url": reverse(f"{site}:rotation_rotationrun_approve", args=[run.pk]),
            "is_initiator": run.initiated_by_id == user.pk,
            "controls": controls,
            "runbook_sections": runbook_sections(run, runbook),
            "tick_form": TickStepForm() if user.has_perm(TICK_PERMISSION) else None,
            "events": events,
            "runbook": runbook,
            "runbook_intro": runbooks.render_markdown(runbook.intro) if runbook and runbook.intro else "",
            "rate_limits_url": reverse(f"{site}:rotation_providerratelimit_changelist")
            if user.has_perm("rotation.view_providerratelimit") else "",
            **(extra_context or {}),
        }
        request.current_app = site
        return TemplateResponse(request, RUN_TEMPLATE, context)

    def progress_view(self, request, object_id: str):
        self._require(request, VIEW_PERMISSION)
        run = self._get_run(request, object_id)
        return JsonResponse(run_progress(run))

    # actions -----------------------------------------------------------------------

    def _render_action(self, request, run: RotationRun, *, action: str, title: str, form, intro: str,
                       submit_label: str, danger: bool = False, runbook=None, runbook_html: str = "",
                       unavailable: str = ""):
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "subtitle": str(run),
            "opts": self.opts,
            "original": run,
            "form": form,
            "adminform": helpers.AdminForm(form, [(None, {"fields": list(form.fields)})], {}),
            "media": self.media + form.media,
            "action": action,
            "intro": intro,
            "submit_label": submit_label,
            "danger": danger,
            "cancel_url": self._run_url(run),
            "runbook": runbook,
            "runbook_html": runbook_html,
            "unavailable": unavailable,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, ACTION_TEMPLATE, context)

    @method_decorator(sensitive_post_parameters())
    def decide_view(self, request, object_id: str):
        self._require(request, APPROVE_PERMISSION)
        run = self._get_run(request, object_id)
        allow_break_glass = services.is_break_glass(request.user)
        if request.method == "POST":
            form = DecisionForm(request.POST, allow_break_glass=allow_break_glass)
            if form.is_valid():
                data = form.cleaned_data
                try:
                    run = services.decide(run, user=request.user, actor=Actor.from_request(request),
                                          comment=data["comment"], decision=data["decision"],
                                          break_glass=data.get("break_glass", False))
                except SERVICE_ERRORS as exc:
                    logger.warning("console: decision on run #%s refused: %s", run.pk, type(exc).__name__)
                    form.add_error(None, service_error_message(exc))
                else:
                    run.refresh_from_db()
                    messages.success(request, f"Recorded your decision on run #{run.pk}; it is now "
                                              f"{S(run.state).label.lower()}.")
                    return HttpResponseRedirect(self._run_url(run))
        else:
            form = DecisionForm(allow_break_glass=allow_break_glass)
        unavailable = "" if run.state == S.PENDING_APPROVAL else (
            f"Run #{run.pk} is {S(run.state).label.lower()}; it is not waiting for approval.")
        return self._render_action(
            request, run, action="approve-run", title=f"Approve or reject run #{run.pk}", form=form,
            intro=(f"{run} was started by {run.initiator}"
                   f"{' because: ' + run.reason if run.reason else ''}. The initiator never approves their own run."),
            submit_label="Record decision", runbook=runbook_for("approve-run"), unavailable=unavailable,
        )

    @method_decorator(sensitive_post_parameters())
    def control_view(self, request, object_id: str, control: str):
        spec = RUN_CONTROLS[control]
        self._require(request, CANCEL_PERMISSION)
        run = self._get_run(request, object_id)
        perform = {"cancel": services.cancel, "rollback": services.rollback}.get(control)
        if request.method == "POST":
            form = RunControlForm(request.POST)
            if form.is_valid():
                actor = Actor.from_request(request)
                try:
                    if perform is not None:
                        run = perform(run, actor=actor, reason=form.cleaned_data["reason"])
                    else:
                        run = services.resume(run, actor=actor)
                except SERVICE_ERRORS as exc:
                    logger.warning("console: %s of run #%s refused: %s", control, run.pk, type(exc).__name__)
                    form.add_error(None, service_error_message(exc))
                else:
                    messages.success(request, f"Run #{run.pk} is now {S(run.state).label.lower()}.")
                    return HttpResponseRedirect(self._run_url(run))
        else:
            form = RunControlForm()
        done = {"cancel": "cancelled", "rollback": "rolled back", "resume": "resumed"}[control]
        unavailable = "" if control in available_run_actions(run) else (
            f"Run #{run.pk} is {S(run.state).label.lower()}; it cannot be {done} now.")
        return self._render_action(
            request, run, action=f"{control}-run", title=f"{spec.title} #{run.pk}", form=form,
            intro=spec.explanation, submit_label=spec.button, danger=spec.danger,
            runbook_html=runbook_section_html(run_runbook(run), "rollback"), unavailable=unavailable,
        )

    @method_decorator(sensitive_post_parameters())
    def tick_step_view(self, request, object_id: str, key: str):
        self._require(request, TICK_PERMISSION)
        run = self._get_run(request, object_id)
        step = get_object_or_404(RunStep, run=run, key=key)
        if request.method == "POST":
            form = TickStepForm(request.POST)
            if form.is_valid():
                try:
                    services.tick_manual_step(run, key, actor=Actor.from_request(request),
                                              evidence=form.cleaned_data["evidence"])
                except SERVICE_ERRORS as exc:
                    logger.warning("console: tick of %s on run #%s refused: %s", key, run.pk, type(exc).__name__)
                    form.add_error(None, service_error_message(exc))
                else:
                    messages.success(request, f"Marked “{step.title}” done.")
                    return HttpResponseRedirect(self._run_url(run) + f"#step-{key}")
        else:
            form = TickStepForm()
        unavailable = "This step is ticked by the rotation engine, not by hand." if step.automatic else ""
        return self._render_action(
            request, run, action="tick-step", title=f"Mark step done on run #{run.pk}", form=form,
            intro=step.title, submit_label="Mark done", runbook=run_runbook(run), unavailable=unavailable,
        )
