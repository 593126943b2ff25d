"""Two-factor login for the console: TOTP devices from django-otp.

With ``REQUIRE_2FA`` (default: on when ``HMD_DEBUG=false``) a password alone
reaches nothing but the login, enrolment, token and logout pages (and the
health endpoint; ``/metrics`` answers a bearer token without a session, or a
session that passed both factors):

1. the user signs in with a password on the admin login page;
2. :class:`RequireOTPMiddleware` sends a user without a confirmed device to
   :func:`enrol_view` (otpauth URI and a QR code rendered here as SVG; the
   secret is shown only while the device is unconfirmed) and a user with one to
   :func:`verify_view`;
3. a correct token marks the session verified (``django_otp.login``); every new
   login asks again.

Passing the second factor cycles the session id, so an id seen before the code
was entered (a fixated or sniffed cookie) is worth nothing afterwards.

The TOTP secret lives in :class:`keyvault.models.TOTPDevice`, envelope-encrypted
(django-otp's own table held it in clear). It is shown once, during enrolment, and
never again: the device admin below omits it and the enrolment page refuses a
user who already has a confirmed device. Losing a phone means a superuser
deletes the device (console, or ``manage.py otp reset-device USER``), and the user
enrols again. Every device change is audited (:mod:`keyvault.access.accounts`).

Wrong codes are counted three ways, so that someone who has only a password
cannot lock the owner out:

* per session: ``OTP_SESSION_ATTEMPTS`` (5) wrong codes, then this session gets no
  more tries (sign in again);
* per client address: ``OTP_ADDRESS_ATTEMPTS`` (10) wrong codes per
  ``OTP_ADDRESS_WINDOW_SECONDS`` (900), counted in the shared cache;
* per device: django-otp's exponential back-off, but only after
  ``OTP_DEVICE_GRACE_FAILURES`` (10) failures, more than one address may make.

A refused attempt never reaches the device. If a device is backed off anyway (an
attacker with many addresses), an administrator clears it: the TOTP device admin's
"Reset throttling" action or ``manage.py otp reset-throttle USER``, both audited.
"""

from __future__ import annotations

import time
from urllib.parse import urlencode

import segno
from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.http import HttpResponseRedirect
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import Resolver404, resolve, reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.safestring import mark_safe
from django.views.decorators.cache import never_cache
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_http_methods
from django_otp import login as otp_login
from django_otp import user_has_device

from keyvault.access import accounts
from keyvault.access.security import audit_otp_failure, client_ip
from keyvault.audit import Actor
from keyvault.models import TOTPDevice

#: Views a password-only session may reach (URL names; the admin's under ``admin:``).
#: ``/metrics`` is not one: a scraper's bearer token needs no session, and a session needs both factors.
EXEMPT_VIEWS = frozenset({"admin:login", "admin:logout", "otp-enrol", "otp-verify", "healthz"})

SESSION_ATTEMPTS = 5
ADDRESS_ATTEMPTS = 10
ADDRESS_WINDOW_SECONDS = 900
#: Wrong codes made in this session (kept in the session itself).
SESSION_FAILURES_KEY = "_keyvault_otp_failures"


def _is_exempt(request) -> bool:
    if request.path_info.startswith("/" + settings.STATIC_URL.lstrip("/")):
        return True
    try:
        return resolve(request.path_info).view_name in EXEMPT_VIEWS
    except Resolver404:
        return False


class RequireOTPMiddleware:
    """Send signed-in users who have not passed the second factor to enrol or verify."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        user = getattr(request, "user", None)
        if (
            settings.REQUIRE_2FA
            and user is not None
            and user.is_authenticated
            and not user.is_verified()
            and not _is_exempt(request)
        ):
            target = "otp-verify" if user_has_device(user, confirmed=True) else "otp-enrol"
            return HttpResponseRedirect(f"{reverse(target)}?{urlencode({'next': request.get_full_path()})}")
        return self.get_response(request)


class TokenForm(forms.Form):
    token = forms.CharField(
        label="Code from your authenticator app",
        max_length=8,
        min_length=6,
        strip=True,
        widget=forms.TextInput(attrs={"autocomplete": "one-time-code", "inputmode": "numeric", "autofocus": True}),
    )

    def clean_token(self) -> str:
        token = self.cleaned_data["token"]
        if not token.isascii() or not token.isdigit():
            raise ValidationError("Enter the 6-digit code your authenticator app shows.")
        return token


def _next_url(request) -> str:
    candidate = request.POST.get("next") or request.GET.get("next") or ""
    if url_has_allowed_host_and_scheme(candidate, allowed_hosts={request.get_host()},
                                       require_https=request.is_secure()):
        return candidate
    return reverse("admin:index")


def _context(request, **extra) -> dict:
    return {
        **admin.site.each_context(request),
        "is_nav_sidebar_enabled": False,
        "available_apps": [],
        "next": _next_url(request),
        "enforced": settings.REQUIRE_2FA,  # what the middleware does, not what production would do
        "debug": settings.DEBUG,
        **extra,
    }


def qr_svg(uri: str) -> str:
    """The otpauth URI as an inline SVG QR code (no script, no external image)."""
    return segno.make(uri, error="m").svg_inline(scale=4, dark="#000", light="#fff", omitsize=False)


# -- attempt budgets: per session and per address, before the device is asked ----------------


def _limit(name: str, default: int) -> int:
    return int(getattr(settings, name, default))


def _address_key(request) -> str:
    window = int(time.time()) // _limit("OTP_ADDRESS_WINDOW_SECONDS", ADDRESS_WINDOW_SECONDS)
    return f"keyvault:otp:address:{client_ip(request) or 'unknown'}:{window}"


def attempts_left(request) -> bool:
    """Whether this session and this client address may still try a code."""
    if request.session.get(SESSION_FAILURES_KEY, 0) >= _limit("OTP_SESSION_ATTEMPTS", SESSION_ATTEMPTS):
        return False
    return (cache.get(_address_key(request)) or 0) < _limit("OTP_ADDRESS_ATTEMPTS", ADDRESS_ATTEMPTS)


def count_failure(request) -> None:
    request.session[SESSION_FAILURES_KEY] = request.session.get(SESSION_FAILURES_KEY, 0) + 1
    key = _address_key(request)
    cache.add(key, 0, timeout=_limit("OTP_ADDRESS_WINDOW_SECONDS", ADDRESS_WINDOW_SECONDS) * 2)
    try:
        cache.incr(key)
    except ValueError:  # evicted between add and incr
        cache.set(key, 1, timeout=_limit("OTP_ADDRESS_WINDOW_SECONDS", ADDRESS_WINDOW_SECONDS) * 2)


def _second_factor_passed(request, device: TOTPDevice) -> None:
    otp_login(request, device)
    request.session.pop(SESSION_FAILURES_KEY, None)
    # A new session id once both factors are in: an id known before (fixated, sniffed) is now worthless.
    request.session.cycle_key()


TOO_MANY = "Too many wrong codes from this session or address. Sign in again later, or ask an administrator."


def _login_required(view):
    def wrapped(request, *args, **kwargs):
        if not request.user.is_authenticated:
            return redirect(f"{reverse('admin:login')}?{urlencode({'next': request.get_full_path()})}")
        return view(request, *args, **kwargs)

    wrapped.__name__ = view.__name__
    wrapped.__doc__ = view.__doc__
    return wrapped


@sensitive_post_parameters("token")
@never_cache
@require_http_methods(["GET", "POST"])
@_login_required
def enrol_view(request):
    """Show a new TOTP secret (URI + QR code) and confirm it with a first token."""
    user = request.user
    if user_has_device(user, confirmed=True):
        return redirect(f"{reverse('otp-verify')}?{urlencode({'next': _next_url(request)})}")
    device = accounts.pending_device(user, actor=Actor.from_request(request))
    form = TokenForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        if not attempts_left(request):
            audit_otp_failure(request, reason="attempt budget spent")
            form.add_error("token", TOO_MANY)
        elif device.verify_token(form.cleaned_data["token"]):
            accounts.confirm_device(device, actor=Actor.from_request(request))
            _second_factor_passed(request, device)
            return HttpResponseRedirect(_next_url(request))
        else:
            count_failure(request)
            audit_otp_failure(request, reason="enrolment token rejected")
            form.add_error("token", "That code is not valid. Check the time on your phone and try the current code.")
    uri = device.config_url
    return TemplateResponse(request, "keyvault/otp/enrol.html", _context(
        request, title="Set up two-factor login", form=form, otpauth_uri=uri, qr_code=mark_safe(qr_svg(uri)),
    ))


@sensitive_post_parameters("token")
@never_cache
@require_http_methods(["GET", "POST"])
@_login_required
def verify_view(request):
    """Ask for the current TOTP code of the user's confirmed device."""
    user = request.user
    if user.is_verified():
        return HttpResponseRedirect(_next_url(request))
    devices = list(TOTPDevice.objects.filter(user=user, confirmed=True))
    if not devices:
        return redirect(f"{reverse('otp-enrol')}?{urlencode({'next': _next_url(request)})}")
    form = TokenForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        if not attempts_left(request):
            audit_otp_failure(request, reason="attempt budget spent")
            form.add_error("token", TOO_MANY)
        else:
            for device in devices:
                allowed, _ = device.verify_is_allowed()
                if allowed and device.verify_token(form.cleaned_data["token"]):
                    _second_factor_passed(request, device)
                    return HttpResponseRedirect(_next_url(request))
            count_failure(request)
            audit_otp_failure(request, reason="token rejected")
            form.add_error("token", "That code is not valid (or too many attempts: wait a little and retry).")
    return TemplateResponse(request, "keyvault/otp/verify.html", _context(
        request, title="Two-factor login", form=form,
    ))


# -- the device admin, without the secret -----------------------------------------------


class TOTPDeviceAdmin(admin.ModelAdmin):
    """Superusers list and delete devices (a lost phone) and reset throttling; the secret is never shown."""

    list_display = ("user", "name", "confirmed", "throttling_failure_count", "created_at", "last_used_at")
    fields = ("user", "name", "confirmed", "throttling_failure_count", "throttling_failure_timestamp",
              "created_at", "last_used_at")
    readonly_fields = fields
    list_filter = ("confirmed",)
    search_fields = ("user__username",)
    list_select_related = ("user",)
    actions = ("reset_throttle",)

    def get_queryset(self, request):
        return super().get_queryset(request).defer("key")  # a list of devices decrypts no secret

    def has_view_permission(self, request, obj=None) -> bool:
        return request.user.is_superuser  # no role holds device permissions (keyvault.access.roles)

    def has_module_permission(self, request) -> bool:
        return request.user.is_superuser

    def has_add_permission(self, request) -> bool:
        return False  # devices are made by enrolling, where the user sees the secret once

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return request.user.is_superuser

    def has_reset_throttle_permission(self, request) -> bool:
        return request.user.is_superuser

    @admin.action(description="Reset throttling (after repeated wrong codes)", permissions=["reset_throttle"])
    def reset_throttle(self, request, queryset):
        actor = Actor.from_request(request)
        users = {device.user for device in queryset.select_related("user")}
        reset = sum(accounts.reset_throttle(user, actor=actor) for user in users)
        self.message_user(request, f"Throttling reset on {reset} device(s).", messages.SUCCESS)

    def delete_model(self, request, obj) -> None:
        accounts.delete_device(obj, actor=Actor.from_request(request))

    def delete_queryset(self, request, queryset) -> None:
        actor = Actor.from_request(request)
        for device in queryset.select_related("user"):
            accounts.delete_device(device, actor=actor)


def register_device_admin(site=admin.site) -> None:
    """Register the device admin (django-otp's TOTP app, whose admin shows the key, is not installed)."""
    if not site.is_registered(TOTPDevice):
        site.register(TOTPDevice, TOTPDeviceAdmin)
