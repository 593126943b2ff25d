"""Cookie-signing keys: a JSON keyring rotated the way Django's SECRET_KEY_FALLBACKS work.

Rotation puts a new 256-bit key first and keeps the old one as a verification-only
fallback for the grace period (the policy's grace = the longest session or signed
token lifetime, ``SESSION_COOKIE_AGE`` by default); retirement then removes it, and
everything signed with it stops verifying. Keyvault's own console reads its
``SECRET_KEY`` from such a keyring when ``HMD_SECRET_KEY_KEYRING(_FILE)`` is set.

Config (:attr:`CookieSigningExecutor.schema`): none required. ``format``: ``django``
(default) or ``json`` (same document, for other applications).
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings

from keyvault.secrets import keyring
from rotation.executors.base import Context, Executor, ExecutorError, VerificationFailed, fingerprint
from rotation.executors.schema import CHOICE, ConfigSchema, Field


class CookieSigningExecutor(Executor):
    rotation_period = timedelta(days=90)
    schema = ConfigSchema((
        Field("format", CHOICE, "who reads the keyring: Django (SECRET_KEY + SECRET_KEY_FALLBACKS) or any "
              "application (the same JSON document)", default="django", choices=("django", "json")),
    ))

    def policy_defaults(self) -> dict:
        """Grace: the longest session lifetime (``SESSION_COOKIE_AGE``), so no signed-in user is logged out."""
        return {**super().policy_defaults(), "grace_period": timedelta(seconds=getattr(settings, "SESSION_COOKIE_AGE", 1209600))}

    def precheck(self, ctx: Context) -> None:
        current = ctx.read()
        try:
            key, previous = keyring.parse(current.value)
        except keyring.KeyringError as exc:
            raise ExecutorError(f"secret {ctx.secret.name}: {exc}") from None
        ctx.state["previous_version"] = current.version
        ctx.tick("precheck.source", f"keyring version {current.version} read: current {fingerprint(key)}, "
                                    f"{len(previous)} previous key(s)")

    def rotate(self, ctx: Context) -> None:
        if ctx.state.get("new_version"):
            return
        current = ctx.read(version=ctx.state["previous_version"])
        document, new, demoted = keyring.rotated(current.value)
        written = ctx.write(document)
        ctx.state.update(new_version=written.version, new_key=fingerprint(new), demoted=[fingerprint(demoted)])
        ctx.tick("rotate.generate", f"new 256-bit key {fingerprint(new)}")
        ctx.tick("rotate.install", f"keyring version {written.version}: {fingerprint(new)} signs, "
                                   f"{fingerprint(demoted)} only verifies")

    def verify(self, ctx: Context) -> None:
        from django.core import signing

        current = ctx.read()
        key, previous = keyring.parse(current.value)
        if fingerprint(key) != ctx.state["new_key"]:
            raise VerificationFailed("the source does not hold the new key as current")
        token = signing.dumps({"probe": ctx.run.pk}, key=key, salt="keyvault.rotation.verify")
        old_signed = None
        if previous:
            old_signed = signing.dumps({"probe": ctx.run.pk}, key=previous[0], salt="keyvault.rotation.verify")
        try:
            signing.loads(token, key=key, fallback_keys=previous, salt="keyvault.rotation.verify")
            if old_signed:
                signing.loads(old_signed, key=key, fallback_keys=previous, salt="keyvault.rotation.verify")
        except signing.BadSignature:
            raise VerificationFailed("a value signed with the keyring did not verify") from None
        ctx.tick("verify.sign", f"signed with {fingerprint(key)} and verified; a value signed with the previous key "
                                "still verifies through the fallbacks")

    def retire(self, ctx: Context) -> None:
        current = ctx.read()
        key, previous = keyring.parse(current.value)
        retired = {k for k in previous if fingerprint(k) in set(ctx.state.get("demoted", []))}
        document, removed = keyring.without(current.value, retired)
        if removed:
            written = ctx.write(document)
            ctx.state["retired_version"] = written.version
        ctx.tick("retire", f"removed {removed} fallback key(s) ({', '.join(ctx.state.get('demoted', []))}); "
                           f"values signed with them no longer verify")
