"""Second factors: a console user's TOTP authenticator, its secret envelope-encrypted at rest.

Its own module because its field reaches the key models through the envelope
layer (``keyvault.keys.fields`` → ``keyvault.keys.envelopes`` → ``keyvault.models.core``):
kept beside the key models, ``keyvault.models`` would import itself in a cycle.
"""

from __future__ import annotations

import time
from base64 import b32encode
from datetime import timedelta
from urllib.parse import quote, urlencode

from django.conf import settings
from django.db import models
from django.utils import timezone
from django_otp.models import Device, ThrottlingMixin, TimestampMixin, VerifyNotAllowed
from django_otp.oath import TOTP
from django_otp.util import random_hex

from keyvault.keys.fields import EncryptedTextField


#: Failures a device absorbs before it backs off (``OTP_DEVICE_GRACE_FAILURES``): the per-address budget.
DEVICE_GRACE_FAILURES = 10
#: The longest a device backs off after one more failure (``OTP_DEVICE_MAX_BACKOFF_SECONDS``).
DEVICE_MAX_BACKOFF_SECONDS = 60


def new_totp_key() -> str:
    """A fresh TOTP secret: 20 random bytes, hex (django-otp's default)."""
    return random_hex(20)


class TOTPDevice(TimestampMixin, ThrottlingMixin, Device):
    """A TOTP authenticator of a console user, its secret envelope-encrypted at rest.

    django-otp's own ``TOTPDevice`` keeps the secret as hex in a plain column, and a
    concrete model's field cannot be swapped in a subclass; so this model has the
    same fields with the secret in an :class:`~keyvault.keys.fields.EncryptedTextField`
    (context ``{model: keyvault.totpdevice, field: key}``) and the same verification
    (django-otp's ``TOTPDevice.verify_token`` and ``config_url``, on its ``TOTP``
    class). django-otp's TOTP app is not installed, so this is the only TOTP device
    class django-otp finds (``OTPMiddleware``, ``match_token``, persistent ids
    ``keyvault.totpdevice/<pk>``).

    Throttling differs on purpose (:meth:`verify_is_allowed`): the first
    ``OTP_DEVICE_GRACE_FAILURES`` failures cost the device nothing, because the
    per-session and per-address budgets in :mod:`keyvault.console.otp` stop a single
    attacker well before that; only failures beyond it (many sessions from many
    addresses) back off the device itself.
    """

    key = EncryptedTextField(
        "secret", default=new_totp_key, editable=False,
        help_text="Hex TOTP secret, envelope-encrypted; shown once, at enrolment.",
    )
    step = models.PositiveSmallIntegerField("time step (s)", default=30, help_text="The time step in seconds.")
    t0 = models.BigIntegerField("t0", default=0, help_text="The Unix time at which to begin counting steps.")
    digits = models.PositiveSmallIntegerField(
        "digits", choices=[(6, 6), (8, 8)], default=6, help_text="The number of digits to expect in a token.")
    tolerance = models.PositiveSmallIntegerField(
        "tolerance", default=1, help_text="The number of time steps in the past or future to allow.")
    drift = models.SmallIntegerField(
        "drift", default=0, help_text="The number of time steps the prover is known to deviate from our clock.")
    last_t = models.BigIntegerField(
        "last time step", default=-1, help_text="The time step of the latest verified token; the next must be later.")

    class Meta(Device.Meta):
        """Listed and deleted by superusers (a lost phone); made only by enrolling."""

        verbose_name = "TOTP device"
        verbose_name_plural = "TOTP devices"
        default_permissions = ("view", "delete")

    @property
    def bin_key(self) -> bytes:
        return bytes.fromhex(self.key)

    def verify_token(self, token) -> bool:
        """django-otp's TOTP check: within ``tolerance`` steps, never a step already used; throttled."""
        allowed, _ = self.verify_is_allowed()
        if not allowed:
            return False
        try:
            token = int(token)
        except (TypeError, ValueError):
            verified = False
        else:
            totp = TOTP(self.bin_key, self.step, self.t0, self.digits, self.drift)
            totp.time = time.time()
            verified = totp.verify(token, self.tolerance, self.last_t + 1)
            if verified:
                self.last_t = totp.t()
                if getattr(settings, "OTP_TOTP_SYNC", True):
                    self.drift = totp.drift
                self.throttle_reset(commit=False)
                self.set_last_used_timestamp(commit=False)
                self.save(update_fields=["last_t", "drift", "throttling_failure_count",
                                         "throttling_failure_timestamp", "last_used_at"])
        if not verified:
            self.throttle_increment(commit=False)
            self.save(update_fields=["throttling_failure_count", "throttling_failure_timestamp"])
        return verified

    def get_throttle_factor(self) -> int:
        return getattr(settings, "OTP_TOTP_THROTTLE_FACTOR", 1)

    @property
    def config_url(self) -> str:
        """The ``otpauth://`` URI an authenticator app reads (Google's Key-Uri-Format)."""
        label = str(self.user.get_username())
        query = urlencode({"secret": b32encode(self.bin_key), "algorithm": "SHA1", "digits": self.digits,
                           "period": self.step})
        issuer = getattr(settings, "OTP_TOTP_ISSUER", "")
        if isinstance(issuer, str) and issuer:
            issuer = issuer.replace(":", "")
            label = f"{issuer}:{label}"
            query += f"&issuer={quote(issuer)}"
        return f"otpauth://totp/{quote(label)}?{query}"

    def verify_is_allowed(self):
        """Past the grace failures, back off 1, 2, 4 … seconds, but never longer than a minute.

        django-otp doubles the delay without limit, so an attacker who keeps adding
        failures from new addresses (or from one, every time its budget refills)
        could keep the owner out for good. Capped, the device stays slow for guessing
        (at most one code a minute: about 0.4% a day for a 6-digit code) and its owner
        gets in within a minute of the attacker's last try.
        """
        grace = getattr(settings, "OTP_DEVICE_GRACE_FAILURES", DEVICE_GRACE_FAILURES)
        failures = self.throttling_failure_count - grace
        if failures <= 0 or self.throttling_failure_timestamp is None:
            return Device.verify_is_allowed(self)
        longest = getattr(settings, "OTP_DEVICE_MAX_BACKOFF_SECONDS", DEVICE_MAX_BACKOFF_SECONDS)
        delay = min(self.get_throttle_factor() * 2 ** min(failures - 1, 32), longest)
        locked_until = self.throttling_failure_timestamp + timedelta(seconds=delay)
        if timezone.now() < locked_until:
            return False, {"reason": VerifyNotAllowed.N_FAILED_ATTEMPTS,
                           "failure_count": self.throttling_failure_count, "locked_until": locked_until}
        return Device.verify_is_allowed(self)
