"""Two-factor login for the console: TOTP devices from django-otp.

With ``REQUIRE_2FA`` (default: on when ``HMD_DEBUG=false``) a password alone
reaches nothing but the login, enrolment, token and logout pages (and the
health and metrics endpoints, which have their own access rules):

1. the user signs in with a password on the admin login page;
2. :class:`RequireOTPMiddleware` sends a user without a confirmed device to
   :func:`enrol_view` (otpauth URI and a QR code rendered here as SVG; the
   secret is shown only while the device is unconfirmed) and a user with one to
   :func:`verify_view`;
3. a correct token marks the session verified (``django_otp.login``); every new
   login asks again.

The TOTP secret lives in django-otp's ``TOTPDevice.key`` (hex, not encrypted at
rest: django-otp has no hook for it). It is shown once, during enrolment, and
never again: the device admin below omits it and the enrolment page refuses a
user who already has a confirmed device. Losing a phone means a superuser
deletes the device, and the user enrols again.
"""

from __future__ import annotations

from urllib.parse import urlencode

import segno
from django import forms
from django.conf import settings
from django.contrib import admin
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
from django_otp.plugins.otp_totp.models import TOTPDevice

from keyvault import audit
from keyvault.audit import Action, Actor
from keyvault.security import audit_otp_failure

#: Views a password-only session may reach (URL names; the admin's under ``admin:``).
EXEMPT_VIEWS = frozenset({"admin:login", "admin:logout", "otp-enrol", "otp-verify", "healthz", "metrics"})
DEVICE_NAME = "console"


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
        **extra,
    }


def qr_svg(uri: str) -> str:
    """The otpauth URI as an inline SVG QR code (no script, no external image)."""
    return segno.make(uri, error="m").svg_inline(scale=4, dark="#000", light="#fff", omitsize=False)


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
    device = TOTPDevice.objects.filter(user=user, confirmed=False).order_by("pk").first()
    if device is None:
        device = TOTPDevice.objects.create(user=user, name=DEVICE_NAME, confirmed=False)
    form = TokenForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        if device.verify_token(form.cleaned_data["token"]):
            device.confirmed = True
            device.save(update_fields=["confirmed"])
            otp_login(request, device)
            audit.record(Action.OTHER, actor=Actor.from_request(request), target=("user", user.get_username()),
                         details={"event": "2fa.enrolled", "device": "totp"})
            return redirect(_next_url(request))
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
        return redirect(_next_url(request))
    devices = list(TOTPDevice.objects.filter(user=user, confirmed=True))
    if not devices:
        return redirect(f"{reverse('otp-enrol')}?{urlencode({'next': _next_url(request)})}")
    form = TokenForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        for device in devices:
            allowed, _ = device.verify_is_allowed()
            if allowed and device.verify_token(form.cleaned_data["token"]):
                otp_login(request, device)
                return redirect(_next_url(request))
        audit_otp_failure(request, reason="token rejected")
        form.add_error("token", "That code is not valid (or too many attempts: wait a little and retry).")
    return TemplateResponse(request, "keyvault/otp/verify.html", _context(
        request, title="Two-factor login", form=form,
    ))


# -- the device admin, without the secret -----------------------------------------------


class TOTPDeviceAdmin(admin.ModelAdmin):
    """Superusers list and delete devices (a lost phone); the secret is never shown."""

    list_display = ("user", "name", "confirmed", "created_at", "last_used_at")
    fields = ("user", "name", "confirmed", "created_at", "last_used_at")
    readonly_fields = fields
    search_fields = ("user__username",)

    def has_add_permission(self, request) -> bool:
        return False  # devices are made by enrolling, where the user sees the secret once

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return request.user.is_superuser


def register_device_admin(site=admin.site) -> None:
    """Replace django-otp's device admin (which shows and QR-encodes the key) with ours."""
    if site.is_registered(TOTPDevice):
        site.unregister(TOTPDevice)
    site.register(TOTPDevice, TOTPDeviceAdmin)
